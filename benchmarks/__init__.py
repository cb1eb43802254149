"""asv benchmarks for cybn (see asv.conf.json at the repository root).

The modules bench_*.py hold the benchmarks; this file holds what they share:
the parameter grid and a base class that builds the data and sets the thread
count.  Only cybn's public API is used, so the suite can run against every
commit of the history.

Parameters of every benchmark: dtype, shape (written NxCxHxW, a subset of the
shapes of `benchmarks/compare.py`) and threads (1 and all available cores, set
with threadpoolctl for cybn's OpenMP kernels).

The environment variable CYBN_ASV_SHAPES (e.g. "2x8x4x4,64x2048") replaces
the shape list, for a fast smoke pass in CI; results taken that way are not
comparable with the default grid, so use it with --dry-run.
"""
import math
import os

import numpy as np

import cybn

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # only thread counts equal to OpenMP's default can run
    threadpool_limits = None

DTYPES = ["float32", "float64"]

# A subset of ResNet-50's batch-norm inputs at batch 32, the 2-D / 1x1
# shapes ("rows" kernels) and a tiny tensor for the per-call overhead.
SHAPES = [
    "32x64x56x56",
    "32x512x7x7",
    "256x512x1x1",
    "64x2048",
    "2x8x4x4",
]
if os.environ.get("CYBN_ASV_SHAPES"):
    SHAPES = [s.strip() for s in os.environ["CYBN_ASV_SHAPES"].split(",") if s.strip()]


def _cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


THREADS = sorted({1, _cores()})

MOMENTUM = 0.1
EPS = 1e-5


def parse_shape(text):
    return tuple(int(n) for n in text.split("x"))


class Data:
    """Input data, per-channel parameters and preallocated outputs."""

    def __init__(self, dtype, shape, seed=0):
        rng = np.random.default_rng(seed)
        dtype = np.dtype(dtype)
        shape = parse_shape(shape)
        c = shape[1]
        self.shape = shape
        self.x = rng.random(shape, dtype=dtype)
        self.dy = rng.random(shape, dtype=dtype)
        self.out = np.empty_like(self.x)
        self.out[...] = 0  # touch the pages before timing
        self.weight = (1.0 + 0.1 * rng.standard_normal(c)).astype(dtype)
        self.bias = (0.1 * rng.standard_normal(c)).astype(dtype)
        self.running_mean = (0.1 * rng.standard_normal(c)).astype(dtype)
        self.running_var = (1.0 + rng.random(c)).astype(dtype)
        _, self.mean, self.invstd = cybn.forward_train(self.x, self.weight, self.bias)

    @property
    def channels(self):
        return self.shape[1]

    @property
    def elements(self):
        return math.prod(self.shape)


class Benchmark:
    """Base of the parameterized benchmark classes: setup() makes self.data
    and limits OpenMP to `threads` threads until teardown()."""

    params = [DTYPES, SHAPES, THREADS]
    param_names = ["dtype", "shape", "threads"]
    timeout = 300
    # asv calls teardown() also after a setup() that raised NotImplementedError
    # (a skip): teardown must not depend on setup having run.
    _limits = None

    def setup(self, dtype, shape, threads):
        self._limits = None
        if cybn.max_threads() != threads:
            if threadpool_limits is None:
                raise NotImplementedError("threadpoolctl is needed to change the thread count")
            self._limits = threadpool_limits(limits=threads, user_api="openmp")
        self.data = Data(dtype, shape)

    def teardown(self, dtype, shape, threads):
        if getattr(self, "_limits", None) is not None:
            self._limits.restore_original_limits()
            self._limits = None
