"""Backward against central finite differences of the forward, in float64."""
import numpy as np
import pytest

import cybn
from conftest import numeric_gradient


def _loss_train(x, weight, bias, g):
    y, _, _ = cybn.forward_train(x, weight, bias)
    return float(np.sum(y * g))


def _loss_eval(x, weight, bias, g, mean, var):
    return float(np.sum(cybn.forward_eval(x, mean, var, weight, bias) * g))


@pytest.mark.parametrize("shape", [(5, 3), (3, 2, 4), (2, 3, 2, 3), (2, 2, 2, 1, 3)], ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_backward_matches_finite_differences(shape, training):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape) * 2 + 1
    c = shape[1]
    weight = rng.uniform(0.5, 2, c)
    bias = rng.standard_normal(c)
    g = rng.standard_normal(shape)  # the loss is sum(y * g), so dy = g
    if training:
        _, mean, invstd = cybn.forward_train(x, weight, bias)
        f = lambda: _loss_train(x, weight, bias, g)
    else:
        mean = rng.standard_normal(c)
        var = rng.uniform(0.5, 2, c)
        invstd = 1 / np.sqrt(var + 1e-5)
        f = lambda: _loss_eval(x, weight, bias, g, mean, var)
    dx, dweight, dbias = cybn.backward(g, x, mean, invstd, weight, training=training)
    np.testing.assert_allclose(dx, numeric_gradient(f, x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dweight, numeric_gradient(f, weight), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dbias, numeric_gradient(f, bias), rtol=1e-6, atol=1e-7)
