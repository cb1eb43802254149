# cython: language_level=3
"""The typed kernels of cybn: loops and nothing else.

cybn._api checks the arguments and chooses the layout; the kernels only
check, cheaply and in C, that their operands are what they need (see
operand).  Data arrives in one of two layouts, both views of the caller's
memory:

- "planar": (N, C, *spatial) whose spatial axes form one run of S values of
  unit stride (NCHW and its relatives); a channel is N runs of S contiguous
  values.
- "rows": (R, C) with unit stride along C ((N, C) batches, N×C×1×1 and
  channels-last data); a channel is a column, and loops run along rows,
  vectorized across channels.

Work is cut into tasks whose boundaries depend on the shape only, never on
the number of threads, and partial sums are merged in task order: results
are bitwise identical for any number of threads.  With many channels a
planar task is a whole channel, whose statistics and element-wise pass then
run back to back while its data is still in cache; with few channels each
channel is cut into parts so that every thread has work.  All statistics and
gradient sums are accumulated in float64, whatever the data type.
"""
import contextlib
import contextvars
import os

from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport isfinite, sqrt
from libc.stdlib cimport free, malloc

cimport numpy as cnp

cnp.import_array()

# The C loops cybn calls are declared in _kernels.pxd.


def _set_fused_form():
    """Fused multiply-adds in the planar float32 passes (see _loops.h) where
    the CPU has fma, or as the environment variable CYBN_FMA (0 or 1) says:
    tests run each form in its own process."""
    global cybn_fused
    cybn_detect_fma()
    form = os.environ.get("CYBN_FMA", "").strip()
    if form not in ("", "0", "1"):
        raise ValueError(f"CYBN_FMA: expected 0 or 1, got {form!r}")
    if form:
        cybn_fused = form == "1"


_set_fused_form()


def machine_and_build():
    """What cybn.show_config() reports of the CPU and of this build."""
    cdef int cpu = cybn_cpu_features(), build = cybn_build_options()
    return {"avx2": bool(cpu & 1), "fma": bool(cpu & 2), "avx512f": bool(cpu & 4),
            "fused_float32_passes": bool(cybn_fused), "openmp": bool(build & 1),
            "runtime_clones": bool(build & 2), "native": bool(build & 4)}


def max_threads():
    """The number of threads a large kernel uses now (OpenMP's current limit)."""
    return cybn_max_threads()


# ---------------------------------------------------------------------------
# The schedule: how a call runs, decided in one place (schedule) from its
# shape, element size and operands and the machine's caches.  Every
# threshold is here with its reason; the measurements behind the numbers are
# in docs/design.md.  The tasks whose sums are merged are fixed by the shape
# and the caches, never by the thread count, so that results are bitwise the
# same for any number of threads.

# A call uses at most one thread per THREAD_VALUES values, rounded down to a
# power of two: a thread's start-up costs more than a smaller share saves,
# and power-of-two channel and task counts then deal evenly.
cdef Py_ssize_t THREAD_VALUES = 1 << 17
# Work is cut into TASKS_PER_THREAD tasks for each thread the call could use
# on PLANNED_THREADS (not on this machine: the tasks fix the order of the
# sums), at least MIN_TASKS (which measured best on 2 threads), of at least
# TASK_VALUES values: the busiest thread then does at most 1.25 times the
# mean on up to 64 threads (tests/test_schedule.py).
cdef Py_ssize_t TASKS_PER_THREAD = 4
cdef Py_ssize_t PLANNED_THREADS = 64
cdef Py_ssize_t MIN_TASKS = 16
cdef Py_ssize_t TASK_VALUES = 1 << 14
# Planar data with at least MIN_CHANNELS channels, or too few values to cut,
# runs a task per channel, its statistics then its element-wise pass while it
# is in cache; fewer channels are cut into parts.
cdef Py_ssize_t MIN_CHANNELS = 64
# A call counts on keeping at most this much of a shared last-level cache:
# the detected L3 where it is smaller (a VM may report its host's whole L3).
cdef Py_ssize_t CACHE_CAP = 32 << 20
# Planar runs shorter than SHORT_RUN_BYTES (small H x W), in calls over half
# the cache, are summed in memory order in BATCH_RANGES ranges of the batch
# (2 x C partial sums each): runs a batch stride apart defeat the prefetcher.
cdef Py_ssize_t SHORT_RUN_BYTES = 4096
cdef Py_ssize_t BATCH_RANGES = 16
# The per-channel sums over runs shorter than PREFETCH_RUN_BYTES prefetch
# PREFETCH_RUNS runs ahead, as such runs are too short for the prefetcher.
cdef Py_ssize_t PREFETCH_RUN_BYTES = 2048
cdef Py_ssize_t PREFETCH_RUNS = 2


cdef inline Py_ssize_t runs_ahead(Py_ssize_t n_spatial, Py_ssize_t itemsize) noexcept nogil:
    return PREFETCH_RUNS if n_spatial * itemsize < PREFETCH_RUN_BYTES else 0


# Rows sums cut the data into ranges of at least ROWS_MIN rows outside an
# eighth of the cache, each keeping 2 x C partial sums (at most 1/64 of its
# data: more cost as much as the data to add up), of CACHED_ROWS_MIN within
# it, a power of two of them to deal evenly; then, for the tasks still
# needed, into blocks of channels (no value depends on them), of a page or
# more outside the cache (narrower ones read a few lines of each page), of at
# least CHANNELS_MIN within it.  No more threads run than there are tasks.
cdef Py_ssize_t ROWS_MIN = 256
cdef Py_ssize_t CACHED_ROWS_MIN = 64
cdef Py_ssize_t CHANNELS_MIN = 64
# Rows element-wise tasks hold at least WRITE_ROWS_MIN rows.
cdef Py_ssize_t WRITE_ROWS_MIN = 4
# Rows of at most SHORT_ROW_BYTES, or of at least PAGE_BYTES, or data within
# an eighth of the cache, are summed several rows per step; rows in between
# one at a time, in memory order, which the prefetcher follows better.
cdef Py_ssize_t SHORT_ROW_BYTES = 256
cdef Py_ssize_t PAGE_BYTES = 4096
# The element-wise rows passes take several rows per step only in data that
# fits the cache, and for rows of at most SHORT_ROW_BYTES or at least
# LONG_ROW_CHANNELS channels, where that measured faster.
cdef Py_ssize_t LONG_ROW_CHANNELS = 1024
# Outputs are written by streaming stores in runs of at least
# STREAM_RUN_BYTES (shorter ones would write lines partly), in two-pass calls
# over the cache (the output cannot stay there, and streaming keeps the
# inputs there for the second pass), and in one-pass calls over
# ONE_PASS_STREAM_FACTOR times it (a smaller one finds part of its arrays in
# the cache from the call before).
cdef Py_ssize_t STREAM_RUN_BYTES = 512
cdef Py_ssize_t ONE_PASS_STREAM_FACTOR = 2
# The per-channel path sums the next channel while it streams out this one,
# where a channel's inputs fit half the L2, for its second pass to find.

cdef enum:
    TWO_PASS = 0  # sums, then an element-wise pass over the same data
    ONE_PASS = 1  # an element-wise pass alone (evaluation, the split API's)
    SUMS = 2      # sums alone (the split API's)

ctypedef struct Caches:
    Py_ssize_t l2, l3

ctypedef struct Plan:
    int threads          # of every parallel region (1: none)
    bint per_channel     # planar: a task per channel, sums then pass
    bint memory_order    # planar: sums by batch ranges in memory order
    Py_ssize_t parts     # planar: tasks per channel of the per-channel sums
    Py_ssize_t ranges    # batch ranges (memory order) or row ranges (rows)
    Py_ssize_t blocks    # channel blocks per range (no value depends on them)
    Py_ssize_t chunk     # runs per element-wise task (planar)
    Py_ssize_t write_tasks  # row ranges of the element-wise pass (rows)
    bint stream          # outputs by streaming stores
    bint overlap         # per-channel: the next channel's sums with this pass
    int sums_block       # rows per step of the rows sums
    int write_block      # rows per step of the rows element-wise passes


cdef Caches CACHES  # this machine's, set at import
# The schedule's inputs that tests replace within `forcing` (None: none).
_forced = contextvars.ContextVar("cybn_forced_schedule", default=None)
_FORCEABLE = ("l2", "l3", "stream_cache")


@contextlib.contextmanager
def forcing(**inputs):
    """For tests: the kernels called in this block (in this thread or task)
    plan with these inputs instead of the machine's: l2 and l3, the cache
    sizes in bytes, and stream_cache, the cache the streaming decision alone
    assumes (0: every output with long enough runs is streamed, and the
    plan is otherwise the same)."""
    unknown = sorted(set(inputs) - set(_FORCEABLE))
    if unknown:
        raise TypeError(f"forcing: unknown inputs {unknown}; expected some of {_FORCEABLE}")
    token = _forced.set(inputs)
    try:
        yield
    finally:
        _forced.reset(token)


def _set_machine_caches():
    global CACHES
    from cybn._config import cache_sizes
    sizes = cache_sizes()
    CACHES.l2, CACHES.l3 = sizes["L2"], sizes["L3"]


_set_machine_caches()


cdef inline Py_ssize_t ceil_div(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return (a + b - 1) // b


cdef inline int power_of_two_below(Py_ssize_t n) noexcept nogil:
    cdef int p = 1
    while 2 * p <= n and p < (1 << 20):
        p *= 2
    return p


cdef Plan schedule(int op, bint rows_layout, Py_ssize_t n_batch, Py_ssize_t n_channels,
                   Py_ssize_t n_spatial, Py_ssize_t ghosts, Py_ssize_t row_bytes,
                   Py_ssize_t itemsize, Py_ssize_t n_arrays, Py_ssize_t n_inputs,
                   Caches caches, int max_threads, Py_ssize_t stream_cache) noexcept nogil:
    """How a call runs on `ghosts` batches of (n_batch, n_channels, n_spatial)
    (rows: n_spatial 1, rows row_bytes apart), whose element-wise pass
    touches n_arrays arrays, n_inputs of them read by its sums; stream_cache
    (-1: the cache) is the cache the streaming decision assumes."""
    cdef Plan p
    cdef Py_ssize_t n = n_batch * n_channels * n_spatial, count = n_batch * n_spatial
    cdef Py_ssize_t cached = min(caches.l3, CACHE_CAP)
    cdef Py_ssize_t tasks = max(MIN_TASKS, TASKS_PER_THREAD * min(
        PLANNED_THREADS, power_of_two_below(1 + n // THREAD_VALUES)))
    cdef Py_ssize_t row_blocks = max(1, n_channels // (
        CHANNELS_MIN if n * itemsize <= cached // 8 else PAGE_BYTES // itemsize))
    cdef Py_ssize_t run = n_channels if rows_layout else n_spatial
    cdef Py_ssize_t stream_limit = cached if stream_cache < 0 else stream_cache
    p.threads = min(max_threads, power_of_two_below(1 + n * ghosts // THREAD_VALUES))
    p.stream = (op != SUMS and run * itemsize >= STREAM_RUN_BYTES
                and n * ghosts * n_arrays * itemsize
                > (stream_limit if op == TWO_PASS else ONE_PASS_STREAM_FACTOR * stream_limit))
    p.memory_order = (not rows_layout and n_spatial * itemsize < SHORT_RUN_BYTES
                      and n * n_arrays * itemsize > cached // 2)
    p.parts = 1 if n_channels >= MIN_CHANNELS else max(
        1, min(ceil_div(tasks, n_channels), count // TASK_VALUES))
    p.per_channel = op == TWO_PASS and not rows_layout and not p.memory_order and p.parts == 1
    p.overlap = p.per_channel and p.stream and count * n_inputs * itemsize <= caches.l2 // 2
    p.chunk = max(1, TASK_VALUES // n_spatial)
    if rows_layout:
        p.ranges = power_of_two_below(min(n_batch // (
            ROWS_MIN if n * itemsize > cached // 8 else CACHED_ROWS_MIN), tasks))
        p.blocks = min(row_blocks, ceil_div(tasks, p.ranges))
        p.threads = min(p.threads, p.ranges * p.blocks)
    else:
        p.ranges = min(n_batch, BATCH_RANGES) if p.memory_order else 1
        p.blocks = max(1, min(n_channels, ceil_div(tasks, p.ranges))) if p.memory_order else 1
    p.write_tasks = max(1, min(n_batch // WRITE_ROWS_MIN, tasks))
    p.sums_block = CYBN_ROWS_BLOCK if (n * itemsize <= cached // 8 or row_bytes <= SHORT_ROW_BYTES
                                       or row_bytes >= PAGE_BYTES) else 1
    p.write_block = CYBN_WRITE_BLOCK if (n * itemsize <= cached and (
        row_bytes <= SHORT_ROW_BYTES or n_channels >= LONG_ROW_CHANNELS)) else 1
    return p


cdef Plan plan_of(int op, bint rows_layout, Py_ssize_t n_batch, Py_ssize_t n_channels,
                  Py_ssize_t n_spatial, Py_ssize_t ghosts, Py_ssize_t row_bytes,
                  Py_ssize_t itemsize, Py_ssize_t n_arrays, Py_ssize_t n_inputs) except *:
    """schedule() on this machine, or with the inputs `forcing` gives."""
    cdef Caches caches = CACHES
    cdef Py_ssize_t stream_cache = -1
    forced = _forced.get()
    if forced is not None:
        caches.l2 = forced.get("l2", caches.l2)
        caches.l3 = forced.get("l3", caches.l3)
        stream_cache = forced.get("stream_cache", -1)
    return schedule(op, rows_layout, n_batch, n_channels, n_spatial, ghosts, row_bytes,
                    itemsize, n_arrays, n_inputs, caches, cybn_max_threads(), stream_cache)


cdef inline Py_ssize_t planar_scratch(Plan p, Py_ssize_t n_channels) noexcept nogil:
    """Doubles of partial sums the planar sums need."""
    return 2 * n_channels * max(p.ranges, p.parts)


ctypedef struct Rows:
    char *data
    Py_ssize_t row_stride


ctypedef struct Tile:
    # Samples or rows [begin, end) of range `part`, channels [first, first + count).
    Py_ssize_t part, begin, end, first, count


cdef inline double *tile_sums(double *partial, Tile t, Py_ssize_t n_channels) noexcept nogil:
    """The 2 x C partial sums of tile t's range (partial[(2 * part + k) * C +
    c]), those of the tile's channels set to zero."""
    cdef double *sums = partial + 2 * t.part * n_channels
    cdef Py_ssize_t c
    for c in range(t.first, t.first + t.count):
        sums[c] = 0.0
        sums[n_channels + c] = 0.0
    return sums


cdef inline Tile tile(Plan p, Py_ssize_t task, Py_ssize_t n_batch,
                      Py_ssize_t n_channels) noexcept nogil:
    """Task `task` of the range-by-block sums (memory order, rows)."""
    cdef Tile t
    cdef Py_ssize_t block = task % p.blocks
    t.part = task // p.blocks
    t.begin = part_start(t.part, p.ranges, n_batch)
    t.end = part_start(t.part + 1, p.ranges, n_batch)
    t.first = part_start(block, p.blocks, n_channels)
    t.count = part_start(block + 1, p.blocks, n_channels) - t.first
    return t


_OPS = {"train": (TWO_PASS, 1), "backward": (TWO_PASS, 2), "eval": (ONE_PASS, 1),
        "sums": (SUMS, 1)}


def plan(op, shape, itemsize, *, rows=False, ghosts=1, n_arrays=None, l2=None, l3=None,
         stream_cache=-1, threads=None):
    """The plan of a call, as a dict, and its tasks: for tests and docs.
    op: "train", "eval", "backward" or "sums"; shape: (N, C, *spatial), or
    (R, C) with rows=True; n_arrays defaults to the plain call's (2 for the
    forward, 3 for the backward, 1 for sums).  l2, l3 and threads default to
    this machine's, stream_cache to the cache (see forcing).  "tasks" maps
    each parallel region to the values of each of its tasks, in the order the
    static schedule deals them."""
    cdef int code = _OPS[op][0]
    cdef Caches caches = CACHES
    cdef Py_ssize_t n_batch = shape[0] // ghosts, n_channels = shape[1], n_spatial = 1
    for extent_ in shape[2:]:
        n_spatial *= extent_
    if l2 is not None:
        caches.l2 = l2
    if l3 is not None:
        caches.l3 = l3
    if n_arrays is None:
        n_arrays = {"train": 2, "eval": 2, "backward": 3, "sums": 1}[op]
    cdef Plan p = schedule(code, rows, n_batch, n_channels, n_spatial, ghosts,
                           n_channels * itemsize, itemsize, n_arrays, _OPS[op][1], caches,
                           cybn_max_threads() if threads is None else threads, stream_cache)
    result = dict(p)
    result["tasks"] = plan_tasks(p, code, rows, n_batch, n_channels, n_spatial, ghosts)
    return result


cdef dict plan_tasks(Plan p, int op, bint rows_layout, Py_ssize_t n_batch,
                     Py_ssize_t n_channels, Py_ssize_t n_spatial, Py_ssize_t ghosts):
    """The values each task of each parallel region handles (see plan)."""
    cdef Py_ssize_t count = n_batch * n_spatial, n_runs = n_batch * n_channels, k
    cdef Tile t
    regions = {}
    if p.per_channel:
        regions["channels"] = [count * ghosts] * n_channels
        return regions
    if op != ONE_PASS:
        if rows_layout or p.memory_order:
            sums = []
            for k in range(p.ranges * p.blocks):
                t = tile(p, k, n_batch, n_channels)
                sums.append((t.end - t.begin) * t.count * n_spatial)
        else:
            sums = [part_start(k % p.parts + 1, p.parts, count)
                    - part_start(k % p.parts, p.parts, count)
                    for k in range(n_channels * p.parts)]
        regions["sums"] = sums
    if op != SUMS:
        if rows_layout:
            regions["write"] = [(part_start(k + 1, p.write_tasks, n_batch)
                                 - part_start(k, p.write_tasks, n_batch)) * n_channels
                                for k in range(p.write_tasks)]
        else:
            regions["write"] = [(min(n_runs, (k + 1) * p.chunk) - k * p.chunk) * n_spatial
                                for k in range(ceil_div(n_runs, p.chunk))]
    return regions


cdef inline Py_ssize_t affine_arrays(bint residual) noexcept nogil:
    """Arrays of y = act(affine(x) [+ residual])."""
    return 2 + residual


cdef inline Py_ssize_t grad_input_arrays(bint masked, bint keeps_g) noexcept nogil:
    """Arrays of dx from dy, x (and y for the mask; g to grad_residual)."""
    return 3 + masked + keeps_g


cdef inline Py_ssize_t part_start(Py_ssize_t part, Py_ssize_t n_parts,
                                  Py_ssize_t size) noexcept nogil:
    return part * size // n_parts


cdef inline double centered_m2(double s, double q, double count) noexcept nogil:
    """M2 = sum((x - mean)^2) from s = sum(x - shift), q = sum((x - shift)^2)."""
    return max(q - s * s / count, 0.0)


cdef double *scratch(Py_ssize_t n_doubles) except NULL:
    cdef double *p = <double *>malloc(max(n_doubles, 1) * sizeof(double))
    if p == NULL:
        raise MemoryError(f"cybn: cannot allocate {n_doubles} doubles of scratch")
    return p


# ---------------------------------------------------------------------------
# The kernels' operands.  The kernels below take ndarrays, not typed
# memoryviews: acquiring memoryviews for a call's many arguments was a large
# part of a small call's time (docs/design.md).  What
# a memoryview checked is checked here instead, in C: a wrong call raises
# rather than reading or writing out of bounds, though cybn._api never makes
# one.

cdef cnp.ndarray operand(object a, int ndim, int first, object like_array, bint output,
                         floating *like):
    """a as an operand of a kernel call on like_array (None: a itself): an
    aligned ndarray of ndim dimensions (0: at least 2, planar data's N, C
    and any spatial axes) and the instance's element type, of like_array's
    shape, writeable when it is an output, whose axes from `first` on merge
    into one run of unit stride."""
    if not isinstance(a, cnp.ndarray):
        raise TypeError(f"cybn kernel operand: expected an ndarray, got {type(a).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray>a
    cdef int type_num = cnp.NPY_FLOAT if floating is float else cnp.NPY_DOUBLE
    cdef int axis
    cdef Py_ssize_t expected = sizeof(floating)
    if (cnp.PyArray_NDIM(arr) != ndim if ndim else cnp.PyArray_NDIM(arr) < 2) \
            or cnp.PyArray_TYPE(arr) != type_num:
        raise TypeError(f"cybn kernel operand: expected {ndim or 'at least 2'} dimensions "
                        f"of {'float32' if floating is float else 'float64'}, got {a.ndim} "
                        f"of {a.dtype}")
    if like_array is not None and not cnp.PyArray_SAMESHAPE(arr, <cnp.ndarray>like_array):
        raise ValueError(f"cybn kernel operand: shape {a.shape} differs from "
                         f"{like_array.shape}")
    for axis in reversed(range(first, cnp.PyArray_NDIM(arr))):
        if cnp.PyArray_DIM(arr, axis) != 1 and cnp.PyArray_STRIDE(arr, axis) != expected:
            raise ValueError("cybn kernel operand: the inner axes are not one unit-stride run")
        expected *= cnp.PyArray_DIM(arr, axis)
    if (not cnp.PyArray_ISALIGNED(arr) or not cnp.PyArray_ISNOTSWAPPED(arr)
            or (output and not cnp.PyArray_ISWRITEABLE(arr))):
        raise ValueError("cybn kernel operand: unaligned, byte-swapped, or a read-only output")
    return arr


cdef Planar planar(object a, object like_array, bint output, floating *like) except *:
    """The planar view of an (N, C, *spatial) operand, or an absent one for None."""
    cdef Planar view
    cdef cnp.ndarray arr
    view.data = NULL
    view.batch_stride = view.channel_stride = 0
    if a is not None:
        arr = operand(a, 0, 2, like_array, output, like)
        view.data = cnp.PyArray_BYTES(arr)
        view.batch_stride = cnp.PyArray_STRIDE(arr, 0) // sizeof(floating)
        view.channel_stride = cnp.PyArray_STRIDE(arr, 1) // sizeof(floating)
    return view


cdef Rows rows(object a, object like_array, bint output, floating *like) except *:
    """The rows view of an (R, C) operand, or an absent one for None."""
    cdef Rows view
    cdef cnp.ndarray arr
    view.data = NULL
    view.row_stride = 0
    if a is not None:
        arr = operand(a, 2, 1, like_array, output, like)
        view.data = cnp.PyArray_BYTES(arr)
        view.row_stride = cnp.PyArray_STRIDE(arr, 0) // sizeof(floating)
    return view


cdef inline Py_ssize_t extent(object a, int axis) noexcept:
    """The length of a checked operand along axis."""
    return cnp.PyArray_DIM(<cnp.ndarray>a, axis)


cdef inline Py_ssize_t spatial_extent(object a) noexcept:
    """The values per run of a checked planar operand: the product of its
    spatial extents."""
    cdef Py_ssize_t n = 1
    cdef int axis
    for axis in range(2, cnp.PyArray_NDIM(<cnp.ndarray>a)):
        n *= cnp.PyArray_DIM(<cnp.ndarray>a, axis)
    return n


cdef floating *values(object a, Py_ssize_t n, bint output, floating *like) except NULL:
    """The data of a contiguous (n,) vector of the element type, such as a
    per-channel parameter, statistic or gradient."""
    cdef cnp.ndarray arr = operand(a, 1, 0, None, output, like)
    if cnp.PyArray_DIM(arr, 0) != n:
        raise ValueError(f"cybn kernel operand: expected {n} values, got {(<object>arr).shape}")
    return <floating *>cnp.PyArray_DATA(arr)


cdef inline double *doubles(object a, Py_ssize_t n, bint output) except NULL:
    """values() of a float64 vector."""
    cdef double *like = NULL
    return values(a, n, output, like)


cdef inline Rows columns(Rows v, Py_ssize_t c, floating *like) noexcept nogil:
    """The view from column c on (absent operands stay absent)."""
    if v.data != NULL:
        v.data = <char *>(<floating *>v.data + c)
    return v


cdef inline Planar batch_from(Planar v, Py_ssize_t n, floating *like) noexcept nogil:
    """The view from sample n on (absent operands stay absent)."""
    if v.data != NULL:
        v.data = <char *>(<floating *>v.data + n * v.batch_stride)
    return v


cdef inline Rows rows_from(Rows v, Py_ssize_t n, floating *like) noexcept nogil:
    """The view from row n on (absent operands stay absent)."""
    if v.data != NULL:
        v.data = <char *>(<floating *>v.data + n * v.row_stride)
    return v


cdef inline floating *channel(Planar v, Py_ssize_t c, floating *like) noexcept nogil:
    """Channel c's first value, or NULL for an absent operand (`like` only
    selects the element type)."""
    if v.data == NULL:
        return NULL
    return <floating *>v.data + c * v.channel_stride


# ---------------------------------------------------------------------------
# Typed dispatch to the C loops.  `like` is a null pointer of the element
# type: it picks the float or double instance.

cdef inline void planar_sums(Planar x, Py_ssize_t c, Py_ssize_t n_spatial,
                             Py_ssize_t begin, Py_ssize_t end, double shift, double *s,
                             double *q, floating *like) noexcept nogil:
    cdef Py_ssize_t ahead = runs_ahead(n_spatial, sizeof(floating))
    if floating is float:
        planar_sums_f32(channel(x, c, like), x.batch_stride, n_spatial, begin, end, shift, s, q,
                        ahead)
    else:
        planar_sums_f64(channel(x, c, like), x.batch_stride, n_spatial, begin, end, shift, s, q,
                        ahead)


cdef inline void planar_grad_sums(Planar dy, Planar y, Planar x, Py_ssize_t c,
                                  Py_ssize_t n_spatial, Py_ssize_t begin, Py_ssize_t end,
                                  double mean, double *sum_dy, double *sum_dy_xmu,
                                  floating *like) noexcept nogil:
    cdef Py_ssize_t ahead = runs_ahead(n_spatial, sizeof(floating))
    if floating is float:
        planar_grad_sums_f32(channel(dy, c, like), dy.batch_stride, channel(y, c, like),
                             y.batch_stride, channel(x, c, like), x.batch_stride, n_spatial,
                             begin, end, mean, sum_dy, sum_dy_xmu, ahead)
    else:
        planar_grad_sums_f64(channel(dy, c, like), dy.batch_stride, channel(y, c, like),
                             y.batch_stride, channel(x, c, like), x.batch_stride, n_spatial,
                             begin, end, mean, sum_dy, sum_dy_xmu, ahead)


cdef inline void planar_affine(Planar x, Planar res, Planar y, Py_ssize_t c,
                               Py_ssize_t n_spatial, Py_ssize_t begin, Py_ssize_t end,
                               double mean, double scale, double shift, int relu,
                               int stream, floating *like) noexcept nogil:
    if floating is float:
        planar_affine_f32(channel(x, c, like), x.batch_stride, channel(res, c, like),
                          res.batch_stride, channel(y, c, like), y.batch_stride, n_spatial,
                          begin, end, mean, scale, shift, relu, stream)
    else:
        planar_affine_f64(channel(x, c, like), x.batch_stride, channel(res, c, like),
                          res.batch_stride, channel(y, c, like), y.batch_stride, n_spatial,
                          begin, end, mean, scale, shift, relu, stream)


cdef inline void planar_affine_sums(Planar x, Planar res, Planar y, Py_ssize_t c,
                                    Py_ssize_t n_spatial, Py_ssize_t count, double mean,
                                    double scale, double shift, int relu, int stream,
                                    double next_shift, double *s, double *q,
                                    floating *like) noexcept nogil:
    if floating is float:
        planar_affine_sums_f32(channel(x, c, like), x.batch_stride, channel(res, c, like),
                               res.batch_stride, channel(y, c, like), y.batch_stride,
                               n_spatial, count, mean, scale, shift, relu, stream,
                               x.channel_stride, next_shift, s, q)
    else:
        planar_affine_sums_f64(channel(x, c, like), x.batch_stride, channel(res, c, like),
                               res.batch_stride, channel(y, c, like), y.batch_stride,
                               n_spatial, count, mean, scale, shift, relu, stream,
                               x.channel_stride, next_shift, s, q)


cdef inline void planar_grad_input(Planar dy, Planar y, Planar x, Planar dx, Planar g_out,
                                   Py_ssize_t c, Py_ssize_t n_spatial, Py_ssize_t begin,
                                   Py_ssize_t end, double mean, double dy_shift,
                                   double x_coef, double scale, int stream,
                                   floating *like) noexcept nogil:
    if floating is float:
        planar_grad_input_f32(channel(dy, c, like), dy.batch_stride, channel(y, c, like),
                              y.batch_stride, channel(x, c, like), x.batch_stride,
                              channel(dx, c, like), dx.batch_stride, channel(g_out, c, like),
                              g_out.batch_stride, n_spatial, begin, end, mean, dy_shift,
                              x_coef, scale, stream)
    else:
        planar_grad_input_f64(channel(dy, c, like), dy.batch_stride, channel(y, c, like),
                              y.batch_stride, channel(x, c, like), x.batch_stride,
                              channel(dx, c, like), dx.batch_stride, channel(g_out, c, like),
                              g_out.batch_stride, n_spatial, begin, end, mean, dy_shift,
                              x_coef, scale, stream)


cdef inline void rows_sums(Rows x, Py_ssize_t n_channels, Py_ssize_t begin, Py_ssize_t end,
                           const double *shift, double *s, double *q, int block,
                           floating *like) noexcept nogil:
    if floating is float:
        rows_sums_f32(<float *>x.data, x.row_stride, n_channels, begin, end, shift, s, q,
                      block)
    else:
        rows_sums_f64(<double *>x.data, x.row_stride, n_channels, begin, end, shift, s, q,
                      block)


cdef inline void rows_grad_sums(Rows dy, Rows y, Rows x, Py_ssize_t n_channels,
                                Py_ssize_t begin, Py_ssize_t end, const double *mean,
                                double *sum_dy, double *sum_dy_xmu, int block,
                                floating *like) noexcept nogil:
    if floating is float:
        rows_grad_sums_f32(<float *>dy.data, dy.row_stride, <float *>y.data, y.row_stride,
                           <float *>x.data, x.row_stride, n_channels, begin, end, mean,
                           sum_dy, sum_dy_xmu, block)
    else:
        rows_grad_sums_f64(<double *>dy.data, dy.row_stride, <double *>y.data, y.row_stride,
                           <double *>x.data, x.row_stride, n_channels, begin, end, mean,
                           sum_dy, sum_dy_xmu, block)


cdef inline void rows_affine(Rows x, Rows res, Rows y, Py_ssize_t n_channels,
                             Py_ssize_t begin, Py_ssize_t end, const double *mean,
                             const double *scale, const double *shift, int relu, int block,
                             int stream, floating *like) noexcept nogil:
    if floating is float:
        rows_affine_f32(<float *>x.data, x.row_stride, <float *>res.data, res.row_stride,
                        <float *>y.data, y.row_stride, n_channels, begin, end, mean, scale,
                        shift, relu, block, stream)
    else:
        rows_affine_f64(<double *>x.data, x.row_stride, <double *>res.data, res.row_stride,
                        <double *>y.data, y.row_stride, n_channels, begin, end, mean, scale,
                        shift, relu, block, stream)


cdef inline void rows_grad_input(Rows dy, Rows y, Rows x, Rows dx, Rows g_out,
                                 Py_ssize_t n_channels, Py_ssize_t begin, Py_ssize_t end,
                                 const double *mean, const double *dy_shift,
                                 const double *x_coef, const double *scale, int block,
                                 int stream, floating *like) noexcept nogil:
    if floating is float:
        rows_grad_input_f32(<float *>dy.data, dy.row_stride, <float *>y.data, y.row_stride,
                            <float *>x.data, x.row_stride, <float *>dx.data, dx.row_stride,
                            <float *>g_out.data, g_out.row_stride, n_channels, begin, end,
                            mean, dy_shift, x_coef, scale, block, stream)
    else:
        rows_grad_input_f64(<double *>dy.data, dy.row_stride, <double *>y.data, y.row_stride,
                            <double *>x.data, x.row_stride, <double *>dx.data, dx.row_stride,
                            <double *>g_out.data, g_out.row_stride, n_channels, begin, end,
                            mean, dy_shift, x_coef, scale, block, stream)


cdef inline void planar_grad_input_sums(Planar dy, Planar y, Planar x, Planar dx,
                                        Planar g_out, Py_ssize_t c, Py_ssize_t n_spatial,
                                        Py_ssize_t count, double mean, double dy_shift,
                                        double x_coef, double scale, int stream,
                                        double next_mean, double *sum_dy,
                                        double *sum_dy_xmu, floating *like) noexcept nogil:
    if floating is float:
        planar_grad_input_sums_f32(
            channel(dy, c, like), dy.batch_stride, channel(y, c, like), y.batch_stride,
            channel(x, c, like), x.batch_stride, channel(dx, c, like), dx.batch_stride,
            channel(g_out, c, like), g_out.batch_stride, n_spatial, count, mean, dy_shift,
            x_coef, scale, stream, dy.channel_stride, y.channel_stride, x.channel_stride,
            next_mean, sum_dy, sum_dy_xmu)
    else:
        planar_grad_input_sums_f64(
            channel(dy, c, like), dy.batch_stride, channel(y, c, like), y.batch_stride,
            channel(x, c, like), x.batch_stride, channel(dx, c, like), dx.batch_stride,
            channel(g_out, c, like), g_out.batch_stride, n_spatial, count, mean, dy_shift,
            x_coef, scale, stream, dy.channel_stride, y.channel_stride, x.channel_stride,
            next_mean, sum_dy, sum_dy_xmu)


cdef inline void runs_sums(Planar x, Py_ssize_t n_channels, Py_ssize_t n_spatial,
                           Py_ssize_t begin, Py_ssize_t end, const double *shift,
                           double *s, double *q, floating *like) noexcept nogil:
    if floating is float:
        runs_sums_f32(x, n_channels, n_spatial, begin, end, shift, s, q)
    else:
        runs_sums_f64(x, n_channels, n_spatial, begin, end, shift, s, q)


cdef inline void runs_grad_sums(Planar dy, Planar y, Planar x, Py_ssize_t n_channels,
                                Py_ssize_t n_spatial, Py_ssize_t begin, Py_ssize_t end,
                                const double *mean, double *sum_dy, double *sum_dy_xmu,
                                floating *like) noexcept nogil:
    if floating is float:
        runs_grad_sums_f32(dy, y, x, n_channels, n_spatial, begin, end, mean, sum_dy,
                           sum_dy_xmu)
    else:
        runs_grad_sums_f64(dy, y, x, n_channels, n_spatial, begin, end, mean, sum_dy,
                           sum_dy_xmu)


cdef inline void runs_affine(Planar x, Planar res, Planar y, Py_ssize_t n_channels,
                             Py_ssize_t n_spatial, Py_ssize_t begin, Py_ssize_t end,
                             const double *mean, const double *scale, const double *shift,
                             int relu, int stream, floating *like) noexcept nogil:
    if floating is float:
        runs_affine_f32(x, res, y, n_channels, n_spatial, begin, end, mean, scale, shift,
                        relu, stream)
    else:
        runs_affine_f64(x, res, y, n_channels, n_spatial, begin, end, mean, scale, shift,
                        relu, stream)


cdef inline void runs_grad_input(Planar dy, Planar y, Planar x, Planar dx, Planar g_out,
                                 Py_ssize_t n_channels, Py_ssize_t n_spatial,
                                 Py_ssize_t begin, Py_ssize_t end, const double *mean,
                                 const double *dy_shift, const double *x_coef,
                                 const double *scale, int stream,
                                 floating *like) noexcept nogil:
    if floating is float:
        runs_grad_input_f32(dy, y, x, dx, g_out, n_channels, n_spatial, begin, end, mean,
                            dy_shift, x_coef, scale, stream)
    else:
        runs_grad_input_f64(dy, y, x, dx, g_out, n_channels, n_spatial, begin, end, mean,
                            dy_shift, x_coef, scale, stream)


# ---------------------------------------------------------------------------
# Statistics.  Sums are taken of x - shift, shift being near the channel's
# values (see first_shift): a constant channel then gives exactly s = 0,
# mean = shift and M2 = 0, and an offset such as 1e6 + N(0, 1) costs no
# precision.

# Partial sums of the parts of a channel are added in part order, so the
# totals depend on the shape alone.  Layouts: planar tasks keep
# partial[(c * n_parts + p) * 2 + k] (part_step 2, channel_step 2 * n_parts,
# second 1); row and batch ranges keep partial[(2 * p + k) * C + c]
# (part_step 2 * C, channel_step 1, second C); k = 0 for the first sum, 1 for
# the second.

cdef void sum_into_first_part(double *partial, Py_ssize_t n_channels, Py_ssize_t n_parts,
                              Py_ssize_t part_step, Py_ssize_t channel_step,
                              Py_ssize_t second) noexcept nogil:
    """Part 0 receives each channel's totals, ((part 0 + part 1) + part 2) + ...
    The loop over channels is innermost: with channel_step 1 it runs along
    memory and vectorizes, and no sum's order depends on it."""
    cdef Py_ssize_t c, p
    cdef double *part
    for p in range(1, n_parts):
        part = partial + p * part_step
        for c in range(n_channels):
            partial[c * channel_step] = partial[c * channel_step] + part[c * channel_step]
            partial[c * channel_step + second] = (partial[c * channel_step + second]
                                                  + part[c * channel_step + second])


cdef void merge_parts(double *partial, Py_ssize_t n_channels, Py_ssize_t n_parts,
                      Py_ssize_t part_step, Py_ssize_t channel_step, Py_ssize_t second,
                      double *first_total, double *second_total) noexcept nogil:
    cdef Py_ssize_t c
    sum_into_first_part(partial, n_channels, n_parts, part_step, channel_step, second)
    for c in range(n_channels):
        first_total[c] = partial[c * channel_step]
        second_total[c] = partial[c * channel_step + second]


# The statistics take one pass over the data, summing x - shift and
# (x - shift)^2 per channel.  In float32 the double sums have 29 bits to
# spare, and the shift is the first value.  In float64, M2 = q - s^2 / n from
# such sums has a rounding-error bound of about (1 + t^2 + 2 t sqrt(1 + t^2))
# times that of sums centred on the mean, t being |mean - shift| / std.  So
# the shift is the mean of a sample of the channel (SAMPLE_RUNS runs spread
# over the batch, SAMPLE_VALUES values of each: iid values miss t <= 1/4 in
# 0.5% of channels), and a second pass, centred on the first's mean, runs for
# the channels where t > 1/4 after all (17 s^2 > n q): elsewhere the bound is
# at most 1.58 times the centred one (0.66 bit).  The first pass's M2 is
# marked NEEDS_CENTRED_PASS meanwhile.  (The rows layout, whose channels
# cannot be read apart, keeps two passes in float64.)
cdef Py_ssize_t SAMPLE_RUNS = 16
cdef Py_ssize_t SAMPLE_VALUES = 8
cdef double NEEDS_CENTRED_PASS = -1.0


cdef double first_shift(const floating *first, Py_ssize_t n_runs, Py_ssize_t run_stride,
                        Py_ssize_t run_length) noexcept nogil:
    """The first pass's shift for a channel of n_runs runs of run_length
    values, run_stride elements apart, from `first` (see above): the first
    value, or (float64) the sample mean where that is finite.  The sample is
    summed about the first value, so that a constant channel gets exactly
    its value (then s = q = 0: mean exact, M2 = 0, no centred pass)."""
    cdef Py_ssize_t k, i, runs = min(n_runs, SAMPLE_RUNS)
    cdef Py_ssize_t values = min(run_length, SAMPLE_VALUES)
    cdef const floating *run
    cdef double total = 0.0, shift
    if floating is double:
        for k in range(runs):
            run = first + (k * n_runs // runs) * run_stride
            for i in range(values):
                total += run[i] - first[0]
        shift = first[0] + total / (runs * values)
        if isfinite(shift):
            return shift
    return first[0]


cdef void first_shifts(Planar x, Py_ssize_t n_channels, Py_ssize_t n_batch,
                       Py_ssize_t n_spatial, double *shift, int n_threads,
                       floating *like) noexcept nogil:
    """first_shift of every planar channel (the float64 samples are scattered
    reads, which gain from running in parallel)."""
    cdef Py_ssize_t c
    if floating is float or n_threads == 1:
        for c in range(n_channels):
            shift[c] = first_shift(channel(x, c, like), n_batch, x.batch_stride, n_spatial)
    else:
        for c in prange(n_channels, schedule='static', num_threads=n_threads):
            shift[c] = first_shift(channel(x, c, like), n_batch, x.batch_stride, n_spatial)


cdef inline bint needs_centred_pass(double s, double q, double count) noexcept nogil:
    """Whether float64 sums of x - shift leave (mean - shift)^2 > var / 16, or
    are not finite (see first_shift)."""
    return not (17.0 * s * s <= count * q)


cdef void finish_moments(double *partial, Py_ssize_t n_channels, Py_ssize_t n_parts,
                         Py_ssize_t part_step, Py_ssize_t channel_step, Py_ssize_t second,
                         double count, bint first_pass, bint all_centred, double *mean,
                         double *m2, floating *like) noexcept nogil:
    """mean (on the first pass, from its shift) and M2 from the merged sums of
    x - shift and (x - shift)^2; after the first pass, M2 of the channels that
    need the centred pass (all of them with all_centred) is NEEDS_CENTRED_PASS,
    and after the centred pass only those channels change."""
    cdef Py_ssize_t c
    cdef double s, q
    sum_into_first_part(partial, n_channels, n_parts, part_step, channel_step, second)
    for c in range(n_channels):
        s = partial[c * channel_step]
        q = partial[c * channel_step + second]
        if first_pass:
            mean[c] = mean[c] + s / count
            if floating is double and (all_centred or needs_centred_pass(s, q, count)):
                m2[c] = NEEDS_CENTRED_PASS
            else:
                m2[c] = centered_m2(s, q, count)
        elif m2[c] == NEEDS_CENTRED_PASS:
            m2[c] = centered_m2(s, q, count)


cdef bint any_centred_pass(const double *m2, Py_ssize_t n_channels,
                           floating *like) noexcept nogil:
    cdef Py_ssize_t c
    if floating is double:
        for c in range(n_channels):
            if m2[c] == NEEDS_CENTRED_PASS:
                return True
    return False


cdef inline double channel_shift(Planar x, Py_ssize_t c, Py_ssize_t n_spatial,
                                 Py_ssize_t count, floating *like) noexcept nogil:
    return first_shift(channel(x, c, like), count // n_spatial, x.batch_stride, n_spatial)


cdef void finish_channel_moments(Planar x, Py_ssize_t c, Py_ssize_t n_spatial,
                                 Py_ssize_t count, double shift, double s, double q,
                                 double *mean, double *m2, floating *like) noexcept nogil:
    """mean and M2 of planar channel c from its sums s, q about shift, with
    the centred pass where that needs one."""
    mean[0] = shift + s / count
    if floating is double and needs_centred_pass(s, q, count):
        s = 0.0
        q = 0.0
        planar_sums(x, c, n_spatial, 0, count, mean[0], &s, &q, like)
    m2[0] = centered_m2(s, q, count)


cdef void channel_moments(Planar x, Py_ssize_t c, Py_ssize_t n_spatial, Py_ssize_t count,
                          double *mean, double *m2, floating *like) noexcept nogil:
    """mean and M2 of one planar channel, in one task."""
    cdef double s = 0.0, q = 0.0
    cdef double shift = channel_shift(x, c, n_spatial, count, like)
    planar_sums(x, c, n_spatial, 0, count, shift, &s, &q, like)
    finish_channel_moments(x, c, n_spatial, count, shift, s, q, mean, m2, like)


cdef void centred_pass(Plan plan, Planar x, Py_ssize_t n_channels, Py_ssize_t n_spatial,
                       Py_ssize_t count, double *partial, double *mean, double *m2,
                       floating *like) noexcept nogil:
    """The centred pass of the planar channels that need it (see first_shift),
    each in plan.parts tasks; partial holds 2 * n_channels * parts doubles."""
    cdef Py_ssize_t task, c, p, n_parts = plan.parts
    if not any_centred_pass(m2, n_channels, like):
        return
    for task in prange(n_channels * n_parts, schedule='static', num_threads=plan.threads):
        c = task // n_parts
        p = task % n_parts
        partial[2 * task] = 0.0
        partial[2 * task + 1] = 0.0
        if m2[c] == NEEDS_CENTRED_PASS:
            planar_sums(x, c, n_spatial, part_start(p, n_parts, count),
                        part_start(p + 1, n_parts, count), mean[c], &partial[2 * task],
                        &partial[2 * task + 1], like)
    finish_moments(partial, n_channels, n_parts, 2, 2 * n_parts, 1, count, False, False,
                   mean, m2, like)


cdef void planar_moments(Plan plan, Planar x, Py_ssize_t n_channels, Py_ssize_t n_spatial,
                         Py_ssize_t count, double *partial, double *mean, double *m2,
                         floating *like) noexcept nogil:
    """mean and M2 of every planar channel, plan.parts tasks per channel;
    partial holds 2 * n_channels * parts doubles."""
    cdef Py_ssize_t task, c, p, n_parts = plan.parts
    first_shifts(x, n_channels, count // n_spatial, n_spatial, mean, plan.threads, like)
    for task in prange(n_channels * n_parts, schedule='static', num_threads=plan.threads):
        c = task // n_parts
        p = task % n_parts
        partial[2 * task] = 0.0
        partial[2 * task + 1] = 0.0
        planar_sums(x, c, n_spatial, part_start(p, n_parts, count),
                    part_start(p + 1, n_parts, count), mean[c], &partial[2 * task],
                    &partial[2 * task + 1], like)
    finish_moments(partial, n_channels, n_parts, 2, 2 * n_parts, 1, count, True, False,
                   mean, m2, like)
    centred_pass(plan, x, n_channels, n_spatial, count, partial, mean, m2, like)


cdef void rows_moments(Plan plan, Rows x, Py_ssize_t n_rows, Py_ssize_t n_channels,
                       double *partial, double *mean, double *m2,
                       floating *like) noexcept nogil:
    """mean and M2 of every channel of rows data in plan's tiles; partial holds
    2 * ranges * n_channels doubles."""
    cdef Py_ssize_t task, c, n_passes = 2 if floating is double else 1, pass_
    cdef Tile t
    cdef double *sums
    for c in range(n_channels):
        mean[c] = (<floating *>x.data)[c]  # the first pass's shift
    for pass_ in range(n_passes):
        for task in prange(plan.ranges * plan.blocks, schedule='static',
                           num_threads=plan.threads):
            t = tile(plan, task, n_rows, n_channels)
            sums = tile_sums(partial, t, n_channels) + t.first
            rows_sums(columns(x, t.first, like), t.count, t.begin, t.end, mean + t.first,
                      sums, sums + n_channels, plan.sums_block, like)
        finish_moments(partial, n_channels, plan.ranges, 2 * n_channels, 1, n_channels,
                       n_rows, pass_ == 0, True, mean, m2, like)


cdef void planar_grad_sums_all(Plan plan, Planar dy, Planar y, Planar x,
                               Py_ssize_t n_channels, Py_ssize_t n_spatial, Py_ssize_t count,
                               const double *mean, double *partial, double *sum_dy,
                               double *sum_dy_xmu, floating *like) noexcept nogil:
    """Gradient sums of every planar channel in plan.parts tasks per channel;
    partial holds 2 * n_channels * parts doubles."""
    cdef Py_ssize_t task, c, p, n_parts = plan.parts
    for task in prange(n_channels * n_parts, schedule='static', num_threads=plan.threads):
        c = task // n_parts
        p = task % n_parts
        partial[2 * task] = 0.0
        partial[2 * task + 1] = 0.0
        planar_grad_sums(dy, y, x, c, n_spatial, part_start(p, n_parts, count),
                         part_start(p + 1, n_parts, count), mean[c], &partial[2 * task],
                         &partial[2 * task + 1], like)
    merge_parts(partial, n_channels, n_parts, 2, 2 * n_parts, 1, sum_dy, sum_dy_xmu)


cdef void rows_grad_sums_all(Plan plan, Rows dy, Rows y, Rows x, Py_ssize_t n_rows,
                             Py_ssize_t n_channels, const double *mean, double *partial,
                             double *sum_dy, double *sum_dy_xmu,
                             floating *like) noexcept nogil:
    """Gradient sums of rows data in plan's tiles; partial holds
    2 * ranges * n_channels doubles."""
    cdef Py_ssize_t task
    cdef Tile t
    cdef double *sums
    for task in prange(plan.ranges * plan.blocks, schedule='static', num_threads=plan.threads):
        t = tile(plan, task, n_rows, n_channels)
        sums = tile_sums(partial, t, n_channels) + t.first
        rows_grad_sums(columns(dy, t.first, like), columns(y, t.first, like),
                       columns(x, t.first, like), t.count, t.begin, t.end, mean + t.first,
                       sums, sums + n_channels, plan.sums_block, like)
    merge_parts(partial, n_channels, plan.ranges, 2 * n_channels, 1, n_channels, sum_dy,
                sum_dy_xmu)


cdef void runs_moments(Plan plan, Planar x, Py_ssize_t n_batch, Py_ssize_t n_channels,
                       Py_ssize_t n_spatial, double *partial, double *mean, double *m2,
                       floating *like) noexcept nogil:
    """mean and M2 of every planar channel, walking the data in memory order in
    plan's tiles: ranges of the batch by blocks of channels (the centred pass,
    for the few channels that need it, by channel); partial holds
    planar_scratch doubles."""
    cdef Py_ssize_t task, n
    cdef double count = <double>n_batch * n_spatial
    cdef Tile t
    cdef double *sums
    first_shifts(x, n_channels, n_batch, n_spatial, mean, plan.threads, like)
    for task in prange(plan.ranges * plan.blocks, schedule='static', num_threads=plan.threads):
        t = tile(plan, task, n_batch, n_channels)
        sums = tile_sums(partial, t, n_channels)
        for n in range(t.begin, t.end):
            runs_sums(x, n_channels, n_spatial, n * n_channels + t.first,
                      n * n_channels + t.first + t.count, mean, sums, sums + n_channels, like)
    finish_moments(partial, n_channels, plan.ranges, 2 * n_channels, 1, n_channels, count,
                   True, False, mean, m2, like)
    centred_pass(plan, x, n_channels, n_spatial, n_batch * n_spatial, partial, mean, m2, like)


cdef void runs_grad_sums_all(Plan plan, Planar dy, Planar y, Planar x, Py_ssize_t n_batch,
                             Py_ssize_t n_channels, Py_ssize_t n_spatial, const double *mean,
                             double *partial, double *sum_dy, double *sum_dy_xmu,
                             floating *like) noexcept nogil:
    """Gradient sums of every planar channel in memory order, in plan's tiles
    as runs_moments; partial holds 2 * ranges * C doubles."""
    cdef Py_ssize_t task, n
    cdef Tile t
    cdef double *sums
    for task in prange(plan.ranges * plan.blocks, schedule='static', num_threads=plan.threads):
        t = tile(plan, task, n_batch, n_channels)
        sums = tile_sums(partial, t, n_channels)
        for n in range(t.begin, t.end):
            runs_grad_sums(dy, y, x, n_channels, n_spatial, n * n_channels + t.first,
                           n * n_channels + t.first + t.count, mean, sums, sums + n_channels,
                           like)
    merge_parts(partial, n_channels, plan.ranges, 2 * n_channels, 1, n_channels, sum_dy,
                sum_dy_xmu)


cdef void runs_affine_all(Plan plan, Planar x, Planar res, Planar y, Py_ssize_t n_batch,
                          Py_ssize_t n_channels, Py_ssize_t n_spatial, const double *mean,
                          const double *scale, const double *shift, int relu,
                          floating *like) noexcept nogil:
    """The affine pass over all runs in memory order, plan.chunk runs a task
    (no value depends on the split)."""
    cdef Py_ssize_t k, n_runs = n_batch * n_channels, chunk = plan.chunk
    if plan.threads == 1:  # no parallel region, whose start-up dominates small calls
        runs_affine(x, res, y, n_channels, n_spatial, 0, n_runs, mean, scale, shift, relu,
                    plan.stream, like)
        return
    for k in prange(ceil_div(n_runs, chunk), schedule='static', num_threads=plan.threads):
        runs_affine(x, res, y, n_channels, n_spatial, k * chunk, min(n_runs, (k + 1) * chunk),
                    mean, scale, shift, relu, plan.stream, like)


cdef void runs_grad_input_all(Plan plan, Planar dy, Planar y, Planar x, Planar dx,
                              Planar g_out, Py_ssize_t n_batch, Py_ssize_t n_channels,
                              Py_ssize_t n_spatial, const double *mean,
                              const double *dy_shift, const double *x_coef,
                              const double *scale, floating *like) noexcept nogil:
    cdef Py_ssize_t k, n_runs = n_batch * n_channels, chunk = plan.chunk
    if plan.threads == 1:  # as in runs_affine_all
        runs_grad_input(dy, y, x, dx, g_out, n_channels, n_spatial, 0, n_runs, mean, dy_shift,
                        x_coef, scale, plan.stream, like)
        return
    for k in prange(ceil_div(n_runs, chunk), schedule='static', num_threads=plan.threads):
        runs_grad_input(dy, y, x, dx, g_out, n_channels, n_spatial, k * chunk,
                        min(n_runs, (k + 1) * chunk), mean, dy_shift, x_coef, scale,
                        plan.stream, like)


cdef void rows_affine_all(Plan plan, Rows x, Rows res, Rows y, Py_ssize_t n_rows,
                          Py_ssize_t n_channels, const double *mean, const double *scale,
                          const double *shift, int relu, floating *like) noexcept nogil:
    """The affine pass over plan.write_tasks ranges of whole rows, each one
    stretch of memory (no value depends on the split)."""
    cdef Py_ssize_t k, n = plan.write_tasks
    if plan.threads == 1:  # as in runs_affine_all
        rows_affine(x, res, y, n_channels, 0, n_rows, mean, scale, shift, relu,
                    plan.write_block, plan.stream, like)
        return
    for k in prange(n, schedule='static', num_threads=plan.threads):
        rows_affine(x, res, y, n_channels, part_start(k, n, n_rows),
                    part_start(k + 1, n, n_rows), mean, scale, shift, relu, plan.write_block,
                    plan.stream, like)


cdef void rows_grad_input_all(Plan plan, Rows dy, Rows y, Rows x, Rows dx, Rows g_out,
                              Py_ssize_t n_rows, Py_ssize_t n_channels, const double *mean,
                              const double *dy_shift, const double *x_coef,
                              const double *scale, floating *like) noexcept nogil:
    cdef Py_ssize_t k, n = plan.write_tasks
    if plan.threads == 1:  # as in runs_affine_all
        rows_grad_input(dy, y, x, dx, g_out, n_channels, 0, n_rows, mean, dy_shift, x_coef,
                        scale, plan.write_block, plan.stream, like)
        return
    for k in prange(n, schedule='static', num_threads=plan.threads):
        rows_grad_input(dy, y, x, dx, g_out, n_channels, part_start(k, n, n_rows),
                        part_start(k + 1, n, n_rows), mean, dy_shift, x_coef, scale,
                        plan.write_block, plan.stream, like)


cdef void planar_statistics(Plan plan, Planar x, Py_ssize_t n_batch, Py_ssize_t n_channels,
                            Py_ssize_t n_spatial, double *partial, double *mean, double *m2,
                            floating *like) noexcept nogil:
    """mean and M2 of every channel, in memory order or channel by channel."""
    if plan.memory_order:
        runs_moments(plan, x, n_batch, n_channels, n_spatial, partial, mean, m2, like)
    else:
        planar_moments(plan, x, n_channels, n_spatial, n_batch * n_spatial, partial, mean, m2,
                       like)


cdef void planar_gradient_sums(Plan plan, Planar dy, Planar y, Planar x, Py_ssize_t n_batch,
                               Py_ssize_t n_channels, Py_ssize_t n_spatial,
                               const double *mean, double *partial, double *sum_dy,
                               double *sum_dy_xmu, floating *like) noexcept nogil:
    """Gradient sums of every channel, in memory order or channel by channel."""
    if plan.memory_order:
        runs_grad_sums_all(plan, dy, y, x, n_batch, n_channels, n_spatial, mean, partial,
                           sum_dy, sum_dy_xmu, like)
    else:
        planar_grad_sums_all(plan, dy, y, x, n_channels, n_spatial, n_batch * n_spatial, mean,
                             partial, sum_dy, sum_dy_xmu, like)


ctypedef struct Renorm:
    # Batch renormalization's inputs and outputs (see train_coefficients);
    # running_mean is NULL for plain batch norm.
    const double *running_mean
    const double *running_var
    double *r
    double *d
    double r_low, r_high, d_high


cdef Renorm renorm_view(object renorm, Py_ssize_t n_channels, Py_ssize_t ghosts) except *:
    """The Renorm of forward_train's `renorm`: None, or (running_mean,
    running_var, r, d, (1/rmax, rmax, dmax)) with float64 (C,) vectors, r and
    d (ghosts x C, written)."""
    cdef Renorm rn
    rn.running_mean = rn.running_var = rn.r = rn.d = NULL
    rn.r_low = rn.r_high = rn.d_high = 0.0
    if renorm is not None:
        rn.running_mean = doubles(renorm[0], n_channels, False)
        rn.running_var = doubles(renorm[1], n_channels, False)
        rn.r = doubles(renorm[2], ghosts * n_channels, True)
        rn.d = doubles(renorm[3], ghosts * n_channels, True)
        rn.r_low, rn.r_high, rn.d_high = renorm[4]
    return rn


cdef inline Renorm renorm_from(Renorm rn, Py_ssize_t k) noexcept nogil:
    """rn writing r and d from value k on (a ghost batch's row)."""
    if rn.running_mean != NULL:
        rn.r += k
        rn.d += k
    return rn


cdef inline double clipped(double v, double low, double high) noexcept nogil:
    """min(max(v, low), high), keeping NaN as np.maximum and np.minimum do."""
    if v < low:
        v = low
    if v > high:
        v = high
    return v


cdef inline void train_coefficients(Py_ssize_t c, const double *mean, const double *var,
                                    const double *invstd, const double *weight,
                                    const double *bias, double eps, Renorm rn,
                                    double *scale, double *shift) noexcept nogil:
    """Channel c's y = (x - mean) * scale + shift: weight * invstd and bias, or
    with batch renormalization weight * r * invstd and weight * d + bias,
    r = clip(sqrt(var + eps) / running_std, 1/rmax, rmax) and d = clip((mean
    - running_mean) / running_std, -dmax, dmax), running_std = sqrt(running_var
    + eps): the operations of cybn._api._renorm_corrections, in its order."""
    cdef double r, d, running_std
    if rn.running_mean == NULL:
        scale[0] = weight[c] * invstd[c]
        shift[0] = bias[c]
        return
    running_std = sqrt(rn.running_var[c] + eps)
    r = clipped(sqrt(var[c] + eps) / running_std, rn.r_low, rn.r_high)
    d = clipped((mean[c] - rn.running_mean[c]) / running_std, -rn.d_high, rn.d_high)
    rn.r[c] = r
    rn.d[c] = d
    scale[0] = weight[c] * r * invstd[c]
    shift[0] = weight[c] * d + bias[c]


# What the training forwards return: whether they wrote every channel.  A
# float64 channel whose statistics are not finite (NaN or Inf in it, or a
# spread beyond ~1e154 that overflows the sum of squares) is not written, so
# that cybn._api can compute its statistics again from x as it was, also
# when y is written over x; the per-channel path skips only those channels,
# the others write nothing at all.  float32 statistics never overflow.
cdef enum:
    ALL_WRITTEN_ = 0
    WRITTEN_BUT_NON_FINITE_ = 1
    NONE_WRITTEN_ = 2
ALL_WRITTEN, WRITTEN_BUT_NON_FINITE, NONE_WRITTEN = (ALL_WRITTEN_, WRITTEN_BUT_NON_FINITE_,
                                                     NONE_WRITTEN_)


cdef inline bint statistics_finite(double mean, double var, floating *like) noexcept nogil:
    return floating is float or (isfinite(mean) and isfinite(var))


cdef bint all_statistics_finite(const double *mean, const double *var, Py_ssize_t n,
                                floating *like) noexcept nogil:
    cdef Py_ssize_t c
    for c in range(n):
        if not statistics_finite(mean[c], var[c], like):
            return False
    return True


cdef bint affine_coefficients(Py_ssize_t n_channels, Py_ssize_t count, double eps,
                             const double *weight, const double *bias, const double *mean,
                             double *var, double *invstd, Renorm rn, double *scale,
                             double *shift, floating *like) noexcept nogil:
    """invstd, and y = (x - mean) * scale + shift of every channel from its
    statistics; whether these are all finite (else y is left unwritten)."""
    cdef Py_ssize_t c
    batch_scales(n_channels, count, eps, weight, var, invstd, scale)
    for c in range(n_channels):
        train_coefficients(c, mean, var, invstd, weight, bias, eps, rn, &scale[c], &shift[c])
    return all_statistics_finite(mean, var, n_channels, like)


cdef void train_channels(Planar x, Planar res, Planar y, Py_ssize_t first, Py_ssize_t end,
                         Py_ssize_t n_spatial, Py_ssize_t count, const double *weight,
                         const double *bias, double eps, double *mean, double *var,
                         double *invstd, Renorm rn, int relu, bint stream, bint overlap,
                         floating *like) noexcept nogil:
    """Channels [first, end) of the per-channel path, one after the other:
    the statistics of a channel, then its y while its values are in cache.
    With overlap (see overlaps_next), the sums of the next channel run along
    with the streamed y of this one, run by run, so that reading the next
    channel from memory overlaps writing this one (the same sums in the same
    order)."""
    cdef Py_ssize_t c
    cdef double next_shift, s, q, scale, shift
    if first >= end:
        return
    channel_moments(x, first, n_spatial, count, &mean[first], &var[first], like)
    for c in range(first, end):
        invstd[c] = batch_invstd(&var[c], count, eps)
        train_coefficients(c, mean, var, invstd, weight, bias, eps, rn, &scale, &shift)
        if not statistics_finite(mean[c], var[c], like):  # see WRITTEN_BUT_NON_FINITE
            if c + 1 < end:
                channel_moments(x, c + 1, n_spatial, count, &mean[c + 1], &var[c + 1], like)
            continue
        if not overlap or c + 1 == end:
            planar_affine(x, res, y, c, n_spatial, 0, count, mean[c], scale, shift, relu,
                          stream, like)
            if c + 1 < end:
                channel_moments(x, c + 1, n_spatial, count, &mean[c + 1], &var[c + 1], like)
            continue
        next_shift = channel_shift(x, c + 1, n_spatial, count, like)
        s = 0.0
        q = 0.0
        planar_affine_sums(x, res, y, c, n_spatial, count, mean[c], scale, shift, relu,
                           stream, next_shift, &s, &q, like)
        finish_channel_moments(x, c + 1, n_spatial, count, next_shift, s, q, &mean[c + 1],
                               &var[c + 1], like)


cdef void backward_channels(Planar dy, Planar y, Planar x, Planar dx, Planar g_out,
                            Py_ssize_t first, Py_ssize_t end, Py_ssize_t n_spatial,
                            Py_ssize_t count, const double *mean, const double *invstd,
                            const double *weight, bint training, double *sum_dy,
                            double *sum_dy_xmu, bint stream, bint overlap,
                            floating *like) noexcept nogil:
    """Channels [first, end) of the per-channel path, as train_channels: the
    gradient sums of a channel, then its dx while its dy and x are in cache,
    and with overlap, the next channel's sums along with it."""
    cdef Py_ssize_t c
    cdef double dy_shift, x_coef, scale
    if first >= end:
        return
    sum_dy[first] = 0.0
    sum_dy_xmu[first] = 0.0
    planar_grad_sums(dy, y, x, first, n_spatial, 0, count, mean[first], &sum_dy[first],
                     &sum_dy_xmu[first], like)
    for c in range(first, end):
        grad_coefficients(1, count, training, &sum_dy[c], &sum_dy_xmu[c], &invstd[c],
                          &weight[c], &dy_shift, &x_coef, &scale)
        if c + 1 < end:
            sum_dy[c + 1] = 0.0
            sum_dy_xmu[c + 1] = 0.0
        if not overlap or c + 1 == end:
            planar_grad_input(dy, y, x, dx, g_out, c, n_spatial, 0, count, mean[c], dy_shift,
                              x_coef, scale, stream, like)
            if c + 1 < end:
                planar_grad_sums(dy, y, x, c + 1, n_spatial, 0, count, mean[c + 1],
                                 &sum_dy[c + 1], &sum_dy_xmu[c + 1], like)
        else:
            planar_grad_input_sums(dy, y, x, dx, g_out, c, n_spatial, count, mean[c],
                                   dy_shift, x_coef, scale, stream,
                                   mean[c + 1], &sum_dy[c + 1], &sum_dy_xmu[c + 1], like)


cdef void train_ghosts(Planar x, Planar res, Planar y, Py_ssize_t first, Py_ssize_t end,
                       Py_ssize_t ghosts, Py_ssize_t n_batch, Py_ssize_t n_channels,
                       Py_ssize_t n_spatial, const double *weight, const double *bias,
                       double eps, double *mean, double *var, double *invstd, Renorm rn,
                       int relu, bint stream, bint overlap, floating *like) noexcept nogil:
    """train_channels for channels [first, end) of each ghost batch of
    n_batch samples in turn: one task for all of them, as a parallel region
    costs more than a small ghost batch."""
    cdef Py_ssize_t g, k
    for g in range(ghosts):
        k = g * n_channels
        train_channels(batch_from(x, g * n_batch, like), batch_from(res, g * n_batch, like),
                       batch_from(y, g * n_batch, like), first, end, n_spatial,
                       n_batch * n_spatial, weight, bias, eps, mean + k, var + k, invstd + k,
                       renorm_from(rn, k), relu, stream, overlap, like)


cdef void backward_ghosts(Planar dy, Planar y, Planar x, Planar dx, Planar g_out,
                          Py_ssize_t first, Py_ssize_t end, Py_ssize_t ghosts,
                          Py_ssize_t n_batch, Py_ssize_t n_channels, Py_ssize_t n_spatial,
                          const double *mean, const double *invstd, const double *weight,
                          bint training, double *sum_dy, double *sum_dy_xmu, bint stream,
                          bint overlap, floating *like) noexcept nogil:
    """backward_channels for channels [first, end) of each ghost batch in
    turn, as train_ghosts."""
    cdef Py_ssize_t g, k, n
    for g in range(ghosts):
        k, n = g * n_channels, g * n_batch
        backward_channels(batch_from(dy, n, like), batch_from(y, n, like),
                          batch_from(x, n, like), batch_from(dx, n, like),
                          batch_from(g_out, n, like), first, end, n_spatial,
                          n_batch * n_spatial, mean + k, invstd + k, weight + k, training,
                          sum_dy + k, sum_dy_xmu + k, stream, overlap, like)


cdef void byte_bounds(cnp.ndarray a, char **low, char **high) noexcept:
    """The first and one past the last byte a's values occupy (a is not empty)."""
    cdef int axis
    cdef Py_ssize_t step
    low[0] = high[0] = cnp.PyArray_BYTES(a)
    for axis in range(cnp.PyArray_NDIM(a)):
        step = (cnp.PyArray_DIM(a, axis) - 1) * cnp.PyArray_STRIDE(a, axis)
        if step < 0:
            low[0] += step
        else:
            high[0] += step
    high[0] += cnp.PyArray_ITEMSIZE(a)


def may_overlap(cnp.ndarray a not None, cnp.ndarray b not None):
    """np.may_share_memory(a, b), whether their byte ranges overlap, without
    its dispatch: a fifth of the time."""
    cdef char *a_low
    cdef char *a_high
    cdef char *b_low
    cdef char *b_high
    if cnp.PyArray_SIZE(a) == 0 or cnp.PyArray_SIZE(b) == 0:
        return False
    byte_bounds(a, &a_low, &a_high)
    byte_bounds(b, &b_low, &b_high)
    return a_low < b_high and b_low < a_high


def all_finite(a):
    """Whether every value of a float64 vector is finite: NumPy's reductions
    cost a microsecond or more per call and may warn."""
    cdef Py_ssize_t n = extent(a, 0) if isinstance(a, cnp.ndarray) else 0, i
    cdef const double *p = doubles(a, n, False)
    for i in range(n):
        if not isfinite(p[i]):
            return False
    return True


def any_below(a, double low):
    """Whether a float64 vector holds a value below low (see all_finite)."""
    cdef Py_ssize_t n = extent(a, 0) if isinstance(a, cnp.ndarray) else 0, i
    cdef const double *p = doubles(a, n, False)
    for i in range(n):
        if p[i] < low:
            return True
    return False


def float64_copy(v, Py_ssize_t n):
    """A new float64 array of v's values when v is an aligned, native float32
    or float64 ndarray of shape (n,), of any stride; None otherwise (cybn._api
    then converts v itself, or says what is wrong with it).  NumPy's astype
    widens float32 without SIMD."""
    return None if v is None else copied(v, n, 0.0)


cdef object copied(object v, Py_ssize_t n, double default):
    """float64_copy(v, n), or n times `default` for v None."""
    cdef cnp.npy_intp size = n
    cdef cnp.ndarray result
    cdef double *out
    cdef Py_ssize_t i
    if v is None:
        result = cnp.PyArray_EMPTY(1, &size, cnp.NPY_DOUBLE, 0)
        out = <double *>cnp.PyArray_DATA(result)
        for i in range(n):
            out[i] = default
        return result
    if type(v) is not cnp.ndarray:
        return None
    cdef cnp.ndarray arr = <cnp.ndarray>v
    cdef int type_num = cnp.PyArray_TYPE(arr)
    if (cnp.PyArray_NDIM(arr) != 1 or cnp.PyArray_DIM(arr, 0) != n
            or (type_num != cnp.NPY_FLOAT and type_num != cnp.NPY_DOUBLE)
            or not cnp.PyArray_ISALIGNED(arr) or not cnp.PyArray_ISNOTSWAPPED(arr)):
        return None
    result = cnp.PyArray_EMPTY(1, &size, cnp.NPY_DOUBLE, 0)
    out = <double *>cnp.PyArray_DATA(result)
    cdef char *src = cnp.PyArray_BYTES(arr)
    cdef Py_ssize_t stride = cnp.PyArray_STRIDE(arr, 0)
    if type_num == cnp.NPY_FLOAT and stride == sizeof(float):
        for i in range(n):
            out[i] = (<float *>src)[i]
    elif type_num == cnp.NPY_FLOAT:
        for i in range(n):
            out[i] = (<float *>(src + i * stride))[0]
    else:
        for i in range(n):
            out[i] = (<double *>(src + i * stride))[0]
    return result


def eval_coefficients(running_mean, running_var, weight, bias, double eps, Py_ssize_t n):
    """[mean, scale, shift] of the evaluation forward as new float64 arrays:
    running_mean, weight / sqrt(running_var + eps) (IEEE: running_var + eps
    <= 0 gives Inf or NaN, without warnings) and bias, weight None counting
    as 1 and bias None as 0; None unless running_mean and running_var, and
    weight and bias where given, are all what float64_copy takes (cybn._api
    then converts and checks them, and calls this again)."""
    if running_mean is None or running_var is None:
        return None
    mean = copied(running_mean, n, 0.0)
    var = copied(running_var, n, 0.0)
    scale = copied(weight, n, 1.0)
    shift = copied(bias, n, 0.0)
    if mean is None or var is None or scale is None or shift is None:
        return None
    cybn_divide_by_sqrt(<double *>cnp.PyArray_DATA(<cnp.ndarray>scale),
                        <double *>cnp.PyArray_DATA(<cnp.ndarray>var), eps, n)
    return [mean, scale, shift]


# ---------------------------------------------------------------------------
# The kernels cybn._api calls.  Optional operands (residual, the forward's
# output y for the ReLU's backward, grad_residual) may be None.  Operands are
# ndarrays (see operand); `name_p` is the data of the vector `name`.  Each
# kernel is a fused function through its last parameter alone, `kind`, which
# no caller passes: cybn._api picks the float or double instance by indexing
# (forward_train_planar["float"]).

def forward_train_planar(x, out, weight, bias, double eps, mean, var, invstd,
                         residual=None, bint relu=False, renorm=None, Py_ssize_t ghosts=1,
                         floating kind=0):
    """out = act((x - mean)*invstd*weight + bias [+ residual]) with the batch
    statistics, which are written to mean, var (biased) and invstd; with
    renorm (see renorm_view), batch renormalization's.  The batch is `ghosts`
    ghost batches of equal size, each normalized with its own statistics:
    mean, var and invstd (and r, d) hold ghosts x C values.  Returns
    ALL_WRITTEN, or which channels were not (see WRITTEN_BUT_NON_FINITE)."""
    cdef floating *like = NULL
    cdef Planar xv = planar(x, None, False, like)
    cdef Py_ssize_t n_batch = extent(x, 0) // ghosts, n_channels = extent(x, 1)
    cdef Py_ssize_t n_spatial = spatial_extent(x), n_stats = ghosts * n_channels
    cdef Planar rv = planar(residual, x, False, like), yv = planar(out, x, True, like)
    cdef const double *weight_p = doubles(weight, n_channels, False)
    cdef const double *bias_p = doubles(bias, n_channels, False)
    cdef double *mean_p = doubles(mean, n_stats, True)
    cdef double *var_p = doubles(var, n_stats, True)
    cdef double *invstd_p = doubles(invstd, n_stats, True)
    cdef Py_ssize_t count = n_batch * n_spatial, t, g, k
    cdef Plan plan = plan_of(TWO_PASS, False, n_batch, n_channels, n_spatial, ghosts, 0,
                             sizeof(floating), affine_arrays(rv.data != NULL), 1)
    cdef int n_threads = plan.threads
    cdef Renorm rn = renorm_view(renorm, n_channels, ghosts)
    if plan.per_channel:
        with nogil:
            if n_threads == 1:  # no parallel region, whose start-up dominates small calls
                train_ghosts(xv, rv, yv, 0, n_channels, ghosts, n_batch, n_channels, n_spatial,
                             weight_p, bias_p, eps, mean_p, var_p, invstd_p, rn, relu,
                             plan.stream, plan.overlap, like)
            else:
                for t in prange(n_threads, schedule='static', num_threads=n_threads):
                    train_ghosts(xv, rv, yv, part_start(t, n_threads, n_channels),
                                 part_start(t + 1, n_threads, n_channels), ghosts, n_batch,
                                 n_channels, n_spatial, weight_p, bias_p, eps, mean_p, var_p,
                                 invstd_p, rn, relu, plan.stream, plan.overlap, like)
        if all_statistics_finite(mean_p, var_p, n_stats, like):
            return ALL_WRITTEN_
        return WRITTEN_BUT_NON_FINITE_
    cdef int written = ALL_WRITTEN_
    cdef double *work = scratch(planar_scratch(plan, n_channels) + 2 * n_channels)
    try:
        with nogil:
            for g in range(ghosts):
                k = g * n_channels
                planar_statistics(plan, batch_from(xv, g * n_batch, like), n_batch,
                                  n_channels, n_spatial, work + 2 * n_channels, mean_p + k,
                                  var_p + k, like)
                if not affine_coefficients(n_channels, count, eps, weight_p, bias_p, mean_p + k,
                                           var_p + k, invstd_p + k, renorm_from(rn, k), work,
                                           work + n_channels, like):
                    written = NONE_WRITTEN_  # of this ghost batch
                else:
                    runs_affine_all(plan, batch_from(xv, g * n_batch, like),
                                    batch_from(rv, g * n_batch, like),
                                    batch_from(yv, g * n_batch, like), n_batch, n_channels,
                                    n_spatial, mean_p + k, work, work + n_channels, relu, like)
    finally:
        free(work)
    return written


def forward_train_rows(x, out, weight, bias, double eps, mean, var, invstd, residual=None,
                       bint relu=False, renorm=None, Py_ssize_t ghosts=1, floating kind=0):
    """forward_train_planar for the rows layout."""
    cdef floating *like = NULL
    cdef Rows xv = rows(x, None, False, like)
    cdef Py_ssize_t n_rows = extent(x, 0) // ghosts, n_channels = extent(x, 1)
    cdef Py_ssize_t n_stats = ghosts * n_channels, g, k
    cdef Rows rv = rows(residual, x, False, like), yv = rows(out, x, True, like)
    cdef const double *weight_p = doubles(weight, n_channels, False)
    cdef const double *bias_p = doubles(bias, n_channels, False)
    cdef double *mean_p = doubles(mean, n_stats, True)
    cdef double *var_p = doubles(var, n_stats, True)
    cdef double *invstd_p = doubles(invstd, n_stats, True)
    cdef Plan plan = plan_of(TWO_PASS, True, n_rows, n_channels, 1, ghosts,
                             xv.row_stride * sizeof(floating), sizeof(floating),
                             affine_arrays(rv.data != NULL), 1)
    cdef Renorm rn = renorm_view(renorm, n_channels, ghosts)
    cdef double *work = scratch(n_channels * (2 * plan.ranges + 2))
    cdef int written = ALL_WRITTEN_
    try:
        with nogil:
            for g in range(ghosts):  # ghost batches are runs of rows
                k = g * n_channels
                rows_moments(plan, rows_from(xv, g * n_rows, like), n_rows, n_channels, work,
                             mean_p + k, var_p + k, like)
                if not affine_coefficients(n_channels, n_rows, eps, weight_p, bias_p, mean_p + k,
                                           var_p + k, invstd_p + k, renorm_from(rn, k), work,
                                           work + n_channels, like):
                    written = NONE_WRITTEN_  # of this ghost batch
                else:
                    rows_affine_all(plan, rows_from(xv, g * n_rows, like),
                                    rows_from(rv, g * n_rows, like),
                                    rows_from(yv, g * n_rows, like), n_rows, n_channels,
                                    mean_p + k, work, work + n_channels, relu, like)
    finally:
        free(work)
    return written


ctypedef struct Constants:
    # Batch renormalization's r and d of each statistic, held constant in the
    # backward; NULL for plain batch norm.
    const double *r
    const double *d


cdef Constants renorm_constants(object renorm, Py_ssize_t n_stats) except *:
    """The Constants of the backward's `renorm`: None, or float64 (r, d)."""
    cdef Constants rd
    rd.r = rd.d = NULL
    if renorm is not None:
        rd.r = doubles(renorm[0], n_stats, False)
        rd.d = doubles(renorm[1], n_stats, False)
    return rd


cdef double *statistic_weights(const double *weight, Constants rd, Py_ssize_t n_channels,
                               Py_ssize_t n_stats, double *out) noexcept nogil:
    """out = the weight of dx for each statistic (of each ghost batch):
    weight, times r with batch renormalization."""
    cdef Py_ssize_t k
    for k in range(n_stats):
        out[k] = weight[k % n_channels] if rd.r == NULL else weight[k % n_channels] * rd.r[k]
    return out


cdef void parameter_gradients(Py_ssize_t n_stats, const double *sum_dy,
                              const double *sum_dy_xmu, const double *invstd, Constants rd,
                              floating *dweight, floating *dbias) noexcept nogil:
    """dweight = sum(g * xhat) and dbias = sum(g), rounded once; with batch
    renormalization dweight = sum(g * (r*xhat + d)) = r*sum(g*xhat) + d*sum(g)
    (d = 0 adds nothing, not even 0 * Inf: rmax = 1, dmax = 0 is plain batch
    norm bit for bit)."""
    cdef Py_ssize_t k
    cdef double g
    for k in range(n_stats):
        g = sum_dy_xmu[k] * invstd[k]
        if rd.r != NULL:
            g = g * rd.r[k]
            if rd.d[k] != 0.0:
                g = g + rd.d[k] * sum_dy[k]
        dweight[k] = <floating>g
        dbias[k] = <floating>sum_dy[k]


def backward_planar(dy, x, dx, mean, invstd, weight, bint training, dweight, dbias,
                    relu_output=None, grad_residual=None, renorm=None, Py_ssize_t ghosts=1,
                    floating kind=0):
    """dx, dweight and dbias.  With relu_output (the forward's y), dy counts
    only where y > 0, and that masked dy is also written to grad_residual
    when given.  With ghosts (see forward_train_planar), mean, invstd,
    dweight and dbias hold ghosts x C values.  renorm: None, or batch
    renormalization's r and d of each statistic (see parameter_gradients)."""
    cdef floating *like = NULL
    cdef Planar xv = planar(x, None, False, like)
    cdef Py_ssize_t n_batch = extent(x, 0) // ghosts, n_channels = extent(x, 1)
    cdef Py_ssize_t n_spatial = spatial_extent(x), n_stats = ghosts * n_channels, g, k
    cdef Planar dyv = planar(dy, x, False, like), yv = planar(relu_output, x, False, like)
    cdef Planar dxv = planar(dx, x, True, like), gv = planar(grad_residual, x, True, like)
    cdef const double *mean_p = doubles(mean, n_stats, False)
    cdef const double *invstd_p = doubles(invstd, n_stats, False)
    cdef const double *weight_p = doubles(weight, n_channels, False)
    cdef floating *dweight_p = values(dweight, n_stats, True, like)
    cdef floating *dbias_p = values(dbias, n_stats, True, like)
    cdef Constants rd = renorm_constants(renorm, n_stats)
    cdef Py_ssize_t count = n_batch * n_spatial, t
    cdef Plan plan = plan_of(TWO_PASS, False, n_batch, n_channels, n_spatial, ghosts, 0,
                             sizeof(floating), grad_input_arrays(yv.data != NULL,
                                                                 gv.data != NULL),
                             3 if yv.data != NULL else 2)
    cdef int n_threads = plan.threads
    # weights, sum_dy, sum_dy_xmu, then (not per channel) dy_shift, x_coef, scale and
    # partial sums
    cdef double *work = scratch(3 * n_stats if plan.per_channel else 3 * n_stats
                                + 3 * n_channels + planar_scratch(plan, n_channels))
    cdef double *sum_dy = work + n_stats
    cdef double *sum_dy_xmu = work + 2 * n_stats
    cdef double *coefficients = work + 3 * n_stats
    try:
        with nogil:
            weight_p = statistic_weights(weight_p, rd, n_channels, n_stats, work)
            if plan.per_channel and n_threads == 1:  # no parallel region, as in the forward
                backward_ghosts(dyv, yv, xv, dxv, gv, 0, n_channels, ghosts, n_batch,
                                n_channels, n_spatial, mean_p, invstd_p, weight_p, training,
                                sum_dy, sum_dy_xmu, plan.stream, plan.overlap, like)
            elif plan.per_channel:
                for t in prange(n_threads, schedule='static', num_threads=n_threads):
                    backward_ghosts(dyv, yv, xv, dxv, gv, part_start(t, n_threads, n_channels),
                                    part_start(t + 1, n_threads, n_channels), ghosts, n_batch,
                                    n_channels, n_spatial, mean_p, invstd_p, weight_p,
                                    training, sum_dy, sum_dy_xmu, plan.stream, plan.overlap, like)
            else:
                for g in range(ghosts):
                    k = g * n_channels
                    planar_gradient_sums(plan, batch_from(dyv, g * n_batch, like),
                                         batch_from(yv, g * n_batch, like),
                                         batch_from(xv, g * n_batch, like), n_batch,
                                         n_channels, n_spatial, mean_p + k,
                                         coefficients + 3 * n_channels, sum_dy + k,
                                         sum_dy_xmu + k, like)
                    grad_coefficients(n_channels, count, training, sum_dy + k, sum_dy_xmu + k,
                                      invstd_p + k, weight_p + k, coefficients,
                                      coefficients + n_channels, coefficients + 2 * n_channels)
                    runs_grad_input_all(plan, batch_from(dyv, g * n_batch, like),
                                        batch_from(yv, g * n_batch, like),
                                        batch_from(xv, g * n_batch, like),
                                        batch_from(dxv, g * n_batch, like),
                                        batch_from(gv, g * n_batch, like), n_batch, n_channels,
                                        n_spatial, mean_p + k, coefficients,
                                        coefficients + n_channels,
                                        coefficients + 2 * n_channels, like)
            parameter_gradients(n_stats, sum_dy, sum_dy_xmu, invstd_p, rd, dweight_p, dbias_p)
    finally:
        free(work)


def backward_rows(dy, x, dx, mean, invstd, weight, bint training, dweight, dbias,
                  relu_output=None, grad_residual=None, renorm=None, Py_ssize_t ghosts=1,
                  floating kind=0):
    """backward_planar for the rows layout."""
    cdef floating *like = NULL
    cdef Rows xv = rows(x, None, False, like)
    cdef Py_ssize_t n_rows = extent(x, 0) // ghosts, n_channels = extent(x, 1)
    cdef Py_ssize_t n_stats = ghosts * n_channels, g, k, n
    cdef Rows dyv = rows(dy, x, False, like), yv = rows(relu_output, x, False, like)
    cdef Rows dxv = rows(dx, x, True, like), gv = rows(grad_residual, x, True, like)
    cdef const double *mean_p = doubles(mean, n_stats, False)
    cdef const double *invstd_p = doubles(invstd, n_stats, False)
    cdef const double *weight_p = doubles(weight, n_channels, False)
    cdef floating *dweight_p = values(dweight, n_stats, True, like)
    cdef floating *dbias_p = values(dbias, n_stats, True, like)
    cdef Constants rd = renorm_constants(renorm, n_stats)
    cdef Plan plan = plan_of(TWO_PASS, True, n_rows, n_channels, 1, ghosts,
                             xv.row_stride * sizeof(floating), sizeof(floating),
                             grad_input_arrays(yv.data != NULL, gv.data != NULL),
                             3 if yv.data != NULL else 2)
    # weights, sum_dy, sum_dy_xmu, then the partial sums, later dy_shift, x_coef, scale
    cdef double *work = scratch(3 * n_stats + n_channels * (2 * plan.ranges + 3))
    cdef double *sum_dy = work + n_stats
    cdef double *sum_dy_xmu = work + 2 * n_stats
    cdef double *rest = work + 3 * n_stats
    try:
        with nogil:
            weight_p = statistic_weights(weight_p, rd, n_channels, n_stats, work)
            for g in range(ghosts):  # ghost batches are runs of rows
                k, n = g * n_channels, g * n_rows
                rows_grad_sums_all(plan, rows_from(dyv, n, like), rows_from(yv, n, like),
                                   rows_from(xv, n, like), n_rows, n_channels, mean_p + k,
                                   rest, sum_dy + k, sum_dy_xmu + k, like)
                grad_coefficients(n_channels, n_rows, training, sum_dy + k, sum_dy_xmu + k,
                                  invstd_p + k, weight_p + k, rest, rest + n_channels,
                                  rest + 2 * n_channels)
                rows_grad_input_all(plan, rows_from(dyv, n, like), rows_from(yv, n, like),
                                    rows_from(xv, n, like), rows_from(dxv, n, like),
                                    rows_from(gv, n, like), n_rows, n_channels, mean_p + k,
                                    rest, rest + n_channels, rest + 2 * n_channels, like)
            parameter_gradients(n_stats, sum_dy, sum_dy_xmu, invstd_p, rd, dweight_p, dbias_p)
    finally:
        free(work)


cdef inline double column_mean(const double *a, Py_ssize_t c, Py_ssize_t n_channels,
                               Py_ssize_t parts) noexcept nogil:
    """The mean of column c of `parts` rows of n_channels (a[c] for one row):
    the rows summed in order, then divided, as NumPy's mean over axis 0."""
    cdef double total = a[c]
    cdef Py_ssize_t g
    if parts == 1:
        return total
    for g in range(1, parts):
        total += a[g * n_channels + c]
    return total / parts


def update_running(running_mean, running_var, mean, var, Py_ssize_t count, double momentum,
                   Py_ssize_t parts=1, floating kind=0):
    """running <- (1 - momentum)*running + momentum*batch, the variance unbiased
    by count/(count - 1), in the running statistics' dtype; mean and var are
    float64, `parts` rows of C (ghost batches, of count values per channel
    each: batch is then the mean of the rows).  Returns False, changing
    nothing, when a batch statistic is not finite in the dtype (NaN, Inf,
    or beyond its range)."""
    cdef floating *like = NULL
    cdef Py_ssize_t n_channels = len(running_mean)
    cdef const double *mean_p = doubles(mean, parts * n_channels, False)
    cdef const double *var_p = doubles(var, parts * n_channels, False)
    cdef floating *running_mean_p = values(running_mean, n_channels, True, like)
    cdef floating *running_var_p = values(running_var, n_channels, True, like)
    cdef double largest = 3.4028234663852886e38 if floating is float else 1.7976931348623157e308
    cdef double unbias = <double>count / (count - 1), m, v
    cdef Py_ssize_t c
    for c in range(n_channels):
        m = column_mean(mean_p, c, n_channels, parts)
        v = column_mean(var_p, c, n_channels, parts)
        if not (-largest <= m <= largest and v * unbias <= largest):  # NaN fails it
            return False
    for c in range(n_channels):
        m = column_mean(mean_p, c, n_channels, parts)
        v = column_mean(var_p, c, n_channels, parts)
        running_mean_p[c] = <floating>((1.0 - momentum) * running_mean_p[c] + momentum * m)
        running_var_p[c] = <floating>((1.0 - momentum) * running_var_p[c]
                                      + momentum * (v * unbias))
    return True


# ---------------------------------------------------------------------------
# Split kernels, one step each, for callers that combine statistics or
# gradient sums across processes between the steps.

def moments_planar(x, mean, m2, floating kind=0):
    cdef floating *like = NULL
    cdef Planar xv = planar(x, None, False, like)
    cdef Py_ssize_t n_batch = extent(x, 0), n_channels = extent(x, 1)
    cdef Py_ssize_t n_spatial = spatial_extent(x)
    cdef double *mean_p = doubles(mean, n_channels, True)
    cdef double *m2_p = doubles(m2, n_channels, True)
    cdef Plan plan = plan_of(SUMS, False, n_batch, n_channels, n_spatial, 1, 0,
                             sizeof(floating), 1, 1)
    cdef double *work = scratch(planar_scratch(plan, n_channels))
    try:
        with nogil:
            planar_statistics(plan, xv, n_batch, n_channels, n_spatial, work, mean_p, m2_p, like)
    finally:
        free(work)


def moments_rows(x, mean, m2, floating kind=0):
    cdef floating *like = NULL
    cdef Rows xv = rows(x, None, False, like)
    cdef Py_ssize_t n_rows = extent(x, 0), n_channels = extent(x, 1)
    cdef double *mean_p = doubles(mean, n_channels, True)
    cdef double *m2_p = doubles(m2, n_channels, True)
    cdef Plan plan = plan_of(SUMS, True, n_rows, n_channels, 1, 1,
                             xv.row_stride * sizeof(floating), sizeof(floating), 1, 1)
    cdef double *work = scratch(2 * n_channels * plan.ranges)
    try:
        with nogil:
            rows_moments(plan, xv, n_rows, n_channels, work, mean_p, m2_p, like)
    finally:
        free(work)


def affine_planar(x, out, mean, scale, shift, residual=None, bint relu=False,
                  floating kind=0):
    """out = act((x - mean)*scale + shift [+ residual]), per channel."""
    cdef floating *like = NULL
    cdef Planar xv = planar(x, None, False, like)
    cdef Py_ssize_t n_batch = extent(x, 0), n_channels = extent(x, 1)
    cdef Py_ssize_t n_spatial = spatial_extent(x)
    cdef Planar rv = planar(residual, x, False, like), yv = planar(out, x, True, like)
    cdef const double *mean_p = doubles(mean, n_channels, False)
    cdef const double *scale_p = doubles(scale, n_channels, False)
    cdef const double *shift_p = doubles(shift, n_channels, False)
    cdef Plan plan = plan_of(ONE_PASS, False, n_batch, n_channels, n_spatial, 1, 0,
                             sizeof(floating), affine_arrays(rv.data != NULL), 1)
    with nogil:
        runs_affine_all(plan, xv, rv, yv, n_batch, n_channels, n_spatial, mean_p, scale_p,
                        shift_p, relu, like)


def affine_rows(x, out, mean, scale, shift, residual=None, bint relu=False, floating kind=0):
    cdef floating *like = NULL
    cdef Rows xv = rows(x, None, False, like)
    cdef Py_ssize_t n_rows = extent(x, 0), n_channels = extent(x, 1)
    cdef Rows rv = rows(residual, x, False, like), yv = rows(out, x, True, like)
    cdef const double *mean_p = doubles(mean, n_channels, False)
    cdef const double *scale_p = doubles(scale, n_channels, False)
    cdef const double *shift_p = doubles(shift, n_channels, False)
    cdef Plan plan = plan_of(ONE_PASS, True, n_rows, n_channels, 1, 1,
                             xv.row_stride * sizeof(floating), sizeof(floating),
                             affine_arrays(rv.data != NULL), 1)
    with nogil:
        rows_affine_all(plan, xv, rv, yv, n_rows, n_channels, mean_p, scale_p, shift_p, relu,
                        like)


def grad_sums_planar(dy, x, mean, sum_dy, sum_dy_xmu, relu_output=None, floating kind=0):
    cdef floating *like = NULL
    cdef Planar xv = planar(x, None, False, like)
    cdef Py_ssize_t n_batch = extent(x, 0), n_channels = extent(x, 1)
    cdef Py_ssize_t n_spatial = spatial_extent(x)
    cdef Planar dyv = planar(dy, x, False, like), yv = planar(relu_output, x, False, like)
    cdef const double *mean_p = doubles(mean, n_channels, False)
    cdef double *sum_dy_p = doubles(sum_dy, n_channels, True)
    cdef double *sum_dy_xmu_p = doubles(sum_dy_xmu, n_channels, True)
    cdef Plan plan = plan_of(SUMS, False, n_batch, n_channels, n_spatial, 1, 0,
                             sizeof(floating), 2 + (yv.data != NULL), 1)
    cdef double *work = scratch(planar_scratch(plan, n_channels))
    try:
        with nogil:
            planar_gradient_sums(plan, dyv, yv, xv, n_batch, n_channels, n_spatial, mean_p,
                                 work, sum_dy_p, sum_dy_xmu_p, like)
    finally:
        free(work)


def grad_sums_rows(dy, x, mean, sum_dy, sum_dy_xmu, relu_output=None, floating kind=0):
    cdef floating *like = NULL
    cdef Rows xv = rows(x, None, False, like)
    cdef Py_ssize_t n_rows = extent(x, 0), n_channels = extent(x, 1)
    cdef Rows dyv = rows(dy, x, False, like), yv = rows(relu_output, x, False, like)
    cdef const double *mean_p = doubles(mean, n_channels, False)
    cdef double *sum_dy_p = doubles(sum_dy, n_channels, True)
    cdef double *sum_dy_xmu_p = doubles(sum_dy_xmu, n_channels, True)
    cdef Plan plan = plan_of(SUMS, True, n_rows, n_channels, 1, 1,
                             xv.row_stride * sizeof(floating), sizeof(floating),
                             2 + (yv.data != NULL), 1)
    cdef double *work = scratch(2 * n_channels * plan.ranges)
    try:
        with nogil:
            rows_grad_sums_all(plan, dyv, yv, xv, n_rows, n_channels, mean_p, work, sum_dy_p,
                               sum_dy_xmu_p, like)
    finally:
        free(work)


def grad_input_planar(dy, x, dx, mean, dy_shift, x_coef, scale, relu_output=None,
                      grad_residual=None, floating kind=0):
    """dx = ((g - dy_shift) - (x - mean)*x_coef)*scale per channel, g = dy
    (masked by relu_output > 0 when given, and then kept in grad_residual)."""
    cdef floating *like = NULL
    cdef Planar xv = planar(x, None, False, like)
    cdef Py_ssize_t n_batch = extent(x, 0), n_channels = extent(x, 1)
    cdef Py_ssize_t n_spatial = spatial_extent(x)
    cdef Planar dyv = planar(dy, x, False, like), yv = planar(relu_output, x, False, like)
    cdef Planar dxv = planar(dx, x, True, like), gv = planar(grad_residual, x, True, like)
    cdef const double *mean_p = doubles(mean, n_channels, False)
    cdef const double *dy_shift_p = doubles(dy_shift, n_channels, False)
    cdef const double *x_coef_p = doubles(x_coef, n_channels, False)
    cdef const double *scale_p = doubles(scale, n_channels, False)
    cdef Plan plan = plan_of(ONE_PASS, False, n_batch, n_channels, n_spatial, 1, 0,
                             sizeof(floating),
                             grad_input_arrays(yv.data != NULL, gv.data != NULL), 2)
    with nogil:
        runs_grad_input_all(plan, dyv, yv, xv, dxv, gv, n_batch, n_channels, n_spatial,
                            mean_p, dy_shift_p, x_coef_p, scale_p, like)


def grad_input_rows(dy, x, dx, mean, dy_shift, x_coef, scale, relu_output=None,
                    grad_residual=None, floating kind=0):
    cdef floating *like = NULL
    cdef Rows xv = rows(x, None, False, like)
    cdef Py_ssize_t n_rows = extent(x, 0), n_channels = extent(x, 1)
    cdef Rows dyv = rows(dy, x, False, like), yv = rows(relu_output, x, False, like)
    cdef Rows dxv = rows(dx, x, True, like), gv = rows(grad_residual, x, True, like)
    cdef const double *mean_p = doubles(mean, n_channels, False)
    cdef const double *dy_shift_p = doubles(dy_shift, n_channels, False)
    cdef const double *x_coef_p = doubles(x_coef, n_channels, False)
    cdef const double *scale_p = doubles(scale, n_channels, False)
    cdef Plan plan = plan_of(ONE_PASS, True, n_rows, n_channels, 1, 1,
                             xv.row_stride * sizeof(floating), sizeof(floating),
                             grad_input_arrays(yv.data != NULL, gv.data != NULL), 2)
    with nogil:
        rows_grad_input_all(plan, dyv, yv, xv, dxv, gv, n_rows, n_channels, mean_p, dy_shift_p,
                            x_coef_p, scale_p, like)
