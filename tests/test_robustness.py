"""Inputs and situations of real training code: misaligned and subclassed
arrays, no channels, a layer shared by threads or interrupted by Ctrl-C,
float64 data near the top of its range, full-precision statistics, and
state dicts that do not fit the layer."""
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cybn
from cybn import reference
from test_errors import Untouched

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------
# Misaligned arrays (they crashed the interpreter): in a subprocess.

def test_misaligned_operands_in_a_subprocess():
    # The child imports the cybn this process imported (a build in place or
    # an installed wheel).
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(cybn.__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         str(HERE / "misaligned_cases.py")],
        capture_output=True, text=True, timeout=600, cwd=HERE, env=env)
    assert result.returncode == 0 and " passed" in result.stdout, (
        f"exit status {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")


@pytest.mark.parametrize("kind", ["misaligned", "strided", "memmap"])
def test_running_statistics_of_any_layout_are_updated(kind, dtype, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 3, 4)).astype(dtype)
    start_mean = rng.standard_normal(3).astype(dtype)
    start_var = rng.uniform(0.5, 2, 3).astype(dtype)
    if kind == "misaligned":
        buffers = [np.zeros(3 * np.dtype(dtype).itemsize + 1, np.uint8) for _ in range(2)]
        running = [b[1:].view(dtype) for b in buffers]
    elif kind == "strided":
        running = [np.zeros(6, dtype)[::2] for _ in range(2)]
    else:
        running = [np.memmap(tmp_path / f"{i}.bin", dtype=dtype, mode="w+", shape=(3,))
                   for i in range(2)]
    running[0][...], running[1][...] = start_mean, start_var
    expected_mean, expected_var = start_mean.copy(), start_var.copy()
    out = np.zeros_like(x)
    cybn.forward_train(x, None, None, *running, momentum=0.3, out=out)
    y, *_ = cybn.forward_train(x, None, None, expected_mean, expected_var, momentum=0.3)
    np.testing.assert_array_equal(running[0], expected_mean)
    np.testing.assert_array_equal(running[1], expected_var)
    np.testing.assert_array_equal(out, y)


# ---------------------------------------------------------------------------
# No channels.

def test_no_channels_everywhere(dtype):
    x = np.ones((4, 0, 3), dtype)
    none = np.zeros(0)
    assert cybn.forward_eval(x, none, none).shape == x.shape
    assert cybn.forward_train(x)[0].shape == x.shape
    assert cybn.normalize(x, none, none).shape == x.shape
    dx, dweight, dbias = cybn.backward(x, x, none, none)
    assert dx.shape == x.shape and dweight.shape == dbias.shape == (0,)
    assert cybn.batch_moments(x)[1].shape == (0,)
    assert cybn.grad_sums(x, x, none)[0].shape == (0,)
    assert cybn.grad_input(x, x, none, none, none, none, 12).shape == x.shape
    out = np.ones((4, 0, 3), dtype)
    assert cybn.forward_eval(x, none, none, out=out) is out


# ---------------------------------------------------------------------------
# ndarray subclasses.

class Odd(np.ndarray):
    """A subclass whose reshape and indexing are not ndarray's."""

    def reshape(self, *args, **kwargs):
        raise AssertionError("cybn must not call a subclass's reshape")

    def __getitem__(self, index):
        raise AssertionError("cybn must not index a subclass")


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix's own
@pytest.mark.parametrize("function", ["forward_train", "forward_eval", "backward",
                                      "batch_moments"])
def test_matrix_is_rejected_naming_the_argument(function):
    m = np.asmatrix(np.ones((4, 6)))[:, ::2]  # non-contiguous, as in the report
    c = np.zeros(3)
    calls = {"forward_train": lambda: cybn.forward_train(m),
             "forward_eval": lambda: cybn.forward_eval(m, c, c + 1),
             "backward": lambda: cybn.backward(np.ones((4, 3)), m, c, c + 1),
             "batch_moments": lambda: cybn.batch_moments(m)}
    with pytest.raises(TypeError, match=r"x must be a NumPy ndarray, got matrix"):
        calls[function]()
    out = np.asmatrix(np.zeros((4, 3)))
    with pytest.raises(TypeError, match="out must be a NumPy ndarray or None, got matrix"):
        cybn.forward_train(np.ones((4, 3)), out=out)


def test_subclasses_are_computed_as_plain_arrays(dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 3, 4)).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    odd_x, odd_dy = x.view(Odd), dy.view(Odd)
    out = np.zeros_like(x).view(Odd)
    y, mean, invstd = cybn.forward_train(odd_x, out=out, axis=-1)
    assert y is out
    expected = cybn.forward_train(x, axis=-1)
    np.testing.assert_array_equal(y.view(np.ndarray), expected[0])
    np.testing.assert_array_equal(
        cybn.backward(odd_dy, odd_x, mean, invstd, axis=-1)[0],
        cybn.backward(dy, x, mean, invstd, axis=-1)[0])
    layer = cybn.BatchNorm1d(3, dtype=dtype)
    np.testing.assert_array_equal(layer(odd_x), cybn.forward_train(x)[0])


# ---------------------------------------------------------------------------
# A layer shared by threads.

def test_shared_layer_under_threads():
    """8 threads on one layer with momentum=None: the running statistics are
    the average over all batches (as serially), and each thread's backward
    uses its own forward."""
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        layer = cybn.BatchNorm2d(8, momentum=None, dtype=np.float64)
        batches = [np.random.default_rng(i).standard_normal((4, 8, 6, 6)) + 10 * i
                   for i in range(8)]
        errors = []
        barrier = threading.Barrier(8)

        def work(i):
            try:
                barrier.wait()
                for step in range(5):
                    x = batches[i]
                    dy = np.full_like(x, i + 1.0) + x
                    layer(x)
                    dx = layer.backward(dy)
                    _, mean, invstd = cybn.forward_train(x, stats_dtype=np.float64)
                    expected = cybn.backward(dy, x, mean, invstd)[0]
                    np.testing.assert_array_equal(dx, expected, err_msg=f"thread {i} step {step}")
            except BaseException as error:  # reported below
                errors.append(error)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors[0]
    finally:
        sys.setswitchinterval(old_interval)
    assert layer.num_batches_tracked == 40
    means = [b.mean(axis=(0, 2, 3)) for b in batches]
    np.testing.assert_allclose(layer.running_mean, np.mean(means, axis=0), rtol=1e-12)
    variances = [b.var(axis=(0, 2, 3), ddof=1) for b in batches]
    np.testing.assert_allclose(layer.running_var, np.mean(variances, axis=0), rtol=1e-12)


def test_backward_in_another_thread_raises():
    layer = cybn.BatchNorm1d(3)
    x = np.ones((4, 3), np.float32)
    layer(x)
    caught = []
    t = threading.Thread(target=lambda: caught.append(pytest.raises(
        RuntimeError, layer.backward, x)))
    t.start()
    t.join(60)
    assert caught and "in this thread" in str(caught[0].value)


def test_separate_layers_run_in_parallel():
    """No lock is shared between layers: one layer runs while another's lock is held."""
    held, free = cybn.BatchNorm1d(3), cybn.BatchNorm1d(3)
    done = threading.Event()
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    with held._lock:
        t = threading.Thread(target=lambda: (free(x), free.backward(x), done.set()))
        t.start()
        assert done.wait(60), "a layer waited for another layer's lock"
        t.join()


def test_layers_copy_and_pickle():
    import copy
    import pickle
    layer = cybn.BatchNorm1d(3, momentum=None)
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    layer(x)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone._saved is None  # what a forward saved stays with its thread and layer
        np.testing.assert_array_equal(clone.running_mean, layer.running_mean)
        assert clone.num_batches_tracked == 1
        np.testing.assert_array_equal(clone(x), layer(x))


# ---------------------------------------------------------------------------
# Ctrl-C: a KeyboardInterrupt at any bytecode of a training step.

def _state(layer):
    return (layer.running_mean.copy(), layer.running_var.copy(), layer.num_batches_tracked,
            layer._saved)


def _same(a, b):
    return (np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
            and a[3] is b[3])


class InterruptAt:
    """A tracer that raises KeyboardInterrupt at the n-th bytecode run in
    cybn's Python files."""

    def __init__(self, n):
        self.n, self.count, self.fired = n, 0, False
        self.files = {str(Path(cybn.__file__).parent / f) for f in ("layer.py", "sync.py")}

    def __call__(self, frame, event, arg):
        if event == "call":
            if frame.f_code.co_filename not in self.files:
                return None
            frame.f_trace_opcodes = True
            return self
        if event == "opcode" and not self.fired:
            self.count += 1
            if self.count == self.n:
                self.fired = True
                raise KeyboardInterrupt
        return self


@pytest.mark.parametrize("momentum", [None, 0.1])
def test_interrupt_at_any_bytecode_leaves_the_layer_before_or_after(momentum):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    layer = cybn.BatchNorm1d(3, momentum=momentum)
    layer(rng.standard_normal((4, 3, 5)).astype(np.float32) + 2)
    reference_layer = cybn.BatchNorm1d(3, momentum=momentum)
    reference_layer.load_state_dict(layer.state_dict())
    reference_layer(x)
    n, interrupted = 0, True
    while interrupted:
        n += 1
        before = _state(layer)
        tracer = InterruptAt(n)
        sys.settrace(tracer)
        try:
            layer(x)
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        interrupted = tracer.fired
        after = _state(layer)
        if _same(before, after):
            continue
        # Else the whole step happened: as the reference's step, and paired.
        assert after[2] == before[2] + 1, f"interrupt at bytecode {n}: counter {after}"
        np.testing.assert_array_equal(after[0], reference_layer.running_mean,
                                      err_msg=f"interrupt at bytecode {n}")
        np.testing.assert_array_equal(after[1], reference_layer.running_var,
                                      err_msg=f"interrupt at bytecode {n}")
        assert after[3] is not None and after[3].x is x, f"interrupt at bytecode {n}"
        layer.load_state_dict(_rewind(layer, before))
    assert n > 10  # the forward ran that many bytecodes


def _rewind(layer, state):
    """The state dict of `state`, for the next attempt to start from it."""
    return {"weight": layer.weight, "bias": layer.bias, "running_mean": state[0],
            "running_var": state[1], "num_batches_tracked": state[2]}


# ---------------------------------------------------------------------------
# float64 data of any finite magnitude.

def _shaped(v, x):
    return np.asarray(v).reshape((1, -1) + (1,) * (x.ndim - 2))


@settings(max_examples=60, deadline=None)
@given(st.integers(140, 307), st.sampled_from([(8, 3), (4, 2, 5), (3, 2, 3, 4), (2, 2, 2, 2, 3)]),
       st.sampled_from([0.0, 3.0, -50.0]), st.booleans(), st.integers(0, 2 ** 16))
def test_float64_up_to_1e307(exponent, shape, offset, channels_last, seed):
    rng = np.random.default_rng(seed)
    unit = rng.standard_normal(shape) * rng.uniform(0.5, 1, shape[1]).reshape(
        (1, -1) + (1,) * (len(shape) - 2)) + offset / 10
    k = 10.0 ** (exponent - 1)
    x = unit * k
    weight, bias = rng.uniform(0.5, 2, shape[1]), rng.standard_normal(shape[1])
    dy = rng.standard_normal(shape)
    axis = -1 if channels_last else 1
    xa, dya = (np.moveaxis(a, 1, -1) if channels_last else a for a in (x, dy))
    y, mean, invstd = cybn.forward_train(xa, weight, bias, axis=axis)
    y_ref, mean_ref, invstd_ref, *_ = reference.forward_train(unit, weight, bias, eps=0.0)
    y = np.moveaxis(y, -1, 1) if channels_last else y
    np.testing.assert_allclose(y, y_ref, atol=1e-12 * (1 + np.abs(bias).max() + 3 * weight.max()))
    np.testing.assert_allclose(mean / k, mean_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(invstd * k, invstd_ref, rtol=1e-10)
    dx, dweight, dbias = cybn.backward(dya, xa, mean, invstd, weight, axis=axis)
    dx_ref, dweight_ref, dbias_ref = reference.backward(dy, unit, mean_ref, invstd_ref, weight)
    dx = np.moveaxis(dx, -1, 1) if channels_last else dx
    np.testing.assert_allclose(dx * k, dx_ref, atol=1e-10 * np.abs(dx_ref).max())
    np.testing.assert_allclose(dweight, dweight_ref, atol=1e-10 * unit.size)
    np.testing.assert_allclose(dbias, dbias_ref, atol=1e-12 * unit.size)


@pytest.mark.parametrize("magnitude", [1e160, 1e250, 1e300])
def test_float64_layer_and_in_place_at_large_magnitudes(magnitude):
    rng = np.random.default_rng(3)
    unit = rng.standard_normal((6, 4, 5, 5)) + np.array([0, 1, -2, 0.5]).reshape(1, 4, 1, 1)
    x = unit * magnitude
    y_ref = reference.forward_train(unit, eps=0.0)[0]
    layer = cybn.BatchNorm2d(4, dtype=np.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = layer(x)
    np.testing.assert_allclose(y, y_ref, atol=1e-12)
    # The running variance is beyond float64's range: said, and left alone.
    assert [w.category for w in caught] == [RuntimeWarning]
    np.testing.assert_array_equal(layer.running_var, np.ones(4))
    dy = rng.standard_normal(x.shape)
    ref_dx = reference.backward(dy, unit, *reference.forward_train(unit, eps=0.0)[1:3])[0]
    np.testing.assert_allclose(layer.backward(dy) * magnitude, ref_dx, atol=1e-10)
    in_place = x.copy()
    out, _, _ = cybn.forward_train(in_place, out=in_place)
    assert out is in_place
    np.testing.assert_allclose(in_place, y_ref, atol=1e-12)


def test_non_finite_data_stays_not_finite():
    x = np.random.default_rng(0).standard_normal((5, 2, 3)) * 1e300
    x[0, 1, 0] = np.inf
    with np.errstate(invalid="ignore"):
        y, mean, invstd = cybn.forward_train(x)
    assert np.all(np.isnan(y[:, 1])) and np.all(np.isfinite(y[:, 0]))


# ---------------------------------------------------------------------------
# Full-precision statistics for the functional backward.

def test_stats_dtype_float64_keeps_backward_precise():
    rng = np.random.default_rng(0)
    x = (1e7 + rng.standard_normal((32, 4, 8))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    x64 = x.astype(np.float64)
    _, mean_ref, invstd_ref, *_ = reference.forward_train(x64)
    dx_ref = reference.backward(dy.astype(np.float64), x64, mean_ref, invstd_ref)[0]
    _, mean, invstd = cybn.forward_train(x, stats_dtype=np.float64)
    assert mean.dtype == invstd.dtype == np.float64
    precise = np.max(np.abs(cybn.backward(dy, x, mean, invstd)[0] - dx_ref))
    _, mean32, invstd32 = cybn.forward_train(x)
    assert mean32.dtype == invstd32.dtype == np.float32  # PyTorch's convention by default
    rounded = np.max(np.abs(cybn.backward(dy, x, mean32, invstd32)[0] - dx_ref))
    assert precise < 1e-6 < rounded
    layer = cybn.BatchNorm1d(4)
    layer(x)
    assert np.max(np.abs(layer.backward(dy) - dx_ref)) < 1e-6


@pytest.mark.parametrize("bad", ["float16", np.int32, "x", 3])
def test_stats_dtype_must_be_a_float_dtype(bad):
    x = np.ones((4, 3), np.float32)
    out = np.zeros_like(x)
    with Untouched(out), pytest.raises(TypeError, match="stats_dtype must be None"):
        cybn.forward_train(x, out=out, stats_dtype=bad)


# ---------------------------------------------------------------------------
# State dicts that do not fit the layer.

def test_load_state_dict_rejects_what_does_not_fit():
    layer = cybn.BatchNorm1d(3)
    layer(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32))
    before = layer.state_dict()
    bad = [({"num_batches_tracked": np.uint64(2 ** 64 - 1)}, "num_batches_tracked"),
           ({"num_batches_tracked": 2 ** 63}, "num_batches_tracked"),
           ({"running_var": np.full(3, 1e300)}, "running_var"),
           ({"weight": np.array([1.0, -1e39, 0.0])}, "weight")]
    for change, key in bad:
        with pytest.raises(ValueError, match=key):
            layer.load_state_dict({**before, **change})
        after = layer.state_dict()
        for k in before:
            np.testing.assert_array_equal(after[k], before[k], err_msg=f"{key} changed {k}")
    layer.load_state_dict({**before, "num_batches_tracked": np.uint64(2 ** 63 - 1)})
    assert layer.state_dict()["num_batches_tracked"] == 2 ** 63 - 1


@pytest.mark.parametrize("shape", [(40, 3), (6, 3, 5, 5), (300, 3, 8, 8), (4, 3, 2, 1, 1)],
                         ids=["rows", "per-channel", "memory-order", "rank-5 rows"])
@pytest.mark.parametrize("in_place", [False, True])
def test_overflowing_channels_next_to_plain_ones(shape, in_place):
    """Each kernel path leaves the channels whose float64 statistics overflow
    for the rescue, also when y is written over x, and writes the others."""
    rng = np.random.default_rng(8)
    unit = rng.standard_normal(shape)
    magnitudes = np.array([1.0, 1e300, 1e-300]).reshape((1, 3) + (1,) * (len(shape) - 2))
    x = unit * magnitudes
    residual = rng.standard_normal(shape)
    expected = reference.forward_train(unit, eps=0.0)[0]
    expected[:, 0] = reference.forward_train(x[:, :1])[0][:, 0]  # eps matters at scale 1
    expected[:, 2] = reference.forward_train(x[:, 2:])[0][:, 0]  # ... and swamps 1e-300
    expected = np.maximum(expected + residual, 0)
    out = x if in_place else None
    y, mean, invstd = cybn.forward_train(x, out=out, residual=residual, activation="relu")
    assert (y is x) == in_place
    np.testing.assert_allclose(y, expected, atol=1e-12)
    np.testing.assert_allclose(mean[1] / 1e300, unit[:, 1].mean(), rtol=1e-12, atol=1e-15)
