"""Streaming stores (outputs written around the cache) change no value.

The training forward and the backward write by streaming stores only when
their arrays exceed the cache (at most 32 MiB), the evaluation forward only when
they exceed twice that, in runs of at least 512 bytes.  With the streaming
decision's cache forced to 0 every call with long enough runs takes them, so
that every shape, layout, fusion and output alignment below is compared bit
for bit with plain stores (which the other tests check against the
reference); big calls check the threshold's own path against the reference."""
import numpy as np
import pytest

import cybn
from cybn import _kernels, reference
from conftest import SHAPES, assert_close, layouts, random_batch

# conftest's shapes, and runs that start at every offset in a cache line and
# end with a partial line: odd spatial sizes, odd row lengths, rows cut into
# channel blocks, channels cut into parts (walked in memory order).
STREAM_SHAPES = SHAPES + [(2, 3, 17, 19), (3, 2, 130), (5, 640), (37, 1030), (300, 520),
                          (3, 5, 11, 13, 7), (2, 2, 300, 301)]


@pytest.fixture
def always_stream():
    with _kernels.forcing(stream_cache=0):
        yield


def offset_empty(shape, dtype, offset):
    """An uninitialized C-order array starting `offset` elements past a
    64-byte boundary."""
    itemsize = np.dtype(dtype).itemsize
    size = int(np.prod(shape))
    buffer = np.empty(size + (128 + offset * itemsize) // itemsize, dtype)
    start = (-buffer.ctypes.data % 64) // itemsize + offset
    return buffer[start:start + size].reshape(shape)


def all_outputs(x, dy, out_offset, grad_offset):
    """Every output of the functional API on x, dy: train and eval forward,
    plain and fused, backward plain, in eval mode and fused (dx and
    grad_residual at their own offsets), and the split API's normalize and
    grad_input; out= buffers at the given offsets for C-order data."""
    c = x.shape[1]
    w = np.linspace(0.5, 1.5, c)
    b = np.linspace(-1, 1, c)
    residual = random_batch(x.shape, x.dtype, seed=7)
    contiguous = x.flags.c_contiguous

    def out(offset):
        return offset_empty(x.shape, x.dtype, offset) if contiguous else None

    y, mean, invstd = cybn.forward_train(x, w, b, out=out(out_offset))
    y_fused, _, _ = cybn.forward_train(x, w, b, residual=residual, activation="relu",
                                       out=out(out_offset))
    running_var = np.linspace(0.5, 2.0, c).astype(x.dtype)
    y_eval = cybn.forward_eval(x, mean, running_var, w, b, out=out(out_offset))
    y_eval_fused = cybn.forward_eval(x, mean, running_var, w, b, residual=residual,
                                     activation="relu", out=out(out_offset))
    dx, dw, db = cybn.backward(dy, x, mean, invstd, w, out=out(out_offset))
    dx_eval, _, _ = cybn.backward(dy, x, mean, invstd, w, training=False, out=out(out_offset))
    grad_residual = offset_empty(x.shape, x.dtype, grad_offset)
    dx_fused, dw_fused, _ = cybn.backward(dy, x, mean, invstd, w, activation="relu",
                                          y=y_fused, grad_residual=grad_residual,
                                          out=out(out_offset))
    normalized = cybn.normalize(x, mean, invstd, w, b, out=out(out_offset))
    count, m, _ = cybn.batch_moments(x)
    sum_dy, sum_dy_xmu = cybn.grad_sums(dy, x, m)
    dx_split = cybn.grad_input(dy, x, m, invstd, sum_dy, sum_dy_xmu, count, w,
                               out=out(out_offset))
    return dict(y=y, mean=mean, invstd=invstd, y_fused=y_fused, y_eval=y_eval,
                y_eval_fused=y_eval_fused, dx=dx, dw=dw, db=db, dx_eval=dx_eval,
                dx_fused=dx_fused, dw_fused=dw_fused, grad_residual=grad_residual,
                normalized=normalized, dx_split=dx_split)


def assert_same_bits(streamed, plain, what):
    for name in plain:
        assert streamed[name].tobytes() == plain[name].tobytes(), f"{name} differs, {what}"


@pytest.mark.parametrize("shape", STREAM_SHAPES, ids=str)
@pytest.mark.parametrize("out_offset, grad_offset", [(0, 0), (1, 5), (3, 4)],
                         ids=["aligned", "misaligned", "other-line-offset"])
def test_streaming_stores_change_no_value(shape, out_offset, grad_offset, dtype, request):
    x = random_batch(shape, dtype, seed=1, offset=2.0)
    dy = random_batch(shape, dtype, seed=2)
    plain = all_outputs(x, dy, out_offset, grad_offset)
    request.getfixturevalue("always_stream")
    streamed = all_outputs(x, dy, out_offset, grad_offset)
    assert_same_bits(streamed, plain, f"{shape}, offsets {out_offset}/{grad_offset}")


@pytest.mark.parametrize("shape", [(2, 3, 17, 19), (5, 640), (2, 2, 300, 301)], ids=str)
def test_streaming_stores_change_no_value_in_any_layout(shape, dtype, request):
    x = random_batch(shape, dtype, seed=3, offset=-1.0)
    dy = random_batch(shape, dtype, seed=4)
    plain = {name: all_outputs(xl, dy, 0, 0) for name, xl in layouts(x)}
    request.getfixturevalue("always_stream")
    for name, xl in layouts(x):
        assert_same_bits(all_outputs(xl, dy, 0, 0), plain[name], f"{shape}, {name}")


@pytest.mark.parametrize("shape, axis", [((16, 8, 256, 264), 1), ((4, 64, 68, 256), -1),
                                         ((64, 256, 14, 14), 1)],
                         ids=["planar", "channels-last", "planar-short-runs"])
def test_calls_big_enough_to_stream_match_the_reference(shape, axis):
    """Calls over the default threshold: float32, 34.6 MB per array (x and y
    over the 32 MiB assumed for the cache, and over twice that for the
    evaluation forward); channels-last rows of 1 KiB; runs
    of 784 bytes, 12.8 MB per array (the backward's three arrays over the
    threshold), whose per-channel sums prefetch."""
    x = random_batch(shape, np.float32, seed=5, offset=3.0)
    dy = random_batch(shape, np.float32, seed=6)
    to_axis1 = (lambda a: np.moveaxis(a, -1, 1)) if axis == -1 else (lambda a: a)
    c = x.shape[axis]
    w = np.linspace(0.5, 1.5, c)
    b = np.linspace(-1, 1, c)
    y, mean, invstd = cybn.forward_train(x, w, b, axis=axis)
    y_ref, mean_ref, invstd_ref, *_ = reference.forward_train(to_axis1(x), w, b)
    assert_close(to_axis1(y), y_ref, np.float32, "train y")
    del y_ref
    y_eval = cybn.forward_eval(x, mean_ref, 1 / invstd_ref ** 2, w, b, eps=0.0, axis=axis)
    assert_close(to_axis1(y_eval), reference.forward_eval(to_axis1(x), mean_ref,
                                                          1 / invstd_ref ** 2, w, b, eps=0.0),
                 np.float32, "eval y")
    del y_eval
    dx, dw, db = cybn.backward(dy, x, mean, invstd, w, axis=axis)
    dx_ref, dw_ref, db_ref = reference.backward(to_axis1(dy), to_axis1(x), mean, invstd, w)
    assert_close(to_axis1(dx), dx_ref, np.float32, "dx")
    assert_close(dw, dw_ref, np.float32, "dweight")
    assert_close(db, db_ref, np.float32, "dbias")


@pytest.mark.parametrize("shape", [(3, 67, 48, 48), (2, 70, 17, 19)], ids=str)
def test_streamed_calls_in_place_match_those_into_new_arrays(shape, dtype, always_stream):
    """In place, the per-channel path writes each channel over its input while
    it reads the next channel (overlaps_next)."""
    x = random_batch(shape, dtype, seed=8, offset=1.0)
    dy = random_batch(shape, dtype, seed=9)
    c = x.shape[1]
    w = np.linspace(0.5, 1.5, c)
    b = np.linspace(-1, 1, c)
    y, mean, invstd = cybn.forward_train(x, w, b)
    x_in = x.copy()
    y_in, mean_in, invstd_in = cybn.forward_train(x_in, w, b, out=x_in)
    assert y_in is x_in
    for name, a, a_in in (("y", y, y_in), ("mean", mean, mean_in), ("invstd", invstd, invstd_in)):
        assert a.tobytes() == a_in.tobytes(), f"{name} differs in place"
    dx, dw, db = cybn.backward(dy, x, mean, invstd, w)
    for name, target in (("dy", dy.copy()), ("x", x.copy())):
        args = (target, x) if name == "dy" else (dy, target)
        dx_in, dw_in, db_in = cybn.backward(*args, mean, invstd, w, out=target)
        assert dx_in is target
        for what, a, a_in in (("dx", dx, dx_in), ("dweight", dw, dw_in), ("dbias", db, db_in)):
            assert a.tobytes() == a_in.tobytes(), f"{what} differs with out={name}"
