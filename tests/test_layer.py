"""The BatchNorm layers against the reference, step by step."""
import numpy as np
import pytest

import cybn
from cybn import reference
from conftest import assert_close, random_batch
from test_errors import Untouched


def _reference_steps(batches, momentum, eps=1e-5):
    """Running statistics after each batch, as PyTorch defines them."""
    c = batches[0].shape[1]
    running_mean, running_var = np.zeros(c), np.ones(c)
    history = []
    for i, x in enumerate(batches, start=1):
        factor = 1.0 / i if momentum is None else momentum
        y, mean, invstd, running_mean, running_var = reference.forward_train(
            x, None, None, running_mean, running_var, momentum=factor, eps=eps)
        history.append((y, mean, invstd, running_mean, running_var))
    return history


@pytest.mark.parametrize("momentum", [None, 0.0, 0.1, 1.0])
@pytest.mark.parametrize("eps", [1e-5, 0.5])
def test_training_steps_then_eval(momentum, eps, dtype):
    batches = [random_batch((6, 4, 3, 3), dtype, seed=s, offset=s) for s in range(4)]
    bn = cybn.BatchNorm2d(4, eps=eps, momentum=momentum, dtype=dtype)
    expected = _reference_steps(batches, momentum, eps)
    for step, (x, (y_ref, _, _, rm_ref, rv_ref)) in enumerate(zip(batches, expected), 1):
        assert_close(bn(x), y_ref, dtype, f"y at step {step}")
        assert_close(bn.running_mean, rm_ref, dtype, f"running_mean at step {step}")
        assert_close(bn.running_var, rv_ref, dtype, f"running_var at step {step}")
        assert bn.num_batches_tracked == step
    bn.eval()
    assert not bn.training
    x = random_batch((3, 4, 3, 3), dtype, seed=9)
    y = bn(x)
    assert_close(y, reference.forward_eval(x, expected[-1][3], expected[-1][4], eps=eps), dtype,
                 "eval y")
    before = bn.running_mean.copy()
    bn(x)
    np.testing.assert_array_equal(bn.running_mean, before)  # eval does not update
    assert bn.num_batches_tracked == 4


def test_backward_in_training_and_eval(dtype):
    rng = np.random.default_rng(0)
    bn = cybn.BatchNorm(3, dtype=dtype)
    bn.weight[...] = rng.uniform(0.5, 2, 3)
    bn.bias[...] = rng.standard_normal(3)
    x = random_batch((5, 3, 4), dtype, seed=1)
    dy = random_batch((5, 3, 4), dtype, seed=2)
    bn(x)
    dx = bn.backward(dy)
    _, mean, invstd, _, _ = reference.forward_train(x)
    expected = reference.backward(dy, x, mean, invstd, bn.weight, training=True)
    assert_close(dx, expected[0], dtype, "dx")
    assert_close(bn.grad_weight, expected[1], dtype, "grad_weight")
    assert_close(bn.grad_bias, expected[2], dtype, "grad_bias")
    assert bn.grad_weight.dtype == dtype

    bn.eval()
    bn(x)
    dx = bn.backward(dy)
    invstd = 1 / np.sqrt(bn.running_var.astype(np.float64) + bn.eps)
    expected = reference.backward(dy, x, bn.running_mean, invstd, bn.weight, training=False)
    assert_close(dx, expected[0], dtype, "eval dx")
    assert_close(bn.grad_weight, expected[1], dtype, "eval grad_weight")


def test_gradients_are_overwritten_not_accumulated():
    bn = cybn.BatchNorm1d(3)
    x = random_batch((8, 3), np.float32)
    dy = random_batch((8, 3), np.float32, seed=5)
    bn(x)
    bn.backward(dy)
    first = bn.grad_bias.copy()
    bn(x)
    bn.backward(dy)
    np.testing.assert_array_equal(bn.grad_bias, first)


def test_no_tracking_uses_batch_stats_in_eval(dtype):
    bn = cybn.BatchNorm1d(3, track_running_stats=False, dtype=dtype).eval()
    assert bn.running_mean is None and bn.running_var is None and bn.num_batches_tracked is None
    x = random_batch((7, 3, 5), dtype, seed=3, offset=2)
    assert_close(bn(x), reference.forward_train(x)[0], dtype, "y")
    dy = random_batch((7, 3, 5), dtype, seed=4)
    dx = bn.backward(dy)
    _, mean, invstd, _, _ = reference.forward_train(x)
    assert_close(dx, reference.backward(dy, x, mean, invstd, None, training=True)[0], dtype, "dx")


def test_affine_false():
    bn = cybn.BatchNorm3d(2, affine=False, dtype=np.float64)
    assert bn.weight is None and bn.bias is None and bn.grad_weight is None
    x = random_batch((2, 2, 3, 3, 3), np.float64)
    assert_close(bn(x), reference.forward_train(x)[0], np.float64, "y")
    bn.backward(x)
    assert bn.grad_weight is None
    assert set(bn.state_dict()) == {"running_mean", "running_var", "num_batches_tracked"}


def test_state_dict_round_trip_and_resets():
    bn = cybn.BatchNorm2d(3)
    for s in range(3):
        bn(random_batch((4, 3, 2, 2), np.float32, seed=s, offset=1))
    bn.weight[...] = [1, 2, 3]
    state = bn.state_dict()
    assert set(state) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    assert state["num_batches_tracked"].dtype == np.int64 and state["num_batches_tracked"] == 3
    state["weight"][0] = 99  # a copy: the layer is not changed through it
    assert bn.weight[0] == 1
    other = cybn.BatchNorm2d(3)
    other.load_state_dict(bn.state_dict())
    for key, value in bn.state_dict().items():
        np.testing.assert_array_equal(other.state_dict()[key], value)
    x = random_batch((2, 3, 2, 2), np.float32, seed=7)
    np.testing.assert_array_equal(other.eval()(x), bn.eval()(x))
    bn.reset_running_stats()
    np.testing.assert_array_equal(bn.running_mean, 0)
    np.testing.assert_array_equal(bn.running_var, 1)
    assert bn.num_batches_tracked == 0
    np.testing.assert_array_equal(bn.weight, [1, 2, 3])
    bn.reset_parameters()
    np.testing.assert_array_equal(bn.weight, 1)
    np.testing.assert_array_equal(bn.bias, 0)


def test_load_state_dict_checks_everything_first():
    bn = cybn.BatchNorm2d(3)
    bn(random_batch((4, 3, 2, 2), np.float32, offset=5))
    good = bn.state_dict()
    with Untouched(bn.weight, bn.bias, bn.running_mean, bn.running_var):
        bad = dict(good, running_var=np.ones(4))  # weight comes first and is fine
        bad["weight"] = good["weight"] + 1
        with pytest.raises(ValueError, match=r"state_dict\['running_var'\] must have shape \(3,\)"):
            bn.load_state_dict(bad)
        with pytest.raises(KeyError, match="unexpected keys \\['extra'\\]"):
            bn.load_state_dict(dict(good, extra=np.ones(3)))
        with pytest.raises(KeyError, match="missing keys \\['bias'\\]"):
            bn.load_state_dict({k: v for k, v in good.items() if k != "bias"})
        with pytest.raises(ValueError, match="num_batches_tracked"):
            bn.load_state_dict(dict(good, num_batches_tracked=np.array([1.5])))
    assert bn.num_batches_tracked == 1
    no_count = {k: v for k, v in good.items() if k != "num_batches_tracked"}
    bn.load_state_dict(no_count)  # PyTorch's rule: an old checkpoint without the count
    assert bn.num_batches_tracked == 0


def test_layer_errors_leave_state_unchanged():
    bn = cybn.BatchNorm2d(3)
    with pytest.raises(RuntimeError, match="backward was called before forward"):
        bn.backward(np.zeros((2, 3, 2, 2), np.float32))
    x = random_batch((2, 3, 2, 2), np.float32)
    bn(x)
    state = bn.state_dict()
    with Untouched(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.grad_weight):
        with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
            bn(x[0])
        with pytest.raises(TypeError, match="x must have the layer's dtype float32"):
            bn(x.astype(np.float64))
        with pytest.raises(ValueError, match="x must have 3 channels"):
            bn(np.zeros((2, 4, 2, 2), np.float32))
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            bn(np.zeros((1, 3, 1, 1), np.float32))
        with pytest.raises(ValueError, match="dy must have the shape of x"):
            bn.backward(np.zeros((2, 3, 2, 3), np.float32))
    assert bn.num_batches_tracked == state["num_batches_tracked"]
    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got 4D input\)"):
        cybn.BatchNorm1d(3)(x)
    with pytest.raises(ValueError, match=r"expected 5D input \(got 4D input\)"):
        cybn.BatchNorm3d(3)(x)
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        cybn.BatchNorm(3, dtype=np.int32)
    with pytest.raises(ValueError, match="num_features must be a positive integer"):
        cybn.BatchNorm(0)
    with pytest.raises(ValueError, match="momentum must be in"):
        cybn.BatchNorm(3, momentum=2.0)


def test_non_finite_batch_keeps_the_model():
    bn = cybn.BatchNorm1d(2)
    bn(random_batch((5, 2), np.float32))
    state = bn.state_dict()
    bad = random_batch((5, 2), np.float32, seed=1)
    bad[0, 0] = np.inf
    with pytest.warns(RuntimeWarning, match="left unchanged") as caught:
        bn(bad)
    assert [w.filename for w in caught] == [__file__]  # points at the caller, not cybn
    for key, value in state.items():
        np.testing.assert_array_equal(bn.state_dict()[key], value)


def test_empty_batch_is_not_counted():
    bn = cybn.BatchNorm2d(3)
    y = bn(np.zeros((0, 3, 4, 4), np.float32))
    assert y.shape == (0, 3, 4, 4) and bn.num_batches_tracked == 0
    dx = bn.backward(np.zeros((0, 3, 4, 4), np.float32))
    assert dx.shape == (0, 3, 4, 4)
    np.testing.assert_array_equal(bn.grad_weight, 0)


def test_repr():
    assert repr(cybn.BatchNorm2d(8)) == ("BatchNorm2d(8, eps=1e-05, momentum=0.1, affine=True, "
                                         "track_running_stats=True, dtype=float32)")
