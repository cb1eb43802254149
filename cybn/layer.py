"""The BatchNorm layer classes: PyTorch's module semantics over cybn's functions.

No arithmetic happens here beyond bookkeeping; the numbers come from
cybn._api.
"""
import numbers

import numpy as np

from ._api import (_activation, _axis, _check_data, _check_same, _forward_train, _real,
                   backward, forward_eval)

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]

_STATE_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


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
    """

    _allowed_ndims = (2, 3, 4, 5)
    _ndim_text = "2D to 5D"

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, dtype=np.float32, axis=1, activation=None):
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
        self._saved = None  # (x, mean, invstd, weight, used batch statistics) of the last forward
        self._saved_output = None  # y of the last forward, for the ReLU's backward
        self._saved_residual = False

    # -- modes ---------------------------------------------------------------

    def train(self, mode=True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    # -- computation ---------------------------------------------------------

    def __call__(self, x, residual=None):
        return self.forward(x, residual)

    def _check_input(self, x):
        _check_data(x, "x")
        if x.ndim not in self._allowed_ndims:
            raise ValueError(f"expected {self._ndim_text} input (got {x.ndim}D input)")
        if x.dtype != self.dtype:
            raise TypeError(f"x must have the layer's dtype {self.dtype}, got {x.dtype}")
        axis = _axis(self.axis, x.ndim)
        if x.shape[axis] != self.num_features:
            raise ValueError(f"x must have {self.num_features} channels (axis {self.axis}), "
                             f"got shape {x.shape}")

    def forward(self, x, residual=None):
        """y = bn(x), or act(bn(x) + residual) with the layer's activation."""
        self._check_input(x)
        if residual is not None:
            _check_same(residual, "residual", x)
        relu = _activation(self.activation)
        use_batch_stats = self.training or not self.track_running_stats
        weight = None if self.weight is None else np.array(self.weight, np.float64)
        if use_batch_stats:
            update = self.training and self.track_running_stats
            momentum = self.momentum
            if update and momentum is None:
                momentum = 1.0 / (self.num_batches_tracked + 1)  # cumulative average
            y, mean, invstd, updated = _forward_train(
                x, weight, self.bias,
                self.running_mean if update else None,
                self.running_var if update else None,
                0.0 if momentum is None else momentum, self.eps, None, self.axis, residual,
                self.activation)
            if updated:
                self.num_batches_tracked += 1
        else:
            mean = self.running_mean.astype(np.float64)
            invstd = 1.0 / np.sqrt(self.running_var.astype(np.float64) + self.eps)
            y = forward_eval(x, mean, self.running_var, weight, self.bias, eps=self.eps,
                             axis=self.axis, residual=residual, activation=self.activation)
        self._saved = (x, mean, invstd, weight, use_batch_stats)
        self._saved_output = y if relu else None
        self._saved_residual = residual is not None
        return y

    def backward(self, dy):
        """dx for the last forward; sets grad_weight and grad_bias when affine."""
        if self._saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward was called before forward")
        x, mean, invstd, weight, use_batch_stats = self._saved
        relu = self._saved_output is not None
        grad_residual = (np.empty_like(dy) if relu and self._saved_residual
                         and isinstance(dy, np.ndarray) else None)
        dx, grad_weight, grad_bias = backward(
            dy, x, mean, invstd, weight, training=use_batch_stats, axis=self.axis,
            activation="relu" if relu else None, y=self._saved_output,
            grad_residual=grad_residual)
        if self.affine:
            self.grad_weight = grad_weight.astype(self.dtype, copy=False)
            self.grad_bias = grad_bias.astype(self.dtype, copy=False)
        self.grad_residual = None
        if self._saved_residual:
            self.grad_residual = grad_residual if relu else dy
        return dx

    # -- state ---------------------------------------------------------------

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked = 0

    def reset_parameters(self):
        self.reset_running_stats()
        if self.affine:
            self.weight[...] = 1
            self.bias[...] = 0

    def state_dict(self):
        """Copies of the parameters and buffers under PyTorch's keys; those
        that are None (affine=False, track_running_stats=False) are left out."""
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
                if value.size != 1 or value.dtype.kind not in "iu" or value.item() < 0:
                    raise ValueError("state_dict['num_batches_tracked'] must be one "
                                     f"non-negative integer, got {given[key]!r}")
                converted[key] = int(value.item())
                continue
            if value.dtype.kind not in "fiu":
                raise TypeError(f"state_dict[{key!r}] must hold real numbers, "
                                f"got dtype {value.dtype}")
            if value.shape != (self.num_features,):
                raise ValueError(f"state_dict[{key!r}] must have shape "
                                 f"({self.num_features},), got {value.shape}")
            converted[key] = value
        for key, value in converted.items():
            if key == "num_batches_tracked":
                self.num_batches_tracked = value
            else:
                getattr(self, key)[...] = value

    def _state_keys(self):
        return tuple(k for k in _STATE_KEYS if getattr(self, k) is not None)

    def __repr__(self):
        extra = "" if self.axis == 1 else f", axis={self.axis}"
        extra += "" if self.activation is None else f", activation={self.activation!r}"
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
