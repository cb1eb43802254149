"""The split API (batch_moments, combine_moments, normalize, grad_sums,
grad_input) reproduces the fused functions, also when the batch is cut."""
import numpy as np
import pytest

import cybn
from cybn import reference
from conftest import assert_close, layouts, random_batch


@pytest.mark.parametrize("shape", [(9, 4), (5, 3, 7), (6, 70, 1, 1), (4, 3, 5, 6)], ids=str)
def test_moments_match_reference(shape, dtype):
    x = random_batch(shape, dtype, seed=1, offset=1e3)
    mean_ref, var_ref = reference.batch_statistics(x)
    for name, xl in layouts(x):
        count, mean, m2 = cybn.batch_moments(xl)
        assert count == x.size // shape[1]
        assert mean.dtype == m2.dtype == np.float64
        assert_close(mean, mean_ref, dtype, f"mean {name}")
        np.testing.assert_allclose(m2 / count, var_ref, rtol=1e-5 if dtype == np.float32 else 1e-11)


@pytest.mark.parametrize("sizes", [[3, 5, 8], [0, 7, 1, 0, 4], [16]])
def test_combined_parts_equal_the_whole(sizes, dtype):
    x = random_batch((sum(sizes), 3, 4), dtype, seed=2, offset=50, scale=3)
    parts = np.split(x, np.cumsum(sizes)[:-1])
    triples = [cybn.batch_moments(p) for p in parts]
    count, mean, m2 = cybn.combine_moments([t[0] for t in triples], [t[1] for t in triples],
                                           [t[2] for t in triples])
    whole = cybn.batch_moments(x)
    assert count == whole[0]
    np.testing.assert_allclose(mean, whole[1], rtol=1e-12)
    np.testing.assert_allclose(m2, whole[2], rtol=1e-9)


def test_combine_moments_rejects_bad_input():
    with pytest.raises(TypeError, match="counts must be a 1-d array of integers"):
        cybn.combine_moments([1.5, 2.0], np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="counts must not be negative"):
        cybn.combine_moments([-1, 2], np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="means and m2s must have shape"):
        cybn.combine_moments([1, 2], np.zeros((3, 3)), np.zeros((3, 3)))


@pytest.mark.parametrize("training", [True, False])
def test_split_backward_over_parts_equals_backward(training, dtype):
    x = random_batch((12, 3, 5), dtype, seed=3)
    dy = random_batch((12, 3, 5), dtype, seed=4)
    w = np.array([0.5, 1.0, 2.0])
    b = np.array([0.0, 1.0, -1.0])
    y, mean, invstd = cybn.forward_train(x, w, b)
    dx, dw, db = cybn.backward(dy, x, mean, invstd, w, training=training)
    parts = [slice(0, 5), slice(5, 5), slice(5, 12)]
    sums = [cybn.grad_sums(dy[p], x[p], mean) for p in parts]
    sum_dy = sum(s[0] for s in sums)
    sum_dy_xmu = sum(s[1] for s in sums)
    assert_close(sum_dy, db, dtype, "dbias")
    assert_close(sum_dy_xmu * invstd, dw, dtype, "dweight")
    count = x.size // 3
    for p in parts:
        dx_part = cybn.grad_input(dy[p], x[p], mean, invstd, sum_dy, sum_dy_xmu, count, w,
                                  training=training)
        assert_close(dx_part, dx[p], dtype, "dx")
        y_part = cybn.normalize(x[p], mean, invstd, w, b)
        assert_close(y_part, y[p], dtype, "y")
