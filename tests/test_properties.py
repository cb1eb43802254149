"""Property tests (hypothesis): random shapes, dtypes, layouts, parameters and
extreme values, every function and the layer against cybn.reference.

The default profile is small enough for CI; HYPOTHESIS_PROFILE=thorough runs
many more examples.
"""
import os
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import cybn
from cybn import reference
from test_errors import Untouched

settings.register_profile("ci", max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=3000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}

LAYOUTS = ["C", "Fortran", "channels-last", "transposed-spatial", "step-sliced",
           "negative-strides", "read-only", "subclass"]


class Subclass(np.ndarray):
    """An ndarray subclass whose reshape is not ndarray's: cybn must compute
    on the plain array it holds.  (Misaligned layouts are drawn in
    tests/misaligned_cases.py, which runs in a subprocess.)"""

    def reshape(self, *args, **kwargs):
        raise AssertionError("cybn called a subclass's reshape")


def in_layout(x, layout):
    """x's values in the named memory layout."""
    if layout == "Fortran":
        return np.asfortranarray(x)
    if layout == "channels-last":
        return np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    if layout == "transposed-spatial" and x.ndim > 2:
        return np.ascontiguousarray(np.swapaxes(x, -1, -2)).swapaxes(-1, -2)
    if layout == "step-sliced":
        padded = np.zeros(x.shape[:1] + (2 * x.shape[1],) + x.shape[2:], x.dtype)
        padded[:, ::2] = x
        return padded[:, ::2]
    if layout == "negative-strides":
        return np.ascontiguousarray(x[::-1, ::-1])[::-1, ::-1]
    if layout == "read-only":
        x = x.copy()
        x.flags.writeable = False
    if layout == "subclass":
        return x.view(Subclass)
    return x


@st.composite
def batches(draw, min_values_per_channel=0):
    dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64])))
    rank = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=rank, max_size=rank)))
    shape = (shape[0], max(shape[1], 1)) + shape[2:]
    count = int(np.prod(shape)) // shape[1]
    assume(count >= min_values_per_channel)
    magnitude = draw(st.sampled_from([1e-40, 1e-30, 1e-3, 1.0, 1e4, 1e30]))  # 1e-40: float32 denormals
    offset = draw(st.sampled_from([0.0, 1.0, -1e3, 1e6]))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    values = offset + magnitude * rng.standard_normal(shape)
    if draw(st.booleans()):  # a constant channel
        values[:, 0] = offset
    x = values.astype(dtype)
    with np.errstate(over="ignore"):
        assume(np.all(np.isfinite(x)))
    return in_layout(x, draw(st.sampled_from(LAYOUTS))), seed


def close(actual, expected, dtype, scale):
    err = np.max(np.abs(np.asarray(actual, np.float64) - expected), initial=0.0)
    assert err <= TOL[dtype] * scale, f"error {err:.3g} > {TOL[dtype]:.1g} x {scale:.3g}"


@given(batches(min_values_per_channel=2), st.floats(1e-5, 1.0), st.floats(0.0, 1.0),
       st.booleans(), st.booleans())
def test_forward_train_and_backward(batch, eps, momentum, affine, tracking):
    x, seed = batch
    dtype, c = x.dtype, x.shape[1]
    rng = np.random.default_rng(seed + 1)
    weight = rng.uniform(-2, 2, c) if affine else None
    bias = rng.standard_normal(c) if affine else None
    running = ((rng.standard_normal(c).astype(dtype), rng.uniform(0.1, 2, c).astype(dtype))
               if tracking else (None, None))
    expected = reference.forward_train(x, weight, bias, *running, momentum=momentum, eps=eps)
    count = x.size // c
    unbiased = expected[1] * 0 + (1 / expected[2] ** 2 - eps) * count / max(count - 1, 1)
    # a variance beyond the dtype's range leaves the running statistics as they were
    overflow = tracking and x.size and np.max(unbiased) > np.finfo(dtype).max
    before = [r.copy() for r in running] if tracking else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y, mean, invstd = cybn.forward_train(x, weight, bias, *running, momentum=momentum,
                                             eps=eps)
    assert bool(caught) == bool(overflow), [str(w.message) for w in caught]
    if overflow:
        np.testing.assert_array_equal(running[0], before[0])
        np.testing.assert_array_equal(running[1], before[1])
        tracking = False
    w_abs = np.abs(weight) if affine else np.ones(c)
    x_hat_max = np.max(np.abs((np.asarray(x, np.float64) - expected[1].reshape((1, c) + (1,) * (x.ndim - 2)))
                              * expected[2].reshape((1, c) + (1,) * (x.ndim - 2))), initial=0)
    # The mean itself carries rounding of its own size: (x - mean) * invstd is
    # known to about ulp(mean) * invstd.
    mean_term = np.max(np.abs(expected[1]) * expected[2], initial=0)
    close(y, expected[0], dtype,
          1 + np.max(w_abs) * (1 + x_hat_max + mean_term) + np.max(np.abs(bias) if affine else 0))
    close(mean, expected[1], dtype, 1 + np.max(np.abs(expected[1])) + np.max(1 / expected[2]))
    close(invstd, expected[2], dtype, np.max(expected[2]) * 10)
    if tracking:
        close(running[0], expected[3], dtype, 1 + np.max(np.abs(expected[3])) + np.max(1 / expected[2]))
        close(running[1], expected[4], dtype, 1 + np.max(np.abs(expected[4])) * 10)

    dy = in_layout(rng.standard_normal(x.shape).astype(dtype), "C")
    for training in (True, False):
        dx, dweight, dbias = cybn.backward(dy, x, mean, invstd, weight, training=training)
        ref = reference.backward(dy, x, mean, invstd, weight, training=training)
        scale = (np.max(w_abs * np.abs(invstd), initial=0) * (1 + 3 * x_hat_max)
                 * (1 + mean_term) * 10 + 1)
        close(dx, ref[0], dtype, scale)
        close(dweight, ref[1], dtype, count * (1 + x_hat_max + mean_term) * 5)
        close(dbias, ref[2], dtype, count * 5)


@given(batches(), st.floats(1e-5, 1.0), st.booleans())
def test_forward_eval_and_layer_eval(batch, eps, affine):
    x, seed = batch
    dtype, c = x.dtype, x.shape[1]
    rng = np.random.default_rng(seed + 2)
    running_mean = rng.standard_normal(c)
    running_var = rng.uniform(0.1, 2, c)
    weight = rng.uniform(-2, 2, c) if affine else None
    bias = rng.standard_normal(c) if affine else None
    expected = reference.forward_eval(x, running_mean, running_var, weight, bias, eps)
    y = cybn.forward_eval(x, running_mean, running_var, weight, bias, eps=eps)
    scale = 1 + np.max(np.abs(expected), initial=0)
    close(y, expected, dtype, scale * 4)
    layer = cybn.BatchNorm(c, eps=eps, affine=affine, dtype=dtype).eval()
    layer.load_state_dict({"running_mean": running_mean, "running_var": running_var,
                           **({"weight": weight, "bias": bias} if affine else {})})
    if x.ndim in (2, 3, 4, 5):
        y_layer = layer(x)
        close(y_layer, reference.forward_eval(x, layer.running_mean, layer.running_var,
                                              layer.weight, layer.bias, eps), dtype, scale * 4)


@given(batches(), st.sampled_from(["dtype", "rank", "weight", "out_shape", "out_dtype",
                                   "out_readonly", "running_one", "running_dtype",
                                   "out_aliases_running", "momentum", "eps", "matrix"]))
def test_bad_input_raises_and_modifies_nothing(batch, fault):
    x, seed = batch
    c = x.shape[1]
    count = x.size // c
    running_mean = np.zeros(c, x.dtype)
    running_var = np.ones(c, x.dtype)
    out = np.full(x.shape, 3, x.dtype)
    args = dict(weight=None, bias=None, running_mean=running_mean, running_var=running_var,
                momentum=0.1, eps=1e-5, out=out)
    expected_error = (TypeError, ValueError)
    if fault == "dtype":
        with np.errstate(over="ignore"):  # values past float16's range become inf
            x = x.astype(np.float16)
    elif fault == "rank":
        x = np.asarray(x).reshape(-1)
    elif fault == "weight":
        args["weight"] = np.ones(c + 1)
    elif fault == "out_shape":
        args["out"] = np.zeros(x.shape + (1,), x.dtype)
    elif fault == "out_dtype":
        args["out"] = out.astype(np.float64 if x.dtype == np.float32 else np.float32)
    elif fault == "out_readonly":
        out.flags.writeable = False
    elif fault == "running_one":
        args["running_var"] = None
    elif fault == "running_dtype":
        args["running_var"] = running_var.astype(np.float64 if x.dtype == np.float32 else np.float32)
    elif fault == "out_aliases_running":
        assume(x.size > 0 and x.ndim == 2 and x.shape[1] == c and x.flags.c_contiguous
               and count >= 2)
        args["out"] = np.zeros(x.shape, x.dtype)
        args["running_mean"] = args["out"][0]
    elif fault == "momentum":
        args["momentum"] = 1.5
    elif fault == "eps":
        args["eps"] = -1.0
    elif fault == "matrix":
        with warnings.catch_warnings():  # np.matrix's own PendingDeprecationWarning
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            x = np.asmatrix(np.asarray(x).reshape(x.shape[0], c * (count // x.shape[0])
                                                  if x.shape[0] else c))
    arrays = [a for a in args.values() if isinstance(a, np.ndarray)]
    with Untouched(*arrays), pytest.raises(expected_error):
        cybn.forward_train(x, **args)
