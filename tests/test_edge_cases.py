"""Numerical edge cases and tensors past 2**31 elements."""
import warnings

import numpy as np
import pytest

import cybn
from cybn import reference


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batch_built_to_cancel(dtype):
    """(2, 128, 2, 2) at offset 1e4 with spread 1e-2: E[x^2] - E[x]^2 would cancel."""
    rng = np.random.default_rng(0)
    signs = np.where(rng.random((2, 128, 2, 2)) < 0.5, -1.0, 1.0)
    x = (1e4 + 1e-2 * signs * rng.random((2, 128, 2, 2))).astype(dtype)
    _, mean, invstd = cybn.forward_train(x, eps=0.0)
    ref_mean, ref_var = reference.batch_statistics(x)
    var = 1.0 / invstd.astype(np.float64) ** 2
    np.testing.assert_allclose(var, ref_var, rtol=1e-5 if dtype == np.float32 else 1e-10)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-7 if dtype == np.float32 else 1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_denormal_inputs(dtype):
    tiny = np.finfo(dtype).smallest_subnormal
    rng = np.random.default_rng(1)
    x = (rng.integers(-1000, 1000, (4, 3, 5)) * tiny).astype(dtype)
    assert np.any((x != 0) & (np.abs(x) < np.finfo(dtype).tiny))  # denormals indeed
    # float32 denormals square to normal float64 numbers: eps = 0 is fine there;
    # in float64 the variance underflows to 0 and needs eps > 0.
    eps = 0.0 if dtype == np.float32 else 1e-300
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # invstd overflows float32: inf, no warning
        y, mean, invstd = cybn.forward_train(x, eps=eps)
    expected = reference.forward_train(x, eps=eps)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, expected[0], rtol=1e-5,
                               atol=1e-5 * np.max(np.abs(expected[0])) + 4 * tiny)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_eval_with_zero_and_negative_running_variance(dtype):
    """IEEE results without warnings, as in the kernels: var + eps = 0 divides
    by zero, var + eps < 0 is the square root of a negative number."""
    x = np.array([[1.0, 2.0, 3.0], [-1.0, 0.0, 4.0]], dtype)
    running_mean = np.array([0.0, 0.0, 3.0], dtype)
    running_var = np.array([0.0, -1.0, 1.0], dtype)
    with np.errstate(all="raise"):  # a NumPy warning would raise here
        y = cybn.forward_eval(x, running_mean, running_var, eps=0.0)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y[:, 0], [np.inf, -np.inf])
    assert np.all(np.isnan(y[:, 1]))
    np.testing.assert_array_equal(y[:, 2], [0.0, 1.0])


def test_float32_values_near_1e30_and_their_gradients():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((3, 4, 6)) * 3e30 + 1e30).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y, mean, invstd = cybn.forward_train(x)
    dx, dweight, dbias = cybn.backward(dy, x, mean, invstd)
    for got in (y, mean, invstd, dx, dweight, dbias):
        assert np.all(np.isfinite(got))
    np.testing.assert_allclose(y, reference.forward_train(x)[0], rtol=2e-5, atol=2e-5)
    ref_dx = reference.backward(dy, x, mean, invstd)[0]
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-4, atol=1e-4 * np.max(np.abs(ref_dx)))


def _memory_available():
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0


HUGE = 2 ** 31 + 8  # float32 values: 8 GiB, an even count per channel


@pytest.mark.skipif(_memory_available() < 11 * 2 ** 30,
                    reason="needs 11 GiB of free memory for an 8 GiB tensor")
def test_in_place_past_2_to_the_31_elements():
    """Index arithmetic stays correct past 2**31 elements (in place, out=x)."""
    per_channel = HUGE // 2
    x = np.empty((1, 2, per_channel), np.float32)
    x[0, 0, 0::2] = 3.0  # channel 0: 3, 1, 3, 1, ... -> mean 2, var 1
    x[0, 0, 1::2] = 1.0
    x[0, 1] = 5.0  # channel 1: constant but for its very last value
    x[0, 1, -1] = 7.0
    y, mean, invstd = cybn.forward_train(x, None, np.array([0.0, 0.5]), out=x)
    assert y is x
    assert mean[0] == 2.0 and abs(float(invstd[0]) - 1 / np.sqrt(1 + 1e-5)) < 1e-6
    expected_mean_1 = 5.0 + 2.0 / per_channel
    assert abs(float(mean[1]) - expected_mean_1) < 1e-6
    scaled = np.float32(1 / np.sqrt(1 + 1e-5))
    # both ends of each channel, beyond 2**31 flat elements for the last ones
    np.testing.assert_allclose(x[0, 0, [0, 1, -2, -1]], [scaled, -scaled, scaled, -scaled],
                               rtol=1e-6)
    assert x[0, 1, -1] > 100 and np.all(x[0, 1, :3] < 0.5)
    del x, y
