"""cybn's functions against the float64 reference (cybn.reference)."""
import warnings

import numpy as np
import pytest

import cybn
from cybn import reference
from conftest import SHAPES, assert_close, layouts, random_batch


def _params(c, affine, seed=1):
    if not affine:
        return None, None
    rng = np.random.default_rng(seed)
    return rng.uniform(0.5, 2.0, c), rng.standard_normal(c)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("momentum", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("eps", [1e-5, 0.5])
def test_forward_train_matches_reference(shape, affine, momentum, eps, dtype):
    x = random_batch(shape, dtype, offset=3.0, scale=2.0)
    c = shape[1]
    weight, bias = _params(c, affine)
    rng = np.random.default_rng(2)
    running_mean = rng.standard_normal(c).astype(dtype)
    running_var = rng.uniform(0.5, 2, c).astype(dtype)
    expected = reference.forward_train(x, weight, bias, running_mean, running_var,
                                       momentum=momentum, eps=eps)
    y, mean, invstd = cybn.forward_train(x, weight, bias, running_mean, running_var,
                                         momentum=momentum, eps=eps)
    assert y.dtype == mean.dtype == invstd.dtype == dtype
    assert mean.shape == invstd.shape == (c,)
    assert_close(y, expected[0], dtype, "y")
    assert_close(mean, expected[1], dtype, "mean")
    assert_close(invstd, expected[2], dtype, "invstd")
    assert_close(running_mean, expected[3], dtype, "running_mean")
    assert_close(running_var, expected[4], dtype, "running_var")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_train_without_running_stats(shape, dtype):
    x = random_batch(shape, dtype, seed=3)
    y, mean, invstd = cybn.forward_train(x)
    expected = reference.forward_train(x)
    assert_close(y, expected[0], dtype, "y")
    assert_close(mean, expected[1], dtype, "mean")
    assert_close(invstd, expected[2], dtype, "invstd")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("eps", [1e-5, 0.5])
def test_forward_eval_matches_reference(shape, affine, eps, dtype):
    x = random_batch(shape, dtype, seed=4)
    c = shape[1]
    weight, bias = _params(c, affine)
    rng = np.random.default_rng(5)
    running_mean = rng.standard_normal(c).astype(dtype)
    running_var = rng.uniform(0.5, 2, c).astype(dtype)
    y = cybn.forward_eval(x, running_mean, running_var, weight, bias, eps=eps)
    assert y.dtype == dtype
    assert_close(y, reference.forward_eval(x, running_mean, running_var, weight, bias, eps),
                 dtype, "y")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_backward_matches_reference(shape, training, affine, dtype):
    x = random_batch(shape, dtype, seed=6, offset=-1.0, scale=3.0)
    dy = random_batch(shape, dtype, seed=7)
    c = shape[1]
    weight, _ = _params(c, affine)
    _, mean, invstd = cybn.forward_train(x, weight)
    dx, dweight, dbias = cybn.backward(dy, x, mean, invstd, weight, training=training)
    expected = reference.backward(dy, x, mean, invstd, weight, training=training)
    assert dx.dtype == dweight.dtype == dbias.dtype == dtype
    # dx in training is a difference of terms of size |dy|: scale errors by those.
    assert_close(dx, expected[0], dtype, "dx")
    assert_close(dweight, expected[1], dtype, "dweight")
    assert_close(dbias, expected[2], dtype, "dbias")


@pytest.mark.parametrize("shape", [(160, 1024, 8, 8), (8200, 130), (300, 520)], ids=str)
def test_work_splits_of_larger_tensors_match_reference(shape, dtype):
    """Other code paths: in calls of over 16 MiB in all, small H x W is walked
    in memory order; (N, C) rows over 4 MiB of 256 B to 4 KiB are summed one
    at a time; few rows in many channels are cut into channel blocks."""
    x = random_batch(shape, dtype, seed=40, offset=-2.0)
    dy = random_batch(x.shape, dtype, seed=41)
    w = np.linspace(0.5, 1.5, shape[1])
    y, mean, invstd = cybn.forward_train(x, w, None, eps=0.1)
    expected = reference.forward_train(x, w, None, eps=0.1)
    assert_close(y, expected[0], dtype, "y")
    assert_close(mean, expected[1], dtype, "mean")
    assert_close(invstd, expected[2], dtype, "invstd")
    dx, dw, db = cybn.backward(dy, x, mean, invstd, w)
    ref = reference.backward(dy, x, mean, invstd, w)
    assert_close(dx, ref[0], dtype, "dx")
    assert_close(dw, ref[1], dtype, "dweight")
    assert_close(db, ref[2], dtype, "dbias")
    # and fused with a residual and a ReLU
    y, _, _ = cybn.forward_train(x, w, None, eps=0.1, residual=dy, activation="relu")
    assert_close(y, np.maximum(expected[0] + dy, 0), dtype, "relu(y + residual)")
    g = np.empty_like(dy)
    dx, dw, db = cybn.backward(dy, x, mean, invstd, w, activation="relu", y=y, grad_residual=g)
    masked = dy * (y > 0)
    np.testing.assert_array_equal(g, masked)
    ref = reference.backward(masked, x, mean, invstd, w)
    assert_close(dx, ref[0], dtype, "masked dx")
    assert_close(dw, ref[1], dtype, "masked dweight")


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 5, 6), (2, 3, 2, 3, 4), (8, 70, 1, 1)], ids=str)
def test_every_layout_gives_the_same_values(shape, dtype):
    """Fortran, channels-last, negative strides, steps, read-only: all correct."""
    x = random_batch(shape, dtype, seed=8, offset=1.0)
    dy = random_batch(shape, dtype, seed=9)
    c = shape[1]
    weight, bias = _params(c, True)
    ref_y, ref_mean, ref_invstd, *_ = reference.forward_train(x, weight, bias)
    ref_eval = reference.forward_eval(x, ref_mean, 1 / ref_invstd ** 2, weight, bias, 0.0)
    for name, xl in layouts(x):
        for dname, dyl in layouts(dy):
            if dname not in ("C", name):  # x's layout with dy in C order and in its own
                continue
            y, mean, invstd = cybn.forward_train(xl, weight, bias)
            assert_close(y, ref_y, dtype, f"y, x {name}")
            assert_close(mean, ref_mean, dtype, f"mean, x {name}")
            y_eval = cybn.forward_eval(xl, ref_mean, 1 / ref_invstd ** 2, weight, bias, eps=0.0)
            assert_close(y_eval, ref_eval, dtype, f"eval y, x {name}")
            dx, dweight, dbias = cybn.backward(dyl, xl, mean, invstd, weight)
            expected = reference.backward(dy, x, mean, invstd, weight)
            assert_close(dx, expected[0], dtype, f"dx, x {name}, dy {dname}")
            assert_close(dweight, expected[1], dtype, f"dweight, x {name}, dy {dname}")
            assert_close(dbias, expected[2], dtype, f"dbias, x {name}, dy {dname}")


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 5, 6), (8, 70, 1, 1)], ids=str)
def test_out_in_every_layout_and_in_place(shape, dtype):
    x = random_batch(shape, dtype, seed=10)
    dy = random_batch(shape, dtype, seed=11)
    y_expected, mean, invstd = cybn.forward_train(x)
    dx_expected, _, _ = cybn.backward(dy, x, mean, invstd)
    for name, template in layouts(np.zeros(shape, dtype)):
        if not template.flags.writeable:
            continue
        y, *_ = cybn.forward_train(x, out=template)
        assert y is template, name
        np.testing.assert_array_equal(template, y_expected, err_msg=name)
        out = template.copy() if name == "C" else template
        dx, _, _ = cybn.backward(dy, x, mean, invstd, out=out)
        assert dx is out
        np.testing.assert_array_equal(out, dx_expected, err_msg=name)
    # in place: out=x forward, out=dy backward, out=x backward
    xi = x.copy()
    y, _, _ = cybn.forward_train(xi, out=xi)
    assert y is xi
    np.testing.assert_array_equal(xi, y_expected)
    dyi = dy.copy()
    dx, _, _ = cybn.backward(dyi, x, mean, invstd, out=dyi)
    assert dx is dyi
    np.testing.assert_array_equal(dyi, dx_expected)
    xi = x.copy()
    cybn.backward(dy, xi, mean, invstd, out=xi)
    np.testing.assert_array_equal(xi, dx_expected)
    xi = x.copy()
    cybn.forward_eval(xi, mean, 1 / invstd.astype(np.float64) ** 2, eps=0.0, out=xi)
    np.testing.assert_allclose(xi, y_expected, rtol=1e-5, atol=1e-5)


def test_partially_overlapping_out_is_handled(dtype):
    """out overlapping x elsewhere than element-for-element still gives the right answer."""
    buf = random_batch((10, 4), dtype, seed=12)
    x = buf[:8]
    expected, _, _ = cybn.forward_train(x.copy())
    out = buf[2:]
    cybn.forward_train(x, out=out)
    np.testing.assert_array_equal(out, expected)


def test_zero_size_batch_leaves_running_stats_untouched(dtype):
    x = np.empty((0, 3, 4, 4), dtype)
    running_mean = np.array([1, 2, 3], dtype)
    running_var = np.array([4, 5, 6], dtype)
    y, mean, invstd = cybn.forward_train(x, None, None, running_mean, running_var)
    assert y.shape == x.shape and mean.shape == invstd.shape == (3,)
    np.testing.assert_array_equal(running_mean, [1, 2, 3])
    np.testing.assert_array_equal(running_var, [4, 5, 6])
    dx, dweight, dbias = cybn.backward(x, x, mean, invstd, np.ones(3))
    assert dx.shape == x.shape
    np.testing.assert_array_equal(dweight, 0)
    np.testing.assert_array_equal(dbias, 0)
    assert cybn.forward_eval(x, running_mean, running_var).shape == x.shape


@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_float32_variance_at_large_offsets(offset):
    """float64 accumulation: 1e4 + N(0,1) in float32 keeps var to 1e-5 relative."""
    x = random_batch((16, 4, 32, 32), np.float32, seed=13, offset=offset)
    _, mean, invstd = cybn.forward_train(x, eps=0.0)
    ref_mean, ref_var = reference.batch_statistics(x)
    var = 1 / invstd.astype(np.float64) ** 2
    np.testing.assert_allclose(var, ref_var, rtol=1e-5)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-7)


@pytest.mark.parametrize("shape", [(40, 1024, 8, 8), (32, 6, 20, 20), (4, 3, 96, 96)], ids=str)
def test_float64_moments_where_the_sample_shift_misses_the_mean(shape):
    """float64 statistics take one pass about a sample mean (16 runs spread
    over the batch, 8 values of each) and a centred pass where that sample
    is off by over std / 4.  Every other channel here has its sampled values
    at +5 over 0.1 N(0, 1), far off; all of them on a 1e6 offset.  Shapes:
    memory-order walk (short runs in a big call), parts of channels, and
    one task per channel."""
    x = random_batch(shape, np.float64, seed=47, offset=1e6, scale=0.1)
    n = shape[0]
    flat = x.reshape(n, shape[1], -1)
    runs = min(n, 16)
    for k in range(runs):
        flat[k * n // runs, ::2, :8] += 5.0
    # Long double (64 significant bits on x86), two passes.
    axes = (0,) + tuple(range(2, x.ndim))
    exact = x.astype(np.longdouble)
    ref_mean = exact.mean(axis=axes)
    ref_m2 = ((exact - ref_mean.reshape((1, -1) + (1,) * (x.ndim - 2))) ** 2).sum(axis=axes)
    count, mean, m2 = cybn.batch_moments(x)
    np.testing.assert_allclose(mean, ref_mean.astype(np.float64), rtol=1e-15)
    # Measured: at most 3e-16 relative; one pass about the far sample, 1.5e-13.
    np.testing.assert_allclose(m2, ref_m2.astype(np.float64), rtol=2e-15)
    y, _, invstd = cybn.forward_train(x, eps=0.0)  # its own path for the last shape
    np.testing.assert_allclose(1 / invstd**2, (ref_m2 / count).astype(np.float64), rtol=4e-15)


def test_huge_values_give_finite_correct_output():
    x = random_batch((8, 3, 5, 5), np.float32, seed=14, scale=1e30)
    y, _, invstd = cybn.forward_train(x)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(invstd))
    assert_close(y, reference.forward_train(x)[0], np.float32, "y at 1e30")


# 5.062626145025364: 128 copies of it, added one by one, are not 128 times it.
@pytest.mark.parametrize("value", [1e7, -3.25, 1e-3, 5.062626145025364])
def test_constant_channel_normalizes_to_exactly_bias(value, dtype):
    x = np.full((4, 3, 5, 5), value, dtype)
    x[:, 1] = random_batch((4, 5, 5), dtype, seed=15)  # one channel that is not constant
    bias = np.array([0.5, 0.0, -2.0], dtype)
    y, mean, invstd = cybn.forward_train(x, np.array([3.0, 1.0, 7.0]), bias)
    np.testing.assert_array_equal(y[:, 0], bias[0])
    np.testing.assert_array_equal(y[:, 2], bias[2])
    assert mean[0] == mean[2] == dtype(value)
    # channels-last layout takes the other kernel: the same promise holds
    xl = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    yl, _, _ = cybn.forward_train(xl, np.array([3.0, 1.0, 7.0]), bias)
    np.testing.assert_array_equal(yl[:, 0], bias[0])


def test_nan_and_inf_propagate_and_running_stats_survive(dtype):
    x = random_batch((4, 3, 4, 4), dtype, seed=16)
    x[0, 1, 0, 0] = np.nan
    x[1, 2, 1, 1] = np.inf
    running_mean = np.zeros(3, dtype)
    running_var = np.ones(3, dtype)
    with pytest.warns(RuntimeWarning, match="running_mean and running_var were left unchanged"
                      ) as caught:
        y, mean, _ = cybn.forward_train(x, None, None, running_mean, running_var)
    assert [w.filename for w in caught] == [__file__]  # points at the caller
    assert np.all(np.isnan(y[:, 1])) and np.isnan(mean[1])
    assert np.isnan(y[1, 2, 1, 1])  # inf - mean(inf)
    assert np.all(np.isfinite(y[:, 0]))
    assert_close(y[:, 0], reference.forward_train(x[:, :1])[0][:, 0], dtype, "finite channel")
    np.testing.assert_array_equal(running_mean, 0)
    np.testing.assert_array_equal(running_var, 1)


def test_finite_batch_updates_running_stats_without_warning(dtype):
    x = random_batch((4, 3, 4, 4), dtype, seed=17)
    running_mean = np.zeros(3, dtype)
    running_var = np.ones(3, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cybn.forward_train(x, None, None, running_mean, running_var)
    assert np.all(running_mean != 0)


def test_eps_zero_on_a_constant_channel_follows_ieee(dtype):
    """Documented: var + eps = 0 gives invstd = inf and y = NaN (0 * inf), no crash."""
    x = np.ones((4, 2, 3), dtype)
    x[:, 1] = random_batch((4, 3), dtype, seed=18)
    with np.errstate(all="ignore"):
        y, _, invstd = cybn.forward_train(x, eps=0.0)
    assert np.isinf(invstd[0]) and np.all(np.isnan(y[:, 0]))
    assert np.all(np.isfinite(y[:, 1]))


def test_integer_and_list_parameters_are_accepted():
    x = random_batch((5, 3), np.float32, seed=19)
    y1, _, _ = cybn.forward_train(x, [1, 2, 3], [0, 0, 1])
    y2, _, _ = cybn.forward_train(x, np.array([1.0, 2.0, 3.0]), np.array([0.0, 0.0, 1.0]))
    np.testing.assert_array_equal(y1, y2)


@pytest.mark.parametrize("shape", [(16, 64, 64, 64), (65536, 256)], ids=str)
def test_no_full_size_temporaries_with_out(shape):
    """With out= given, only O(C) scratch is allocated: no copy of the data."""
    import tracemalloc

    x = random_batch(shape, np.float32, seed=30)
    out = np.empty_like(x)
    dy = random_batch(shape, np.float32, seed=31)
    c = shape[1]
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    _, mean, invstd = cybn.forward_train(x, None, None, rm, rv, out=out)  # warm up
    tracemalloc.start()
    try:
        cybn.forward_train(x, None, None, rm, rv, out=out)
        cybn.forward_eval(x, rm, rv, out=out)
        cybn.backward(dy, x, mean, invstd, out=out)
        cybn.forward_train(x, out=out, residual=dy, activation="relu")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * c * 8 + 65536, f"peak {peak} bytes for {x.nbytes} bytes of data"


def test_evaluation_coefficients_in_one_call_match_those_converted_one_by_one():
    """forward_eval takes its four vectors in one C call when they are float32
    or float64 arrays (of any stride); lists, ints and other dtypes go one by
    one through NumPy: both give the same bits, with weight and bias absent
    too, and with running_var + eps <= 0 (infinite or NaN scale)."""
    x = random_batch((6, 5, 3, 3), np.float64, seed=50)
    rng = np.random.default_rng(51)
    rm, w, b = rng.standard_normal(5), rng.uniform(0.5, 2, 5), rng.standard_normal(5)
    rv = np.array([0.5, 2.0, 0.0, -1e-5, 3.0])
    strided = np.empty(10)
    strided[::2] = rv
    for args in [(rm, rv, w, b), (rm, rv, None, None), (rm.astype(np.float32), strided[::2],
                                                        w.astype(np.float32), None)]:
        with np.errstate(all="ignore"):
            quick = cybn.forward_eval(x, *args, eps=1e-5)
            slow = cybn.forward_eval(x, *[None if a is None else a.tolist() for a in args],
                                     eps=1e-5)
            mean, var, weight, bias = (np.asarray(a if a is not None else np.full(5, d),
                                                  np.float64)
                                       for a, d in zip(args, (0, 0, 1.0, 0.0)))
            expected = (x - mean[:, None, None]) / np.sqrt(var + 1e-5)[:, None, None] \
                * weight[:, None, None] + bias[:, None, None]
        np.testing.assert_array_equal(quick, slow)
        np.testing.assert_allclose(quick, expected, rtol=1e-14, atol=1e-14)
