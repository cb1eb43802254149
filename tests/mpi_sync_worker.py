"""Run under mpiexec by tests/test_sync.py: SyncBatchNorm on every process
against a single-process BatchNorm on the concatenated batch.

Every process builds the same global batches (same seeds), keeps its slice
for SyncBatchNorm and runs the reference BatchNorm on the whole batch itself,
so each process checks its own results.  Prints "rank K ok: M checks" at the
end; on a failed check it prints the traceback and aborts the whole job, so
that the other processes do not wait for it forever.
"""
import sys
import traceback
import warnings

import numpy as np
from mpi4py import MPI

import cybn
from cybn.sync import SyncBatchNorm

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
checks = 0


def close(actual, expected, dtype, what):
    """Errors scaled to the reference's magnitude, as in tests/conftest.py."""
    global checks
    checks += 1
    expected = np.asarray(expected, dtype=np.float64)
    actual = np.asarray(actual)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if not expected.size:
        return
    tolerance = 1e-5 if np.dtype(dtype) == np.float32 else 1e-12
    scale = max(np.max(np.abs(expected)), 1.0)
    err = np.max(np.abs(actual.astype(np.float64) - expected))
    assert err <= tolerance * scale, (
        f"{what}: max error {err:.3g} vs magnitude {scale:.3g} ({np.dtype(dtype).name})")


def same_everywhere(value, what):
    """value is bitwise identical on every process."""
    global checks
    checks += 1
    values = comm.allgather(np.asarray(value))
    assert all(np.array_equal(v, values[0], equal_nan=True) for v in values), (
        f"{what} differs between processes: {values}")


def batch_sizes(step):
    """Uneven per-process batch sizes, with an empty process on most steps
    and sometimes a process with a single sample."""
    sizes = [(3 * rank + step) % 5 + 1 for rank in range(size)]
    if step % 3 != 2:
        sizes[(step + 1) % size] = 0
    if sum(sizes) < 2:
        sizes[-1] += 2
    return sizes


def my_slice(global_array, sizes):
    start = sum(sizes[:rank])
    return global_array[start:start + sizes[rank]]


def check_equivalence(dtype, spatial, **options):
    """Several training steps, then an eval step, against BatchNorm.

    The reference is a float64 BatchNorm on the same values, also for
    float32: float32 BatchNorm rounds its saved mean and invstd to float32,
    which costs more than float32 accuracy in dx for ill-conditioned
    channels (two values close together), while SyncBatchNorm keeps them in
    float64.
    """
    c = 4
    sync = SyncBatchNorm(c, dtype=dtype, **options)
    ref = cybn.BatchNorm(c, dtype=np.float64, **options)
    if sync.affine:
        rng = np.random.default_rng(7)
        weight, bias = rng.uniform(0.5, 2, c).astype(dtype), rng.standard_normal(c).astype(dtype)
        for layer in (sync, ref):
            layer.weight[...], layer.bias[...] = weight, bias
    label = f"{np.dtype(dtype).name} spatial={spatial} {options}"
    for step in range(5):
        training = step < 4
        sync.train(training)
        ref.train(training)
        sizes = batch_sizes(step)
        rng = np.random.default_rng(100 + step)
        shape = (sum(sizes), c) + spatial
        x = (3.0 + 2.0 * rng.standard_normal(shape)).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        what = f"{label} step {step} sizes {sizes}"
        if not training and not sync.track_running_stats:
            check_eval_local_statistics(sync, ref, x, dy, sizes, what)
            continue
        y_ref, dx_ref = ref(x.astype(np.float64)), ref.backward(dy.astype(np.float64))
        close(sync(my_slice(x, sizes)), my_slice(y_ref, sizes), dtype, f"y, {what}")
        close(sync.backward(my_slice(dy, sizes)), my_slice(dx_ref, sizes), dtype, f"dx, {what}")
        if sync.affine:
            close(sync.grad_weight, ref.grad_weight, dtype, f"grad_weight, {what}")
            close(sync.grad_bias, ref.grad_bias, dtype, f"grad_bias, {what}")
            same_everywhere(sync.grad_weight, f"grad_weight, {what}")
        if sync.track_running_stats:
            close(sync.running_mean, ref.running_mean, dtype, f"running_mean, {what}")
            close(sync.running_var, ref.running_var, dtype, f"running_var, {what}")
            assert sync.num_batches_tracked == ref.num_batches_tracked, what
            same_everywhere(sync.running_var, f"running_var, {what}")


def check_large_magnitudes():
    """float64 data whose spread overflows the sum of squares (1e300): the
    scaled second round (Allreduce of the largest values) gives what
    BatchNorm gives on the whole batch."""
    global checks
    sizes = batch_sizes(1)
    rng = np.random.default_rng(11)
    unit = rng.standard_normal((sum(sizes), 3, 4)) + np.array([0, 2, -1.0]).reshape(1, 3, 1)
    x, dy = unit * 1e300, rng.standard_normal(unit.shape)
    sync, ref = SyncBatchNorm(3, dtype=np.float64), cybn.BatchNorm(3, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the running variance overflows
        y, y_ref = sync(my_slice(x, sizes)), my_slice(ref(x), sizes)
    checks += 1
    error = np.max(np.abs(y - y_ref), initial=0.0)
    assert error < 1e-12, f"large magnitudes: y off by {error}"
    dx, dx_ref = sync.backward(my_slice(dy, sizes)), my_slice(ref.backward(dy), sizes)
    error = np.max(np.abs(dx - dx_ref), initial=0.0) * 1e300
    assert error < 1e-9, f"large magnitudes: dx off by {error} (times 1e300)"
    same_everywhere(sync.grad_weight, "grad_weight at large magnitudes")


def check_eval_local_statistics(sync, ref, x, dy, sizes, what):
    """Eval without running statistics: each process normalizes with its own
    batch's statistics (as PyTorch does), and the weight gradients are the sum
    of the processes' own."""
    dtype = sync.dtype
    x_ref, dy_ref = x.astype(np.float64), dy.astype(np.float64)
    close(sync(my_slice(x, sizes)), ref(my_slice(x_ref, sizes)), dtype, f"y, {what}")
    close(sync.backward(my_slice(dy, sizes)), ref.backward(my_slice(dy_ref, sizes)), dtype,
          f"dx, {what}")
    if sync.affine:
        grad_weight, grad_bias = 0.0, 0.0
        start = 0
        for n in sizes:
            ref(x_ref[start:start + n])
            ref.backward(dy_ref[start:start + n])
            grad_weight, grad_bias = grad_weight + ref.grad_weight, grad_bias + ref.grad_bias
            start += n
        close(sync.grad_weight, grad_weight, dtype, f"grad_weight, {what}")
        close(sync.grad_bias, grad_bias, dtype, f"grad_bias, {what}")


def state(layer):
    return {key: np.array(value) for key, value in layer.state_dict().items()}


def expect_error(layer, call, error_type, fragment, what):
    """call() raises error_type mentioning fragment, and leaves layer's state alone."""
    global checks
    checks += 1
    before = state(layer)
    saved = layer._saved
    try:
        call()
    except error_type as error:
        assert fragment in str(error), f"{what}: unexpected message {error!r}"
    else:
        raise AssertionError(f"{what}: no {error_type.__name__} raised")
    after = state(layer)
    assert before.keys() == after.keys()
    for key in before:
        assert np.array_equal(before[key], after[key]), f"{what}: {key} was modified"
    assert layer._saved is saved, f"{what}: the saved forward was replaced"


def check_step_still_works(layer, dtype, what):
    """A valid step after an error: the processes are still in step."""
    c = layer.num_features
    sizes = [2] * size
    rng = np.random.default_rng(5)
    x = rng.standard_normal((sum(sizes), c, 3)).astype(dtype)
    ref = cybn.BatchNorm(c, dtype=np.float64)
    ref.load_state_dict(layer.state_dict())
    close(layer(my_slice(x, sizes)), my_slice(ref(x.astype(np.float64)), sizes), dtype,
          f"y after {what}")
    close(layer.running_var, ref.running_var, dtype, f"running_var after {what}")


def check_errors(dtype):
    c = 3
    name = np.dtype(dtype).name
    other = np.float64 if np.dtype(dtype) == np.float32 else np.float32
    last = size - 1
    layer = SyncBatchNorm(c, dtype=dtype)
    x = np.random.default_rng(rank).standard_normal((2, c, 4)).astype(dtype)
    layer(x)  # a first step, so that there is state to keep
    layer.backward(x)

    # Layers that disagree between processes.
    bad_c = SyncBatchNorm(c + (rank == last), dtype=dtype)
    expect_error(bad_c, lambda: bad_c(np.ones((2, bad_c.num_features), dtype)), ValueError,
                 "same num_features", f"num_features mismatch {name}")
    bad_dtype = SyncBatchNorm(c, dtype=other if rank == last else dtype)
    expect_error(bad_dtype, lambda: bad_dtype(np.ones((2, c), bad_dtype.dtype)), TypeError,
                 "same dtype", f"dtype mismatch {name}")

    # One process's input is bad: every process raises the same type.
    wrong_dtype = x.astype(other) if rank == last else x
    expect_error(layer, lambda: layer(wrong_dtype), TypeError,
                 "layer's dtype" if rank == last else f"process {last}",
                 f"x of the wrong dtype on process {last} {name}")
    wrong_c = x[:, :2] if rank == 0 else x
    expect_error(layer, lambda: layer(wrong_c), ValueError,
                 "channels" if rank == 0 else "process 0",
                 f"x with the wrong C on process 0 {name}")
    expect_error(layer, lambda: layer([[1.0, 2.0, 3.0]] if rank == last else x), TypeError,
                 "ndarray", f"x not an array on process {last} {name}")
    check_step_still_works(layer, dtype, f"input errors {name}")

    # One value per channel over the whole group: each process's own input
    # (N = 0 or 1) passes the local checks.
    one = np.ones((1 if rank == last else 0, c), dtype)
    expect_error(layer, lambda: layer(one), ValueError, "more than 1 value per channel",
                 f"global count 1 {name}")
    one_spatial = np.ones((1 if rank == 0 else 0, c, 1, 1), dtype)
    expect_error(layer, lambda: layer(one_spatial), ValueError,
                 "more than 1 value per channel", f"global count 1, 4D {name}")
    check_step_still_works(layer, dtype, f"global count 1 {name}")

    # A bad dy on one process during backward.
    y = layer(x)
    good_dy = np.ones_like(y)
    bad_dy = good_dy[:1] if rank == last else good_dy
    expect_error(layer, lambda: layer.backward(bad_dy), ValueError,
                 "shape of x" if rank == last else f"process {last}", f"bad dy {name}")
    layer.backward(good_dy)  # and then a good one works
    values_per_channel = good_dy[:, 0].size * size  # dbias = the sum of dy over all processes
    assert np.all(layer.grad_bias == values_per_channel), (
        f"grad_bias {layer.grad_bias} after a bad dy {name}")

    # Non-finite statistics: the same warning and no update on every process.
    before = state(layer)
    poisoned = x.copy()
    if rank == 0:
        poisoned[0, 1, 0] = np.nan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(poisoned)
    assert [w.category for w in caught] == [RuntimeWarning], f"warnings {caught} {name}"
    assert "left unchanged" in str(caught[0].message)
    after = state(layer)
    for key in before:
        assert np.array_equal(before[key], after[key]), f"NaN batch modified {key} {name}"

    # No data on any process: as BatchNorm on an empty batch.
    empty = np.ones((0, c, 2), dtype)
    y = layer(empty)
    dx = layer.backward(empty)
    assert y.shape == dx.shape == empty.shape
    assert np.all(layer.grad_weight == 0) and np.all(layer.grad_bias == 0)
    after_empty = state(layer)
    for key in before:
        assert np.array_equal(before[key], after_empty[key]), f"empty batch modified {key}"

    # A forward in eval mode does not communicate: only one process calls it.
    layer.eval()
    if rank == last:
        close(layer(x), cybn.forward_eval(x, layer.running_mean, layer.running_var,
                                          layer.weight, layer.bias, eps=layer.eps),
              dtype, f"eval forward on one process {name}")
    layer.train()
    check_step_still_works(layer, dtype, f"eval on one process {name}")

    # Backward after an eval forward sums the weight gradients over the
    # processes, so it is collective too, and just as safe.
    layer.eval()
    layer(x)
    expect_error(layer, lambda: layer.backward(bad_dy), ValueError,
                 "shape of x" if rank == last else f"process {last}", f"bad dy in eval {name}")
    layer.backward(good_dy)
    assert np.all(layer.grad_bias == values_per_channel), f"eval grad_bias {name}"
    bad_c.eval()
    bad_c(np.ones((2, bad_c.num_features), dtype))
    expect_error(bad_c, lambda: bad_c.backward(np.ones((2, bad_c.num_features), dtype)),
                 ValueError, "same num_features", f"num_features mismatch in eval {name}")
    layer.train()
    check_step_still_works(layer, dtype, f"eval backward errors {name}")

    # A bad parameter or running statistic on one process only: every
    # process raises in the forward, before any exchange of statistics, and
    # then a backward of the last good forward still pairs up everywhere.
    layer(x)
    for attribute, bad_value, fragment in (
            ("bias", np.zeros(c + 1, dtype), "bias must have shape"),
            ("weight", np.ones((c, 1), dtype), "weight must have shape"),
            ("running_var", np.ones(c + 1, dtype), "running_var must have shape"),
            ("running_mean", np.zeros(c, other), "running_mean must have the dtype"),
            ("eps", -1.0, "eps must be in")):
        good_value = getattr(layer, attribute)
        if rank == last:
            setattr(layer, attribute, bad_value)
        expect_error(layer, lambda: layer(x), TypeError if "dtype" in fragment else ValueError,
                     fragment if rank == last else f"process {last}",
                     f"bad {attribute} on process {last} {name}")
        setattr(layer, attribute, good_value)
    layer.backward(good_dy)
    assert np.all(layer.grad_bias == values_per_channel), f"grad_bias after bad parameters {name}"

    # Processes in different modes meet in the header of their steps and
    # raise together: the last one evaluates (its backward is collective)
    # while the others train.
    if rank == last:
        layer.eval()
        layer(x)
        expect_error(layer, lambda: layer.backward(good_dy), RuntimeError, "different steps",
                     f"backward in eval against a training forward {name}")
    else:
        expect_error(layer, lambda: layer(x), RuntimeError, "different steps",
                     f"training forward against an eval backward {name}")
    layer.train()
    check_step_still_works(layer, dtype, f"mode mismatch {name}")


def check_renorm_same_everywhere(dtype):
    """r and d come from the global statistics: bitwise the same on every
    process, and clipped on this batch."""
    global checks
    layer = SyncBatchNorm(3, dtype=dtype, renorm=True, rmax=1.5, dmax=0.5)
    sizes = batch_sizes(1)
    x = (3.0 + 2.0 * np.random.default_rng(5).standard_normal((sum(sizes), 3, 4)))
    layer(my_slice(x.astype(dtype), sizes))
    r, d = layer._saved.renorm
    same_everywhere(r, "renorm r")
    same_everywhere(d, "renorm d")
    checks += 1
    assert np.all(r == 1.5) and np.all(d == 0.5), (r, d)
    try:
        SyncBatchNorm(3, dtype=dtype, ghost_batch_size=2)
    except ValueError as error:
        assert "does not support ghost batches" in str(error), error
    else:
        raise AssertionError("SyncBatchNorm accepted ghost_batch_size")


def main():
    assert size >= 2, "run under mpiexec with at least 2 processes"
    for dtype in (np.float32, np.float64):
        check_equivalence(dtype, ())
        check_equivalence(dtype, (3, 5))
        check_equivalence(dtype, (6,), momentum=None)
        check_equivalence(dtype, (2, 2), affine=False)
        check_equivalence(dtype, (4,), track_running_stats=False)
        # batch renormalization with the global statistics: clipped at first
        # (x is 3 + 2 N(0, 1), the running statistics start at 0 and 1)
        check_equivalence(dtype, (3, 5), renorm=True, rmax=1.5, dmax=0.5)
        check_equivalence(dtype, (), renorm=True, momentum=None)
        check_renorm_same_everywhere(dtype)
        check_errors(dtype)
    check_large_magnitudes()
    print(f"rank {rank} ok: {checks} checks", flush=True)


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        print(f"rank {rank} FAILED:\n{traceback.format_exc()}", flush=True)
        sys.stdout.flush()
        comm.Abort(1)
