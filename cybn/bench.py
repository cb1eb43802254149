"""Benchmark cybn against PyTorch and the plain NumPy reference.

Run it as a module:

    python -m cybn.bench                   # every shape, float32 and float64
    python -m cybn.bench --quick           # fewer shapes and repetitions
    python -m cybn.bench --dtype float32 --threads 1 --json out.json --png out.png
    python -m cybn.bench --shapes 32x256x56x56,64x2048 --reps 10

For every shape and dtype it times three operations, each with preallocated
outputs on both sides:

    train     cybn.forward_train      vs  aten.native_batch_norm(training=True)
    eval      cybn.forward_eval       vs  aten.native_batch_norm(training=False)
    backward  cybn.backward(training) vs  aten.native_batch_norm_backward

PyTorch's time is the faster of its default call (which allocates) and its
`.out` overload, called under torch.inference_mode.  Times are the minimum
(and median) over interleaved repetitions after warm-up; small tensors are
timed in batches of calls so that one repetition lasts at least a few
milliseconds.  cybn and PyTorch run with the same number of OpenMP threads
(threadpoolctl for cybn, torch.set_num_threads for PyTorch).

"fraction of the limit" is the effective bandwidth (the bytes an operation
must move at least: x and y for the forwards, x, dy and dx for backward,
divided by its time) over the bandwidth of a multi-threaded streaming copy
measured at start-up.

The output is informative; nothing here passes or fails on a timing except
the "targets" section, which says whether the measured numbers meet the
project's performance goals.
"""
import argparse
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import cybn
from cybn import reference

__all__ = ["main", "run", "parse_shapes", "RESNET50_SHAPES", "WIDE_SHAPES", "OTHER_SHAPES",
           "OVERHEAD_SHAPES"]

# ResNet-50's batch-norm inputs at batch 32.
RESNET50_SHAPES = [
    (32, 64, 112, 112), (32, 256, 56, 56), (32, 64, 56, 56),
    (32, 512, 28, 28), (32, 128, 28, 28), (32, 1024, 14, 14),
    (32, 256, 14, 14), (32, 2048, 7, 7), (32, 512, 7, 7),
]
# No spatial extent: a channel is a strided column ("rows" kernels).
WIDE_SHAPES = [(256, 512, 1, 1), (4096, 1024), (64, 2048)]
# Few channels, large planes (a network's first layer).
OTHER_SHAPES = [(8, 3, 224, 224)]
# Per-call overhead: the arithmetic is negligible.
OVERHEAD_SHAPES = [(2, 8, 4, 4)]

QUICK_SHAPES = [
    (32, 64, 56, 56), (32, 512, 28, 28), (32, 256, 14, 14), (32, 512, 7, 7),
    (256, 512, 1, 1), (64, 2048), (2, 8, 4, 4),
]

OPS = ("train", "eval", "backward")
MOMENTUM = 0.1
EPS = 1e-5

# The NumPy reference allocates several float64 temporaries per call; by
# default it is timed only up to this many elements (--full: always).
NUMPY_MAX_ELEMENTS = 1 << 22
NUMPY_MAX_ELEMENTS_QUICK = 1 << 20

# Targets (see issue 3).
TARGET_GEOMEAN = 3.0        # train and backward vs torch, ResNet-50 geometric mean
TARGET_MIN = 2.0            # ... and no ResNet-50 shape below this
TARGET_EVAL = 1.0           # eval vs torch, every shape
TARGET_TRAIN_OVER_EVAL = 1.4
TARGET_BACKWARD_OVER_EVAL = 2.0
TARGET_WIDE = 2.0           # 2-D and 1x1 shapes vs torch, every operation
# Extra memory with out= given must stay O(threads x C): allowed bytes
# = PEAK_BASE + PEAK_PER_CHANNEL * (threads + 2) * C.
PEAK_BASE = 16 * 1024
PEAK_PER_CHANNEL = 64


# ---------------------------------------------------------------------------
# Shapes and sets.

def parse_shapes(text):
    """'32x64x56x56,64x2048' -> [(32, 64, 56, 56), (64, 2048)]."""
    shapes = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            shape = tuple(int(part) for part in item.split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"bad shape {item!r}: write it as NxC[xHxW...], e.g. 32x64x56x56") from None
        if not 2 <= len(shape) <= 5 or min(shape) < 1:
            raise argparse.ArgumentTypeError(
                f"bad shape {item!r}: 2 to 5 positive sizes, channels second")
        if math.prod(shape) // shape[1] < 2:
            raise argparse.ArgumentTypeError(
                f"bad shape {item!r}: training needs more than one value per channel")
        shapes.append(shape)
    if not shapes:
        raise argparse.ArgumentTypeError("no shapes given")
    return shapes


def shape_set(shape):
    """The group a shape belongs to: resnet50, wide, overhead, other or custom."""
    shape = tuple(shape)
    if shape in RESNET50_SHAPES:
        return "resnet50"
    if shape in WIDE_SHAPES:
        return "wide"
    if shape in OVERHEAD_SHAPES:
        return "overhead"
    if shape in OTHER_SHAPES:
        return "other"
    return "custom"


def shape_text(shape):
    return "x".join(str(n) for n in shape)


# ---------------------------------------------------------------------------
# Machine and versions.

def _cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _last_level_cache():
    """Size of the largest CPU cache as Linux reports it (e.g. '32768K'), or None."""
    best = None
    for index in range(8):
        base = f"/sys/devices/system/cpu/cpu0/cache/index{index}/"
        try:
            with open(base + "level", encoding="ascii") as f:
                level = int(f.read())
            with open(base + "size", encoding="ascii") as f:
                size = f.read().strip()
        except (OSError, ValueError):
            continue
        if best is None or level > best[0]:
            best = (level, size)
    return None if best is None else f"L{best[0]} {best[1]}"


def available_cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _version(distribution):
    """Installed version of a distribution, without importing it."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(threads, torch, torch_threads):
    try:
        load = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        load = None
    torch_version = torch.__version__ if torch is not None else None
    return {
        "cpu": _cpu_model(),
        "last_level_cache": _last_level_cache(),
        "cores": os.cpu_count(),
        "cores_available": available_cores(),
        "threads": threads,
        "cybn_threads": cybn.max_threads(),
        "torch_threads": torch_threads,
        "load_average_1min": load,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cybn": cybn.__version__,
        "torch": torch_version,
        "threadpoolctl": _version("threadpoolctl"),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def machine_line(info):
    torch_part = (f"torch {info['torch']} ({info['torch_threads']} threads)"
                  if info["torch"] else "torch not used")
    load = "" if info["load_average_1min"] is None else f" | load {info['load_average_1min']}"
    cache = f" ({info['last_level_cache']})" if info["last_level_cache"] else ""
    return (f"{info['cpu']}{cache} | {info['cores_available']} of {info['cores']} cores"
            f" | cybn {info['cybn']} ({info['cybn_threads']} threads) | {torch_part}"
            f" | numpy {info['numpy']} | Python {info['python']}{load}")


# ---------------------------------------------------------------------------
# Timing.

class Timing:
    """Per-call times (seconds) of one function: one entry per repetition."""

    def __init__(self, times, number):
        self.times = times
        self.number = number

    @property
    def min(self):
        return min(self.times)

    @property
    def median(self):
        return statistics.median(self.times)

    def as_dict(self):
        return {"min": self.min, "median": self.median, "calls_per_rep": self.number,
                "times": self.times}


def _batch(fn, number):
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return time.perf_counter() - start


def time_group(fns, reps, warmup, min_time):
    """Time several functions with their repetitions interleaved, so that a
    change in the machine's load hits them alike.  Returns {name: Timing}."""
    numbers = {}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for name, fn in fns.items():
            for _ in range(warmup):
                fn()
            elapsed = _batch(fn, 1)
            numbers[name] = (1 if elapsed >= min_time
                             else min(10**6, math.ceil(min_time / max(elapsed, 1e-7))))
        times = {name: [] for name in fns}
        for _ in range(reps):
            for name, fn in fns.items():
                times[name].append(_batch(fn, numbers[name]) / numbers[name])
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: Timing(times[name], numbers[name]) for name in fns}


def measure_bandwidth(threads, mib=256, reps=5):
    """Bandwidth of a streaming copy of `mib` MiB in `threads` Python threads,
    each np.copyto-ing its slice (NumPy releases the GIL while copying);
    bytes read plus bytes written over the best time."""
    n = mib * 2**20 // 8
    src = np.ones(n)
    dst = np.zeros(n)
    bounds = np.linspace(0, n, threads + 1).astype(int)
    pieces = [(dst[a:b], src[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        def copy():
            for _ in pool.map(lambda p: np.copyto(*p), pieces):
                pass
        copy()
        best = min(_batch(copy, 1) for _ in range(reps))
    return {
        "gbps": 2 * src.nbytes / best / 1e9,
        "method": f"np.copyto of {mib} MiB float64 in {threads} thread(s), read + write counted",
        "bytes": 2 * src.nbytes,
        "seconds": best,
    }


def peak_extra_bytes(fn):
    """Peak memory NumPy and Python allocate during fn() beyond what was
    allocated before it (tracemalloc; cybn's kernels allocate nothing in C)."""
    gc.collect()
    tracemalloc.start()
    try:
        fn()  # first call outside: caches, lazily built objects
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        fn()
        return max(0, tracemalloc.get_traced_memory()[1] - before)
    finally:
        tracemalloc.stop()


def peak_limit(threads, channels):
    return PEAK_BASE + PEAK_PER_CHANNEL * (threads + 2) * channels


# ---------------------------------------------------------------------------
# The three implementations.

def _import_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


class Case:
    """Data and preallocated outputs for one shape and dtype."""

    def __init__(self, shape, dtype, seed=0):
        rng = np.random.default_rng(seed)
        c = shape[1]
        self.shape = shape
        self.dtype = np.dtype(dtype)
        self.x = rng.standard_normal(shape, dtype=self.dtype)
        self.dy = rng.standard_normal(shape, dtype=self.dtype)
        self.out = np.empty_like(self.x)
        self.weight = (1.0 + 0.1 * rng.standard_normal(c)).astype(self.dtype)
        self.bias = (0.1 * rng.standard_normal(c)).astype(self.dtype)
        self.running_mean = (0.1 * rng.standard_normal(c)).astype(self.dtype)
        self.running_var = (1.0 + rng.random(c)).astype(self.dtype)
        # Statistics for backward, from one training forward.
        _, self.mean, self.invstd = cybn.forward_train(self.x, self.weight, self.bias)

    def cybn_fns(self):
        x, dy, out, w, b = self.x, self.dy, self.out, self.weight, self.bias
        rm_train, rv_train = self.running_mean.copy(), self.running_var.copy()
        rm, rv, mean, invstd = self.running_mean, self.running_var, self.mean, self.invstd
        return {
            "train": lambda: cybn.forward_train(x, w, b, rm_train, rv_train,
                                                momentum=MOMENTUM, eps=EPS, out=out),
            "eval": lambda: cybn.forward_eval(x, rm, rv, w, b, eps=EPS, out=out),
            "backward": lambda: cybn.backward(dy, x, mean, invstd, w, training=True, out=out),
        }

    def numpy_fns(self):
        x, dy, w, b = self.x, self.dy, self.weight, self.bias
        rm, rv, mean, invstd = self.running_mean, self.running_var, self.mean, self.invstd
        return {
            "train": lambda: reference.forward_train(x, w, b, rm, rv, MOMENTUM, EPS),
            "eval": lambda: reference.forward_eval(x, rm, rv, w, b, EPS),
            "backward": lambda: reference.backward(dy, x, mean, invstd, w, True),
        }

    def torch_fns(self, torch):
        """{op: {"default": fn, "out": fn}} on tensors sharing this case's data."""
        aten = torch.ops.aten
        bn, bn_backward = aten.native_batch_norm, aten.native_batch_norm_backward
        x, dy = torch.from_numpy(self.x), torch.from_numpy(self.dy)
        w, b = torch.from_numpy(self.weight), torch.from_numpy(self.bias)
        rm, rv = torch.from_numpy(self.running_mean), torch.from_numpy(self.running_var)
        rm_train, rv_train = rm.clone(), rv.clone()
        out = torch.from_numpy(self.out)
        c = self.shape[1]
        save_mean, save_invstd = torch.empty(c, dtype=x.dtype), torch.empty(c, dtype=x.dtype)
        eval_mean, eval_invstd = torch.empty(0, dtype=x.dtype), torch.empty(0, dtype=x.dtype)
        with torch.inference_mode():
            _, mean, invstd = bn(x, w, b, None, None, True, MOMENTUM, EPS)
        dw, db = torch.empty(c, dtype=x.dtype), torch.empty(c, dtype=x.dtype)
        mask = [True, True, True]
        return {
            "train": {
                "default": lambda: bn(x, w, b, rm_train, rv_train, True, MOMENTUM, EPS),
                "out": lambda: bn.out(x, w, b, rm_train, rv_train, True, MOMENTUM, EPS,
                                      out=out, save_mean=save_mean, save_invstd=save_invstd),
            },
            "eval": {
                "default": lambda: bn(x, w, b, rm, rv, False, MOMENTUM, EPS),
                "out": lambda: bn.out(x, w, b, rm, rv, False, MOMENTUM, EPS,
                                      out=out, save_mean=eval_mean, save_invstd=eval_invstd),
            },
            "backward": {
                "default": lambda: bn_backward(dy, x, w, rm, rv, mean, invstd, True, EPS, mask),
                "out": lambda: bn_backward.out(dy, x, w, rm, rv, mean, invstd, True, EPS, mask,
                                               out0=out, out1=dw, out2=db),
            },
        }


def bytes_moved(op, nbytes):
    """The least traffic an operation needs: every input read and the output
    written once."""
    return (3 if op == "backward" else 2) * nbytes


# ---------------------------------------------------------------------------
# The run.

def run(shapes, dtypes, threads, reps, warmup, min_time, use_torch=True, numpy_limit=None,
        bandwidth_mib=256, progress=None):
    """Measure every shape and dtype; returns the result dict that --json writes.

    numpy_limit: time the NumPy reference on shapes with at most this many
    elements (None: never; math.inf: always).
    """
    torch = _import_torch() if use_torch else None
    limits = _set_threads(threads, torch)
    try:
        info = machine_info(threads, torch, torch.get_num_threads() if torch else None)
        bandwidth = measure_bandwidth(threads, mib=bandwidth_mib)
        rows = []
        for dtype in dtypes:
            for shape in shapes:
                if progress:
                    progress(f"{np.dtype(dtype).name} {shape_text(shape)}")
                rows.extend(_measure_case(shape, dtype, threads, reps, warmup, min_time,
                                          torch, numpy_limit, bandwidth["gbps"]))
    finally:
        if limits is not None:
            limits.restore_original_limits()
    result = {
        "machine": info,
        "settings": {
            "threads": threads, "reps": reps, "warmup": warmup, "min_time": min_time,
            "dtypes": [np.dtype(d).name for d in dtypes],
            "shapes": [list(s) for s in shapes],
            "torch": torch is not None,
            "numpy_reference": _numpy_policy(numpy_limit),
            "numpy_max_elements": (None if numpy_limit is None or math.isinf(numpy_limit)
                                   else numpy_limit),
            "timing": "min and median over interleaved repetitions after warm-up; "
                      "outputs preallocated; seconds per call",
        },
        "bandwidth": bandwidth,
        "results": rows,
    }
    result["summary"] = summarize(rows)
    result["targets"] = check_targets(rows, threads, torch is not None)
    return result


def _numpy_policy(numpy_limit):
    if numpy_limit is None:
        return "skipped (--no-numpy)"
    if math.isinf(numpy_limit):
        return "every shape"
    return f"shapes of at most {numpy_limit} elements (--full: every shape)"


def _set_threads(threads, torch):
    """Give cybn (OpenMP) and torch `threads` threads; returns the threadpoolctl
    limiter to restore, or None."""
    limits = None
    if cybn.max_threads() != threads:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            raise SystemExit(
                f"cybn.bench: cybn runs {cybn.max_threads()} threads and threadpoolctl "
                f"is not installed to change that to {threads} (pip install threadpoolctl, "
                f"or set OMP_NUM_THREADS={threads})") from None
        limits = threadpool_limits(limits=threads, user_api="openmp")
    if torch is not None:
        torch.set_num_threads(threads)
    if cybn.max_threads() != threads:
        print(f"cybn.bench: warning: cybn runs {cybn.max_threads()} threads, "
              f"not {threads}", file=sys.stderr)
    return limits


def _measure_case(shape, dtype, threads, reps, warmup, min_time, torch, numpy_limit,
                  limit_gbps):
    case = Case(shape, dtype)
    cybn_fns = case.cybn_fns()
    torch_fns = case.torch_fns(torch) if torch is not None else None
    numpy_fns = (case.numpy_fns()
                 if numpy_limit is not None and case.x.size <= numpy_limit else None)
    rows = []
    timings = {}
    for op in OPS:
        group = {"cybn": cybn_fns[op]}
        if torch_fns is not None:
            group["torch-default"] = torch_fns[op]["default"]
            group["torch-out"] = torch_fns[op]["out"]
        if torch is not None:
            with torch.inference_mode():
                timings[op] = time_group(group, reps, warmup, min_time)
        else:
            timings[op] = time_group(group, reps, warmup, min_time)
        if numpy_fns is not None:
            timings[op]["numpy"] = time_group({"numpy": numpy_fns[op]}, min(reps, 3),
                                              1, min_time)["numpy"]
    eval_time = timings["eval"]["cybn"].min
    for op in OPS:
        t = timings[op]
        cybn_t = t["cybn"]
        torch_t, variant = None, None
        if "torch-out" in t:
            variant = "out" if t["torch-out"].min <= t["torch-default"].min else "default"
            torch_t = t["torch-" + variant]
        numpy_t = t.get("numpy")
        moved = bytes_moved(op, case.x.nbytes)
        gbps = moved / cybn_t.min / 1e9
        rows.append({
            "shape": list(shape),
            "set": shape_set(shape),
            "dtype": case.dtype.name,
            "op": op,
            "channels": shape[1],
            "cybn": cybn_t.as_dict(),
            "torch": None if torch_t is None else dict(
                torch_t.as_dict(), variant=variant,
                default_min=t["torch-default"].min, out_min=t["torch-out"].min),
            "numpy": None if numpy_t is None else numpy_t.as_dict(),
            "speedup_torch": None if torch_t is None else torch_t.min / cybn_t.min,
            "speedup_numpy": None if numpy_t is None else numpy_t.min / cybn_t.min,
            "bytes": moved,
            "gbps": gbps,
            "fraction_of_limit": gbps / limit_gbps,
            "ratio_to_eval": cybn_t.min / eval_time,
            "peak_extra_bytes": peak_extra_bytes(cybn_fns[op]),
            "peak_limit_bytes": peak_limit(threads, shape[1]),
        })
    return rows


# ---------------------------------------------------------------------------
# Summary and targets.

def geomean(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summarize(rows):
    """Geometric means over the ResNet-50 shapes, per dtype."""
    summary = {}
    for dtype in sorted({r["dtype"] for r in rows}):
        sel = [r for r in rows if r["dtype"] == dtype and r["set"] == "resnet50"]
        entry = {"n_shapes": len({tuple(r["shape"]) for r in sel})}
        for key in ("speedup_torch", "speedup_numpy", "ratio_to_eval", "fraction_of_limit"):
            entry[key] = {op: geomean([r[key] for r in sel if r["op"] == op]) for op in OPS}
        summary[dtype] = entry
    return summary


def _target(name, dtype, passed, detail, value=None, threshold=None):
    return {"name": name, "dtype": dtype, "passed": passed, "value": value,
            "threshold": threshold, "detail": detail}


def _worst(rows, key, highest=False):
    pick = max if highest else min
    row = pick(rows, key=lambda r: r[key])
    return row[key], f"{shape_text(row['shape'])} {row['op']}"


def _why_not(have_torch, selected):
    return "no such shape in this run" if not selected else "torch is not installed"


def _lowest_speedup_target(name, dtype, selected, have_torch, bound):
    """Passes when every selected row is at least `bound` times faster than torch."""
    if not (have_torch and selected):
        return _target(name, dtype, None, _why_not(have_torch, selected))
    low, where = _worst(selected, "speedup_torch")
    return _target(name, dtype, low >= bound, f"lowest {low:.2f}x at {where}", low, bound)


def check_targets(rows, threads, have_torch):
    """The performance goals of issue 3, judged on the rows measured.
    passed is True, False, or None where this run cannot tell."""
    targets = []
    for dtype in sorted({r["dtype"] for r in rows}):
        mine = [r for r in rows if r["dtype"] == dtype]
        resnet = [r for r in mine if r["set"] == "resnet50"]
        n_resnet = len({tuple(r["shape"]) for r in resnet})
        known = [r for r in mine if r["set"] != "custom"]  # the shapes
        sized = [r for r in known if r["set"] != "overhead"]
        for op in ("train", "backward"):
            name = (f"{op} vs torch: ResNet-50 geomean >= {TARGET_GEOMEAN:g}x, "
                    f"none < {TARGET_MIN:g}x")
            sel = [r for r in resnet if r["op"] == op]
            if not have_torch or not sel:
                targets.append(_target(name, dtype, None, _why_not(have_torch, sel)))
                continue
            g = geomean(r["speedup_torch"] for r in sel)
            low, where = _worst(sel, "speedup_torch")
            note = "" if n_resnet == len(RESNET50_SHAPES) else f" ({n_resnet} of 9 shapes)"
            targets.append(_target(
                name, dtype, g >= TARGET_GEOMEAN and low >= TARGET_MIN,
                f"geomean {g:.2f}x, lowest {low:.2f}x at {where}{note}", g, TARGET_GEOMEAN))
        targets.append(_lowest_speedup_target(
            f"eval vs torch >= {TARGET_EVAL:g}x on every shape", dtype,
            [r for r in known if r["op"] == "eval"], have_torch, TARGET_EVAL))
        for op, bound in (("train", TARGET_TRAIN_OVER_EVAL),
                          ("backward", TARGET_BACKWARD_OVER_EVAL)):
            name = f"{op} time <= {bound:g} x cybn eval time (every shape but the overhead case)"
            sel = [r for r in sized if r["op"] == op]
            if sel:
                high, where = _worst(sel, "ratio_to_eval", highest=True)
                targets.append(_target(name, dtype, high <= bound,
                                       f"highest {high:.2f} at {where}", high, bound))
            else:
                targets.append(_target(name, dtype, None, _why_not(True, sel)))
        targets.append(_lowest_speedup_target(
            f"2-D and 1x1 shapes vs torch >= {TARGET_WIDE:g}x (train, eval, backward)", dtype,
            [r for r in mine if r["set"] == "wide"], have_torch, TARGET_WIDE))
        name = "per-call overhead at 2x8x4x4 no worse than torch's"
        sel = [r for r in mine if r["set"] == "overhead"]
        if have_torch and sel:
            low, where = _worst(sel, "speedup_torch")
            detail = ", ".join(f"{r['op']} {r['cybn']['min'] * 1e6:.1f} vs "
                               f"{r['torch']['min'] * 1e6:.1f} us" for r in sel)
            targets.append(_target(name, dtype, low >= 1.0, detail, low, 1.0))
        else:
            targets.append(_target(name, dtype, None, _why_not(have_torch, sel)))
        name = (f"extra memory with out= given <= {PEAK_BASE // 1024} KiB + "
                f"{PEAK_PER_CHANNEL} B x (threads + 2) x C")
        over = [r for r in mine if r["peak_extra_bytes"] > r["peak_limit_bytes"]]
        worst = max(mine, key=lambda r: r["peak_extra_bytes"] / r["peak_limit_bytes"])
        detail = (f"largest {_bytes_text(worst['peak_extra_bytes'])} of "
                  f"{_bytes_text(worst['peak_limit_bytes'])} allowed at "
                  f"{shape_text(worst['shape'])} {worst['op']}")
        if over:
            detail += f"; {len(over)} over the bound"
        targets.append(_target(name, dtype, not over, detail))
    return targets


# ---------------------------------------------------------------------------
# Printing.

def _time_text(seconds):
    if seconds is None:
        return "n/a"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale or unit == "us":
            v = seconds / scale
            digits = 2 if v < 10 else 1 if v < 100 else 0
            return f"{v:.{digits}f} {unit}"
    return None  # unreachable


def _bytes_text(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return None  # unreachable


def _ratio_text(value, suffix="x"):
    return "n/a" if value is None else f"{value:.2f}{suffix}"


COLUMNS = [
    # header, width, cell
    ("shape", 15, lambda r, first: shape_text(r["shape"]) if first else ""),
    ("op", 8, lambda r, first: r["op"]),
    ("cybn min", 10, lambda r, first: _time_text(r["cybn"]["min"])),
    ("cybn med", 10, lambda r, first: _time_text(r["cybn"]["median"])),
    ("torch min", 10, lambda r, first: _time_text(r["torch"] and r["torch"]["min"])),
    ("via", 7, lambda r, first: r["torch"]["variant"] if r["torch"] else "n/a"),
    ("numpy min", 10, lambda r, first: _time_text(r["numpy"] and r["numpy"]["min"])),
    ("vs torch", 8, lambda r, first: _ratio_text(r["speedup_torch"])),
    ("vs numpy", 8, lambda r, first: _ratio_text(r["speedup_numpy"])),
    ("GB/s", 6, lambda r, first: f"{r['gbps']:.1f}"),
    ("limit", 5, lambda r, first: f"{100 * r['fraction_of_limit']:.0f}%"),
    ("/eval", 5, lambda r, first: f"{r['ratio_to_eval']:.2f}"),
    ("extra mem", 10, lambda r, first: _bytes_text(r["peak_extra_bytes"])),
]


def _line(cells):
    parts = []
    for (header, width, _), cell in zip(COLUMNS, cells):
        parts.append(cell.ljust(width) if header in ("shape", "op", "via") else cell.rjust(width))
    return "  ".join(parts).rstrip()


def format_report(result):
    info, settings, bw = result["machine"], result["settings"], result["bandwidth"]
    out = [
        "cybn benchmark: " + machine_line(info),
        f"threads: {settings['threads']} | timing: min and median of {settings['reps']} "
        f"interleaved reps after {settings['warmup']} warm-up call(s), outputs preallocated",
        f"memory bandwidth limit: {bw['gbps']:.1f} GB/s ({bw['method']})",
        f"torch: faster of aten.native_batch_norm[_backward] default and .out, under "
        f"inference_mode" if settings["torch"] else "torch: not installed, columns n/a",
        f"numpy: cybn.reference (float64), {settings['numpy_reference']}",
        "GB/s: bytes that must move (x + y; backward x + dy + dx) / cybn's time; "
        "limit: that over the copy bandwidth; /eval: time over cybn eval's; "
        "extra mem: peak allocation during a call with out= given",
    ]
    load = info["load_average_1min"]
    if load is not None and load >= 0.5 * info["cores_available"]:
        out.append(f"warning: the 1-minute load average was {load} on "
                   f"{info['cores_available']} cores at the start: other work is running, "
                   "and timings with several threads suffer most")
    rows = result["results"]
    noisy = [r for r in rows if r["cybn"]["median"] > 1.25 * r["cybn"]["min"]
             or (r["torch"] and r["torch"]["median"] > 1.25 * r["torch"]["min"])]
    if len(noisy) * 4 > len(rows):
        out.append(f"warning: {len(noisy)} of {len(rows)} rows have a median over 1.25x "
                   "their minimum: the machine is noisy")
    width = sum(w for _, w, _ in COLUMNS) + 2 * (len(COLUMNS) - 1)
    for dtype in settings["dtypes"]:
        rows = [r for r in result["results"] if r["dtype"] == dtype]
        if not rows:
            continue
        out += ["", f"{dtype}", _line([h for h, _, _ in COLUMNS]), "-" * width]
        previous = None
        for r in rows:
            first = r["shape"] != previous
            if first and previous is not None:
                out.append("")
            previous = r["shape"]
            out.append(_line([cell(r, first) for _, _, cell in COLUMNS]))
    out += ["", "geometric means over the ResNet-50 shapes measured:"]
    header = f"  {'dtype':8} {'shapes':>6}  {'':22}" + "".join(f"{op:>10}" for op in OPS)
    out.append(header)
    for dtype, s in result["summary"].items():
        if not s["n_shapes"]:
            out.append(f"  {dtype:8} {0:>6}  (no ResNet-50 shape in this run)")
            continue
        for key, label in (("speedup_torch", "speed-up vs torch"),
                           ("speedup_numpy", "speed-up vs numpy"),
                           ("ratio_to_eval", "time / cybn eval"),
                           ("fraction_of_limit", "fraction of limit")):
            cells = "".join(f"{_ratio_text(s[key][op], ''):>10}" for op in OPS)
            lead = f"{dtype:8} {s['n_shapes']:>6}" if key == "speedup_torch" else " " * 15
            out.append(f"  {lead}  {label:22}{cells}")
    out += ["", "targets (issue 3; judged on the issue's shapes only):"]
    for t in result["targets"]:
        mark = {True: "PASS", False: "FAIL", None: " -- "}[t["passed"]]
        out.append(f"  [{mark}] {t['dtype']:8} {t['name']}: {t['detail']}")
    return "\n".join(out)


def write_png(result, path):
    """Bar chart (log scale) of cybn's speed-ups: over torch, else over the
    NumPy reference, else its fraction of the bandwidth limit."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    rows = result["results"]
    if any(r["speedup_torch"] is not None for r in rows):
        key, label = "speedup_torch", "speed-up over PyTorch"
        lines = (1.0, TARGET_MIN, TARGET_GEOMEAN)
    elif any(r["speedup_numpy"] is not None for r in rows):
        key, label, lines = "speedup_numpy", "speed-up over NumPy reference", (1.0,)
    else:
        key, label, lines = "fraction_of_limit", "fraction of copy bandwidth", (1.0,)
    settings = result["settings"]
    shapes = [tuple(s) for s in settings["shapes"]]
    dtypes = settings["dtypes"]
    fig, axes = plt.subplots(len(dtypes), 1, squeeze=False, sharey=True,
                             figsize=(max(6.0, 0.8 * len(shapes) + 2.5), 3.3 * len(dtypes)))
    width = 0.8 / len(OPS)
    for ax, dtype in zip(axes[:, 0], dtypes):
        value = {(tuple(r["shape"]), r["op"]): r[key] for r in rows if r["dtype"] == dtype}
        for i, op in enumerate(OPS):
            xs, ys = [], []
            for j, s in enumerate(shapes):
                v = value.get((s, op))
                if v is not None and v > 0:
                    xs.append(j + (i - (len(OPS) - 1) / 2) * width)
                    ys.append(v)
            ax.bar(xs, ys, width, label=op)
        for y in lines:
            ax.axhline(y, color="gray", linewidth=0.8, linestyle="--")
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([shape_text(s) for s in shapes], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label, fontsize=9)
        ax.set_title(f"cybn, {dtype}, {settings['threads']} thread(s)", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(machine_line(result["machine"]), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------
# Command line.

# ---------------------------------------------------------------------------
# --fusions: the fused ReLU and residual add, and channels-last data (issue 6)

def _channels_last(a):
    """a's values in channels-last memory, as an NCHW-shaped view."""
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)


def fusion_fns(case):
    """cybn's fused calls, the plain ones, and the same done with NumPy."""
    x, dy, out, w, b = case.x, case.dy, case.out, case.weight, case.bias
    rm, rv = case.running_mean.copy(), case.running_var.copy()
    residual = np.random.default_rng(1).standard_normal(case.shape).astype(case.dtype)
    y_relu, mean, invstd = cybn.forward_train(x, w, b, residual=residual, activation="relu")
    dx, grad_residual, masked = np.empty_like(x), np.empty_like(x), np.empty_like(x)

    def separate_forward():
        cybn.forward_train(x, w, b, rm, rv, out=out)
        np.add(out, residual, out=out)
        np.maximum(out, 0, out=out)

    def separate_backward():
        np.multiply(dy, y_relu > 0, out=masked)
        cybn.backward(masked, x, mean, invstd, w, out=dx)

    return {
        "forward": {
            "plain": lambda: cybn.forward_train(x, w, b, rm, rv, out=out),
            "relu": lambda: cybn.forward_train(x, w, b, rm, rv, out=out, activation="relu"),
            "add+relu": lambda: cybn.forward_train(x, w, b, rm, rv, out=out, residual=residual,
                                                   activation="relu"),
            "separate": separate_forward,
        },
        "backward": {
            "plain": lambda: cybn.backward(dy, x, mean, invstd, w, out=dx),
            "relu": lambda: cybn.backward(dy, x, mean, invstd, w, out=dx, activation="relu",
                                          y=y_relu),
            "add+relu": lambda: cybn.backward(dy, x, mean, invstd, w, out=dx,
                                              activation="relu", y=y_relu,
                                              grad_residual=grad_residual),
            "separate": separate_backward,
        },
    }


def channels_last_fns(case, torch):
    x, dy = _channels_last(case.x), _channels_last(case.dy)
    out, w, b = _channels_last(case.out), case.weight, case.bias
    rm, rv = case.running_mean.copy(), case.running_var.copy()
    _, mean, invstd = cybn.forward_train(x, w, b)
    fns = {"train": {"cybn": lambda: cybn.forward_train(x, w, b, rm, rv, out=out)},
           "backward": {"cybn": lambda: cybn.backward(dy, x, mean, invstd, w, out=out)}}
    if torch is not None:
        aten = torch.ops.aten
        xt, dyt, outt = torch.from_numpy(x), torch.from_numpy(dy), torch.from_numpy(out)
        assert xt.is_contiguous(memory_format=torch.channels_last)
        wt, bt = torch.from_numpy(w), torch.from_numpy(b)
        rmt, rvt = torch.from_numpy(case.running_mean.copy()), torch.from_numpy(rv.copy())
        c = case.shape[1]
        save_mean, save_invstd = torch.empty(c, dtype=xt.dtype), torch.empty(c, dtype=xt.dtype)
        with torch.inference_mode():
            _, tmean, tinvstd = aten.native_batch_norm(xt, wt, bt, None, None, True, MOMENTUM, EPS)
        fns["train"]["torch"] = lambda: aten.native_batch_norm(
            xt, wt, bt, rmt, rvt, True, MOMENTUM, EPS)
        fns["train"]["torch .out"] = lambda: aten.native_batch_norm.out(
            xt, wt, bt, rmt, rvt, True, MOMENTUM, EPS, out=outt, save_mean=save_mean,
            save_invstd=save_invstd)
        fns["backward"]["torch"] = lambda: aten.native_batch_norm_backward(
            dyt, xt, wt, rmt, rvt, tmean, tinvstd, True, EPS, [True, True, True])
    return fns


def run_fusions(shapes, dtypes, threads, reps, warmup, min_time, use_torch=True,
                progress=None):
    torch = _import_torch() if use_torch else None
    _set_threads(threads, torch)
    rows = []
    for dtype in dtypes:
        for shape in shapes:
            if len(shape) != 4:
                continue
            if progress:
                progress(f"fusions {np.dtype(dtype).name} {shape_text(shape)}")
            case = Case(shape, dtype)
            row = {"shape": list(shape), "dtype": np.dtype(dtype).name}
            for op, fns in fusion_fns(case).items():
                t = {k: v.min for k, v in time_group(fns, reps, warmup, min_time).items()}
                row[op] = t
            ctx = torch.inference_mode() if torch is not None else _null_context()
            with ctx:
                for op, fns in channels_last_fns(case, torch).items():
                    t = {k: v.min for k, v in time_group(fns, reps, warmup, min_time).items()}
                    row["channels_last_" + op] = t
            rows.append(row)
    return {"machine": machine_info(threads, torch, threads if torch else None),
            "rows": rows}


class _null_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def format_fusions(result):
    lines = [machine_line(result["machine"]), "",
             "relu: y = relu(bn(x)) in one pass; add+relu: y = relu(bn(x) + residual) in one "
             "pass (backward: dy masked by y > 0, grad_residual written); separate: cybn, then "
             "NumPy add and maximum (backward: NumPy mask, then cybn); CL: channels-last, "
             "NCHW-shaped views of NHWC memory, PyTorch on the same memory (channels_last "
             "tensors); ratios of times, or PyTorch's time / cybn's", ""]
    header = ["dtype", "shape", "fwd relu/plain", "fwd separate/add+relu", "bwd relu/plain",
              "bwd separate/add+relu", "CL train vs torch", "CL bwd vs torch"]
    widths = [8, 15] + [len(h) for h in header[2:]]

    def line(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    lines.append(line(header))
    lines.append("-" * len(lines[-1]))
    ratios = {}
    for row in result["rows"]:
        fwd, bwd = row["forward"], row["backward"]
        cells = {
            "fwd relu/plain": fwd["relu"] / fwd["plain"],
            "fwd separate/add+relu": fwd["separate"] / fwd["add+relu"],
            "bwd relu/plain": bwd["relu"] / bwd["plain"],
            "bwd separate/add+relu": bwd["separate"] / bwd["add+relu"],
        }
        for op in ("train", "backward"):
            t = row["channels_last_" + op]
            torch_times = [v for k, v in t.items() if k.startswith("torch")]
            key = "CL train vs torch" if op == "train" else "CL bwd vs torch"
            cells[key] = min(torch_times) / t["cybn"] if torch_times else None
        if tuple(row["shape"]) in RESNET50_SHAPES:
            for k, v in cells.items():
                if v is not None:
                    ratios.setdefault((row["dtype"], k), []).append(v)
        lines.append(line([row["dtype"], shape_text(row["shape"])]
                          + [_ratio_text(cells[h]) for h in header[2:]]))
    lines += ["", "geometric means over the ResNet-50 shapes measured (targets: relu/plain "
              "<= 1.1, separate/add+relu >= 1.5, channels-last vs torch >= 1.5):"]
    for (dtype, key), values in sorted(ratios.items()):
        worst = max(values) if key.endswith("/plain") else min(values)
        lines.append(f"  {dtype:8s} {key:22s} {geomean(values):6.2f}  (worst {worst:.2f})")
    return "\n".join(lines)


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m cybn.bench",
        description="Time cybn's forward_train, forward_eval and backward against PyTorch's "
                    "native batch norm and the NumPy reference.")
    p.add_argument("--quick", action="store_true",
                   help="7 representative shapes, 3 repetitions (well under a minute)")
    p.add_argument("--full", action="store_true",
                   help="also time the NumPy reference on the big shapes (slow)")
    p.add_argument("--dtype", choices=("float32", "float64", "both"), default="both")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for cybn and torch (default: all available cores, "
                        f"{available_cores()} here)")
    p.add_argument("--shapes", type=parse_shapes, default=None,
                   help="comma-separated shapes such as 32x64x56x56,64x2048 "
                        "(default: ResNet-50's, the 2-D and 1x1 ones, 8x3x224x224, 2x8x4x4)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed repetitions (default 7, --quick 3)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls before timing (default 2, --quick 1)")
    p.add_argument("--bandwidth-mib", type=int, default=256, metavar="MIB",
                   help="size of the streaming copy that measures the bandwidth limit "
                        "(default 256; keep it well above the last-level cache)")
    p.add_argument("--no-torch", action="store_true", help="do not time PyTorch")
    p.add_argument("--no-numpy", action="store_true", help="do not time the NumPy reference")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--png", metavar="PATH", help="write a bar chart of the speed-ups")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--fusions", action="store_true",
                   help="time the fused ReLU / residual add and channels-last data instead "
                        "(4-d shapes only)")
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    threads = args.threads if args.threads is not None else available_cores()
    if threads < 1:
        raise SystemExit("cybn.bench: --threads must be at least 1")
    reps = args.reps if args.reps is not None else (3 if args.quick else 7)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if reps < 1 or warmup < 0 or args.bandwidth_mib < 1:
        raise SystemExit("cybn.bench: --reps and --bandwidth-mib must be at least 1, "
                         "--warmup at least 0")
    min_time = 0.002 if args.quick else 0.01
    if args.shapes is not None:
        shapes = args.shapes
    elif args.quick:
        shapes = QUICK_SHAPES
    else:
        shapes = RESNET50_SHAPES + WIDE_SHAPES + OTHER_SHAPES + OVERHEAD_SHAPES
    dtypes = ([np.float32, np.float64] if args.dtype == "both" else [np.dtype(args.dtype)])
    if args.no_numpy:
        numpy_limit = None
    elif args.full:
        numpy_limit = math.inf
    else:
        numpy_limit = NUMPY_MAX_ELEMENTS_QUICK if args.quick else NUMPY_MAX_ELEMENTS

    def progress(text):
        if not args.quiet:
            print(f"  measuring {text} ...", file=sys.stderr, flush=True)

    if args.fusions:
        if args.shapes is None:
            shapes = QUICK_SHAPES if args.quick else RESNET50_SHAPES
        result = run_fusions(shapes, dtypes, threads, reps, warmup, min_time,
                             use_torch=not args.no_torch, progress=progress)
        print(format_fusions(result), flush=True)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=1)
                f.write("\n")
        return 0
    result = run(shapes, dtypes, threads, reps, warmup, min_time,
                 use_torch=not args.no_torch, numpy_limit=numpy_limit,
                 bandwidth_mib=args.bandwidth_mib, progress=progress)
    result["settings"]["quick"] = bool(args.quick)
    print(format_report(result), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    if args.png:
        write_png(result, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
