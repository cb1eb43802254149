"""The accuracy standard for float32 data, on adversarial batches.

Whatever arithmetic the element-wise passes use, with float64 statistics
(a layer's, or forward_train(..., stats_dtype=np.float64)):

- every y is within 6 float32 ulps of max(|weight * x_hat|, |bias|) of the
  exact value;
- every dx is within 8 float32 ulps of the largest of its terms,
  |w*invstd*dy|, |w*invstd*mean(dy)| and |w*invstd*x_hat*mean(dy*x_hat)|;
- a constant channel gives exactly bias, and 1e7 + N(0, 1) data gives y
  within 1e-6 of the float64 result;
- none of it depends on |mean| / std.

"Exact" is the float64 formula applied to the same float32 values (float64
errors are some 1e-9 ulps of float32).
"""
import numpy as np
import pytest

import cybn

Y_ULPS, DX_ULPS = 6, 8


def ulp32(v):
    return np.spacing(np.abs(v).astype(np.float32)).astype(np.float64)


def channel_view(v, x):
    return np.asarray(v, np.float64).reshape((1, -1) + (1,) * (x.ndim - 2))


def exact(x, weight, bias, dy):
    """y and dx (training) in float64 from the formulas, and their error scales."""
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    axes = (0, *range(2, x.ndim))
    mean = x64.mean(axis=axes, keepdims=True)
    var = ((x64 - mean) ** 2).mean(axis=axes, keepdims=True)
    invstd = 1 / np.sqrt(var + 1e-5)
    x_hat = (x64 - mean) * invstd
    w, b = channel_view(weight, x), channel_view(bias, x)
    y = w * x_hat + b
    mean_dy = dy64.mean(axis=axes, keepdims=True)
    mean_dy_xhat = (dy64 * x_hat).mean(axis=axes, keepdims=True)
    dx = w * invstd * (dy64 - mean_dy - x_hat * mean_dy_xhat)
    y_scale = np.maximum(np.abs(w * x_hat), np.abs(b))
    terms = [np.abs(w * invstd * dy64), np.abs(w * invstd * mean_dy) + 0 * dy64,
             np.abs(w * invstd * x_hat * mean_dy_xhat)]
    return y, dx, y_scale, np.maximum.reduce(terms)


def adversarial_batches():
    rng = np.random.default_rng(2024)
    yield "offset 1e7", (1e7 + rng.standard_normal((16, 4, 6, 6))).astype(np.float32)
    yield "offset 1e4, std 1e-3", (1e4 + 1e-3 * rng.standard_normal((8, 3, 5, 7))).astype(
        np.float32)
    scales = np.array([1e-20, 1e-3, 1.0, 1e3, 1e20]).reshape(1, 5, 1, 1)
    offsets = np.array([0, 5e-20, -3e3, 1e6, 2e20]).reshape(1, 5, 1, 1)
    yield "mixed channel scales", (offsets + scales * rng.standard_normal((4, 5, 8, 8))).astype(
        np.float32)
    base = rng.uniform(-1e5, 1e5, (1, 128, 1, 1))
    yield "cancellation (2, 128, 2, 2)", (base + rng.standard_normal((2, 128, 2, 2))).astype(
        np.float32)
    yield "rows (64, 300) offset 3e5", (3e5 + rng.standard_normal((64, 300))).astype(np.float32)
    yield "rows (5, 2048) tiny batch", (rng.standard_normal((5, 2048)) * 1e4 - 7e6).astype(
        np.float32)


@pytest.mark.parametrize("layout", ["planar", "channels-last"])
@pytest.mark.parametrize("name,x", list(adversarial_batches()), ids=lambda v: v
                         if isinstance(v, str) else "")
def test_y_and_dx_within_the_ulp_bounds(name, x, layout):
    rng = np.random.default_rng(7)
    c = x.shape[1]
    weight = rng.uniform(-3, 3, c).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32) * 10
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y_exact, dx_exact, y_scale, dx_scale = exact(x, weight, bias, dy)
    axis = 1
    if layout == "channels-last":  # (for 2-D data the same as planar)
        x, dy = (np.ascontiguousarray(np.moveaxis(a, 1, -1)) for a in (x, dy))
        axis = -1
    y, mean, invstd = cybn.forward_train(x, weight, bias, axis=axis, stats_dtype=np.float64)
    dx, _, _ = cybn.backward(dy, x, mean, invstd, weight, axis=axis)
    if axis == -1:
        y, dx = np.moveaxis(y, -1, 1), np.moveaxis(dx, -1, 1)
    y_err = np.abs(y.astype(np.float64) - y_exact) / ulp32(y_scale)
    dx_err = np.abs(dx.astype(np.float64) - dx_exact) / ulp32(dx_scale)
    assert y_err.max() <= Y_ULPS, f"{name}: y off by {y_err.max():.2f} ulps"
    assert dx_err.max() <= DX_ULPS, f"{name}: dx off by {dx_err.max():.2f} ulps"


def test_constant_channel_gives_exactly_bias():
    for value in (1e7, -3.25, 1e-30, 6e37):
        x = np.full((8, 3, 4, 4), value, np.float32)
        x[:, 1] = np.random.default_rng(0).standard_normal((8, 4, 4))
        bias = np.array([0.5, 2.0, -7.125], np.float32)
        for shaped in (x, np.ascontiguousarray(x.reshape(8, -1)[:, :48].reshape(8, 3, 16))):
            y, _, _ = cybn.forward_train(shaped, np.full(3, 3.0), bias)
            assert np.all(y[:, 0] == bias[0]) and np.all(y[:, 2] == bias[2]), value


def test_offset_1e7_within_1e6_of_float64():
    rng = np.random.default_rng(1)
    x = (1e7 + rng.standard_normal((32, 8, 7, 7))).astype(np.float32)
    y32, _, _ = cybn.forward_train(x)
    y64, _, _ = cybn.forward_train(x.astype(np.float64))
    assert np.max(np.abs(y32 - y64)) <= 1e-6 + np.max(np.abs(y64)) * 2 ** -24


def test_error_does_not_grow_with_the_offset():
    """The same data shifted further and further from 0: the error in ulps of
    the terms stays within the bound (it would grow with |mean|/std if the
    mean were subtracted after scaling)."""
    rng = np.random.default_rng(3)
    noise = rng.standard_normal((16, 4, 8, 8))
    for offset in (0.0, 1e2, 1e4, 1e6):
        x = (offset + noise).astype(np.float32)
        y_exact, _, y_scale, _ = exact(x, np.ones(4), np.zeros(4), np.zeros_like(x))
        y, _, _ = cybn.forward_train(x, stats_dtype=np.float64)
        err = np.max(np.abs(y - y_exact) / ulp32(y_scale))
        assert err <= Y_ULPS, f"offset {offset}: {err:.2f} ulps"
