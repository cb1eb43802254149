"""PyTorch 2.13's BatchNorm modules as a second oracle."""
import numpy as np
import pytest

import cybn
from conftest import random_batch

torch = pytest.importorskip("torch", reason="PyTorch is the second oracle; pip install torch==2.13.0")

TORCH_CLASSES = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d,
                 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
CYBN_CLASSES = {2: cybn.BatchNorm1d, 3: cybn.BatchNorm1d,
                4: cybn.BatchNorm2d, 5: cybn.BatchNorm3d}
TORCH_DTYPES = {np.float32: torch.float32, np.float64: torch.float64}


def _tol(dtype):
    return dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(16, 5), (6, 4, 9), (4, 3, 6, 5), (2, 3, 3, 4, 5)], ids=str)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_layer_matches_torch_over_steps(shape, momentum, affine, track, dtype):
    c = shape[1]
    ours = CYBN_CLASSES[len(shape)](c, momentum=momentum, affine=affine,
                                    track_running_stats=track, dtype=dtype)
    theirs = TORCH_CLASSES[len(shape)](c, momentum=momentum, affine=affine,
                                       track_running_stats=track, dtype=TORCH_DTYPES[dtype])
    if affine:
        rng = np.random.default_rng(0)
        ours.weight[...] = rng.uniform(0.5, 2, c)
        ours.bias[...] = rng.standard_normal(c)
        with torch.no_grad():
            theirs.weight.copy_(torch.from_numpy(ours.weight))
            theirs.bias.copy_(torch.from_numpy(ours.bias))
    assert_steps_match(ours, theirs, shape, dtype, affine, track)


def assert_steps_match(ours, theirs, shape, dtype, affine=True, track=True):
    """Three steps of a training and an evaluation forward and backward:
    cybn's layer and torch's agree on y, dx, the parameters' gradients and
    the running statistics."""
    tol = _tol(dtype)
    for step in range(3):
        for mode in ("train", "eval"):
            ours.train(mode == "train")
            theirs.train(mode == "train")
            x = random_batch(shape, dtype, seed=10 * step + len(mode), offset=step, scale=2)
            dy = random_batch(shape, dtype, seed=100 + step)
            xt = torch.from_numpy(x.copy()).requires_grad_(True)
            yt = theirs(xt)
            yt.backward(torch.from_numpy(dy))
            y = ours(x)
            dx = ours.backward(dy)
            np.testing.assert_allclose(y, yt.detach().numpy(), **tol, err_msg=f"y {mode} {step}")
            np.testing.assert_allclose(dx, xt.grad.numpy(), **tol, err_msg=f"dx {mode} {step}")
            if affine:
                np.testing.assert_allclose(ours.grad_weight, theirs.weight.grad.numpy(), **tol)
                np.testing.assert_allclose(ours.grad_bias, theirs.bias.grad.numpy(), **tol)
                theirs.weight.grad = theirs.bias.grad = None
            if track:
                np.testing.assert_allclose(ours.running_mean, theirs.running_mean.numpy(), **tol)
                np.testing.assert_allclose(ours.running_var, theirs.running_var.numpy(), **tol)
                assert ours.num_batches_tracked == theirs.num_batches_tracked.item()


@pytest.mark.parametrize("shape", [(8, 6), (4, 6, 5, 5)], ids=str)
def test_functional_matches_native_batch_norm(shape, dtype):
    x = random_batch(shape, dtype, seed=3, offset=4)
    dy = random_batch(shape, dtype, seed=4)
    c = shape[1]
    w = np.linspace(0.5, 2, c).astype(dtype)
    b = np.linspace(-1, 1, c).astype(dtype)
    rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
    rm_t, rv_t = torch.zeros(c, dtype=TORCH_DTYPES[dtype]), torch.ones(c, dtype=TORCH_DTYPES[dtype])
    y, mean, invstd = cybn.forward_train(x, w, b, rm, rv, momentum=0.3, eps=1e-3)
    yt, mean_t, invstd_t = torch.ops.aten.native_batch_norm(
        torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), rm_t, rv_t, True, 0.3, 1e-3)
    tol = _tol(dtype)
    np.testing.assert_allclose(y, yt.numpy(), **tol)
    np.testing.assert_allclose(mean, mean_t.numpy(), **tol)
    np.testing.assert_allclose(invstd, invstd_t.numpy(), **tol)
    np.testing.assert_allclose(rm, rm_t.numpy(), **tol)
    np.testing.assert_allclose(rv, rv_t.numpy(), **tol)
    dx, dw, db = cybn.backward(dy, x, mean, invstd, w)
    dxt, dwt, dbt = torch.ops.aten.native_batch_norm_backward(
        torch.from_numpy(dy), torch.from_numpy(x), torch.from_numpy(w), rm_t, rv_t,
        mean_t, invstd_t, True, 1e-3, [True, True, True])
    np.testing.assert_allclose(dx, dxt.numpy(), **tol)
    np.testing.assert_allclose(dw, dwt.numpy(), **tol)
    np.testing.assert_allclose(db, dbt.numpy(), **tol)


def test_torch_state_dict_loads_as_is_and_back():
    theirs = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 2)
        theirs.bias.normal_()
    for s in range(3):
        theirs(torch.from_numpy(random_batch((5, 4, 3, 3), np.float32, seed=s, offset=s)))
    theirs.eval()
    ours = cybn.BatchNorm2d(4).eval()
    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    assert ours.num_batches_tracked == 3
    x = random_batch((2, 4, 3, 3), np.float32, seed=9)
    np.testing.assert_allclose(ours(x), theirs(torch.from_numpy(x)).detach().numpy(),
                               rtol=1e-5, atol=1e-6)
    back = torch.nn.BatchNorm2d(4).eval()
    back.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in ours.state_dict().items()})
    np.testing.assert_allclose(back(torch.from_numpy(x)).detach().numpy(), ours(x),
                               rtol=1e-5, atol=1e-6)


def test_constant_channel_where_torch_is_off_by_one():
    """Documented difference: at magnitude 1e7 in float32 cybn gives exactly bias."""
    x = np.full((4, 2, 3, 3), 1e7, np.float32)
    y, _, _ = cybn.forward_train(x, None, np.array([0.25, -1.0]))
    np.testing.assert_array_equal(y[:, 0], 0.25)
    np.testing.assert_array_equal(y[:, 1], -1.0)
