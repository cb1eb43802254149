"""Fused ReLU and residual add, channels-last data (axis), and folding."""
import numpy as np
import pytest

import cybn
from cybn import _api, reference
from conftest import assert_close, layouts, numeric_gradient, random_batch
from test_errors import Untouched


def _relu(v):
    return np.maximum(v, 0.0)


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 5, 6), (8, 70, 1, 1), (2, 3, 4, 5, 3)], ids=str)
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("relu", [True, False])
def test_fused_forward_and_backward_match_reference(shape, with_residual, relu, dtype):
    x = random_batch(shape, dtype, seed=1, offset=0.5)
    residual = random_batch(shape, dtype, seed=2) if with_residual else None
    dy = random_batch(shape, dtype, seed=3)
    c = shape[1]
    w = np.linspace(0.5, 2.0, c)
    b = np.linspace(-0.5, 0.5, c)
    activation = "relu" if relu else None
    ref_bn, mean_ref, invstd_ref, *_ = reference.forward_train(x, w, b)
    pre = ref_bn + (residual if with_residual else 0)
    expected_y = _relu(pre) if relu else pre
    for name, xl in layouts(x):
        y, mean, invstd = cybn.forward_train(xl, w, b, residual=residual, activation=activation)
        assert_close(y, expected_y, dtype, f"train y, {name}")
        y_eval = cybn.forward_eval(xl, mean_ref, 1 / invstd_ref ** 2, w, b, eps=0.0,
                                   residual=residual, activation=activation)
        assert_close(y_eval, expected_y, dtype, f"eval y, {name}")
    y, mean, invstd = cybn.forward_train(x, w, b, residual=residual, activation=activation)
    grad_residual = np.full(shape, 9.0, dtype) if with_residual else None
    dx, dw, db = cybn.backward(dy, x, mean, invstd, w, activation=activation,
                               y=y if relu else None, grad_residual=grad_residual)
    g = dy * (y > 0) if relu else dy
    expected = reference.backward(g, x, mean, invstd, w)
    assert_close(dx, expected[0], dtype, "dx")
    assert_close(dw, expected[1], dtype, "dweight")
    assert_close(db, expected[2], dtype, "dbias")
    if with_residual:
        np.testing.assert_array_equal(grad_residual, g)


def test_in_place_fusions(dtype):
    x = random_batch((4, 3, 6, 6), dtype, seed=4)
    r = random_batch((4, 3, 6, 6), dtype, seed=5)
    expected, _, _ = cybn.forward_train(x, residual=r, activation="relu")
    xi = x.copy()
    cybn.forward_train(xi, residual=r, activation="relu", out=xi)
    np.testing.assert_array_equal(xi, expected)
    ri = r.copy()
    cybn.forward_train(x, residual=ri, activation="relu", out=ri)  # out = residual
    np.testing.assert_array_equal(ri, expected)
    y, mean, invstd = cybn.forward_train(x, residual=r, activation="relu")
    dy = random_batch(x.shape, dtype, seed=6)
    dx_expected, _, _ = cybn.backward(dy, x, mean, invstd, activation="relu", y=y)
    dyi = dy.copy()
    g = np.empty_like(dy)
    cybn.backward(dyi, x, mean, invstd, activation="relu", y=y, out=dyi, grad_residual=g)
    np.testing.assert_array_equal(dyi, dx_expected)
    np.testing.assert_array_equal(g, dy * (y > 0))


def test_fused_gradients_match_finite_differences():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 3, 5))
    r = rng.standard_normal((4, 3, 5))
    w = rng.uniform(0.5, 2, 3)
    b = rng.standard_normal(3)
    gy = rng.standard_normal(x.shape)

    def loss():
        y, _, _ = cybn.forward_train(x, w, b, residual=r, activation="relu")
        return float(np.sum(y * gy))

    y, mean, invstd = cybn.forward_train(x, w, b, residual=r, activation="relu")
    g_res = np.empty_like(x)
    dx, dw, db = cybn.backward(gy, x, mean, invstd, w, activation="relu", y=y,
                               grad_residual=g_res)
    for array, analytic in ((x, dx), (r, g_res), (w, dw), (b, db)):
        np.testing.assert_allclose(analytic, numeric_gradient(loss, array), rtol=1e-5,
                                   atol=1e-6)


def test_layer_with_relu_and_residual_matches_torch():
    torch = pytest.importorskip("torch", reason="PyTorch is the second oracle")
    ours = cybn.BatchNorm2d(4, activation="relu")
    theirs = torch.nn.BatchNorm2d(4)
    x = random_batch((3, 4, 5, 5), np.float32, seed=8)
    r = random_batch((3, 4, 5, 5), np.float32, seed=9)
    dy = random_batch((3, 4, 5, 5), np.float32, seed=10)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    rt = torch.from_numpy(r.copy()).requires_grad_(True)
    yt = torch.relu(theirs(xt) + rt)
    yt.backward(torch.from_numpy(dy))
    y = ours(x, r)
    dx = ours.backward(dy)
    tol = dict(rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(y, yt.detach().numpy(), **tol)
    np.testing.assert_allclose(dx, xt.grad.numpy(), **tol)
    np.testing.assert_allclose(ours.grad_residual, rt.grad.numpy(), **tol)
    np.testing.assert_allclose(ours.grad_weight, theirs.weight.grad.numpy(), **tol)
    np.testing.assert_allclose(ours.running_var, theirs.running_var.numpy(), **tol)
    # without activation the residual's gradient is dy itself
    plain = cybn.BatchNorm2d(4)
    plain(x, r)
    plain.backward(dy)
    assert plain.grad_residual is dy
    plain(x)
    plain.backward(dy)
    assert plain.grad_residual is None


def test_fusion_errors_modify_nothing():
    x = random_batch((4, 3, 5), np.float32)
    out = np.zeros_like(x)
    with Untouched(x, out):
        with pytest.raises(ValueError, match="activation must be None or 'relu'"):
            cybn.forward_train(x, activation="gelu", out=out)
        with pytest.raises(ValueError, match="residual must have the shape of x"):
            cybn.forward_train(x, residual=x[:2], out=out)
        with pytest.raises(TypeError, match="residual must have the dtype of x"):
            cybn.forward_eval(x, np.zeros(3), np.ones(3), residual=x.astype(np.float64), out=out)
        _, mean, invstd = cybn.forward_train(x)
        with pytest.raises(TypeError, match="y, the forward's output, is required"):
            cybn.backward(x, x, mean, invstd, activation="relu", out=out)
        with pytest.raises(ValueError, match="y is only used with activation='relu'"):
            cybn.backward(x, x, mean, invstd, y=x, out=out)
        with pytest.raises(ValueError, match="grad_residual must not share memory with out"):
            cybn.backward(x, x, mean, invstd, activation="relu", y=x, out=out, grad_residual=out)
    with pytest.raises(ValueError, match="activation must be None or 'relu'"):
        cybn.BatchNorm(3, activation="tanh")


# -- channels-last ------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 5, 6, 7), (3, 9, 8), (2, 3, 4, 2, 6), (10, 4)], ids=str)
def test_axis_minus_one_matches_reference(shape, dtype):
    """(N, *spatial, C) data with axis=-1 equals the NC* computation, moved."""
    nhwc = random_batch(shape, dtype, seed=11, offset=2.0)
    dy = random_batch(shape, dtype, seed=12)
    c = shape[-1]
    w = np.linspace(0.5, 1.5, c)
    b = np.linspace(-1, 1, c)
    rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
    nchw = np.moveaxis(nhwc, -1, 1)
    expected = reference.forward_train(nchw, w, b, rm, rv)
    y, mean, invstd = cybn.forward_train(nhwc, w, b, rm, rv, axis=-1)
    assert y.shape == shape and y.flags.c_contiguous
    assert_close(np.moveaxis(y, -1, 1), expected[0], dtype, "y")
    assert_close(mean, expected[1], dtype, "mean")
    assert_close(rv, expected[4], dtype, "running_var")
    dx, dw, db = cybn.backward(dy, nhwc, mean, invstd, w, axis=-1)
    ref = reference.backward(np.moveaxis(dy, -1, 1), nchw, mean, invstd, w)
    assert_close(np.moveaxis(dx, -1, 1), ref[0], dtype, "dx")
    assert_close(dw, ref[1], dtype, "dweight")
    y_eval = cybn.forward_eval(nhwc, rm, rv, w, b, axis=-1)
    assert_close(np.moveaxis(y_eval, -1, 1), reference.forward_eval(nchw, rm, rv, w, b), dtype,
                 "eval y")
    count, m, m2 = cybn.batch_moments(nhwc, axis=-1)
    assert_close(m, expected[1], dtype, "batch_moments")
    layer = cybn.BatchNorm(c, axis=-1, dtype=dtype)
    assert_close(np.moveaxis(layer(nhwc), -1, 1), reference.forward_train(nchw)[0], dtype, "layer")
    assert_close(np.moveaxis(layer.backward(dy), -1, 1),
                 reference.backward(np.moveaxis(dy, -1, 1), nchw, *reference.forward_train(nchw)[1:3])[0],
                 dtype, "layer dx")


def test_channels_last_memory_runs_without_a_copy():
    nhwc = random_batch((4, 6, 6, 16), np.float32)
    as_nchw = np.transpose(nhwc, (0, 3, 1, 2))  # PyTorch's channels_last
    layout, views, _, _, _ = _api._plan([as_nchw], [])
    assert layout == "rows" and np.shares_memory(views[0], nhwc)
    layout, views, _, _, _ = _api._plan([_api._to_axis1(nhwc, 3)], [])
    assert layout == "rows" and np.shares_memory(views[0], nhwc)
    y, _, _ = cybn.forward_train(as_nchw)
    assert np.transpose(y, (0, 2, 3, 1)).flags.c_contiguous  # the output keeps the layout


def test_bad_axis():
    x = random_batch((4, 3, 5), np.float32)
    with pytest.raises(ValueError, match="axis must be a channel axis, not 0"):
        cybn.forward_train(x, axis=0)
    with pytest.raises(ValueError, match="axis 3 is out of range"):
        cybn.forward_train(x, axis=3)
    with pytest.raises(TypeError, match="axis must be an integer"):
        cybn.forward_train(x, axis=1.0)


# -- folding ------------------------------------------------------------------

def _conv2d(x, w, b):
    """Plain valid convolution (cross-correlation), stride 1."""
    n, c_in, h, wd = x.shape
    c_out, _, kh, kw = w.shape
    out = np.zeros((n, c_out, h - kh + 1, wd - kw + 1))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, :, i:i + out.shape[2], j:j + out.shape[3]]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return out + (0 if b is None else b.reshape(1, -1, 1, 1))


def _trained_bn(c, seed, affine=True):
    bn = cybn.BatchNorm(c, affine=affine, dtype=np.float64)
    rng = np.random.default_rng(seed)
    for _ in range(3):
        bn(rng.standard_normal((8, c, 3, 3)) * 2 + 1)
    if affine:
        bn.weight[...] = rng.uniform(0.5, 2, c)
        bn.bias[...] = rng.standard_normal(c)
    return bn.eval()


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_fold_into_convolution(with_bias, affine):
    rng = np.random.default_rng(13)
    w = rng.standard_normal((5, 3, 3, 3))
    b = rng.standard_normal(5) if with_bias else None
    x = rng.standard_normal((2, 3, 7, 7))
    bn = _trained_bn(5, 14, affine)
    unfused = bn(_conv2d(x, w, b))
    w_folded, b_folded = cybn.fold_batch_norm(w, b, bn)
    assert w_folded.shape == w.shape and b_folded.shape == (5,)
    np.testing.assert_allclose(_conv2d(x, w_folded, b_folded), unfused, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fold_into_linear(dtype):
    rng = np.random.default_rng(15)
    w = rng.standard_normal((6, 4)).astype(dtype)
    b = rng.standard_normal(6).astype(dtype)
    x = rng.standard_normal((10, 4)).astype(dtype)
    bn = cybn.BatchNorm1d(6, dtype=dtype)
    for s in range(3):
        bn(random_batch((8, 6), dtype, seed=s, offset=1))
    bn.weight[...] = rng.uniform(0.5, 2, 6)
    bn.eval()
    unfused = bn(x @ w.T + b)
    w_folded, b_folded = cybn.fold_batch_norm(w, b, bn)
    assert w_folded.dtype == dtype and b_folded.dtype == dtype
    np.testing.assert_allclose(x @ w_folded.T + b_folded, unfused,
                               rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)


def test_fold_errors():
    bn = cybn.BatchNorm(4, track_running_stats=False)
    with pytest.raises(ValueError, match="must track running statistics"):
        cybn.fold_batch_norm(np.ones((4, 2)), None, bn)
    bn = cybn.BatchNorm(4)
    with pytest.raises(ValueError, match=r"weight must have shape \(4, ...\)"):
        cybn.fold_batch_norm(np.ones((3, 2)), None, bn)
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        cybn.fold_batch_norm(np.ones((4, 2)), np.ones(3), bn)
    with pytest.raises(TypeError, match="bn must be a cybn.BatchNorm"):
        cybn.fold_batch_norm(np.ones((4, 2)), None, object())
