"""Misaligned operands in every function and layer, against the same call on
aligned copies (bit for bit).

A misaligned array that reaches a kernel can crash the interpreter, so this
file is not collected with the suite: tests/test_robustness.py runs it in a
subprocess, where a crash fails one test instead of killing the run.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cybn

FUNCTIONS = ["forward_train", "forward_eval", "normalize", "backward", "grad_sums",
             "grad_input", "batch_moments", "layer"]
# The array arguments of each function that may be misaligned.
OPERANDS = {
    "forward_train": ("x", "residual", "out", "running_mean", "running_var"),
    "forward_eval": ("x", "residual", "out"),
    "normalize": ("x", "residual", "out"),
    "backward": ("dy", "x", "y", "out", "grad_residual"),
    "grad_sums": ("dy", "x", "y"),
    "grad_input": ("dy", "x", "y", "out", "grad_residual"),
    "batch_moments": ("x",),
    "layer": ("x", "residual", "dy"),
}


def misaligned(a, offset, order="C"):
    """A copy of a whose data starts `offset` bytes past a 64-byte boundary."""
    buffer = np.zeros(a.nbytes + 128, np.uint8)
    start = (-buffer.ctypes.data) % 64 + offset
    view = buffer[start:start + a.nbytes].view(a.dtype).reshape(a.shape, order=order)
    view[...] = a
    assert a.size == 0 or a.itemsize == 1 or not view.flags.aligned
    return view


def arrays(dtype, shape, seed):
    rng = np.random.default_rng(seed)
    c = shape[1]
    x = (3 + rng.standard_normal(shape)).astype(dtype)
    mean, invstd = x.mean(axis=(0, *range(2, x.ndim))), np.full(c, 0.7)
    y = cybn.normalize(x, mean, invstd, activation="relu")
    return dict(x=x, dy=rng.standard_normal(shape).astype(dtype),
                residual=rng.standard_normal(shape).astype(dtype), y=y,
                out=np.full(shape, 9, dtype), grad_residual=np.full(shape, 8, dtype),
                running_mean=rng.standard_normal(c).astype(dtype),
                running_var=rng.uniform(0.5, 2, c).astype(dtype),
                mean=mean, invstd=invstd, weight=rng.uniform(0.5, 2, c), bias=rng.standard_normal(c))


def call(name, a):
    """The function's results (and every array it writes) for arguments a."""
    if name == "forward_train":
        y, mean, invstd = cybn.forward_train(a["x"], a["weight"], a["bias"], a["running_mean"],
                                             a["running_var"], out=a["out"],
                                             residual=a["residual"], activation="relu")
        return y, mean, invstd, a["out"], a["running_mean"], a["running_var"]
    if name == "forward_eval":
        y = cybn.forward_eval(a["x"], a["running_mean"], a["running_var"], a["weight"],
                              a["bias"], out=a["out"], residual=a["residual"])
        return y, a["out"]
    if name == "normalize":
        return (cybn.normalize(a["x"], a["mean"], a["invstd"], a["weight"], a["bias"],
                               out=a["out"], residual=a["residual"], activation="relu"),
                a["out"])
    if name == "backward":
        return (*cybn.backward(a["dy"], a["x"], a["mean"], a["invstd"], a["weight"],
                               out=a["out"], activation="relu", y=a["y"],
                               grad_residual=a["grad_residual"]), a["grad_residual"])
    if name == "grad_sums":
        return cybn.grad_sums(a["dy"], a["x"], a["mean"], activation="relu", y=a["y"])
    if name == "grad_input":
        return (cybn.grad_input(a["dy"], a["x"], a["mean"], a["invstd"], np.ones(len(a["mean"])),
                                np.ones(len(a["mean"])), max(a["x"].size // len(a["mean"]), 1),
                                a["weight"], out=a["out"], activation="relu", y=a["y"],
                                grad_residual=a["grad_residual"]), a["grad_residual"])
    if name == "batch_moments":
        return cybn.batch_moments(a["x"])[1:]
    layer = cybn.BatchNorm(a["x"].shape[1], dtype=a["x"].dtype, activation="relu")
    y = layer(a["x"], a["residual"])
    dx = layer.backward(a["dy"])
    return y, dx, layer.grad_weight, layer.grad_bias, layer.running_mean, layer.running_var


def check(name, dtype, shape, operand, offset, order, seed=0):
    aligned = arrays(dtype, shape, seed)
    moved = arrays(dtype, shape, seed)
    moved[operand] = misaligned(moved[operand], offset, order)
    expected = call(name, aligned)
    actual = call(name, moved)
    what = f"{name}, {operand} misaligned by {offset} bytes ({order} order), {np.dtype(dtype).name} {shape}"
    for e, a in zip(expected, actual):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e), err_msg=what)


def offsets(dtype):
    return [1, 2, 3] if np.dtype(dtype) == np.float32 else [1, 4, 7]


@pytest.mark.parametrize("shape", [(8, 4), (3, 5, 7), (2, 3, 4, 5), (6, 5, 1, 1),
                                   (2, 2, 3, 2, 2)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", FUNCTIONS)
def test_every_operand_misaligned(name, dtype, shape):
    for operand in OPERANDS[name]:
        for offset in offsets(dtype):
            check(name, dtype, shape, operand, offset, "C")
        check(name, dtype, shape, operand, offsets(dtype)[0], "F")


def test_the_issue_example():
    x = np.frombuffer(b"\0" + np.ones(32, np.float32).tobytes(), np.float32,
                      offset=1).reshape(8, 4)
    y, mean, invstd = cybn.forward_train(x)
    np.testing.assert_array_equal(y, np.zeros((8, 4), np.float32))
    np.testing.assert_array_equal(mean, np.ones(4, np.float32))


def test_structured_field_and_channels_last():
    record = np.zeros((6, 4, 3), dtype=[("flag", "u1"), ("value", "<f8")])
    record["value"] = np.random.default_rng(1).standard_normal((6, 4, 3))
    field = record["value"]  # strided and misaligned
    assert not field.flags.aligned
    y, mean, invstd = cybn.forward_train(field, axis=-1)
    expected = cybn.forward_train(np.array(field), axis=-1)
    for e, a in zip(expected, (y, mean, invstd)):  # the copy may take the other layout
        np.testing.assert_allclose(a, e, rtol=1e-13, atol=1e-13)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(FUNCTIONS), st.sampled_from([np.float32, np.float64]),
       st.lists(st.integers(1, 4), min_size=2, max_size=5), st.integers(0, 6),
       st.sampled_from(["C", "F"]), st.integers(0, 2 ** 16))
def test_misaligned_property(name, dtype, shape, which, order, seed):
    shape = tuple(shape)
    shape = (max(shape[0], 2),) + shape[1:]
    operand = OPERANDS[name][which % len(OPERANDS[name])]
    offset = 1 + seed % (np.dtype(dtype).itemsize - 1)
    check(name, dtype, shape, operand, offset, order, seed)
