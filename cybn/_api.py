"""cybn's functional API: argument checks, allocation, dispatch to the kernels.

This module is the only place that raises for bad input, and it raises before
anything is written: when an error comes out of a function here, no output
buffer and no running statistic has been touched.
"""
import math
import numbers
import warnings

import numpy as np

from . import _kernels

__all__ = [
    "forward_train", "forward_eval", "backward",
    "batch_moments", "combine_moments", "normalize", "grad_sums", "grad_input",
]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


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

def _check_data(a, name):
    """An (N, C, *spatial) float32/float64 ndarray."""
    if not isinstance(a, np.ndarray) or isinstance(a, np.ma.MaskedArray):
        raise TypeError(f"{name} must be a NumPy ndarray, got {type(a).__name__}")
    if a.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {a.dtype}")
    if not 2 <= a.ndim <= 5:
        raise ValueError(
            f"{name} must have 2 to 5 dimensions, (N, C), (N, C, L), (N, C, H, W) or "
            f"(N, C, D, H, W); got shape {a.shape}")


def _check_same(a, name, x):
    """a is data of x's dtype and shape (dy next to x)."""
    _check_data(a, name)
    if a.dtype != x.dtype:
        raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {a.dtype}")
    if a.shape != x.shape:
        raise ValueError(f"{name} must have the shape of x {x.shape}, got {a.shape}")


def _check_out(out, x, name="out"):
    if out is None:
        return
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a NumPy ndarray or None, got {type(out).__name__}")
    if out.dtype != x.dtype:
        raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {out.dtype}")
    if out.shape != x.shape:
        raise ValueError(f"{name} must have the shape of x {x.shape}, got {out.shape}")
    if not out.flags.writeable:
        raise ValueError(f"{name} must be writeable")


def _vector(v, n_channels, name, default=None):
    """A per-channel parameter as a fresh float64 array of shape (C,).

    Always a copy, so that an output buffer overlapping the caller's array
    cannot change the parameter while a kernel runs.
    """
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


def _check_running(running_mean, running_var, x):
    """The running statistics forward_train updates in place."""
    if (running_mean is None) != (running_var is None):
        given, missing = (("running_mean", "running_var") if running_var is None
                          else ("running_var", "running_mean"))
        raise ValueError(f"{given} was given without {missing}: pass both or neither")
    if running_mean is None:
        return
    n_channels = x.shape[1]
    for name, a in (("running_mean", running_mean), ("running_var", running_var)):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{name} must be a NumPy ndarray, got {type(a).__name__}")
        if a.dtype != x.dtype:
            raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {a.dtype}")
        if a.shape != (n_channels,):
            raise ValueError(
                f"{name} must have shape ({n_channels},), one value per channel of x, "
                f"got shape {a.shape}")
        if not a.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous (it is updated in place)")
        if not a.flags.writeable:
            raise ValueError(f"{name} must be writeable (it is updated in place)")
    if np.may_share_memory(running_mean, running_var):
        raise ValueError("running_mean and running_var must not share memory")


def _check_not_overlapping(out, others):
    if out is None:
        return
    for name, a in others:
        if a is not None and np.shares_memory(out, a):
            raise ValueError(f"out must not share memory with {name}")


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


def _values_per_channel(x):
    return math.prod(x.shape) // x.shape[1] if x.shape[1] else 0


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


def _plan(inputs, out):
    """Views for one kernel call.

    inputs: arrays of one shape, x first.  Returns (layout, input views, output
    view, result, finish): the kernel writes the output view, then finish()
    moves the values to `out` when the kernel could not write there directly
    (a layout the kernels cannot read, or a partial overlap with an input).
    """
    x = inputs[0]
    for layout in _preferred_layouts(x):
        views = [_kernel_view(a, layout) for a in inputs]
        if all(v is not None for v in views):
            break
    else:
        inputs = [np.ascontiguousarray(a) for a in inputs]
        layout = _preferred_layouts(x)[0]
        views = [_kernel_view(a, layout) for a in inputs]

    if out is not None:
        out_view = _kernel_view(out, layout)
        # Element-wise kernels may write over an input read at the same
        # index (out=x, out=dy), but not over any other part of it.
        if out_view is not None and all(
                not np.may_share_memory(out_view, v) or _same_view(out_view, v)
                for v in views):
            return layout, views, out_view, out, _nothing
    result = _empty_like_layout(x, layout)
    result_view = _kernel_view(result, layout)
    if out is None:
        return layout, views, result_view, result, _nothing
    return layout, views, result_view, out, lambda: np.copyto(out, result)


def _nothing():
    pass


def _empty_result(x, out):
    return out if out is not None else np.empty_like(x)


# ---------------------------------------------------------------------------
# The public functions.

def forward_train(x, weight=None, bias=None, running_mean=None, running_var=None,
                  *, momentum=0.1, eps=1e-5, out=None):
    """Batch normalization in training mode.

    Normalizes each channel of x (shape (N, C, *spatial)) with its batch mean
    and biased variance, then scales by weight and shifts by bias (None: 1 and
    0).  When running_mean and running_var are given they are updated in place
    with `momentum` (the variance unbiased by m/(m-1), m = N*prod(spatial)),
    unless the batch statistics are not finite: then they are left unchanged
    and a RuntimeWarning is emitted.

    Returns (y, mean, invstd): y has x's shape (written to `out` when given;
    out=x works), mean and invstd = 1/sqrt(var + eps) are (C,) arrays of x's
    dtype, the values `backward` needs.
    """
    y, mean, invstd, _ = _forward_train(x, weight, bias, running_mean, running_var,
                                        momentum, eps, out)
    return y, mean, invstd


def _forward_train(x, weight, bias, running_mean, running_var, momentum, eps, out):
    """forward_train, also telling whether the running statistics were updated."""
    _check_data(x, "x")
    n_channels = x.shape[1]
    weight = _vector(weight, n_channels, "weight", default=1.0)
    bias = _vector(bias, n_channels, "bias", default=0.0)
    momentum = _momentum(momentum)
    eps = _eps(eps)
    _check_running(running_mean, running_var, x)
    _check_out(out, x)
    _check_not_overlapping(out, (("running_mean", running_mean), ("running_var", running_var)))
    count = _values_per_channel(x)
    if count == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {x.shape}")
    if count == 0 or n_channels == 0:
        undefined = np.full(n_channels, np.nan, x.dtype)  # statistics of no values
        return _empty_result(x, out), undefined, undefined.copy(), False

    layout, (x_view,), y_view, y, finish = _plan([x], out)
    mean = np.empty(n_channels)
    var = np.empty(n_channels)
    invstd = np.empty(n_channels)
    _KERNELS["forward_train_" + layout][x.dtype](x_view, y_view, weight, bias, eps,
                                                  mean, var, invstd)
    finish()
    updated = (running_mean is not None
               and _update_running(running_mean, running_var, mean, var, count, momentum))
    return y, mean.astype(x.dtype), invstd.astype(x.dtype), updated


def _update_running(running_mean, running_var, mean, var, count, momentum):
    if _KERNELS["update_running"][running_mean.dtype](running_mean, running_var, mean, var,
                                                      count, momentum):
        return True
    # A single batch with an Inf or NaN (or values whose variance overflows
    # the dtype) would otherwise poison the running statistics for good.
    warnings.warn(
        "cybn: the batch statistics are not finite (NaN or Inf in x, or a variance "
        "beyond the dtype's range); running_mean and running_var were left unchanged",
        RuntimeWarning, stacklevel=4)
    return False


def forward_eval(x, running_mean, running_var, weight=None, bias=None, *, eps=1e-5,
                 out=None):
    """Batch normalization in evaluation mode: y = (x - running_mean) /
    sqrt(running_var + eps) * weight + bias, per channel.  Returns y."""
    _check_data(x, "x")
    n_channels = x.shape[1]
    mean = _vector(running_mean, n_channels, "running_mean")
    var = _vector(running_var, n_channels, "running_var")
    weight = _vector(weight, n_channels, "weight", default=1.0)
    bias = _vector(bias, n_channels, "bias", default=0.0)
    eps = _eps(eps)
    _check_out(out, x)
    with np.errstate(divide="ignore", invalid="ignore"):  # IEEE results, as in the kernels
        scale = weight / np.sqrt(var + eps)
    return _affine(x, mean, scale, bias, out)


def normalize(x, mean, invstd, weight=None, bias=None, *, out=None):
    """y = (x - mean) * invstd * weight + bias with given per-channel statistics
    (for instance statistics combined across processes).  Returns y."""
    _check_data(x, "x")
    n_channels = x.shape[1]
    mean = _vector(mean, n_channels, "mean")
    invstd = _vector(invstd, n_channels, "invstd")
    weight = _vector(weight, n_channels, "weight", default=1.0)
    bias = _vector(bias, n_channels, "bias", default=0.0)
    _check_out(out, x)
    return _affine(x, mean, weight * invstd, bias, out)


def _affine(x, mean, scale, shift, out):
    if x.size == 0:
        return _empty_result(x, out)
    layout, (x_view,), y_view, y, finish = _plan([x], out)
    _KERNELS["affine_" + layout][x.dtype](x_view, y_view, mean, scale, shift)
    finish()
    return y


def backward(dy, x, mean, invstd, weight=None, *, training=True, out=None):
    """Gradients of batch normalization.

    dy is the gradient of the loss with respect to y, x the forward's input,
    mean and invstd the statistics the forward used (forward_train's outputs,
    or running_mean and 1/sqrt(running_var + eps) in evaluation mode).  With
    training=True, dx includes the path through the batch statistics; with
    training=False they are constants.

    Returns (dx, dweight, dbias); dx is written to `out` when given (out=dy
    works); dweight and dbias are (C,) arrays of x's dtype.
    """
    _check_data(x, "x")
    _check_same(dy, "dy", x)
    n_channels = x.shape[1]
    mean = _vector(mean, n_channels, "mean")
    invstd = _vector(invstd, n_channels, "invstd")
    weight = _vector(weight, n_channels, "weight", default=1.0)
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"training must be True or False, got {training!r}")
    _check_out(out, x)
    if x.size == 0:
        zeros = np.zeros(n_channels, x.dtype)
        return _empty_result(x, out), zeros, zeros.copy()

    layout, (dy_view, x_view), dx_view, dx, finish = _plan([dy, x], out)
    sum_dy = np.empty(n_channels)
    sum_dy_xmu = np.empty(n_channels)
    _KERNELS["backward_" + layout][x.dtype](dy_view, x_view, dx_view, mean, invstd, weight,
                                            training, sum_dy, sum_dy_xmu)
    finish()
    return dx, (sum_dy_xmu * invstd).astype(x.dtype), sum_dy.astype(x.dtype)


# ---------------------------------------------------------------------------
# The split API: the steps of forward_train and backward, separately, so that
# statistics and gradient sums can be combined across processes in between
# (see cybn.SyncBatchNorm).  Statistics and sums are float64.

def batch_moments(x):
    """Per-channel (count, mean, m2) of x, m2 = sum((x - mean)^2), in float64.

    count is the number of values per channel (N * prod(spatial)); with no
    values, mean and m2 are zeros, which combine_moments ignores.
    """
    _check_data(x, "x")
    n_channels = x.shape[1]
    count = _values_per_channel(x)
    mean = np.zeros(n_channels)
    m2 = np.zeros(n_channels)
    if count and n_channels:
        layout, (x_view,), *_ = _plan([x], None)
        _KERNELS["moments_" + layout][x.dtype](x_view, mean, m2)
    return count, mean, m2


def combine_moments(counts, means, m2s):
    """Combine per-part (count, mean, m2) into those of the union.

    counts: (P,) values per channel of each part; means, m2s: (P, C).  Parts
    are merged left to right with Chan et al.'s pairwise update, so the result
    depends only on the order of the parts; parts with count 0 are skipped.
    Returns (count, mean, m2).
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
    for n_b, mean_b, m2_b in zip(counts.tolist(), means, m2s):
        if n_b == 0:
            continue
        n = total + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / n)
        m2 = m2 + m2_b + delta * delta * (total * n_b / n)
        total = n
    return total, mean, m2


def grad_sums(dy, x, mean):
    """Per-channel (sum(dy), sum(dy * (x - mean))) in float64: the reductions
    of backward, to be summed across processes before grad_input."""
    _check_data(x, "x")
    _check_same(dy, "dy", x)
    n_channels = x.shape[1]
    mean = _vector(mean, n_channels, "mean")
    sum_dy = np.zeros(n_channels)
    sum_dy_xmu = np.zeros(n_channels)
    if x.size:
        layout, (dy_view, x_view), *_ = _plan([dy, x], None)
        _KERNELS["grad_sums_" + layout][x.dtype](dy_view, x_view, mean, sum_dy, sum_dy_xmu)
    return sum_dy, sum_dy_xmu


def grad_input(dy, x, mean, invstd, sum_dy, sum_dy_xmu, count, weight=None, *,
               training=True, out=None):
    """dx from (possibly globally summed) grad_sums over `count` values per
    channel: dx = weight*invstd*(dy - sum_dy/count - (x - mean)*invstd^2*sum_dy_xmu/count)
    in training, weight*invstd*dy otherwise.  dweight = sum_dy_xmu*invstd and
    dbias = sum_dy.  Returns dx."""
    _check_data(x, "x")
    _check_same(dy, "dy", x)
    n_channels = x.shape[1]
    mean = _vector(mean, n_channels, "mean")
    invstd = _vector(invstd, n_channels, "invstd")
    sum_dy = _vector(sum_dy, n_channels, "sum_dy")
    sum_dy_xmu = _vector(sum_dy_xmu, n_channels, "sum_dy_xmu")
    weight = _vector(weight, n_channels, "weight", default=1.0)
    if isinstance(count, (bool, np.bool_)) or not isinstance(count, numbers.Integral):
        raise TypeError(f"count must be an integer, got {type(count).__name__}")
    if training and count < 1:
        raise ValueError(f"count must be at least 1 in training, got {count}")
    _check_out(out, x)
    if x.size == 0:
        return _empty_result(x, out)
    if training:
        dy_shift = sum_dy / count
        x_coef = invstd * invstd * sum_dy_xmu / count
    else:
        dy_shift = np.zeros(n_channels)
        x_coef = np.zeros(n_channels)
    layout, (dy_view, x_view), dx_view, dx, finish = _plan([dy, x], out)
    _KERNELS["grad_input_" + layout][x.dtype](dy_view, x_view, dx_view, mean, dy_shift,
                                               x_coef, weight * invstd)
    finish()
    return dx
