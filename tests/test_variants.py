"""Batch renormalization and ghost batches (docs/variants.md) against the
float64 reference written from the formulas (cybn.reference), finite
differences, and the identities that tie them to plain batch norm."""
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import cybn
from cybn import reference
from conftest import assert_close, layouts, numeric_gradient, random_batch
from test_errors import Untouched

# Ranks 2 to 5, N even (ghost batches of 2), one rows shape over 4 KiB, and
# shapes big enough for the threaded and per-channel kernel paths.
SHAPES = [(8, 3), (64, 1030), (6, 5, 7), (4, 3, 6, 6), (4, 2, 3, 4, 5), (2, 1, 9),
          (8, 13, 40, 40), (6, 3, 1, 1)]
RENORM = (1.5, 0.5)  # clips some channels' r and d, and not others


def _problem(shape, dtype, seed=0):
    """x, dy, weight, bias and running statistics that put some channels'
    r and d inside RENORM's limits and others outside."""
    rng = np.random.default_rng(seed)
    c = shape[1]
    x = random_batch(shape, dtype, seed=seed, offset=2.0, scale=1.5)
    dy = random_batch(shape, dtype, seed=seed + 1)
    weight = rng.uniform(0.5, 2.0, c).astype(dtype)
    bias = rng.standard_normal(c).astype(dtype)
    # sigma_B / sigma near 2, 1, 1/2, ...: clipped, not clipped, clipped by RENORM
    running_mean = (2.0 + np.resize([-1.5, 0.2, 1.5, -0.3, 0.6], c)).astype(dtype)
    running_var = (2.25 * np.resize([0.25, 1.0, 4.0, 0.8, 1.3], c)).astype(dtype)
    return x, dy, weight, bias, running_mean, running_var


def _to_channels_last(a):
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


# ---------------------------------------------------------------------------
# Batch renormalization.

@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("ghost", [None, 2], ids=["whole", "ghost2"])
@pytest.mark.parametrize("limits", [RENORM, None], ids=["renorm", "plain"])
def test_forward_and_backward_match_reference(shape, ghost, limits, dtype):
    x, dy, w, b, rm, rv = _problem(shape, dtype)
    expected = reference.forward_train_variants(x, w, b, rm, rv, momentum=0.1, eps=1e-5,
                                                renorm=limits, ghost_batch_size=ghost)
    y_ref, mean_ref, invstd_ref, r_ref, d_ref, rm_ref, rv_ref = expected
    what = f"{shape} ghost={ghost} renorm={limits} {np.dtype(dtype).name}"
    rm_out, rv_out = rm.copy(), rv.copy()
    result = cybn.forward_train(x, w, b, rm_out, rv_out, stats_dtype=np.float64,
                                renorm=limits, ghost_batch_size=ghost)
    y, mean, invstd = result[:3]
    assert len(result) == (3 if limits is None else 5)
    assert y.dtype == dtype and rm_out.dtype == dtype
    assert_close(y, y_ref, dtype, f"y, {what}")
    assert_close(mean, mean_ref, dtype, f"mean, {what}")
    assert_close(invstd, invstd_ref, dtype, f"invstd, {what}")
    assert_close(rm_out, rm_ref, dtype, f"running_mean, {what}")
    assert_close(rv_out, rv_ref, dtype, f"running_var, {what}")
    renorm = None
    if limits is not None:
        r, d = result[3:]
        assert_close(r, r_ref, dtype, f"r, {what}")
        assert_close(d, d_ref, dtype, f"d, {what}")
        if shape[1] >= 3 and x.size // shape[1] >= 50:
            # the limits matter: some channels are clipped, some not
            assert np.any(r_ref == limits[0]) and np.any(r_ref == 1 / limits[0]), what
            assert np.any((r_ref < limits[0]) & (r_ref > 1 / limits[0])), what
        renorm = (r, d)
    dx, dw, db = cybn.backward(dy, x, mean, invstd, w, renorm=renorm, ghost_batch_size=ghost)
    dx_ref, dw_ref, db_ref = reference.backward_variants(
        dy, x, mean, invstd, w, *(renorm or (None, None)), ghost_batch_size=ghost)
    assert dx.dtype == dw.dtype == db.dtype == dtype
    assert_close(dx, dx_ref, dtype, f"dx, {what}")
    assert_close(dw, dw_ref, dtype, f"dweight, {what}")
    assert_close(db, db_ref, dtype, f"dbias, {what}")


@pytest.mark.parametrize("shape", [(4, 3, 6, 6), (8, 3), (4, 2, 3, 4, 5)], ids=str)
@pytest.mark.parametrize("ghost", [None, 2], ids=["whole", "ghost2"])
def test_every_layout_and_channels_last(shape, ghost, dtype):
    """The same numbers for every memory layout of x, for axis=-1, and into out."""
    x, dy, w, b, rm, rv = _problem(shape, dtype, seed=3)
    y_ref, mean_ref, invstd_ref, r_ref, d_ref, rm_ref, rv_ref = \
        reference.forward_train_variants(x, w, b, rm, rv, renorm=RENORM,
                                         ghost_batch_size=ghost)
    dx_ref, dw_ref, _ = reference.backward_variants(dy, x, mean_ref, invstd_ref, w, r_ref,
                                                    d_ref, ghost_batch_size=ghost)
    options = dict(renorm=RENORM, ghost_batch_size=ghost, stats_dtype=np.float64)
    for name, xl in layouts(x):
        rm_out, rv_out = rm.copy(), rv.copy()
        out = np.full(x.shape, np.nan, dtype)
        y, mean, invstd, r, d = cybn.forward_train(xl, w, b, rm_out, rv_out, out=out, **options)
        assert y is out
        assert_close(y, y_ref, dtype, f"y, {name}")
        assert_close(r, r_ref, dtype, f"r, {name}")
        assert_close(rv_out, rv_ref, dtype, f"running_var, {name}")
        dx, dw, _ = cybn.backward(dy, xl, mean, invstd, w, renorm=(r, d),
                                  ghost_batch_size=ghost)
        assert_close(dx, dx_ref, dtype, f"dx, {name}")
        assert_close(dw, dw_ref, dtype, f"dweight, {name}")
    if len(shape) > 2:
        x_cl, dy_cl = _to_channels_last(x), _to_channels_last(dy)
        rm_out, rv_out = rm.copy(), rv.copy()
        y, mean, invstd, r, d = cybn.forward_train(x_cl, w, b, rm_out, rv_out, axis=-1,
                                                   **options)
        assert_close(np.moveaxis(y, -1, 1), y_ref, dtype, "y, axis=-1")
        assert_close(rm_out, rm_ref, dtype, "running_mean, axis=-1")
        dx, dw, _ = cybn.backward(dy_cl, x_cl, mean, invstd, w, axis=-1, renorm=(r, d),
                                  ghost_batch_size=ghost)
        assert_close(np.moveaxis(dx, -1, 1), dx_ref, dtype, "dx, axis=-1")
        assert_close(dw, dw_ref, dtype, "dweight, axis=-1")


@pytest.mark.parametrize("ghost", [None, 3], ids=["whole", "ghost3"])
def test_in_place_and_overlapping_outputs(ghost, dtype):
    """out=x, and an out that overlaps x shifted by one sample (each ghost
    batch is written before the next is read, so that must go through a
    new array), give the results of a separate out."""
    x, dy, w, b, rm, rv = _problem((6, 3, 4, 5), dtype, seed=5)
    expected = cybn.forward_train(x, w, b, rm.copy(), rv.copy(), renorm=RENORM,
                                  ghost_batch_size=ghost)[0]
    x_in_place = x.copy()
    cybn.forward_train(x_in_place, w, b, rm.copy(), rv.copy(), out=x_in_place, renorm=RENORM,
                       ghost_batch_size=ghost)
    np.testing.assert_array_equal(x_in_place, expected)
    buffer = np.zeros((7,) + x.shape[1:], dtype)
    buffer[1:] = x
    cybn.forward_train(buffer[1:], w, b, rm.copy(), rv.copy(), out=buffer[:-1], renorm=RENORM,
                       ghost_batch_size=ghost)
    np.testing.assert_array_equal(buffer[:-1], expected)
    # backward with out=dy
    y, mean, invstd, r, d = cybn.forward_train(x, w, b, rm.copy(), rv.copy(), renorm=RENORM,
                                               ghost_batch_size=ghost)
    dx, dw, db = cybn.backward(dy, x, mean, invstd, w, renorm=(r, d), ghost_batch_size=ghost)
    dy_in_place = dy.copy()
    dx2, dw2, db2 = cybn.backward(dy_in_place, x, mean, invstd, w, out=dy_in_place,
                                  renorm=(r, d), ghost_batch_size=ghost)
    assert dx2 is dy_in_place
    for a, b_ in ((dx, dx2), (dw, dw2), (db, db2)):
        np.testing.assert_array_equal(a, b_)


@pytest.mark.parametrize("ghost", [None, 2], ids=["whole", "ghost2"])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_fused_residual_and_relu(ghost, activation, dtype):
    x, dy, w, b, rm, rv = _problem((4, 3, 5, 6), dtype, seed=7)
    residual = random_batch(x.shape, dtype, seed=9)
    y_ref, mean_ref, invstd_ref, r_ref, d_ref, _, _ = reference.forward_train_variants(
        x, w, b, rm, rv, renorm=RENORM, ghost_batch_size=ghost)
    y_ref = y_ref + residual
    if activation:
        y_ref = np.maximum(y_ref, 0)
    y, mean, invstd, r, d = cybn.forward_train(x, w, b, rm.copy(), rv.copy(), residual=residual,
                                               activation=activation, renorm=RENORM,
                                               ghost_batch_size=ghost, stats_dtype=np.float64)
    assert_close(y, y_ref, dtype, "y")
    grad_residual = np.empty_like(dy)
    dx, dw, db = cybn.backward(dy, x, mean, invstd, w, activation=activation,
                               y=y if activation else None, grad_residual=grad_residual,
                               renorm=(r, d), ghost_batch_size=ghost)
    g = dy.astype(np.float64) * (y_ref > 0) if activation else dy
    dx_ref, dw_ref, db_ref = reference.backward_variants(g, x, mean, invstd, w, r, d,
                                                         ghost_batch_size=ghost)
    assert_close(dx, dx_ref, dtype, "dx")
    assert_close(dw, dw_ref, dtype, "dweight")
    assert_close(db, db_ref, dtype, "dbias")
    assert_close(grad_residual, g, dtype, "grad_residual")


@pytest.mark.parametrize("ghost", [None, 2], ids=["whole", "ghost2"])
def test_backward_is_the_finite_difference_with_r_and_d_held_constant(ghost):
    x, dy, w, b, rm, rv = _problem((4, 3, 5), np.float64, seed=11)
    y, mean, invstd, r, d = cybn.forward_train(x, w, b, rm.copy(), rv.copy(), renorm=RENORM,
                                               ghost_batch_size=ghost)
    g = x.shape[0] if ghost is None else ghost
    r_rows, d_rows = np.atleast_2d(r), np.atleast_2d(d)
    assert np.any((r_rows == RENORM[0]) | (r_rows == 1 / RENORM[0]))  # clipped somewhere
    x0, w0, b0 = x.copy(), w.copy(), b.copy()

    def loss():
        """sum(dy * y) with this step's r and d as constants."""
        total = 0.0
        for i, start in enumerate(range(0, x0.shape[0], g)):
            part = x0[start:start + g]
            m = part.mean(axis=(0, 2), keepdims=True)
            sigma = np.sqrt(((part - m) ** 2).mean(axis=(0, 2), keepdims=True) + 1e-5)
            x_hat = (part - m) / sigma * r_rows[i][:, None] + d_rows[i][:, None]
            total += np.sum(dy[start:start + g] * (w0[:, None] * x_hat + b0[:, None]))
        return total

    dx, dw, db = cybn.backward(dy, x, mean, invstd, w, renorm=(r, d), ghost_batch_size=ghost)
    np.testing.assert_allclose(dx, numeric_gradient(loss, x0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dw, numeric_gradient(loss, w0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(db, numeric_gradient(loss, b0), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------
# Identities.

def _layer_class(ndim):
    return {2: cybn.BatchNorm1d, 3: cybn.BatchNorm1d, 4: cybn.BatchNorm2d,
            5: cybn.BatchNorm3d}[ndim]


def _steps(layer, shape, dtype, n_steps=3, residual=False):
    """forward and backward for a few training steps, then an eval step:
    everything the layer produced, as bytes."""
    results = []
    for step in range(n_steps + 1):
        layer.train(step < n_steps)
        x = random_batch(shape, dtype, seed=step, offset=1.0 + step, scale=2.0)
        dy = random_batch(shape, dtype, seed=50 + step)
        res = random_batch(shape, dtype, seed=70 + step) if residual else None
        y = layer(x, res)
        dx = layer.backward(dy)
        results += [y, dx, layer.grad_weight, layer.grad_bias, layer.running_mean,
                    layer.running_var, np.array(layer.num_batches_tracked)]
    return [a.tobytes() for a in results]


@pytest.mark.parametrize("shape", [(8, 3), (4, 5, 6), (4, 3, 6, 6), (2, 3, 3, 4, 5),
                                   (8, 13, 40, 40)], ids=str)
def test_renorm_with_rmax_1_and_dmax_0_is_plain_batch_norm_bit_for_bit(shape, dtype):
    cls = _layer_class(len(shape))
    for options in ({}, {"activation": "relu"}, {"momentum": None}):
        plain = cls(shape[1], dtype=dtype, **options)
        renorm = cls(shape[1], dtype=dtype, renorm=True, rmax=1.0, dmax=0.0, **options)
        for layer in (plain, renorm):
            layer.weight[...] = np.linspace(0.5, 2, shape[1])
            layer.bias[...] = np.linspace(-1, 1, shape[1])
        assert _steps(plain, shape, dtype, residual=bool(options)) == \
            _steps(renorm, shape, dtype, residual=bool(options)), options


@pytest.mark.parametrize("shape", [(8, 3), (4, 5, 6), (4, 3, 6, 6), (2, 3, 3, 4, 5)], ids=str)
def test_one_ghost_batch_of_size_n_is_plain_batch_norm_bit_for_bit(shape, dtype):
    cls = _layer_class(len(shape))
    plain = cls(shape[1], dtype=dtype)
    ghost = cls(shape[1], dtype=dtype, ghost_batch_size=shape[0])
    assert _steps(plain, shape, dtype) == _steps(ghost, shape, dtype)


@pytest.mark.parametrize("limits", [(1.0, 0.0), (2.0, 1.0), (np.inf, np.inf)], ids=str)
def test_running_statistics_equal_to_the_batch_give_r_1_and_d_0(limits, dtype):
    x, dy, w, b, _, _ = _problem((6, 4, 5, 5), dtype, seed=13)
    count, mean, m2 = cybn.batch_moments(x)
    rm, rv = mean.astype(dtype), (m2 / count).astype(dtype)
    y, _, _, r, d = cybn.forward_train(x, w, b, rm.copy(), rv.copy(), renorm=limits,
                                       stats_dtype=np.float64)
    tol = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(r, 1.0, rtol=0, atol=tol)
    np.testing.assert_allclose(d, 0.0, rtol=0, atol=tol)
    assert_close(y, cybn.forward_train(x, w, b)[0], dtype, "y")


def test_without_clipping_the_batch_is_normalized_with_the_running_statistics(dtype):
    """rmax = dmax = inf: y is the evaluation forward's with the running
    statistics before the update, while the gradient still flows through
    the batch's mean and variance."""
    x, dy, w, b, rm, rv = _problem((6, 4, 5, 5), dtype, seed=17)
    y_eval = cybn.forward_eval(x, rm, rv, w, b)
    rm_new, rv_new = rm.copy(), rv.copy()
    y, mean, invstd, r, d = cybn.forward_train(x, w, b, rm_new, rv_new,
                                               renorm=(np.inf, np.inf), stats_dtype=np.float64)
    assert_close(y, y_eval, dtype, "y")
    assert not np.array_equal(rm_new, rm)  # updated as in plain batch norm
    dx, dw, _ = cybn.backward(dy, x, mean, invstd, w, renorm=(r, d))
    dx_ref, dw_ref, _ = reference.backward_variants(dy, x, mean, invstd, w, r, d)
    assert_close(dx, dx_ref, dtype, "dx")
    assert_close(dw, dw_ref, dtype, "dweight")
    invstd_running = 1 / np.sqrt(rv.astype(np.float64) + 1e-5)
    dx_constant, _, _ = cybn.backward(dy, x, rm, invstd_running, w, training=False)
    assert np.max(np.abs(dx.astype(np.float64) - dx_constant)) > 0.01  # not the eval gradient


def test_ghost_batches_are_plain_batch_norm_per_ghost_batch(dtype):
    """Forward and backward of ghost batches are cybn's plain batch norm on
    each ghost batch (bitwise), dweight and dbias the sums over them; the
    running statistics get the mean of the ghost batches' means and
    unbiased variances."""
    x, dy, w, b, rm, rv = _problem((12, 5, 3, 4), dtype, seed=19)
    rm_ghost, rv_ghost = rm.copy(), rv.copy()
    y, mean, invstd = cybn.forward_train(x, w, b, rm_ghost, rv_ghost, ghost_batch_size=4,
                                         momentum=0.25)
    dx, dw, db = cybn.backward(dy, x, mean, invstd, w, ghost_batch_size=4)
    assert mean.shape == invstd.shape == (3, 5)
    means, unbiased = [], []
    dw_sum, db_sum = 0.0, 0.0
    for i in range(3):
        part = slice(4 * i, 4 * i + 4)
        y_i, mean_i, invstd_i = cybn.forward_train(x[part], w, b)
        dx_i, dw_i, db_i = cybn.backward(dy[part], x[part], mean_i, invstd_i, w)
        np.testing.assert_array_equal(y[part], y_i)
        np.testing.assert_array_equal(mean[i], mean_i)
        np.testing.assert_array_equal(dx[part], dx_i)
        dw_sum, db_sum = dw_sum + dw_i.astype(np.float64), db_sum + db_i.astype(np.float64)
        m = 4 * 3 * 4
        means.append(x[part].astype(np.float64).mean(axis=(0, 2, 3)))
        unbiased.append(x[part].astype(np.float64).var(axis=(0, 2, 3)) * m / (m - 1))
    assert_close(dw, dw_sum, dtype, "dweight")
    assert_close(db, db_sum, dtype, "dbias")
    assert_close(rm_ghost, 0.75 * rm.astype(np.float64) + 0.25 * np.mean(means, axis=0), dtype,
                 "running_mean")
    assert_close(rv_ghost, 0.75 * rv.astype(np.float64) + 0.25 * np.mean(unbiased, axis=0),
                 dtype, "running_var")


def test_each_ghost_batch_gets_its_own_r_and_d_against_the_same_running_statistics(dtype):
    x, dy, w, b, rm, rv = _problem((8, 3, 4, 4), dtype, seed=23)
    x[4:] = x[4:] * 3 + 5  # two very different ghost batches
    _, mean, invstd, r, d = cybn.forward_train(x, w, b, rm.copy(), rv.copy(),
                                               renorm=(10.0, 10.0), ghost_batch_size=4,
                                               stats_dtype=np.float64)
    for i in range(2):
        _, _, _, r_i, d_i = cybn.forward_train(x[4 * i:4 * i + 4], w, b, rm.copy(), rv.copy(),
                                               renorm=(10.0, 10.0), stats_dtype=np.float64)
        np.testing.assert_array_equal(r[i], r_i)
        np.testing.assert_array_equal(d[i], d_i)
    assert np.all(np.abs(r[1] - r[0]) > 0.5)


# Ghost batches take each kernel path as a plain call on one ghost batch
# does: planar memory order (a ghost batch's arrays over 16 MiB, short runs),
# channels cut into parts, one task per channel, and rows (2-D, and
# channels-last); all ghost batches go through one kernel call.
GHOST_PATHS = [((540, 16, 16, 16), 270, "planar"), ((64, 2, 32, 32), 32, "planar"),
               ((70, 5, 2, 2), 35, "planar"), ((300, 40), 100, "planar"),
               ((12, 7, 5, 5), 4, "channels-last")]


@pytest.mark.parametrize("shape, ghost, layout", GHOST_PATHS,
                         ids=["memory-order", "channels in parts", "per-channel", "rows",
                              "channels-last"])
@pytest.mark.parametrize("huge", [False, True], ids=["normal", "huge"])
@pytest.mark.filterwarnings("ignore:cybn. the batch statistics are not finite")
def test_ghost_batches_on_every_kernel_path(shape, ghost, layout, huge, dtype):
    """y, the statistics, r, d and dx of ghost batches are bit for bit those
    of plain calls on each ghost batch, on every kernel path, also in place
    (out=x, out=dy), and with float64 values beyond 1e154 in one ghost
    batch (whose statistics the kernels cannot compute: cybn._api computes
    them again for that ghost batch alone)."""
    x, dy, w, b, rm, rv = _problem(shape, dtype, seed=31)
    if huge:  # the second ghost batch's channel 1; its variance is beyond float64's range
        x[ghost:2 * ghost, 1] *= 1e290 if dtype == np.float64 else 1e30
    axis = 1
    if layout == "channels-last":
        x, dy, axis = _to_channels_last(x), _to_channels_last(dy), -1
    n_ghosts = shape[0] // ghost
    for renorm in (None, RENORM):
        stats = cybn.forward_train(x, w, b, rm.copy(), rv.copy(), renorm=renorm, axis=axis,
                                   ghost_batch_size=ghost, stats_dtype=np.float64)
        y, mean, invstd = stats[:3]
        grads = cybn.backward(dy, x, mean, invstd, w, axis=axis, ghost_batch_size=ghost,
                              renorm=None if renorm is None else stats[3:])
        y_in_place = x.copy()
        cybn.forward_train(y_in_place, w, b, rm.copy(), rv.copy(), renorm=renorm, axis=axis,
                           ghost_batch_size=ghost, out=y_in_place)
        dx_in_place = dy.copy()
        cybn.backward(dx_in_place, x, mean, invstd, w, axis=axis, ghost_batch_size=ghost,
                      renorm=None if renorm is None else stats[3:], out=dx_in_place)
        np.testing.assert_array_equal(y_in_place, y)
        np.testing.assert_array_equal(dx_in_place, grads[0])
        dw_sum = db_sum = 0.0
        for i in range(n_ghosts):
            part = slice(i * ghost, (i + 1) * ghost)
            stats_i = cybn.forward_train(x[part], w, b, rm.copy(), rv.copy(), renorm=renorm,
                                         axis=axis, stats_dtype=np.float64)
            np.testing.assert_array_equal(y[part], stats_i[0])
            for whole, alone in zip(stats[1:], stats_i[1:]):
                np.testing.assert_array_equal(whole[i], alone)
            dx_i, dw_i, db_i = cybn.backward(dy[part], x[part], *stats_i[1:3], w, axis=axis,
                                             renorm=None if renorm is None else stats_i[3:])
            np.testing.assert_array_equal(grads[0][part], dx_i)
            dw_sum, db_sum = dw_sum + dw_i.astype(np.float64), db_sum + db_i.astype(np.float64)
        assert_close(grads[1], dw_sum, dtype, "dweight")
        assert_close(grads[2], db_sum, dtype, "dbias")
        assert np.isfinite(y).all() and np.isfinite(grads[0]).all()


@pytest.mark.parametrize("shape", [(8, 13, 40, 40), (4096, 67), (8, 80, 40, 40)], ids=str)
def test_bitwise_identical_for_any_thread_count(shape, dtype):
    x, dy, w, b, rm, rv = _problem(shape, dtype, seed=29)
    results = {}
    for n in (1, 2, 3):
        with threadpool_limits(n, user_api="openmp"):
            values = []
            for ghost in (None, 4):
                rm_n, rv_n = rm.copy(), rv.copy()
                y, mean, invstd, r, d = cybn.forward_train(x, w, b, rm_n, rv_n, renorm=RENORM,
                                                           ghost_batch_size=ghost)
                values += [y, mean, invstd, r, d, rm_n, rv_n]
                values += cybn.backward(dy, x, mean, invstd, w, renorm=(r, d),
                                        ghost_batch_size=ghost)
            results[n] = [a.tobytes() for a in values]
    assert results[1] == results[2] == results[3]


# ---------------------------------------------------------------------------
# The layers.

def test_layer_matches_the_functions_over_steps(dtype):
    """BatchNorm2d(renorm=True, ghost_batch_size=2) with rmax and dmax raised
    between steps, as the paper's schedule does, against the reference."""
    shape = (6, 3, 4, 4)
    layer = cybn.BatchNorm2d(3, dtype=dtype, renorm=True, rmax=1.0, dmax=0.0,
                             ghost_batch_size=2, activation="relu")
    layer.weight[...] = [0.5, 1.0, 2.0]
    layer.bias[...] = [0.1, -0.2, 0.3]
    rm, rv = layer.running_mean.astype(np.float64), layer.running_var.astype(np.float64)
    for step, limits in enumerate([(1.0, 0.0), (1.5, 0.5), (2.0, 1.0), (3.0, 5.0)]):
        layer.rmax, layer.dmax = limits
        x = random_batch(shape, dtype, seed=step, offset=1.0, scale=2.0)
        dy = random_batch(shape, dtype, seed=10 + step)
        y_ref, mean, invstd, r, d, rm, rv = reference.forward_train_variants(
            x, layer.weight, layer.bias, rm, rv, renorm=limits, ghost_batch_size=2)
        y_ref = np.maximum(y_ref, 0)
        what = f"step {step} limits {limits}"
        assert_close(layer(x), y_ref, dtype, f"y, {what}")
        dx_ref, dw_ref, db_ref = reference.backward_variants(
            dy.astype(np.float64) * (y_ref > 0), x, mean, invstd, layer.weight, r, d,
            ghost_batch_size=2)
        assert_close(layer.backward(dy), dx_ref, dtype, f"dx, {what}")
        assert_close(layer.grad_weight, dw_ref, dtype, f"grad_weight, {what}")
        assert_close(layer.grad_bias, db_ref, dtype, f"grad_bias, {what}")
        assert_close(layer.running_mean, rm, dtype, f"running_mean, {what}")
        assert_close(layer.running_var, rv, dtype, f"running_var, {what}")
        assert layer.num_batches_tracked == step + 1
    layer.eval()  # evaluation is unchanged: the running statistics, whole batch
    x = random_batch((5, 3, 4, 4), dtype, seed=99)
    assert_close(layer(x), np.maximum(reference.forward_eval(
        x, layer.running_mean, layer.running_var, layer.weight, layer.bias), 0), dtype, "eval")


def test_layer_repr_and_state_dict():
    layer = cybn.BatchNorm2d(4, renorm=True, rmax=2.0, dmax=1.5, ghost_batch_size=8)
    text = repr(layer)
    assert "renorm=True, rmax=2.0, dmax=1.5" in text and "ghost_batch_size=8" in text
    assert "renorm" not in repr(cybn.BatchNorm2d(4))
    state = layer.state_dict()
    assert list(state) == ["weight", "bias", "running_mean", "running_var",
                           "num_batches_tracked"]
    other = cybn.BatchNorm2d(4)
    other.running_mean[...] = 3
    layer.load_state_dict(other.state_dict())
    np.testing.assert_array_equal(layer.running_mean, 3)
    assert (layer.renorm, layer.rmax, layer.dmax, layer.ghost_batch_size) == (True, 2.0, 1.5, 8)


# ---------------------------------------------------------------------------
# Errors: clear, naming the argument, and nothing modified.

def _function_call(**changes):
    x, dy, w, b, rm, rv = _problem((4, 3, 5, 5), np.float32)
    arguments = dict(x=x, weight=w, bias=b, running_mean=rm, running_var=rv,
                     out=np.full(x.shape, 7.0, np.float32))
    arguments.update(changes)
    return arguments


@pytest.mark.parametrize("changes, error, message", [
    (dict(running_mean=None, running_var=None, renorm=RENORM), ValueError,
     "renorm needs running_mean and running_var"),
    (dict(renorm=(0.5, 1.0)), ValueError, r"rmax must be in \[1.0, inf\], got 0.5"),
    (dict(renorm=(2.0, -1.0)), ValueError, r"dmax must be in \[0.0, inf\], got -1.0"),
    (dict(renorm=(np.nan, 1.0)), ValueError, "rmax must be in"),
    (dict(renorm=3.0), TypeError, r"renorm must be None or a pair \(rmax, dmax\)"),
    (dict(renorm=("a", 1.0)), TypeError, "rmax must be a real number"),
    (dict(ghost_batch_size=3), ValueError,
     "the batch size of x, N = 4, must be a multiple of ghost_batch_size = 3"),
    (dict(ghost_batch_size=1), ValueError, "ghost_batch_size must be at least 2 .*got 1"),
    (dict(ghost_batch_size=0), ValueError, "ghost_batch_size must be at least 2 .*got 0"),
    (dict(ghost_batch_size=2.0), TypeError, "ghost_batch_size must be an integer or None"),
    (dict(ghost_batch_size=True), TypeError, "ghost_batch_size must be an integer or None"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_forward_train_errors_modify_nothing(changes, error, message):
    arguments = _function_call(**changes)
    with Untouched(*arguments.values()), pytest.raises(error, match=message):
        cybn.forward_train(**arguments)


def test_backward_errors_modify_nothing():
    x, dy, w, b, rm, rv = _problem((4, 3, 5, 5), np.float32)
    y, mean, invstd, r, d = cybn.forward_train(x, w, b, rm, rv, renorm=RENORM,
                                               ghost_batch_size=2)
    out = np.full(x.shape, 7.0, np.float32)
    cases = [
        (dict(ghost_batch_size=None), ValueError, r"mean must have shape \(3,\)"),
        (dict(ghost_batch_size=4), ValueError, r"mean must have shape \(1, 3\)"),
        (dict(ghost_batch_size=3), ValueError, "must be a multiple of ghost_batch_size = 3"),
        (dict(renorm=(r[0], d)), ValueError, r"r must have shape \(2, 3\)"),
        (dict(renorm=5.0), TypeError, "renorm must be None or the pair"),
        (dict(training=False), ValueError, "renorm is only used with training=True"),
    ]
    for changes, error, message in cases:
        arguments = dict(renorm=(r, d), ghost_batch_size=2, out=out)
        arguments.update(changes)
        with Untouched(x, dy, mean, invstd, r, d, out), pytest.raises(error, match=message):
            cybn.backward(dy, x, mean, invstd, w, **arguments)


@pytest.mark.parametrize("options, error, message", [
    (dict(renorm=True, track_running_stats=False), ValueError,
     "renorm=True needs track_running_stats=True"),
    (dict(renorm=True, rmax=0.9), ValueError, "rmax must be in"),
    (dict(renorm=True, dmax=-0.1), ValueError, "dmax must be in"),
    (dict(renorm=1), TypeError, "renorm must be True or False"),
    (dict(ghost_batch_size=1), ValueError, "ghost_batch_size must be at least 2"),
    (dict(ghost_batch_size="4"), TypeError, "ghost_batch_size must be an integer"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_layer_construction_errors(options, error, message):
    with pytest.raises(error, match=message):
        cybn.BatchNorm2d(3, **options)


@pytest.mark.parametrize("attribute, value, error, message", [
    ("rmax", 0.5, ValueError, "rmax must be in"),
    ("dmax", -1.0, ValueError, "dmax must be in"),
    ("dmax", None, TypeError, "dmax must be a real number"),
    ("ghost_batch_size", 3, ValueError, "N = 4, must be a multiple of ghost_batch_size = 3"),
    ("ghost_batch_size", 1, ValueError, "ghost_batch_size must be at least 2"),
    ("renorm", "yes", TypeError, "renorm must be True or False"),
])
def test_layer_attribute_errors_modify_nothing(attribute, value, error, message):
    """A training loop's bad rmax, dmax or ghost_batch_size raises at the next
    forward, leaving the running statistics, the counter and the saved
    forward (hence backward) as they were."""
    layer = cybn.BatchNorm2d(3, renorm=True, rmax=2.0, dmax=1.0, ghost_batch_size=2)
    x = random_batch((4, 3, 5, 5), np.float32, seed=1, offset=2.0)
    dy = random_batch(x.shape, np.float32, seed=2)
    layer(x)
    dx_before = layer.backward(dy)
    setattr(layer, attribute, value)
    with Untouched(layer.running_mean, layer.running_var, layer.weight, layer.bias), \
            pytest.raises(error, match=message):
        layer(random_batch(x.shape, np.float32, seed=3))
    assert layer.num_batches_tracked == 1
    np.testing.assert_array_equal(layer.backward(dy), dx_before)
    layer.eval()  # evaluation does not use them
    layer(x)


# ---------------------------------------------------------------------------
# SyncBatchNorm in this process (tests/mpi_sync_worker.py: across processes).

@pytest.mark.parametrize("options", [dict(renorm=True, rmax=1.5, dmax=0.5),
                                     dict(renorm=True, activation="relu", momentum=None)],
                         ids=str)
def test_sync_renorm_over_comm_self_equals_batchnorm(options, dtype, MPI):
    from cybn.sync import SyncBatchNorm
    shape = (6, 3, 4, 5)
    sync = SyncBatchNorm(3, dtype=dtype, comm=MPI.COMM_SELF, **options)
    ref = cybn.BatchNorm(3, dtype=dtype, **options)
    for layer in (sync, ref):
        layer.weight[...] = [0.5, 1.0, 2.0]
        layer.bias[...] = [0.1, -0.2, 0.3]
    for step, training in enumerate([True, True, True, False, True]):
        sync.train(training)
        ref.train(training)
        x = random_batch(shape, dtype, seed=step, offset=3.0, scale=2.0)
        dy = random_batch(shape, dtype, seed=100 + step)
        residual = random_batch(shape, dtype, seed=200 + step)
        what = f"step {step} training={training}"
        assert_close(sync(x, residual), ref(x, residual), dtype, f"y, {what}")
        assert_close(sync.backward(dy), ref.backward(dy), dtype, f"dx, {what}")
        assert_close(sync.grad_weight, ref.grad_weight, dtype, f"grad_weight, {what}")
        assert_close(sync.grad_bias, ref.grad_bias, dtype, f"grad_bias, {what}")
        assert_close(sync.running_var, ref.running_var, dtype, f"running_var, {what}")
    assert sync._saved.renorm is not None


def test_sync_rejects_ghost_batches(MPI):
    from cybn.sync import SyncBatchNorm
    with pytest.raises(ValueError, match="SyncBatchNorm does not support ghost batches"):
        SyncBatchNorm(3, comm=MPI.COMM_SELF, ghost_batch_size=2)
    layer = SyncBatchNorm(3, comm=MPI.COMM_SELF)
    layer.ghost_batch_size = 2
    with Untouched(layer.running_mean, layer.running_var), pytest.raises(
            ValueError, match="does not support ghost batches .*got ghost_batch_size=2"):
        layer(random_batch((4, 3, 2, 2), np.float32))
    assert layer.num_batches_tracked == 0


@pytest.mark.parametrize("shape", [(260, 16, 16, 16), (64, 2, 32, 32), (70, 5, 2, 2), (300, 40)],
                         ids=["memory-order", "channels in parts", "per-channel", "rows"])
def test_renorm_on_every_kernel_path(shape):
    """r and d are computed inside each training kernel path between the
    statistics and y: the large short-run planar path and the path of
    channels cut into parts (statistics of all channels first), the
    per-channel path and the rows path."""
    x, dy, w, b, rm, rv = _problem(shape, np.float64)
    y_ref, mean_ref, invstd_ref, r_ref, d_ref, rm_ref, rv_ref = \
        reference.forward_train_variants(x, w, b, rm, rv, renorm=RENORM)
    for layout in ("planar", "channels-last"):
        data = x if layout == "planar" or x.ndim == 2 else _to_channels_last(x)
        y, mean, invstd, r, d = cybn.forward_train(data, w, b, rm.copy(), rv.copy(),
                                                   renorm=RENORM, axis=1 if layout ==
                                                   "planar" else -1)
        if data is not x:
            y = np.moveaxis(y, -1, 1)
        assert_close(y, y_ref, np.float64, f"y {shape} {layout}")
        assert_close(r, r_ref, np.float64, f"r {shape} {layout}")
        assert_close(d, d_ref, np.float64, f"d {shape} {layout}")
