"""The BatchNorm layer classes: PyTorch's module semantics over cybn's functions.

No arithmetic happens here beyond bookkeeping; the numbers come from
cybn._api.
"""
import numbers
import threading
from collections import namedtuple

import numpy as np

from ._api import (_activation, _assign, _axis, _check_data, _check_optional, _check_running,
                   _commit_training_step, _eps, _ghost_batch_size, _momentum, _real,
                   _renorm_limits, _running_float64, _train_step, _values_per_channel,
                   _vector, _warn_not_finite, backward, forward_eval)

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]

_STATE_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

# What backward needs of a forward: x, the float64 statistics and weight it
# used, whether they were the batch's, the output y (kept for a fused ReLU's
# backward, else None), whether a residual was added, (SyncBatchNorm) the
# values per channel over all processes, batch renormalization's (r, d) or
# None, and the ghost batch size or None.
Saved = namedtuple("Saved", "x mean invstd weight batch_stats output residual global_count "
                   "renorm ghost_batch_size", defaults=(None, None))


class BatchNorm:
    """Batch normalization over the channels (axis 1) of (N, C, *spatial) data.

    bn = BatchNorm(num_features, eps=1e-5, momentum=0.1, affine=True,
                   track_running_stats=True, dtype=np.float32, axis=1,
                   activation=None)

    In training mode (the default, `bn.train()`), `bn(x)` normalizes with the
    batch's statistics and updates running_mean/running_var; in evaluation
    mode (`bn.eval()`) it uses the running statistics, or the batch's when
    track_running_stats is False.  `momentum=None` gives the cumulative
    average of all batches seen.  `bn.backward(dy)` returns dx for the last
    forward and sets grad_weight and grad_bias (overwriting, not
    accumulating).  The layer keeps a reference to the last x, not a copy:
    do not modify x in place between forward and backward.

    axis=-1 normalizes channels-last data (N, *spatial, C).  activation="relu"
    fuses a ReLU after the normalization, and `bn(x, residual)` adds a
    residual before it: y = relu(bn(x) + residual), in one pass.  After such
    a forward, backward(dy) leaves the residual's gradient in grad_residual
    (dy itself when there is no activation: not a copy).

    Threads: a layer may be shared by several Python threads.  Each forward
    (statistics, running statistics, num_batches_tracked, what backward
    needs) and each backward is one step with respect to the other calls on
    the same layer (a lock per layer: separate layers run in parallel), and
    backward(dy) uses the last forward of the thread that calls it.
    grad_weight, grad_bias and grad_residual are those of the last backward
    of any thread.  A KeyboardInterrupt leaves the layer as it was before
    the step or as it is after it, never in between.

    The variants (docs/variants.md), in training mode only (evaluation is
    unchanged):

    - renorm=True: batch renormalization (Ioffe 2017) with the clip limits
      rmax >= 1 and dmax >= 0, attributes a training loop may change between
      steps (the paper raises them from 1 and 0); needs
      track_running_stats.  rmax=1, dmax=0 is plain batch norm, bit for bit.
    - ghost_batch_size=G: each group of G consecutive samples along axis 0
      is normalized with its own statistics; N must be a multiple of G; the
      running statistics are updated once per forward with the means over
      the groups of their means and unbiased variances.

    state_dict() holds exactly PyTorch's keys, so PyTorch state dicts load
    as they are: renorm, rmax, dmax and ghost_batch_size are not in it (set
    them on the layer).
    """

    _allowed_ndims = (2, 3, 4, 5)
    _ndim_text = "2D to 5D"

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, dtype=np.float32, axis=1, activation=None, *,
                 renorm=False, rmax=3.0, dmax=5.0, ghost_batch_size=None):
        if isinstance(num_features, (bool, np.bool_)) or not isinstance(
                num_features, numbers.Integral) or num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        self.num_features = int(num_features)
        self.eps = _real(eps, "eps", 0.0, np.finfo(np.float64).max)
        self.momentum = None if momentum is None else _real(momentum, "momentum", 0.0, 1.0)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.dtype = dtype
        if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral) \
                or axis == 0:
            raise ValueError(f"axis must be a nonzero integer (a channel axis), got {axis!r}")
        self.axis = int(axis)
        _activation(activation)
        self.activation = activation
        if not isinstance(renorm, (bool, np.bool_)):
            raise TypeError(f"renorm must be True or False, got {renorm!r}")
        if renorm and not track_running_stats:
            raise ValueError("renorm=True needs track_running_stats=True: r and d compare the "
                             "batch's statistics with the running ones")
        self.renorm = bool(renorm)
        self.rmax, self.dmax = _renorm_limits((rmax, dmax))
        _ghost_batch_size(ghost_batch_size, 0)
        self.ghost_batch_size = None if ghost_batch_size is None else int(ghost_batch_size)
        self.training = True
        c = self.num_features
        self.weight = np.ones(c, dtype) if self.affine else None
        self.bias = np.zeros(c, dtype) if self.affine else None
        self.grad_weight = np.zeros(c, dtype) if self.affine else None
        self.grad_bias = np.zeros(c, dtype) if self.affine else None
        if self.track_running_stats:
            self.running_mean = np.zeros(c, dtype)
            self.running_var = np.ones(c, dtype)
            self.num_batches_tracked = 0
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self.grad_residual = None
        self._lock = threading.RLock()
        self._local = threading.local()  # .saved: this thread's last forward (a Saved)

    @property
    def _saved(self):
        """This thread's last forward (a Saved), or None."""
        return getattr(self._local, "saved", None)

    def __getstate__(self):
        # Locks and thread-local data do not copy: a copy starts with its own.
        state = self.__dict__.copy()
        del state["_lock"], state["_local"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()
        self._local = threading.local()

    # -- modes ---------------------------------------------------------------

    def train(self, mode=True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    # -- computation ---------------------------------------------------------

    def __call__(self, x, residual=None):
        return self.forward(x, residual)

    def _check_input(self, x, residual=None):
        """x and residual as plain ndarrays, checked against the layer."""
        x = _check_data(x, "x")
        if x.ndim not in self._allowed_ndims:
            raise ValueError(f"expected {self._ndim_text} input (got {x.ndim}D input)")
        if x.dtype != self.dtype:
            raise TypeError(f"x must have the layer's dtype {self.dtype}, got {x.dtype}")
        axis = _axis(self.axis, x.ndim)
        if x.shape[axis] != self.num_features:
            raise ValueError(f"x must have {self.num_features} channels (axis {self.axis}), "
                             f"got shape {x.shape}")
        return x, _check_optional(residual, "residual", x)

    def _check_state(self, x):
        """The layer's own attributes, which a user may have reassigned: returns
        (weight, bias, eps) as float64 and raises, naming the attribute, for a
        value the computation cannot take."""
        c = self.num_features
        weight = _vector(self.weight, c, "weight", default=1.0)
        bias = _vector(self.bias, c, "bias", default=0.0)
        eps = _eps(self.eps)
        relu = _activation(self.activation)
        if self.momentum is not None:
            _momentum(self.momentum)
        if self.track_running_stats:
            _check_running(self.running_mean, self.running_var, x, c)
            if self.momentum is None and (
                    isinstance(self.num_batches_tracked, bool)
                    or not isinstance(self.num_batches_tracked, numbers.Integral)
                    or self.num_batches_tracked < 0):
                raise TypeError("num_batches_tracked must be a non-negative integer, got "
                                f"{self.num_batches_tracked!r}")
        return weight, bias, eps, relu

    def _check_variants(self, x):
        """renorm, rmax, dmax and ghost_batch_size, which a training loop may
        change between steps: returns (renorm's (rmax, dmax) or None, the
        ghost batch size or None) for a training forward on x."""
        if not isinstance(self.renorm, (bool, np.bool_)):
            raise TypeError(f"renorm must be True or False, got {self.renorm!r}")
        limits = None
        if self.renorm:
            if not self.track_running_stats:
                raise ValueError("renorm=True needs track_running_stats=True: r and d compare "
                                 "the batch's statistics with the running ones")
            limits = _renorm_limits((self.rmax, self.dmax))
        return limits, _ghost_batch_size(self.ghost_batch_size, x.shape[0])

    def forward(self, x, residual=None):
        """y = bn(x), or act(bn(x) + residual) with the layer's activation."""
        with self._lock:
            x, residual = self._check_input(x, residual)
            weight, bias, eps, relu = self._check_state(x)
            limits, ghost = self._check_variants(x) if self.training else (None, None)
            axis = _axis(self.axis, x.ndim)
            if self.training or not self.track_running_stats:
                count = _values_per_channel(x, axis)
                if count == 1:
                    raise ValueError("Expected more than 1 value per channel when training, "
                                     f"got input size {x.shape}")
                running = (None if limits is None
                           else _running_float64(self.running_mean, self.running_var))
                y, (mean, invstd, r, d), (mean_b, var_b, count_b) = _train_step(
                    x, weight, bias, eps, None, axis, residual, relu, count, running, limits,
                    ghost)
                saved = Saved(x, mean, invstd, weight, True, y if relu else None,
                              residual is not None, None, None if r is None else (r, d), ghost)
                if self.training:
                    if not _commit_training_step(self, mean_b, var_b, count_b, saved):
                        if self.track_running_stats and count_b:
                            _warn_not_finite()
                    return y
            else:
                mean = self.running_mean.astype(np.float64)
                var = self.running_var.astype(np.float64)
                with np.errstate(divide="ignore", invalid="ignore"):  # IEEE, as the kernels
                    invstd = 1.0 / np.sqrt(var + eps)
                y = forward_eval(x, mean, var, weight, bias, eps=eps, axis=self.axis,
                                 residual=residual, activation=self.activation)
                saved = Saved(x, mean, invstd, weight, False, y if relu else None,
                              residual is not None, None)
            _assign(self._local, saved=saved)
            return y

    def backward(self, dy):
        """dx for this thread's last forward; sets grad_weight and grad_bias when affine."""
        with self._lock:
            saved = self._saved
            if saved is None:
                raise RuntimeError(f"{type(self).__name__}.backward was called before forward "
                                   "(in this thread)")
            dx, grad_weight, grad_bias, grad_residual = self._backward_of(dy, saved)
            self._set_gradients(grad_weight, grad_bias, grad_residual)
            return dx

    def _backward_of(self, dy, saved):
        """(dx, grad_weight, grad_bias, grad_residual) of this process's data
        for the forward `saved`."""
        relu = saved.output is not None
        grad_residual = (np.empty_like(dy) if relu and saved.residual
                         and isinstance(dy, np.ndarray) else None)
        dx, grad_weight, grad_bias = backward(
            dy, saved.x, saved.mean, saved.invstd, saved.weight, training=saved.batch_stats,
            axis=self.axis, activation="relu" if relu else None, y=saved.output,
            grad_residual=grad_residual, renorm=saved.renorm,
            ghost_batch_size=saved.ghost_batch_size)
        if saved.residual:
            grad_residual = grad_residual if relu else dy
        return dx, grad_weight, grad_bias, grad_residual

    def _set_gradients(self, grad_weight, grad_bias, grad_residual):
        if self.affine:
            _assign(self, grad_weight=grad_weight.astype(self.dtype, copy=False),
                    grad_bias=grad_bias.astype(self.dtype, copy=False),
                    grad_residual=grad_residual)
        else:
            self.grad_residual = grad_residual

    # -- state ---------------------------------------------------------------

    def reset_running_stats(self):
        with self._lock:
            if self.track_running_stats:
                self.running_mean[...] = 0
                self.running_var[...] = 1
                self.num_batches_tracked = 0

    def reset_parameters(self):
        with self._lock:
            self.reset_running_stats()
            if self.affine:
                self.weight[...] = 1
                self.bias[...] = 0

    def state_dict(self):
        """Copies of the parameters and buffers under PyTorch's keys; those
        that are None (affine=False, track_running_stats=False) are left out."""
        with self._lock:
            state = {}
            for key in self._state_keys():
                value = getattr(self, key)
                state[key] = (np.array(value, dtype=np.int64) if key == "num_batches_tracked"
                              else value.copy())
            return state

    def load_state_dict(self, state_dict):
        """Load a dict such as state_dict() returns, or a PyTorch BatchNorm's
        state dict converted with .numpy().  Everything is checked before
        anything is assigned; a missing num_batches_tracked loads as 0, as in
        PyTorch."""
        with self._lock:
            converted = self._converted_state(state_dict)
            arrays = {key: np.array(value) for key, value in converted.items()
                      if key != "num_batches_tracked"}
            for key, value in arrays.items():
                getattr(self, key)[...] = value
            if "num_batches_tracked" in converted:
                self.num_batches_tracked = converted["num_batches_tracked"]

    def _converted_state(self, state_dict):
        """state_dict's values checked and converted: arrays of the layer's dtype
        and an int counter; raises, naming the key, for anything else."""
        expected = self._state_keys()
        given = dict(state_dict)
        if "num_batches_tracked" in expected:
            given.setdefault("num_batches_tracked", 0)
        missing = [k for k in expected if k not in given]
        unexpected = [k for k in given if k not in expected]
        if missing or unexpected:
            raise KeyError(f"state_dict does not match {type(self).__name__}: missing keys "
                           f"{missing}, unexpected keys {unexpected}")
        converted = {}
        for key in expected:
            value = np.asarray(given[key])
            if key == "num_batches_tracked":
                if (value.size != 1 or value.dtype.kind not in "iu"
                        or not 0 <= value.item() <= np.iinfo(np.int64).max):
                    raise ValueError("state_dict['num_batches_tracked'] must be one "
                                     "non-negative integer that fits int64, got "
                                     f"{given[key]!r}")
                converted[key] = int(value.item())
                continue
            if value.dtype.kind not in "fiu":
                raise TypeError(f"state_dict[{key!r}] must hold real numbers, "
                                f"got dtype {value.dtype}")
            if value.shape != (self.num_features,):
                raise ValueError(f"state_dict[{key!r}] must have shape "
                                 f"({self.num_features},), got {value.shape}")
            with np.errstate(over="ignore"):
                cast = value.astype(self.dtype)
            overflow = np.isfinite(value) & ~np.isfinite(cast)
            if np.any(overflow):
                raise ValueError(f"state_dict[{key!r}] holds {value[overflow][0]!r}, beyond the "
                                 f"range of the layer's dtype {self.dtype}")
            converted[key] = cast
        return converted

    def _state_keys(self):
        return tuple(k for k in _STATE_KEYS if getattr(self, k) is not None)

    def __repr__(self):
        extra = "" if self.axis == 1 else f", axis={self.axis}"
        extra += "" if self.activation is None else f", activation={self.activation!r}"
        if self.renorm:
            extra += f", renorm=True, rmax={self.rmax}, dmax={self.dmax}"
        if self.ghost_batch_size is not None:
            extra += f", ghost_batch_size={self.ghost_batch_size}"
        return (f"{type(self).__name__}({self.num_features}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}, dtype={self.dtype.name}"
                f"{extra})")


class BatchNorm1d(BatchNorm):
    """BatchNorm for (N, C) or (N, C, L) input."""
    _allowed_ndims = (2, 3)
    _ndim_text = "2D or 3D"


class BatchNorm2d(BatchNorm):
    """BatchNorm for (N, C, H, W) input."""
    _allowed_ndims = (4,)
    _ndim_text = "4D"


class BatchNorm3d(BatchNorm):
    """BatchNorm for (N, C, D, H, W) input."""
    _allowed_ndims = (5,)
    _ndim_text = "5D"
