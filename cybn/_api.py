"""cybn's functional API: argument checks, allocation, dispatch to the kernels.

This module is the only place that raises for bad input, and it raises before
anything is written: when an error comes out of a function here, no output
buffer and no running statistic has been touched.
"""
import math
import numbers
import os
import sys
import warnings

import numpy as np

from . import _kernels

__all__ = [
    "forward_train", "forward_eval", "backward",
    "batch_moments", "combine_moments", "normalize", "grad_sums", "grad_input",
    "fold_batch_norm",
]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _specialized(name):
    fused = getattr(_kernels, name)
    return {np.dtype(np.float32): fused["float"], np.dtype(np.float64): fused["double"]}


_KERNELS = {
    name: _specialized(name)
    for name in (
        "forward_train_planar", "forward_train_rows", "backward_planar", "backward_rows",
        "moments_planar", "moments_rows", "affine_planar", "affine_rows",
        "grad_sums_planar", "grad_sums_rows", "grad_input_planar", "grad_input_rows",
        "update_running",
    )
}


# ---------------------------------------------------------------------------
# Checks.  Each names the argument and says what was expected.

def _plain(a):
    """a as a plain ndarray view (same memory): subclasses such as np.memmap
    are computed on as the arrays they hold."""
    return a if type(a) is np.ndarray else a.view(np.ndarray)


def _check_data(a, name):
    """An (N, C, *spatial) float32/float64 ndarray; returns it as a plain ndarray."""
    if not isinstance(a, np.ndarray) or isinstance(a, (np.ma.MaskedArray, np.matrix)):
        what = type(a).__name__
        raise TypeError(f"{name} must be a NumPy ndarray, got {what}" + (
            " (use np.asarray)" if isinstance(a, np.matrix) else ""))
    if a.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {a.dtype}")
    if not 2 <= a.ndim <= 5:
        raise ValueError(
            f"{name} must have 2 to 5 dimensions, (N, C), (N, C, L), (N, C, H, W) or "
            f"(N, C, D, H, W); got shape {a.shape}")
    return _plain(a)


def _check_same(a, name, x):
    """a is data of x's dtype and shape (dy next to x); returns it as a plain ndarray."""
    a = _check_data(a, name)
    if a.dtype != x.dtype:
        raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {a.dtype}")
    if a.shape != x.shape:
        raise ValueError(f"{name} must have the shape of x {x.shape}, got {a.shape}")
    return a


def _check_out(out, x, name="out"):
    """None, or a writeable array of x's dtype and shape, returned as a plain ndarray."""
    if out is None:
        return None
    if not isinstance(out, np.ndarray) or isinstance(out, (np.ma.MaskedArray, np.matrix)):
        raise TypeError(f"{name} must be a NumPy ndarray or None, got {type(out).__name__}")
    if out.dtype != x.dtype:
        raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {out.dtype}")
    if out.shape != x.shape:
        raise ValueError(f"{name} must have the shape of x {x.shape}, got {out.shape}")
    if not out.flags.writeable:
        raise ValueError(f"{name} must be writeable")
    return _plain(out)


def _vector(v, n_channels, name, default=None):
    """A per-channel parameter as a fresh float64 array of shape (C,).

    Always a copy, so that an output buffer overlapping the caller's array
    cannot change the parameter while a kernel runs.
    """
    copy = _kernels.float64_copy(v, n_channels)  # the common case, quickly
    if copy is not None:
        return copy
    if v is None:
        if default is None:
            raise TypeError(f"{name} is required, got None")
        return np.full(n_channels, default, dtype=np.float64)
    a = np.asarray(v)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} must hold real numbers, got dtype {a.dtype}")
    if a.shape != (n_channels,):
        raise ValueError(
            f"{name} must have shape ({n_channels},), one value per channel of x, "
            f"got shape {a.shape}")
    return np.array(a, dtype=np.float64)


def _check_running(running_mean, running_var, x, n_channels):
    """The running statistics forward_train updates in place (any strides and
    alignment: _update_running goes through aligned copies where needed)."""
    if (running_mean is None) != (running_var is None):
        given, missing = (("running_mean", "running_var") if running_var is None
                          else ("running_var", "running_mean"))
        raise ValueError(f"{given} was given without {missing}: pass both or neither")
    if running_mean is None:
        return
    for name, a in (("running_mean", running_mean), ("running_var", running_var)):
        if not isinstance(a, np.ndarray) or isinstance(a, (np.ma.MaskedArray, np.matrix)):
            raise TypeError(f"{name} must be a NumPy ndarray, got {type(a).__name__}")
        if a.dtype != x.dtype:
            raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {a.dtype}")
        if a.shape != (n_channels,):
            raise ValueError(
                f"{name} must have shape ({n_channels},), one value per channel of x, "
                f"got shape {a.shape}")
        if not a.flags.writeable:
            raise ValueError(f"{name} must be writeable (it is updated in place)")
    if np.may_share_memory(running_mean, running_var):
        raise ValueError("running_mean and running_var must not share memory")


def _check_not_overlapping(out, others, name="out"):
    if out is None:
        return
    for other, a in others:
        if a is not None and np.shares_memory(out, a):
            raise ValueError(f"{name} must not share memory with {other}")


def _check_optional(a, name, x):
    """An optional operand of x's dtype and shape (residual, y), as a plain ndarray."""
    return None if a is None else _check_same(a, name, x)


def _axis(axis, ndim):
    """The channel axis as an index in [1, ndim)."""
    if type(axis) is int and 0 < axis < ndim:  # the common case, quickly
        return axis
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an integer, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for x with {ndim} dimensions")
    axis = int(axis) % ndim
    if axis == 0:
        raise ValueError("axis must be a channel axis, not 0 (the batch axis)")
    return axis


def _to_axis1(a, axis):
    """A view with the channel axis moved to 1, where the kernels expect it."""
    return a if a is None or axis == 1 else np.moveaxis(a, axis, 1)


def _result(out, result, axis):
    """What a function returns: `out` itself, or its new array in x's axis order."""
    if out is not None:
        return out
    return result if axis == 1 else np.moveaxis(result, 1, axis)


def _activation(activation):
    """True for a fused ReLU."""
    if activation is None:
        return False
    if isinstance(activation, str) and activation == "relu":
        return True
    raise ValueError(f"activation must be None or 'relu', got {activation!r}")


def _real(value, name, low, high):
    if type(value) is float and low <= value <= high:  # the common case, quickly
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not low <= value <= high:  # also refuses NaN
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def _eps(eps):
    return _real(eps, "eps", 0.0, np.finfo(np.float64).max)


def _momentum(momentum):
    return _real(momentum, "momentum", 0.0, 1.0)


def _values_per_channel(x, axis=1):
    return math.prod(x.shape) // x.shape[axis] if x.shape[axis] else 0


# ---------------------------------------------------------------------------
# Layouts.  The kernels read either "planar" (N, C, S) views with unit stride
# along S, or "rows" (R, C) views with unit stride along C; any other layout
# is copied to C order first.

def _kernel_view(a, layout):
    """a as the kernels' view for `layout`, sharing its memory; None if impossible."""
    n_channels = a.shape[1]
    if layout == "planar" and a.flags.c_contiguous and a.flags.aligned:  # the common case
        return a.reshape(a.shape[0], n_channels, -1)
    try:
        if layout == "planar":
            v = a.reshape(a.shape[0], n_channels, -1, copy=False)
            inner = v.strides[2] if v.shape[2] > 1 else a.itemsize
        else:
            v = np.moveaxis(a, 1, -1).reshape(-1, n_channels, copy=False)
            inner = v.strides[1] if n_channels > 1 else a.itemsize
    except ValueError:  # the merge of axes needs a copy
        return None
    if inner != a.itemsize or not a.flags.aligned:
        return None
    for extent, stride in zip(v.shape[:-1], v.strides[:-1]):
        if extent > 1 and (stride == 0 or stride % a.itemsize):
            return None
    return v


def _preferred_layouts(x):
    # With no spatial extent a channel is a strided column: vectorize across
    # channels instead.
    return ("rows", "planar") if math.prod(x.shape[2:]) == 1 else ("planar", "rows")


def _empty_like_layout(x, layout):
    if layout == "rows" and x.ndim > 2:  # channels-last memory, NC... shape
        return np.moveaxis(np.empty(x.shape[:1] + x.shape[2:] + x.shape[1:2], x.dtype), -1, 1)
    return np.empty(x.shape, x.dtype)


def _same_view(a, b):
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.strides == b.strides and a.shape == b.shape)


def _no_copies():
    pass


def _contiguous_plan(inputs, outputs):
    """_plan's result when every array is C-contiguous and no output overlaps
    an input other than as the same array (out=x); None otherwise.  The
    kernels take such arrays as they are, except that the rows layout needs
    (N, C, 1, ...) as (N, C)."""
    for a in inputs:
        if a is not None and not (a.flags.c_contiguous and a.flags.aligned):
            return None
    x = inputs[0]
    shape = x.shape
    layout = "rows" if len(shape) == 2 or math.prod(shape[2:]) == 1 else "planar"
    results = []
    for target, allocate in outputs:
        if target is None:
            target = np.empty(shape, x.dtype) if allocate else None
        else:
            if not (target.flags.c_contiguous and target.flags.aligned):
                return None
            for a in inputs:
                if a is not None and a is not target and _kernels.may_overlap(target, a):
                    return None
        results.append(target)
    if layout == "planar" or len(shape) == 2:
        return layout, inputs, results, results, _no_copies
    views = [None if a is None else a.reshape(-1, shape[1]) for a in inputs]
    out_views = [None if a is None else a.reshape(-1, shape[1]) for a in results]
    return layout, views, out_views, results, _no_copies


def _plan(inputs, outputs):
    """Views for one kernel call.

    inputs: arrays of one shape, x first; None for an absent optional input.
    outputs: (target, allocate) pairs: the caller's array or None, and
    whether to allocate one when it is None.  Returns (layout, input views,
    output views, results, finish): the kernel writes the output views, then
    finish() moves values to a target the kernel could not write directly (a
    layout the kernels cannot read, or a partial overlap with an input).
    """
    plan = _contiguous_plan(inputs, outputs)
    if plan is not None:
        return plan
    x = inputs[0]
    for layout in _preferred_layouts(x):
        views = [None if a is None else _kernel_view(a, layout) for a in inputs]
        if all(v is not None for v, a in zip(views, inputs) if a is not None):
            break
    else:
        layout = _preferred_layouts(x)[0]
        # A copy for each input the kernels cannot read as it is; np.array,
        # not np.ascontiguousarray, which returns a misaligned C-order array
        # as it is.
        views = [None if a is None else _kernel_view(a, layout) for a in inputs]
        views = [_kernel_view(np.array(a, order="C"), layout) if v is None and a is not None
                 else v for v, a in zip(views, inputs)]
    present = [v for v in views if v is not None]

    out_views, results, copies = [], [], []
    for target, allocate in outputs:
        if target is not None:
            view = _kernel_view(target, layout)
            # Element-wise kernels may write over an input read at the same
            # index (out=x, out=dy), but not over any other part of it.
            if view is not None and all(not np.may_share_memory(view, v) or _same_view(view, v)
                                        for v in present):
                out_views.append(view)
                results.append(target)
                continue
        elif not allocate:
            out_views.append(None)
            results.append(None)
            continue
        result = _empty_like_layout(x, layout)
        out_views.append(_kernel_view(result, layout))
        results.append(result if target is None else target)
        if target is not None:
            copies.append((target, result))

    def finish():
        for target, result in copies:
            np.copyto(target, result)

    # The invariant of the dispatch: every operand that reaches a kernel is
    # a view it can take (aligned, native, unit-stride runs).
    assert all(v is not None for v, a in zip(views, inputs) if a is not None), layout
    assert all(v is not None for v, (t, allocate) in zip(out_views, outputs)
               if t is not None or allocate), layout
    return layout, views, out_views, results, finish


def _empty_result(x, out):
    return out if out is not None else np.empty_like(x)


# ---------------------------------------------------------------------------
# The public functions.

def forward_train(x, weight=None, bias=None, running_mean=None, running_var=None,
                  *, momentum=0.1, eps=1e-5, out=None, axis=1, residual=None,
                  activation=None, stats_dtype=None, renorm=None, ghost_batch_size=None):
    """Batch normalization in training mode.

    Normalizes each channel of x (channels on `axis`, 1 by default: (N, C,
    *spatial); -1 for channels-last (N, *spatial, C)) with its batch mean and
    biased variance, then scales by weight and shifts by bias (None: 1 and 0).
    When running_mean and running_var are given they are updated in place
    with `momentum` (the variance unbiased by m/(m-1), m the values per
    channel), unless the batch statistics are not finite: then they are left
    unchanged and a RuntimeWarning is emitted.

    Fusions, in the same pass over memory: `residual` (x's shape and dtype)
    is added to the normalized values, then activation="relu" applies a ReLU:
    y = relu(bn(x) + residual).

    Returns (y, mean, invstd): y has x's shape (written to `out` when given;
    out=x works), mean and invstd = 1/sqrt(var + eps) are (C,) arrays of
    `stats_dtype`: x's dtype by default, as PyTorch returns them;
    stats_dtype=np.float64 keeps the statistics as they were computed, which
    `backward` then uses at full precision (it matters for float32 data whose
    mean is large against its standard deviation).

    The variants (docs/variants.md):

    renorm=(rmax, dmax), rmax >= 1, dmax >= 0: batch renormalization (Ioffe
    2017); needs running_mean and running_var.  Per channel, with the
    running statistics before this call's update, sigma = sqrt(running_var
    + eps) and sigma_B = sqrt(var + eps) the batch's,
    r = clip(sigma_B / sigma, 1/rmax, rmax), d = clip((mean - running_mean)
    / sigma, -dmax, dmax) and y = weight * ((x - mean) / sigma_B * r + d)
    + bias.  Returns (y, mean, invstd, r, d): pass renorm=(r, d) to backward.
    rmax=1, dmax=0 is plain batch norm (bit for bit).

    ghost_batch_size=G (N a multiple of G, G >= 2): ghost batches (Hoffer et
    al. 2017).  The N/G consecutive groups of G samples along axis 0 are
    normalized each with its own statistics; the running statistics are
    updated once, with the mean over the groups of their means and of their
    unbiased variances.  mean and invstd (and r, d) then have shape (N/G, C),
    one row per ghost batch: pass ghost_batch_size=G to backward too.
    """
    x, axis, weight, bias, eps, relu, residual, plain_out, count = _train_arguments(
        x, weight, bias, eps, axis, residual, activation, out)
    stats_dtype = _stats_dtype(stats_dtype, x)
    momentum = _momentum(momentum)
    _check_running(running_mean, running_var, x, x.shape[axis])
    _check_not_overlapping(plain_out, (("running_mean", running_mean),
                                       ("running_var", running_var)))
    limits = _renorm_limits(renorm)
    if limits is not None and running_mean is None:
        raise ValueError("renorm needs running_mean and running_var: r and d compare the "
                         "batch's statistics with them")
    ghost = _ghost_batch_size(ghost_batch_size, x.shape[0])
    running = None if limits is None else _running_float64(running_mean, running_var)
    y, (mean, invstd, r, d), (new_mean, new_var, new_count) = _train_step(
        x, weight, bias, eps, plain_out, axis, residual, relu, count, running, limits, ghost)
    if running_mean is not None and new_count:
        if not _update_running(running_mean, running_var, new_mean, new_var, new_count,
                               momentum):
            _warn_not_finite()
    y = out if out is not None else y
    stats = (mean, invstd) if limits is None else (mean, invstd, r, d)
    if stats_dtype == np.float64:
        return (y,) + stats
    if eps >= 1e-76:  # then invstd <= 1e38: within float32's range
        return (y,) + tuple(a.astype(stats_dtype) for a in stats)
    with np.errstate(over="ignore"):  # IEEE: an invstd beyond float32's range is inf
        return (y,) + tuple(a.astype(stats_dtype) for a in stats)


# ---------------------------------------------------------------------------
# The variants: batch renormalization and ghost batches, built from the
# kernels of plain batch norm (docs/variants.md).

def _renorm_limits(renorm):
    """(rmax, dmax) as floats from forward_train's renorm, or None."""
    if renorm is None:
        return None
    if isinstance(renorm, (str, bytes)) or not hasattr(renorm, "__len__") or len(renorm) != 2:
        raise TypeError(f"renorm must be None or a pair (rmax, dmax), got {renorm!r}")
    rmax, dmax = renorm
    return _real(rmax, "rmax", 1.0, math.inf), _real(dmax, "dmax", 0.0, math.inf)


def _ghost_batch_size(ghost_batch_size, n_batch):
    """ghost_batch_size as an int (None stays None), checked against N."""
    if ghost_batch_size is None:
        return None
    if isinstance(ghost_batch_size, (bool, np.bool_)) or not isinstance(
            ghost_batch_size, numbers.Integral):
        raise TypeError("ghost_batch_size must be an integer or None, got "
                        f"{type(ghost_batch_size).__name__}")
    if ghost_batch_size < 2:
        raise ValueError(f"ghost_batch_size must be at least 2 (a ghost batch of one sample "
                         f"has no batch statistics), got {ghost_batch_size}")
    if n_batch % ghost_batch_size:
        raise ValueError(f"the batch size of x, N = {n_batch}, must be a multiple of "
                         f"ghost_batch_size = {ghost_batch_size}")
    return int(ghost_batch_size)


def _running_float64(running_mean, running_var):
    """The running statistics as float64 copies, taken before their update."""
    return running_mean.astype(np.float64), running_var.astype(np.float64)


def _renorm_corrections(mean, var, eps, running, limits):
    """Batch renormalization's r and d (float64) from the batch's mean and
    biased var (shape (C,) or (ghost batches, C)) and the running statistics."""
    running_mean, running_var = running
    rmax, dmax = limits
    with np.errstate(all="ignore"):  # IEEE results, as the kernels
        running_std = np.sqrt(running_var + eps)
        r = np.sqrt(var + eps)
        r /= running_std
        # np.maximum and np.minimum keep NaN, as np.clip does, at a fraction of its cost
        np.minimum(np.maximum(r, 1.0 / rmax, out=r), rmax, out=r)
        d = mean - running_mean
        d /= running_std
        np.minimum(np.maximum(d, -dmax, out=d), dmax, out=d)
    return r, d


def _train_step(x, weight, bias, eps, out, axis, residual, relu, count, running, limits,
                ghost):
    """The training forward of checked arguments, with the variants.

    Returns (y, (mean, invstd, r, d), (mean, var, count) for _update_running);
    the statistics are float64, of shape (C,), or (N/G, C) with ghost batches;
    r and d are None without renorm.
    """
    n_parts = 1 if ghost is None else x.shape[0] // ghost
    part_count = count // n_parts if n_parts else 0
    if limits == (1.0, 0.0):  # then r = 1 and d = 0: plain batch norm, bit for bit
        y, mean, var, invstd, _, _ = _train(x, weight, bias, eps, out, axis, residual, relu,
                                            part_count, ghost=ghost)
        r, d = np.ones_like(mean), np.zeros_like(mean)
    else:
        y, mean, var, invstd, r, d = _train(x, weight, bias, eps, out, axis, residual, relu,
                                            part_count, running, limits, ghost)
        if limits is not None and part_count == 0:
            r, d = _renorm_corrections(mean, var, eps, running, limits)
    # With ghost batches, _update_running takes the means over them of
    # their means and (unbiased by part_count / (part_count - 1)) variances.
    return y, (mean, invstd, r, d), (mean, var, part_count)


def _stats_dtype(stats_dtype, x):
    if stats_dtype is None:
        return x.dtype
    try:
        dtype = np.dtype(stats_dtype)
    except TypeError:
        dtype = None
    if dtype is None or dtype not in _FLOAT_DTYPES:  # (np.dtype(None) is float64)
        raise TypeError(f"stats_dtype must be None, np.float32 or np.float64, "
                        f"got {stats_dtype!r}")
    return dtype


def _train_arguments(x, weight, bias, eps, axis, residual, activation, out):
    """The checks of a training forward (running statistics aside): returns
    (x, axis, weight, bias, eps, relu, residual, out, values per channel),
    arrays as plain ndarrays and parameters as float64 copies."""
    x = _check_data(x, "x")
    axis = _axis(axis, x.ndim)
    n_channels = x.shape[axis]
    weight = _vector(weight, n_channels, "weight", default=1.0)
    bias = _vector(bias, n_channels, "bias", default=0.0)
    eps = _eps(eps)
    relu = _activation(activation)
    residual = _check_optional(residual, "residual", x)
    out = _check_out(out, x)
    count = _values_per_channel(x, axis)
    if count == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {x.shape}")
    return x, axis, weight, bias, eps, relu, residual, out, count


def _train(x, weight, bias, eps, out, axis, residual, relu, count, running=None,
           limits=None, ghost=None):
    """The training forward of checked arguments: (y, mean, var, invstd, r,
    d), the statistics in float64; y is `out` (a plain ndarray) when given.
    With the float64 running statistics (taken before their update) and
    limits (rmax, dmax): batch renormalization, in the same pass as plain
    batch norm (the kernel computes r and d of each channel between its
    statistics and its y); else r and d are None.  With ghost = G, each run
    of G samples is normalized with its own statistics, of shape (N/G, C);
    count is then the values per channel of one ghost batch."""
    n_channels = x.shape[axis]
    n_parts = 1 if ghost is None else x.shape[0] // ghost
    if count == 0:  # statistics of no values
        shape = (n_channels,) if ghost is None else (n_parts, n_channels)
        return (_empty_result(x, out), *(np.full(shape, np.nan) for _ in range(3)), None, None)
    layout, (x_view, residual_view), (y_view,), (y,), finish = _plan(
        [_to_axis1(x, axis), _to_axis1(residual, axis)], [(_to_axis1(out, axis), True)])
    n_stats = n_parts * n_channels  # ghost batch by ghost batch
    mean, var, invstd = np.empty(n_stats), np.empty(n_stats), np.empty(n_stats)
    r = d = renorm = None
    if limits is not None:
        r, d = np.empty(n_stats), np.empty(n_stats)
        renorm = (running[0], running[1], r, d, (1.0 / limits[0], limits[0], limits[1]))
    written = _KERNELS["forward_train_" + layout][x.dtype](
        x_view, y_view, weight, bias, eps, mean, var, invstd, residual_view, relu, renorm,
        n_parts)
    if ghost is not None:
        mean, var, invstd = (a.reshape(n_parts, n_channels) for a in (mean, var, invstd))
        r, d = (None, None) if limits is None else (r.reshape(mean.shape), d.reshape(mean.shape))
    if written != _kernels.ALL_WRITTEN:  # float64 statistics not finite somewhere
        _rescue_ghosts(written, x, axis, count, eps, weight, bias, (mean, var, invstd, r, d),
                       running, limits, (x_view, y_view, residual_view), relu)
    finish()
    return _result(out, y, axis), mean, var, invstd, r, d


def _rescue_ghosts(written, x, axis, count, eps, weight, bias, stats, running, limits, views,
                   relu):
    """After a training kernel left channels unwritten (written, see
    _kernels.ALL_WRITTEN): their statistics again by _rescue, then their y,
    ghost batch by ghost batch (the statistics have a row per ghost batch,
    or are (C,)); views: the kernel's x, y and residual."""
    mean, var, invstd, r, d = (None if a is None else a.reshape(-1, a.shape[-1])
                               for a in stats)
    n_parts, n_channels = mean.shape
    x_view, y_view, residual_view = views
    # A ghost batch is a run of view rows (samples, or samples' positions).
    n_rows, n_samples = x_view.shape[0] // n_parts, x.shape[0] // n_parts
    for p in range(n_parts):
        finite = np.isfinite(mean[p]) & np.isfinite(var[p])
        if finite.all():
            continue
        unwritten = (np.arange(n_channels) if written == _kernels.NONE_WRITTEN
                     else np.flatnonzero(~finite))
        _rescue(x[p * n_samples:(p + 1) * n_samples], axis, count, eps, mean[p], var[p],
                invstd[p])
        scale, shift = weight * invstd[p], bias
        if limits is not None:
            r[p], d[p] = _renorm_corrections(mean[p], var[p], eps, running, limits)
            with np.errstate(all="ignore"):
                scale, shift = weight * r[p] * invstd[p], weight * d[p] + bias
        rows = slice(p * n_rows, (p + 1) * n_rows)
        _affine_channels(unwritten, x_view[rows], mean[p], scale, shift, y_view[rows],
                         None if residual_view is None else residual_view[rows], relu)


def _power_of_two_scales(values):
    """2**-e with values * 2**-e in [0.5, 1): exact scalings; 1 for 0, Inf and NaN."""
    return np.ldexp(1.0, -np.frexp(values)[1])


def _rescue(x, axis, count, eps, mean, var, invstd):
    """The statistics of float64 channels whose finite values spread beyond
    about 1e154, where the sum of squares overflowed: again on the channel
    scaled by a power of two, as hypot does.  x-hat does not depend on the
    scale, so mean and invstd come out right; var itself is then beyond
    float64's range (Inf).  Channels holding Inf or NaN keep their NaN
    statistics.  Returns whether any channel was recomputed."""
    with np.errstate(invalid="ignore", over="ignore"):
        bad = np.flatnonzero(~(np.isfinite(mean) & np.isfinite(var)))
        x1 = np.moveaxis(x, axis, 1)[:, bad]
        largest = np.max(np.abs(x1), axis=(0, *range(2, x.ndim)), initial=0.0)
    finite = np.isfinite(largest)
    if not finite.any():
        return False
    bad, x1 = bad[finite], x1[:, finite]
    scale = _power_of_two_scales(largest[finite])
    _, scaled_mean, scaled_m2 = batch_moments(x1 * scale.reshape((-1,) + (1,) * (x.ndim - 2)))
    scaled_var = scaled_m2 / count
    mean[bad] = scaled_mean / scale
    with np.errstate(over="ignore"):  # scale * scale may underflow to 0
        var[bad] = scaled_var / scale / scale
    invstd[bad] = scale / np.sqrt(scaled_var + eps * scale * scale)
    return True


def _affine_channels(channels, x, mean, scale, shift, y, residual, relu):
    """y[:, channels] that the training kernel left unwritten (see
    _kernels.ALL_WRITTEN), from x[:, channels] as it was (x, y, residual:
    the kernel's views, channels on axis 1)."""
    part = (slice(None), channels)
    y[part] = _affine(x[part], mean[channels], scale[channels], shift[channels], None, 1,
                      None if residual is None else residual[part], relu)


def _update_running(running_mean, running_var, mean, var, count, momentum):
    """Update the running statistics in place; False, changing nothing, when a
    batch statistic is not finite in their dtype.  mean and var: (C,), or a
    row per ghost batch (count values per channel each), whose means are
    used.  The running statistics may have any strides and alignment: the
    kernel then works on aligned copies."""
    kernel = _KERNELS["update_running"][running_mean.dtype]
    parts = len(mean) if mean.ndim == 2 else 1
    mean, var = mean.reshape(-1), var.reshape(-1)
    mean_flags, var_flags = running_mean.flags, running_var.flags
    if (mean_flags.c_contiguous and mean_flags.aligned and var_flags.c_contiguous
            and var_flags.aligned):
        return kernel(running_mean, running_var, mean, var, count, momentum, parts)
    new_mean, new_var = np.array(running_mean), np.array(running_var)
    if not kernel(new_mean, new_var, mean, var, count, momentum, parts):
        return False
    running_mean[...] = new_mean
    running_var[...] = new_var
    return True


def _warn_not_finite():
    # A single batch with an Inf or NaN (or values whose variance overflows
    # the dtype) would otherwise poison the running statistics for good.
    warnings.warn(
        "cybn: the batch statistics are not finite (NaN or Inf in x, or a variance "
        "beyond the dtype's range); running_mean and running_var were left unchanged",
        RuntimeWarning, stacklevel=_outside_stacklevel())


def _commit_training_step(layer, mean, var, count, saved):
    """The state change of a layer's training forward: running statistics,
    num_batches_tracked and the saved forward.  This module is compiled, so
    no bytecode runs in here and a KeyboardInterrupt (or any other signal
    handler's exception) lands before or after the whole step, never inside
    it.  Returns whether the running statistics were updated."""
    updated = False
    if layer.track_running_stats and count:
        momentum = layer.momentum
        if momentum is None:
            momentum = 1.0 / (layer.num_batches_tracked + 1)  # cumulative average
        updated = _update_running(layer.running_mean, layer.running_var, mean, var, count,
                                  momentum)
        if updated:
            layer.num_batches_tracked += 1
    layer._local.saved = saved
    return updated


def _assign(target, **attributes):
    """setattr for each attribute, as one step (compiled: see _commit_training_step)."""
    for name, value in attributes.items():
        setattr(target, name, value)


def _outside_stacklevel():
    """The stacklevel that points a warning raised by this function's caller
    at the first caller outside cybn.  Counted from the frames: compiled, the
    functions of this module have none (warnings then count from the nearest
    Python frame), and the layers add their own."""
    frame = sys._getframe(0)
    level = 0 if frame.f_code.co_name == "_outside_stacklevel" else 1  # run as Python or not
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


def forward_eval(x, running_mean, running_var, weight=None, bias=None, *, eps=1e-5,
                 out=None, axis=1, residual=None, activation=None):
    """Batch normalization in evaluation mode: y = (x - running_mean) /
    sqrt(running_var + eps) * weight + bias per channel, then `residual`
    added and activation="relu" applied when given.  Returns y."""
    eps = _eps(eps)
    x, axis, (mean, scale, shift), relu, residual, plain_out = _affine_arguments(
        x, axis, (("running_mean", running_mean, None), ("running_var", running_var, None),
                  ("weight", weight, 1.0), ("bias", bias, 0.0)), residual, activation, out,
        lambda n, values: _kernels.eval_coefficients(*values, eps, n))
    return _affine(x, mean, scale, shift, plain_out, axis, residual, relu, out)


def normalize(x, mean, invstd, weight=None, bias=None, *, out=None, axis=1, residual=None,
              activation=None):
    """y = (x - mean) * invstd * weight + bias with given per-channel statistics
    (for instance statistics combined across processes), then `residual` and
    activation="relu" as in forward_train.  Returns y."""
    x, axis, (mean, invstd, weight, bias), relu, residual, plain_out = _affine_arguments(
        x, axis, (("mean", mean, None), ("invstd", invstd, None), ("weight", weight, 1.0),
                  ("bias", bias, 0.0)), residual, activation, out)
    return _affine(x, mean, weight * invstd, bias, plain_out, axis, residual, relu, out)


def _affine_arguments(x, axis, vectors, residual, activation, out, combine=None):
    """The checks of the element-wise functions: (x, axis, the per-channel
    vectors as float64, relu, residual, out) from (name, value, default)
    triples, arrays as plain ndarrays.  combine(C, values), when given, makes
    the vectors returned from the values: from the caller's own in one call
    where it can (else None), or from their float64 conversions."""
    x = _check_data(x, "x")
    axis = _axis(axis, x.ndim)
    n_channels = x.shape[axis]
    values = [value for _, value, _ in vectors]
    converted = None if combine is None else combine(n_channels, values)
    if converted is None:
        converted = [_vector(value, n_channels, name, default)
                     for name, value, default in vectors]
        if combine is not None:
            converted = combine(n_channels, converted)
    relu = _activation(activation)
    residual = _check_optional(residual, "residual", x)
    out = _check_out(out, x)
    return x, axis, converted, relu, residual, out


def _affine(x, mean, scale, shift, out, axis, residual, relu, returned=None):
    """The element-wise pass into `out` (a plain ndarray) or a new array;
    returns `returned` (the caller's own out) when given."""
    if x.size == 0:
        y = _empty_result(x, out)
    else:
        layout, (x_view, residual_view), (y_view,), (y,), finish = _plan(
            [_to_axis1(x, axis), _to_axis1(residual, axis)], [(_to_axis1(out, axis), True)])
        _KERNELS["affine_" + layout][x.dtype](x_view, y_view, mean, scale, shift,
                                              residual_view, relu)
        finish()
        y = _result(out, y, axis)
    return y if returned is None else returned


def _check_backward_options(dy, x, activation, y, out, grad_residual):
    """The checks backward and grad_input share; returns (relu, y, out,
    grad_residual), the arrays as plain ndarrays."""
    relu = _activation(activation)
    if relu and y is None:
        raise TypeError("y, the forward's output, is required with activation='relu'")
    if y is not None and not relu:
        raise ValueError("y is only used with activation='relu'")
    y = _check_optional(y, "y", x)
    out = _check_out(out, x)
    grad_residual = _check_out(grad_residual, x, "grad_residual")
    _check_not_overlapping(grad_residual, (("out", out), ("x", x), ("y", y)), "grad_residual")
    return relu, y, out, grad_residual


# Below this invstd (a standard deviation over about 1e135), invstd**2 and
# the sums of dy * (x - mean) leave float64's range: see _backward_scales.
_SMALLEST_PLAIN_INVSTD = 2.0 ** -450


def backward(dy, x, mean, invstd, weight=None, *, training=True, out=None, axis=1,
             activation=None, y=None, grad_residual=None, renorm=None, ghost_batch_size=None):
    """Gradients of batch normalization.

    dy is the gradient of the loss with respect to y, x the forward's input,
    mean and invstd the statistics the forward used (forward_train's outputs,
    or running_mean and 1/sqrt(running_var + eps) in evaluation mode).  With
    training=True, dx includes the path through the batch statistics; with
    training=False they are constants.

    After a forward with activation="relu", pass activation="relu" and the
    forward's output y: dy then counts only where y > 0.  The gradient of a
    residual is that masked dy (dy itself without activation); it is written
    to `grad_residual` when given.

    After forward_train(..., renorm=(rmax, dmax)), pass renorm=(r, d), the r
    and d it returned (held constant: dx = weight*r*invstd*(dy - mean(dy) -
    xhat*mean(dy*xhat)), dweight = sum(dy*(r*xhat + d)), xhat the batch's
    (x - mean)*invstd).  After forward_train(..., ghost_batch_size=G), pass
    the same ghost_batch_size: mean and invstd (and r, d) have shape (N/G, C),
    and dweight, dbias are sums over the ghost batches.

    Returns (dx, dweight, dbias); dx is written to `out` when given (out=dy
    works); dweight and dbias are (C,) arrays of x's dtype.
    """
    x = _check_data(x, "x")
    dy = _check_same(dy, "dy", x)
    axis = _axis(axis, x.ndim)
    n_channels = x.shape[axis]
    ghost = _ghost_batch_size(ghost_batch_size, x.shape[0])
    if ghost is None:
        mean = _vector(mean, n_channels, "mean")
        invstd = _vector(invstd, n_channels, "invstd")
    else:
        shape = (x.shape[0] // ghost, n_channels)
        mean = _per_ghost(mean, shape, "mean")
        invstd = _per_ghost(invstd, shape, "invstd")
    weight = _vector(weight, n_channels, "weight", default=1.0)
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"training must be True or False, got {training!r}")
    r = d = None
    if renorm is not None:
        if not training:
            raise ValueError("renorm is only used with training=True (batch renormalization "
                             "changes only the training forward)")
        if isinstance(renorm, (str, bytes)) or not hasattr(renorm, "__len__") or len(
                renorm) != 2:
            raise TypeError(f"renorm must be None or the pair (r, d) forward_train returned, "
                            f"got {type(renorm).__name__}")
        r, d = ((_vector(renorm[0], n_channels, "r"), _vector(renorm[1], n_channels, "d"))
                if ghost is None else (_per_ghost(renorm[0], mean.shape, "r"),
                                       _per_ghost(renorm[1], mean.shape, "d")))
    given_out = out
    relu, y, out, grad_residual = _check_backward_options(dy, x, activation, y, out,
                                                          grad_residual)
    dx, dweight, dbias = _backward_parts(dy, x, mean, invstd, weight, training, out, axis,
                                         relu, y, grad_residual, r, d, ghost)
    return (dx if given_out is None else given_out), dweight, dbias


def _per_ghost(v, shape, name):
    """A per-ghost-batch statistic as a fresh float64 array of shape (N/G, C)."""
    a = np.asarray(v)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} must hold real numbers, got dtype {a.dtype}")
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, one row per ghost batch and one "
                         f"value per channel of x, got shape {a.shape}")
    return np.array(a, dtype=np.float64)


def _backward_parts(dy, x, mean, invstd, weight, training, out, axis, relu, y, grad_residual,
                    r=None, d=None, ghost=None):
    """backward of checked arguments, with renorm's r and d when given, and
    with ghost = G the statistics (and r, d) of each run of G samples, of
    shape (N/G, C).  Returns (dx, dweight, dbias), dx in `out` when given,
    the gradients of the parameters of x's dtype."""
    n_channels = x.shape[axis]
    if grad_residual is not None and not relu:
        np.copyto(grad_residual, dy)  # before out=dy may overwrite it
    if x.size == 0:
        zeros = np.zeros(n_channels, x.dtype)
        return _empty_result(x, out), zeros, zeros.copy()
    n_parts = 1 if ghost is None else x.shape[0] // ghost
    # the kernel takes the statistics ghost batch by ghost batch, flat
    mean, invstd = mean.reshape(-1), invstd.reshape(-1)
    renorm = None if r is None else (r.reshape(-1), d.reshape(-1))
    scale = None
    if x.dtype == np.float64 and _kernels.any_below(invstd, _SMALLEST_PLAIN_INVSTD):
        x, mean, invstd, scale = _backward_scales(x, axis, mean, invstd, n_parts)

    layout, (dy_view, x_view, y_view), (dx_view, g_view), (dx, _), finish = _plan(
        [_to_axis1(a, axis) for a in (dy, x, y if relu else None)],
        [(_to_axis1(out, axis), True), (_to_axis1(grad_residual if relu else None, axis), False)])
    dweight = np.empty(mean.size, x.dtype)
    dbias = np.empty(mean.size, x.dtype)
    _KERNELS["backward_" + layout][x.dtype](dy_view, x_view, dx_view, mean, invstd, weight,
                                            training, dweight, dbias, y_view, g_view, renorm,
                                            n_parts)
    finish()
    dx = _result(out, dx, axis)
    if scale is not None:  # dx of the scaled data is scale times too small
        _scale_parts(dx, axis, scale.reshape(n_parts, n_channels))
    if ghost is None:
        return dx, dweight, dbias
    # the sums over the ghost batches, in float64, rounded once
    return (dx, *(np.add.reduce(g.reshape(n_parts, n_channels), axis=0,
                                dtype=np.float64).astype(x.dtype) for g in (dweight, dbias)))


def _backward_scales(x, axis, mean, invstd, n_parts=1):
    """x, mean and invstd of data scaled by a power of two per channel (per
    ghost batch and channel: mean and invstd hold n_parts rows of C), so that
    its standard deviation is about 1: the gradients of x-hat are the same
    and dx is the scaled data's times the scale."""
    scale = np.where(invstd < _SMALLEST_PLAIN_INVSTD, np.ldexp(1.0, np.frexp(invstd)[1]), 1.0)
    scaled = np.empty_like(x)  # x's memory layout
    _scale_parts(x, axis, scale.reshape(n_parts, -1), out=scaled)
    return scaled, mean * scale, invstd / scale, scale


def _scale_parts(a, axis, scale, out=None):
    """out = a * scale (out=None: in place), scale[p] of shape (C,) on the
    p-th of len(scale) equal runs of samples."""
    out = a if out is None else out
    n_samples = a.shape[0] // len(scale)
    per_channel = (-1,) + (1,) * (a.ndim - 1 - axis)
    for p, row in enumerate(scale):
        part = slice(p * n_samples, (p + 1) * n_samples)
        np.multiply(a[part], row.reshape(per_channel), out=out[part])


def fold_batch_norm(weight, bias, bn):
    """Fold an evaluation-mode BatchNorm into the layer before it.

    weight: the previous layer's weight with output channels first, such as
    a convolution's (C_out, C_in, kH, kW) or a linear layer's (C_out, C_in)
    (y = x @ weight.T + bias); bias: its (C_out,) bias, or None.  bn: a
    cybn.BatchNorm with running statistics.  Returns (weight', bias') such
    that the previous layer with them computes bn(previous(x)) in evaluation
    mode; new arrays of weight's dtype (float64 for a bias-less integer
    weight), computed in float64.
    """
    from .layer import BatchNorm  # the layer module imports this one

    if not isinstance(bn, BatchNorm):
        raise TypeError(f"bn must be a cybn.BatchNorm, got {type(bn).__name__}")
    if bn.running_mean is None:
        raise ValueError("bn must track running statistics (track_running_stats=True): "
                         "batch statistics cannot be folded into weights")
    w = np.asarray(weight)
    if w.dtype.kind not in "fiu":
        raise TypeError(f"weight must hold real numbers, got dtype {w.dtype}")
    if w.ndim < 2 or w.shape[0] != bn.num_features:
        raise ValueError(f"weight must have shape ({bn.num_features}, ...) with the output "
                         f"channels first, got {w.shape}")
    n_channels = bn.num_features
    b = _vector(bias, n_channels, "bias", default=0.0)
    gamma = _vector(bn.weight, n_channels, "bn.weight", default=1.0)
    beta = _vector(bn.bias, n_channels, "bn.bias", default=0.0)
    scale = gamma / np.sqrt(bn.running_var.astype(np.float64) + bn.eps)
    dtype = w.dtype if w.dtype.kind == "f" else np.dtype(np.float64)
    folded_weight = (w.astype(np.float64) * scale.reshape((-1,) + (1,) * (w.ndim - 1)))
    folded_bias = (b - bn.running_mean.astype(np.float64)) * scale + beta
    return folded_weight.astype(dtype), folded_bias.astype(dtype)


# ---------------------------------------------------------------------------
# The split API: the steps of forward_train and backward, separately, so that
# statistics and gradient sums can be combined across processes in between
# (see cybn.SyncBatchNorm).  Statistics and sums are float64.

def batch_moments(x, *, axis=1):
    """Per-channel (count, mean, m2) of x, m2 = sum((x - mean)^2), in float64.

    count is the number of values per channel (N * prod(spatial)); with no
    values, mean and m2 are zeros, which combine_moments ignores.
    """
    x = _check_data(x, "x")
    axis = _axis(axis, x.ndim)
    n_channels = x.shape[axis]
    count = _values_per_channel(x, axis)
    mean = np.zeros(n_channels)
    m2 = np.zeros(n_channels)
    if count:
        layout, (x_view,), *_ = _plan([_to_axis1(x, axis)], [])
        _KERNELS["moments_" + layout][x.dtype](x_view, mean, m2)
    return count, mean, m2


def combine_moments(counts, means, m2s):
    """Combine per-part (count, mean, m2) into those of the union.

    counts: (P,) values per channel of each part; means, m2s: (P, C).  Parts
    are merged left to right with Chan et al.'s pairwise update, so the result
    depends only on the order of the parts; parts with count 0 are skipped.
    Non-finite parts give non-finite results, silently.  Returns (count,
    mean, m2).
    """
    counts = np.asarray(counts)
    if counts.ndim != 1 or counts.dtype.kind not in "iu":
        raise TypeError(f"counts must be a 1-d array of integers, got {counts.dtype} "
                        f"with shape {counts.shape}")
    if np.any(counts < 0):
        raise ValueError("counts must not be negative")
    means = np.asarray(means, dtype=np.float64)
    m2s = np.asarray(m2s, dtype=np.float64)
    if means.ndim != 2 or means.shape[0] != counts.shape[0] or m2s.shape != means.shape:
        raise ValueError(
            f"means and m2s must have shape (P, C) with P = len(counts) = {len(counts)}, "
            f"got {means.shape} and {m2s.shape}")
    total = 0
    mean = np.zeros(means.shape[1])
    m2 = np.zeros(means.shape[1])
    with np.errstate(invalid="ignore", over="ignore"):
        for n_b, mean_b, m2_b in zip(counts.tolist(), means, m2s):
            if n_b == 0:
                continue
            n = total + n_b
            delta = mean_b - mean
            mean = mean + delta * (n_b / n)
            m2 = m2 + m2_b + delta * delta * (total * n_b / n)
            total = n
    return total, mean, m2


def grad_sums(dy, x, mean, *, axis=1, activation=None, y=None):
    """Per-channel (sum(g), sum(g * (x - mean))) in float64, g = dy (masked
    by y > 0 with activation="relu"): the reductions of backward, to be summed
    across processes before grad_input."""
    x = _check_data(x, "x")
    dy = _check_same(dy, "dy", x)
    axis = _axis(axis, x.ndim)
    n_channels = x.shape[axis]
    mean = _vector(mean, n_channels, "mean")
    relu, y, _, _ = _check_backward_options(dy, x, activation, y, None, None)
    sum_dy = np.zeros(n_channels)
    sum_dy_xmu = np.zeros(n_channels)
    if x.size:
        layout, (dy_view, x_view, y_view), *_ = _plan(
            [_to_axis1(a, axis) for a in (dy, x, y if relu else None)], [])
        _KERNELS["grad_sums_" + layout][x.dtype](dy_view, x_view, mean, sum_dy, sum_dy_xmu,
                                                 y_view)
    return sum_dy, sum_dy_xmu


def grad_input(dy, x, mean, invstd, sum_dy, sum_dy_xmu, count, weight=None, *,
               training=True, out=None, axis=1, activation=None, y=None,
               grad_residual=None):
    """dx from (possibly globally summed) grad_sums over `count` values per
    channel: dx = weight*invstd*(g - sum_dy/count - (x - mean)*invstd^2*sum_dy_xmu/count)
    in training, weight*invstd*g otherwise, g = dy (masked by y > 0 with
    activation="relu", and then written to grad_residual when given).
    dweight = sum_dy_xmu*invstd and dbias = sum_dy.  Returns dx."""
    x = _check_data(x, "x")
    dy = _check_same(dy, "dy", x)
    axis = _axis(axis, x.ndim)
    n_channels = x.shape[axis]
    mean = _vector(mean, n_channels, "mean")
    invstd = _vector(invstd, n_channels, "invstd")
    sum_dy = _vector(sum_dy, n_channels, "sum_dy")
    sum_dy_xmu = _vector(sum_dy_xmu, n_channels, "sum_dy_xmu")
    weight = _vector(weight, n_channels, "weight", default=1.0)
    if isinstance(count, (bool, np.bool_)) or not isinstance(count, numbers.Integral):
        raise TypeError(f"count must be an integer, got {type(count).__name__}")
    if training and count < 1 and x.size:
        raise ValueError(f"count must be at least 1 in training, got {count}")
    given_out = out
    relu, y, out, grad_residual = _check_backward_options(dy, x, activation, y, out,
                                                          grad_residual)
    if grad_residual is not None and not relu:
        np.copyto(grad_residual, dy)
    if x.size == 0:
        return _empty_result(x, given_out)
    if training:
        dy_shift = sum_dy / count
        x_coef = invstd * invstd * sum_dy_xmu / count
    else:
        dy_shift = np.zeros(n_channels)
        x_coef = np.zeros(n_channels)
    layout, (dy_view, x_view, y_view), (dx_view, g_view), (dx, _), finish = _plan(
        [_to_axis1(a, axis) for a in (dy, x, y if relu else None)],
        [(_to_axis1(out, axis), True), (_to_axis1(grad_residual if relu else None, axis), False)])
    _KERNELS["grad_input_" + layout][x.dtype](dy_view, x_view, dx_view, mean, dy_shift,
                                               x_coef, weight * invstd, y_view, g_view)
    finish()
    return _result(given_out, dx, axis)
