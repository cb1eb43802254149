"""Tests for examples/train_digits.py: its NumPy layers' gradients, and a quick training run."""

import numpy as np
import pytest

from conftest import central_difference, numeric_gradient

# td, the example imported as a module, is a fixture of conftest.py.


def assert_close(analytic, numeric):
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("with_bias", [True, False])
def test_conv_gradients(td, with_bias):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5, 4))
    w = rng.standard_normal((4, 3, 3, 3))
    b = rng.standard_normal(4) if with_bias else None
    r = rng.standard_normal((2, 4, 5, 4))        # loss = sum(conv(x) * r), so dout = r

    def loss():
        return float((td.conv_forward(x, w, b)[0] * r).sum())

    out, cache = td.conv_forward(x, w, b)
    assert out.shape == (2, 4, 5, 4) and out.dtype == np.float64
    dx, dw, db = td.conv_backward(r, cache)
    assert_close(dx, numeric_gradient(loss, x))
    assert_close(dw, numeric_gradient(loss, w))
    if with_bias:
        assert_close(db, numeric_gradient(loss, b))


def test_conv_matches_direct_loop(td):
    """im2col + matmul must equal the textbook sum over the kernel."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 2, 4, 4))
    w = rng.standard_normal((3, 2, 3, 3))
    out, _ = td.conv_forward(x, w)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    ref = np.zeros_like(out)
    for i in range(4):
        for j in range(4):
            ref[:, :, i, j] = np.einsum("nckl,fckl->nf", xp[:, :, i:i + 3, j:j + 3], w)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


def test_linear_gradients(td):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 7))
    w = rng.standard_normal((7, 3))
    b = rng.standard_normal(3)
    r = rng.standard_normal((5, 3))

    def loss():
        return float((td.linear_forward(x, w, b)[0] * r).sum())

    _, cache = td.linear_forward(x, w, b)
    dx, dw, db = td.linear_backward(r, cache, w)
    assert_close(dx, numeric_gradient(loss, x))
    assert_close(dw, numeric_gradient(loss, w))
    assert_close(db, numeric_gradient(loss, b))


def test_maxpool_and_softmax_xent_gradients(td):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 4, 6))
    r = rng.standard_normal((2, 3, 2, 3))
    out, cache = td.maxpool_forward(x)
    assert out.shape == (2, 3, 2, 3)
    np.testing.assert_array_equal(out, x.reshape(2, 3, 2, 2, 3, 2).max(axis=(3, 5)))
    dx = td.maxpool_backward(r, cache)
    assert_close(dx, numeric_gradient(lambda: float((td.maxpool_forward(x)[0] * r).sum()), x))

    logits = rng.standard_normal((6, 10)) * 3
    y = rng.integers(0, 10, size=6)
    loss, dlogits = td.softmax_xent(logits, y)
    assert loss > 0
    assert_close(dlogits, numeric_gradient(lambda: td.softmax_xent(logits, y)[0], logits))


@pytest.mark.parametrize("use_bn", [False, True])
def test_whole_network_gradients(td, use_bn):
    """End-to-end check of DigitsNet.backward, including cybn.BatchNorm2d in training mode."""
    rng = np.random.default_rng(4)
    model = td.DigitsNet(use_bn, rng, dtype=np.float64)
    x = rng.random((6, 1, 8, 8))
    y = rng.integers(0, 10, size=6)

    def loss():
        return td.softmax_xent(model.forward(x), y)[0]

    _, dlogits = td.softmax_xent(model.forward(x), y)
    grads = model.backward(dlogits)
    for name, param in model.params.items():
        # A random handful of entries per tensor keeps this fast.
        flat = param.reshape(-1)
        for i in rng.choice(flat.size, size=min(5, flat.size), replace=False):
            np.testing.assert_allclose(grads[name].reshape(-1)[i],
                                       central_difference(loss, flat, i),
                                       rtol=1e-4, atol=1e-7, err_msg=name)
    if use_bn:
        # BN's own parameter gradients, as left on the layer by backward().
        for bn in model.bns:
            for param, grad in ((bn.weight, bn.grad_weight), (bn.bias, bn.grad_bias)):
                for i in range(2):
                    np.testing.assert_allclose(grad[i], central_difference(loss, param, i),
                                               rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_quick_training_run(td, tmp_path):
    # The example's own dependencies (cybn[examples]); in CI a skip fails.
    for module in ("matplotlib", "sklearn", "tqdm"):
        pytest.importorskip(module, reason="pip install 'cybn[examples]'")

    out = tmp_path / "curves.png"
    # One thread for BLAS and OpenMP: this checks that the example trains, not
    # threading, and tiny matrices on a busy CI machine are slowest with
    # several thread pools taking turns on the same cores.
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        from contextlib import nullcontext as threadpool_limits
    with threadpool_limits(1):
        results = td.main(["--quick", "--no-progress", "--seed", "0", "--out", str(out)])

    assert set(results) == {name for name, *_ in td.RUNS}
    bn = results["BN lr=0.05"]
    assert len(bn["test_acc"]) == len(bn["test_loss"]) == 3
    assert bn["final_acc"] > 0.5, bn["test_acc"]          # chance is 0.1
    assert bn["reload_ok"] and bn["reload_acc"] == bn["final_acc"]

    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000
