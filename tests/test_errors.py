"""Bad input raises a clear error naming the argument, and modifies nothing."""
import numpy as np
import pytest

import cybn


class Untouched:
    """Asserts that the arrays given are bitwise unchanged at exit."""

    def __init__(self, *arrays):
        self.arrays = [a for a in arrays if isinstance(a, np.ndarray)]
        self.copies = [a.copy() for a in self.arrays]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for a, c in zip(self.arrays, self.copies):
            np.testing.assert_array_equal(a, c)
        return False


def _setup(dtype=np.float32, shape=(4, 3, 5, 5)):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    c = shape[1]
    return dict(x=x, weight=np.ones(c, dtype), bias=np.zeros(c, dtype),
                running_mean=np.full(c, 0.5, dtype), running_var=np.full(c, 2.0, dtype),
                out=np.full(shape, 7.0, dtype))


def _raises_train(exc, match, **changes):
    a = _setup()
    a.update(changes)
    with Untouched(*a.values()), pytest.raises(exc, match=match):
        cybn.forward_train(a["x"], a["weight"], a["bias"], a["running_mean"],
                           a["running_var"], out=a["out"],
                           **{k: v for k, v in changes.items() if k in ("momentum", "eps")})


@pytest.mark.parametrize("bad_dtype", [np.int32, np.int64, np.float16, np.complex64, bool])
def test_unsupported_dtype_is_a_type_error(bad_dtype):
    _raises_train(TypeError, "x must have dtype float32 or float64",
                  x=np.ones((4, 3, 5, 5), bad_dtype))


def test_non_array_x_is_a_type_error():
    _raises_train(TypeError, "x must be a NumPy ndarray", x=[[1.0, 2.0], [3.0, 4.0]])


@pytest.mark.parametrize("shape", [(5,), (), (2, 3, 2, 2, 2, 2)])
def test_wrong_rank_is_a_value_error(shape):
    _raises_train(ValueError, "x must have 2 to 5 dimensions", x=np.ones(shape, np.float32))


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_parameter_of_wrong_length(name):
    _raises_train(ValueError, f"{name} must have shape \\(3,\\)", **{name: np.ones(4)})


def test_parameter_of_complex_dtype():
    _raises_train(TypeError, "weight must hold real numbers", weight=np.ones(3, complex))


def test_out_of_wrong_shape_dtype_or_read_only():
    _raises_train(ValueError, "out must have the shape of x", out=np.zeros((4, 3, 5, 4), np.float32))
    _raises_train(TypeError, r"out must have the dtype of x \(float32\)",
                  out=np.zeros((4, 3, 5, 5), np.float64))
    ro = np.zeros((4, 3, 5, 5), np.float32)
    ro.flags.writeable = False
    _raises_train(ValueError, "out must be writeable", out=ro)


def test_running_stats_checks():
    _raises_train(ValueError, "running_mean was given without running_var", running_var=None)
    _raises_train(ValueError, "running_var was given without running_mean", running_mean=None)
    _raises_train(TypeError, r"running_mean must have the dtype of x \(float32\)",
                  running_mean=np.zeros(3))
    _raises_train(ValueError, r"running_var must have shape \(3,\)", running_var=np.ones(4, np.float32))
    ro = np.zeros(3, np.float32)
    ro.flags.writeable = False
    _raises_train(ValueError, "running_var must be writeable", running_var=ro)
    _raises_train(TypeError, "running_mean must be a NumPy ndarray", running_mean=[0.0, 0.0, 0.0])


def test_out_aliasing_running_stats():
    a = _setup(shape=(3, 3))
    a["out"] = np.zeros((3, 3), np.float32)
    a["running_mean"] = a["out"][0]
    with Untouched(*a.values()), pytest.raises(ValueError, match="out must not share memory with running_mean"):
        cybn.forward_train(a["x"], None, None, a["running_mean"], a["running_var"], out=a["out"])


@pytest.mark.parametrize("momentum", [-0.1, 1.5, float("nan")])
def test_bad_momentum(momentum):
    _raises_train(ValueError, "momentum must be in", momentum=momentum)


@pytest.mark.parametrize("eps", [-1e-5, float("nan"), float("inf")])
def test_bad_eps(eps):
    _raises_train(ValueError, "eps must be in", eps=eps)


def test_non_numeric_eps():
    _raises_train(TypeError, "eps must be a real number", eps="0.1")


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1), (1, 3, 1, 1, 1)])
def test_one_value_per_channel_in_training(shape):
    _raises_train(ValueError, "Expected more than 1 value per channel when training",
                  x=np.ones(shape, np.float32), out=None)


def test_backward_checks():
    a = _setup()
    x = a["x"]
    mean, invstd = np.zeros(3, np.float32), np.ones(3, np.float32)
    out = a["out"]
    with Untouched(x, out, mean, invstd):
        with pytest.raises(TypeError, match=r"dy must have the dtype of x \(float32\)"):
            cybn.backward(x.astype(np.float64), x, mean, invstd, out=out)
        with pytest.raises(ValueError, match="dy must have the shape of x"):
            cybn.backward(x[:2], x, mean, invstd, out=out)
        with pytest.raises(ValueError, match=r"mean must have shape \(3,\)"):
            cybn.backward(x, x, np.zeros(2), invstd, out=out)
        with pytest.raises(ValueError, match=r"invstd must have shape \(3,\)"):
            cybn.backward(x, x, mean, np.zeros((3, 1)), out=out)
        with pytest.raises(TypeError, match="training must be True or False"):
            cybn.backward(x, x, mean, invstd, training="yes", out=out)
        with pytest.raises(TypeError, match="out must have the dtype of x"):
            cybn.backward(x, x, mean, invstd, out=out.astype(np.float64))


def test_forward_eval_checks():
    a = _setup()
    x, out = a["x"], a["out"]
    with Untouched(x, out):
        with pytest.raises(TypeError, match="running_mean is required"):
            cybn.forward_eval(x, None, np.ones(3), out=out)
        with pytest.raises(ValueError, match=r"running_var must have shape \(3,\)"):
            cybn.forward_eval(x, np.zeros(3), np.ones(2), out=out)
        with pytest.raises(ValueError, match="x must have 2 to 5 dimensions"):
            cybn.forward_eval(x[0, 0, 0], np.zeros(3), np.ones(3))


def test_out_aliasing_weight_or_bias_is_safe(dtype):
    """Documented: weight and bias are copied before any write, so an out that
    overlaps them gives the same y (running statistics may not overlap it)."""
    x = np.random.default_rng(3).standard_normal((3, 4)).astype(dtype)
    w = np.array([0.5, 1.0, 2.0, 3.0], dtype)
    b = np.array([0.1, 0.2, 0.3, 0.4], dtype)
    expected, _, _ = cybn.forward_train(x, w, b)
    buf = np.zeros((3, 4), dtype)
    buf[0], buf[1] = w, b
    y, _, _ = cybn.forward_train(x, buf[0], buf[1], out=buf)
    assert y is buf
    np.testing.assert_array_equal(buf, expected)


# ---------------------------------------------------------------------------
# The kernels take ndarrays, not typed memoryviews (for speed on small calls),
# and check in C what a memoryview would: a wrong call raises and writes
# nothing, though cybn._api never makes one.

def _kernel_call(dtype=np.float32):
    """forward_train_planar's arguments, as cybn._api passes them."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 4, 5)).astype(dtype)
    args = dict(x=x, out=np.full_like(x, 7.0), weight=np.ones(3), bias=np.zeros(3), eps=1e-5,
                mean=np.full(3, 9.0), var=np.full(3, 9.0), invstd=np.full(3, 9.0))
    return args


def _call(args, kind="float"):
    from cybn import _kernels
    _kernels.forward_train_planar[kind](*args.values())


@pytest.mark.parametrize("name, value, exc, match", [
    ("x", [[1.0]], TypeError, "expected an ndarray"),
    ("x", np.zeros((2, 3, 4, 5)), TypeError, "float32"),
    ("x", np.zeros(6, np.float32), TypeError, "at least 2"),
    ("out", np.zeros((2, 3, 4, 6), np.float32), ValueError, "shape"),
    ("out", np.zeros((2, 3, 5, 8), np.float32)[:, :, :4, :5], ValueError, "unit-stride"),
    ("out", np.zeros((2, 3, 4, 10), np.float32)[..., ::2], ValueError, "unit-stride"),
    ("weight", np.ones(3, np.float32), TypeError, "float64"),
    ("weight", np.ones(4), ValueError, "expected 3 values"),
    ("weight", np.ones(6)[::2], ValueError, "unit-stride"),
    ("mean", np.zeros((3, 1)), TypeError, "dimensions"),
])
def test_kernels_check_their_operands(name, value, exc, match):
    args = _kernel_call()
    args[name] = value
    with Untouched(*args.values()), pytest.raises(exc, match=match):
        _call(args)


def test_kernels_refuse_read_only_outputs():
    for name in ("out", "mean", "invstd"):
        args = _kernel_call()
        args[name].flags.writeable = False
        with Untouched(*args.values()), pytest.raises(ValueError, match="read-only"):
            _call(args)


def test_kernels_take_merged_spatial_axes():
    """Planar operands may have any spatial axes that form one run: the
    (N, C, H, W) array and its (N, C, H*W) view give the same bits."""
    args = _kernel_call()
    _call(args)
    merged = _kernel_call()
    merged["x"] = merged["x"].reshape(2, 3, 20)
    merged["out"] = merged["out"].reshape(2, 3, 20)
    _call(merged)
    np.testing.assert_array_equal(args["out"].reshape(2, 3, 20), merged["out"])
    np.testing.assert_array_equal(args["mean"], merged["mean"])


def _views(rng):
    """Views of one buffer: slices, steps, negative and transposed strides."""
    base = np.arange(240.0).reshape(4, 6, 10)
    yield base
    yield base[1:3]
    yield base[:, ::2, 1:7:3]
    yield base[::-1, 2:, ::-3]
    yield base.transpose(2, 0, 1)[3:5]
    yield base[2:2]
    yield base[3, 5, 9:]
    yield base.reshape(-1)[7:8]
    for _ in range(40):
        starts = rng.integers(0, (4, 6, 10))
        stops = [rng.integers(s, n + 1) for s, n in zip(starts, (4, 6, 10))]
        steps = rng.choice([-2, -1, 1, 3], size=3)
        yield base[tuple(slice(a, b, st) if st > 0 else slice(b - 1 if b > a else None,
                                                              a - 1 if a > 0 else None, st)
                         for a, b, st in zip(starts, stops, steps))]


def test_may_overlap_agrees_with_numpy():
    from cybn import _kernels
    views = list(_views(np.random.default_rng(2)))
    other = np.zeros(3)
    for a in views:
        assert not _kernels.may_overlap(a, other)
        for b in views:
            assert _kernels.may_overlap(a, b) == np.may_share_memory(a, b), (
                a.__array_interface__, b.__array_interface__)


def test_float64_copy_is_a_fresh_exact_copy():
    from cybn import _kernels
    rng = np.random.default_rng(3)
    for dtype in (np.float32, np.float64):
        base = rng.standard_normal(24).astype(dtype)
        for v in (base[:6], base[::4], base[::-3][:6], base[5:11].copy()):
            copy = _kernels.float64_copy(v, 6)
            assert copy.dtype == np.float64 and copy.shape == (6,)
            assert copy.flags.c_contiguous and copy.flags.owndata
            np.testing.assert_array_equal(copy, v.astype(np.float64))
            assert not np.may_share_memory(copy, v)


@pytest.mark.parametrize("v", [
    [1.0] * 6, np.ones(6, np.float16), np.ones(6, np.int64), np.ones(6, ">f4"),
    np.ones(5, np.float32), np.ones((6, 1)), np.ma.ones(6), np.float64(1.0),
    np.frombuffer(b"\0" * 25, np.uint8)[1:].view(np.float32)[:6],  # unaligned
])
def test_float64_copy_leaves_other_input_to_the_api(v):
    from cybn import _kernels
    assert _kernels.float64_copy(v, 6) is None


@pytest.mark.parametrize("make", [
    lambda w: w.astype(">f8"), lambda w: np.repeat(w, 2)[::2], lambda w: w.astype(np.float16),
    lambda w: list(w), lambda w: np.ma.array(w),
])
def test_parameters_of_any_real_form_act_as_float64(make):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 6, 3)).astype(np.float32)
    w = rng.standard_normal(6).astype(np.float16).astype(np.float64)  # exact in every form
    expected, _, _ = cybn.forward_train(x, w, w)
    got, _, _ = cybn.forward_train(x, make(w), make(w))
    np.testing.assert_array_equal(got, expected)
