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


# ---------------------------------------------------------------------------
# The variants (docs/variants.md), written from the papers' formulas.

def renorm_corrections(mean, var, running_mean, running_var, rmax, dmax, eps=1e-5):
    """Batch renormalization's r and d (Ioffe 2017) from the batch's mean and
    biased var and the running statistics before the update."""
    sigma_batch = np.sqrt(np.asarray(var, np.float64) + eps)
    sigma = np.sqrt(np.asarray(running_var, np.float64) + eps)
    r = np.clip(sigma_batch / sigma, 1.0 / rmax, rmax)
    d = np.clip((np.asarray(mean, np.float64) - np.asarray(running_mean, np.float64)) / sigma,
                -dmax, dmax)
    return r, d


def forward_train_variants(x, weight=None, bias=None, running_mean=None, running_var=None,
                           momentum=0.1, eps=1e-5, renorm=None, ghost_batch_size=None):
    """Training forward with batch renormalization (renorm=(rmax, dmax)) and/or
    ghost batches of ghost_batch_size samples.

    Returns y, mean, invstd, r, d, new_running_mean, new_running_var; the
    statistics have shape (N/G, C) with ghost batches, (C,) without; r and d
    are None without renorm, the running statistics None when not given.
    """
    x = np.asarray(x, dtype=np.float64)
    c = x.shape[1]
    weight = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    bias = np.zeros(c) if bias is None else np.asarray(bias, np.float64)
    g = x.shape[0] if ghost_batch_size is None else ghost_batch_size
    y = np.empty_like(x)
    means, variances, invstds, rs, ds = [], [], [], [], []
    for start in range(0, x.shape[0], g):
        part = x[start:start + g]
        mean, var = batch_statistics(part)
        sigma_batch = np.sqrt(var + eps)
        x_hat = (part - _per_channel(mean, part)) / _per_channel(sigma_batch, part)
        if renorm is not None:
            r, d = renorm_corrections(mean, var, running_mean, running_var, *renorm, eps=eps)
            x_hat = x_hat * _per_channel(r, part) + _per_channel(d, part)
            rs.append(r)
            ds.append(d)
        y[start:start + g] = _per_channel(weight, part) * x_hat + _per_channel(bias, part)
        means.append(mean)
        variances.append(var)
        invstds.append(1.0 / sigma_batch)
    m = _count(x[:g])
    new_mean = new_var = None
    if running_mean is not None:
        batch_mean = np.mean(means, axis=0)
        batch_var = np.mean([v * m / (m - 1) for v in variances], axis=0)  # unbiased, each
        new_mean = (1 - momentum) * np.asarray(running_mean, np.float64) + momentum * batch_mean
        new_var = (1 - momentum) * np.asarray(running_var, np.float64) + momentum * batch_var
    single = ghost_batch_size is None
    stats = [np.array(a[0] if single else a) if a else None
             for a in (means, invstds, rs, ds)]
    return (y, *stats, new_mean, new_var)


def backward_variants(dy, x, mean, invstd, weight=None, r=None, d=None,
                      ghost_batch_size=None):
    """Training backward of forward_train_variants, r and d held constant:
    per ghost batch, with x_hat = (x - mean)*invstd,
    dx = weight*r*invstd*(dy - mean(dy) - x_hat*mean(dy*x_hat)),
    dweight = sum(dy*(r*x_hat + d)), dbias = sum(dy), the last two summed
    over the ghost batches.  Returns dx, dweight, dbias."""
    dy = np.asarray(dy, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    c = x.shape[1]
    weight = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    g = x.shape[0] if ghost_batch_size is None else ghost_batch_size
    rows = (lambda a, i: None if a is None else np.asarray(a, np.float64)) if \
        ghost_batch_size is None else (lambda a, i: None if a is None else
                                       np.asarray(a, np.float64)[i])
    dx = np.empty_like(x)
    dweight = np.zeros(c)
    dbias = np.zeros(c)
    for i, start in enumerate(range(0, x.shape[0], g)):
        part, part_dy = x[start:start + g], dy[start:start + g]
        r_i = np.ones(c) if r is None else rows(r, i)
        d_i = np.zeros(c) if d is None else rows(d, i)
        invstd_i = rows(invstd, i)
        x_hat = (part - _per_channel(rows(mean, i), part)) * _per_channel(invstd_i, part)
        axes = _axes(part)
        mean_dy = part_dy.mean(axis=axes)
        mean_dy_xhat = (part_dy * x_hat).mean(axis=axes)
        dx[start:start + g] = _per_channel(weight * r_i * invstd_i, part) * (
            part_dy - _per_channel(mean_dy, part) - x_hat * _per_channel(mean_dy_xhat, part))
        dweight += (part_dy * (x_hat * _per_channel(r_i, part) + _per_channel(d_i, part))).sum(
            axis=axes)
        dbias += part_dy.sum(axis=axes)
    return dx, dweight, dbias
