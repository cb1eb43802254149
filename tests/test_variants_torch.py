"""PyTorch as the oracle for batch renormalization and ghost batches: its
BatchNorm for the identities (rmax=1, dmax=0; one ghost batch of size N),
and autograd through the papers' formulas written in torch for the rest."""
import numpy as np
import pytest

import cybn
from conftest import random_batch
from test_torch import CYBN_CLASSES, TORCH_CLASSES, TORCH_DTYPES, _tol, assert_steps_match, torch

SHAPES = [(16, 5), (6, 4, 9), (4, 3, 6, 5), (2, 3, 3, 4, 5)]


def _pair(shape, dtype, **options):
    c = shape[1]
    ours = CYBN_CLASSES[len(shape)](c, dtype=dtype, **options)
    theirs = TORCH_CLASSES[len(shape)](c, dtype=TORCH_DTYPES[dtype])
    rng = np.random.default_rng(0)
    ours.weight[...] = rng.uniform(0.5, 2, c)
    ours.bias[...] = rng.standard_normal(c)
    with torch.no_grad():
        theirs.weight.copy_(torch.from_numpy(ours.weight))
        theirs.bias.copy_(torch.from_numpy(ours.bias))
    return ours, theirs


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("variant", ["renorm rmax=1 dmax=0", "one ghost batch of size N"])
def test_identities_match_torch_batchnorm_over_steps(shape, variant, dtype):
    options = (dict(renorm=True, rmax=1.0, dmax=0.0) if variant.startswith("renorm")
               else dict(ghost_batch_size=shape[0]))
    ours, theirs = _pair(shape, dtype, **options)
    assert_steps_match(ours, theirs, shape, dtype)


def _torch_variants(x, weight, bias, running_mean, running_var, limits, ghost, eps=1e-5):
    """y by the papers' formulas in torch, r and d detached (constants)."""
    axes = [0] + list(range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    outputs = []
    for part in torch.split(x, ghost or x.shape[0]):
        mean = part.mean(dim=axes)
        var = part.var(dim=axes, unbiased=False)
        sigma_batch = torch.sqrt(var + eps)
        x_hat = (part - mean.reshape(shape)) / sigma_batch.reshape(shape)
        if limits is not None:
            rmax, dmax = limits
            sigma = torch.sqrt(running_var + eps)
            r = torch.clamp(sigma_batch.detach() / sigma, 1 / rmax, rmax)
            d = torch.clamp((mean.detach() - running_mean) / sigma, -dmax, dmax)
            x_hat = x_hat * r.reshape(shape) + d.reshape(shape)
        outputs.append(weight.reshape(shape) * x_hat + bias.reshape(shape))
    return torch.cat(outputs)


@pytest.mark.parametrize("shape", [(8, 5), (6, 4, 9), (4, 3, 6, 5), (4, 3, 3, 4, 5)], ids=str)
@pytest.mark.parametrize("limits, ghost", [((1.5, 0.5), None), (None, 2), ((2.0, 1.0), 2)],
                         ids=["renorm", "ghost", "renorm+ghost"])
def test_layer_matches_torch_autograd_through_the_formulas(shape, limits, ghost, dtype):
    options = {} if limits is None else dict(renorm=True, rmax=limits[0], dmax=limits[1])
    ours, _ = _pair(shape, dtype, ghost_batch_size=ghost, **options)
    ours.running_mean[...] = np.linspace(-1, 1, shape[1])
    ours.running_var[...] = np.linspace(0.3, 3, shape[1])
    tol = _tol(dtype)
    for step in range(2):
        x = random_batch(shape, dtype, seed=step, offset=1.0, scale=2)
        dy = random_batch(shape, dtype, seed=100 + step)
        weight = torch.from_numpy(ours.weight.copy()).requires_grad_(True)
        bias = torch.from_numpy(ours.bias.copy()).requires_grad_(True)
        xt = torch.from_numpy(x.copy()).requires_grad_(True)
        yt = _torch_variants(xt, weight, bias, torch.from_numpy(ours.running_mean.copy()),
                             torch.from_numpy(ours.running_var.copy()), limits, ghost)
        yt.backward(torch.from_numpy(dy))
        what = f"step {step}"
        np.testing.assert_allclose(ours(x), yt.detach().numpy(), **tol, err_msg=f"y {what}")
        np.testing.assert_allclose(ours.backward(dy), xt.grad.numpy(), **tol,
                                   err_msg=f"dx {what}")
        np.testing.assert_allclose(ours.grad_weight, weight.grad.numpy(), **tol,
                                   err_msg=f"grad_weight {what}")
        np.testing.assert_allclose(ours.grad_bias, bias.grad.numpy(), **tol,
                                   err_msg=f"grad_bias {what}")


def test_torch_state_dict_loads_into_a_variant_layer():
    theirs = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        theirs.running_mean.fill_(0.5)
        theirs.weight.fill_(2.0)
    theirs.num_batches_tracked.fill_(7)
    ours = cybn.BatchNorm2d(4, renorm=True, rmax=2.0, dmax=1.0, ghost_batch_size=2)
    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    np.testing.assert_array_equal(ours.running_mean, 0.5)
    np.testing.assert_array_equal(ours.weight, 2.0)
    assert ours.num_batches_tracked == 7
    assert set(ours.state_dict()) == set(theirs.state_dict())
