"""Slow, plain float64 batch normalization, written from the formulas.

This is the yardstick for tests and benchmarks; the library never calls it.
Everything is computed in float64 whatever the input type, over the axes
(0, 2, 3, ...) of an (N, C, *spatial) array.
"""
import numpy as np


def _axes(x):
    return (0,) + tuple(range(2, x.ndim))


def _per_channel(v, x):
    """Shape a (C,) vector to broadcast against x."""
    return np.asarray(v, dtype=np.float64).reshape((1, -1) + (1,) * (x.ndim - 2))


def _count(x):
    return x.size // x.shape[1] if x.shape[1] else 0


def batch_statistics(x):
    """mean and biased variance per channel."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=_axes(x))
    var = ((x - _per_channel(mean, x)) ** 2).mean(axis=_axes(x))
    return mean, var


def forward_train(x, weight=None, bias=None, running_mean=None, running_var=None,
                  momentum=0.1, eps=1e-5):
    """Returns y, mean, invstd, new_running_mean, new_running_var (the last two
    None when no running statistics are given)."""
    x = np.asarray(x, dtype=np.float64)
    c = x.shape[1]
    weight = np.ones(c) if weight is None else weight
    bias = np.zeros(c) if bias is None else bias
    mean, var = batch_statistics(x)
    invstd = 1.0 / np.sqrt(var + eps)
    x_hat = (x - _per_channel(mean, x)) * _per_channel(invstd, x)
    y = _per_channel(weight, x) * x_hat + _per_channel(bias, x)
    new_mean = new_var = None
    if running_mean is not None:
        m = _count(x)
        new_mean = (1 - momentum) * np.asarray(running_mean, np.float64) + momentum * mean
        new_var = ((1 - momentum) * np.asarray(running_var, np.float64)
                   + momentum * var * m / (m - 1))
    return y, mean, invstd, new_mean, new_var


def forward_eval(x, running_mean, running_var, weight=None, bias=None, eps=1e-5):
    x = np.asarray(x, dtype=np.float64)
    c = x.shape[1]
    weight = np.ones(c) if weight is None else weight
    bias = np.zeros(c) if bias is None else bias
    invstd = 1.0 / np.sqrt(np.asarray(running_var, np.float64) + eps)
    x_hat = (x - _per_channel(running_mean, x)) * _per_channel(invstd, x)
    return _per_channel(weight, x) * x_hat + _per_channel(bias, x)


def backward(dy, x, mean, invstd, weight=None, training=True):
    """Returns dx, dweight, dbias."""
    dy = np.asarray(dy, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    c = x.shape[1]
    weight = np.ones(c) if weight is None else weight
    x_hat = (x - _per_channel(mean, x)) * _per_channel(invstd, x)
    dbias = dy.sum(axis=_axes(x))
    dweight = (dy * x_hat).sum(axis=_axes(x))
    scale = _per_channel(np.asarray(weight, np.float64) * np.asarray(invstd, np.float64), x)
    if training:
        m = _count(x)
        dx = scale * (dy - _per_channel(dbias, x) / m - x_hat * _per_channel(dweight, x) / m)
    else:
        dx = scale * dy
    return dx, dweight, dbias
