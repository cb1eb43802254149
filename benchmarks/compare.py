"""Side-by-side timing of cybn against PyTorch, JAX/XLA and the NumPy reference.

    python benchmarks/compare.py                        # default shapes, float32
    python benchmarks/compare.py --shapes 32x64x56x56,64x2048 --dtype both --threads 1
    python benchmarks/compare.py --json out.json --png out.png --target train:torch=2
    python benchmarks/compare.py --docs                 # the documented run (see below)
    python benchmarks/compare.py --render-docs          # tables from the committed JSON only

For every shape and dtype it times three operations:

    train     cybn.forward_train(out=)     torch native_batch_norm(training=True)   jax.jit
    eval      cybn.forward_eval(out=)      torch native_batch_norm(training=False)  jax.jit
    backward  cybn.backward(out=)          torch native_batch_norm_backward         jax.jit

PyTorch's time is the faster of its allocating call and its `.out` overload,
under torch.inference_mode.  JAX runs one jitted function per operation,
written from the same formulas (statistics, running-statistic update, the
training backward), on arrays already on the device; the time includes
block_until_ready.  All implementations of one shape and operation are timed
side by side in one process, their repetitions interleaved so that a change
in the machine's load hits them alike; small calls are timed in batches
lasting at least `--min-time`.  Tables report the median per call.

Threads: cybn through threadpoolctl (OpenMP), PyTorch through
torch.set_num_threads, XLA through XLA_FLAGS (one thread, or its default,
every core of the process).  `--threads` defaults to every core available.

`--docs` runs the documented configuration (DOCS_SETTINGS), writes DOCS_JSON
and rewrites the tables between the markers in README.md and
docs/performance.md; `--render-docs` rewrites the tables alone.  The test
suite checks that the committed tables are what DOCS_JSON renders.

The module defines no names asv would take for benchmarks (time_*, track_*).
"""
import argparse
import contextlib
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

OPS = ("train", "eval", "backward")
OTHERS = ("torch", "jax", "numpy")
MOMENTUM = 0.1
EPS = 1e-5

DEFAULT_SHAPES = [(32, 64, 56, 56), (32, 256, 14, 14), (32, 512, 7, 7), (64, 2048),
                  (2, 8, 4, 4)]
QUICK_SHAPES = [(8, 16, 16, 16), (64, 256), (2, 8, 4, 4)]

ROOT = Path(__file__).resolve().parents[1]
DOCS_JSON = ROOT / "docs" / "benchmarks" / "compare-2core.json"
DOCS_COMMAND = "python benchmarks/compare.py --docs"
DOCS_SETTINGS = {"shapes": [(32, 64, 56, 56), (32, 256, 14, 14), (32, 512, 7, 7), (64, 2048),
                            (2, 8, 4, 4)],
                 "dtypes": ["float32"], "threads": 2, "reps": 7, "warmup": 2,
                 "min_time": 0.01, "numpy": False}
# An earlier, complete run (ResNet-50's shapes, both dtypes, PyTorch only) by
# the tool this module replaced; its geometric means are rendered as they are.
HISTORY_JSON = ROOT / "docs" / "benchmarks" / "resnet50-cybn.bench-2core.json"
# (document, kind of table, the JSON it is rendered from)
TABLES = [
    ("README.md", "summary", DOCS_JSON),
    ("docs/performance.md", "full", DOCS_JSON),
    ("docs/performance.md", "resnet50-history", HISTORY_JSON),
]


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


def parse_target(text):
    """'train:torch=2' -> ("train", "torch", 2.0): cybn at least 2x torch's speed."""
    try:
        what, ratio = text.split("=")
        op, other = what.split(":")
        ratio = float(ratio)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad target {text!r}: write OP:OTHER=RATIO, e.g. train:torch=2") from None
    if op not in OPS or other not in OTHERS or not ratio > 0:
        raise argparse.ArgumentTypeError(
            f"bad target {text!r}: OP in {OPS}, OTHER in {OTHERS}, RATIO > 0")
    return op, other, ratio


def shape_text(shape):
    return "x".join(str(n) for n in shape)


def available_cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------
# Machine.

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
    """The largest CPU cache as Linux reports it, e.g. 'L3 32768K', or None."""
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
    return None if best is None else cache_text(f"L{best[0]} {best[1]}")


def cache_text(text):
    """'L3 32768K' -> 'L3 32 MiB' (sysfs gives KiB); anything else unchanged."""
    if text:
        level, _, size = text.partition(" ")
        if size.endswith("K") and size[:-1].isdigit() and int(size[:-1]) % 1024 == 0:
            return f"{level} {int(size[:-1]) // 1024} MiB"
    return text


def _version(distribution):
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(threads):
    try:
        load = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        load = None
    return {
        "cpu": _cpu_model(),
        "last_level_cache": _last_level_cache(),
        "cores": available_cores(),
        "threads": threads,
        "load_average_1min": load,
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in ("cybn", "numpy", "torch", "jax")},
    }


# ---------------------------------------------------------------------------
# The implementations, each a dict {op: zero-argument callable}.

class Case:
    """Data for one shape and dtype, and the statistics backward takes."""

    def __init__(self, shape, dtype, seed=0):
        import cybn

        rng = np.random.default_rng(seed)
        c = shape[1]
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.x = rng.standard_normal(shape, dtype=self.dtype)
        self.dy = rng.standard_normal(shape, dtype=self.dtype)
        self.out = np.empty_like(self.x)
        self.weight = (1.0 + 0.1 * rng.standard_normal(c)).astype(self.dtype)
        self.bias = (0.1 * rng.standard_normal(c)).astype(self.dtype)
        self.running_mean = (0.1 * rng.standard_normal(c)).astype(self.dtype)
        self.running_var = (1.0 + rng.random(c)).astype(self.dtype)
        _, self.mean, self.invstd = cybn.forward_train(self.x, self.weight, self.bias)

    def cybn_fns(self):
        import cybn

        x, dy, out, w, b = self.x, self.dy, self.out, self.weight, self.bias
        rm_train, rv_train = self.running_mean.copy(), self.running_var.copy()
        rm, rv, mean, invstd = self.running_mean, self.running_var, self.mean, self.invstd
        return {
            "train": lambda: cybn.forward_train(x, w, b, rm_train, rv_train,
                                                momentum=MOMENTUM, eps=EPS, out=out)[0],
            "eval": lambda: cybn.forward_eval(x, rm, rv, w, b, eps=EPS, out=out),
            "backward": lambda: cybn.backward(dy, x, mean, invstd, w, training=True,
                                              out=out)[0],
        }

    def numpy_fns(self):
        from cybn import reference

        x, dy, w, b = self.x, self.dy, self.weight, self.bias
        rm, rv, mean, invstd = self.running_mean, self.running_var, self.mean, self.invstd
        return {
            "train": lambda: reference.forward_train(x, w, b, rm.copy(), rv.copy(),
                                                     MOMENTUM, EPS)[0],
            "eval": lambda: reference.forward_eval(x, rm, rv, w, b, EPS),
            "backward": lambda: reference.backward(dy, x, mean, invstd, w, True)[0],
        }

    def torch_fns(self, torch):
        """The faster of the allocating and the .out form of each aten call
        is chosen by the caller; both are returned, as {op: {form: fn}}."""
        aten = torch.ops.aten
        bn, bn_backward = aten.native_batch_norm, aten.native_batch_norm_backward
        x, dy = torch.from_numpy(self.x), torch.from_numpy(self.dy)
        w, b = torch.from_numpy(self.weight), torch.from_numpy(self.bias)
        rm, rv = torch.from_numpy(self.running_mean), torch.from_numpy(self.running_var)
        rm_train, rv_train = rm.clone(), rv.clone()
        out = torch.from_numpy(self.out)
        c = self.shape[1]
        save_mean, save_invstd = torch.empty(c, dtype=x.dtype), torch.empty(c, dtype=x.dtype)
        no_stats = torch.empty(0, dtype=x.dtype), torch.empty(0, dtype=x.dtype)
        mean, invstd = torch.from_numpy(self.mean), torch.from_numpy(self.invstd)
        dw, db = torch.empty(c, dtype=x.dtype), torch.empty(c, dtype=x.dtype)
        mask = [True, True, True]
        return {
            "train": {
                "default": lambda: bn(x, w, b, rm_train, rv_train, True, MOMENTUM, EPS)[0],
                "out": lambda: bn.out(x, w, b, rm_train, rv_train, True, MOMENTUM, EPS,
                                      out=out, save_mean=save_mean,
                                      save_invstd=save_invstd)[0],
            },
            "eval": {
                "default": lambda: bn(x, w, b, rm, rv, False, MOMENTUM, EPS)[0],
                "out": lambda: bn.out(x, w, b, rm, rv, False, MOMENTUM, EPS, out=out,
                                      save_mean=no_stats[0], save_invstd=no_stats[1])[0],
            },
            "backward": {
                "default": lambda: bn_backward(dy, x, w, rm, rv, mean, invstd, True, EPS,
                                               mask)[0],
                "out": lambda: bn_backward.out(dy, x, w, rm, rv, mean, invstd, True, EPS,
                                               mask, out0=out, out1=dw, out2=db)[0],
            },
        }

    def jax_fns(self, jax):
        jnp = jax.numpy
        axes = (0,) + tuple(range(2, len(self.shape)))
        per_channel = (1, self.shape[1]) + (1,) * (len(self.shape) - 2)
        m = math.prod(self.shape) // self.shape[1]

        def column(v):
            return v.reshape(per_channel)

        @jax.jit
        def train(x, w, b, running_mean, running_var):
            mean = jnp.mean(x, axis=axes)
            var = jnp.mean(jnp.square(x - column(mean)), axis=axes)
            invstd = jax.lax.rsqrt(var + EPS)
            y = (x - column(mean)) * column(invstd * w) + column(b)
            running_mean = (1 - MOMENTUM) * running_mean + MOMENTUM * mean
            running_var = (1 - MOMENTUM) * running_var + MOMENTUM * var * (m / (m - 1))
            return y, mean, invstd, running_mean, running_var

        @jax.jit
        def evaluate(x, running_mean, running_var, w, b):
            scale = w * jax.lax.rsqrt(running_var + EPS)
            return x * column(scale) + column(b - running_mean * scale)

        @jax.jit
        def backward(dy, x, mean, invstd, w):
            x_hat = (x - column(mean)) * column(invstd)
            grad_bias = jnp.sum(dy, axis=axes)
            grad_weight = jnp.sum(dy * x_hat, axis=axes)
            dx = column(w * invstd) * (dy - column(grad_bias / m)
                                       - x_hat * column(grad_weight / m))
            return dx, grad_weight, grad_bias

        x, dy = jnp.asarray(self.x), jnp.asarray(self.dy)
        w, b = jnp.asarray(self.weight), jnp.asarray(self.bias)
        rm, rv = jnp.asarray(self.running_mean), jnp.asarray(self.running_var)
        mean, invstd = jnp.asarray(self.mean), jnp.asarray(self.invstd)
        return {
            "train": lambda: jax.block_until_ready(train(x, w, b, rm, rv))[0],
            "eval": lambda: evaluate(x, rm, rv, w, b).block_until_ready(),
            "backward": lambda: jax.block_until_ready(backward(dy, x, mean, invstd, w))[0],
        }


# ---------------------------------------------------------------------------
# Timing.

def _batch(fn, number):
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return time.perf_counter() - start


def measure_interleaved(fns, reps, warmup, min_time):
    """{name: [seconds per call, one per repetition]}, the functions' batches
    of calls interleaved within each repetition."""
    numbers = {}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for name, fn in fns.items():
            for _ in range(warmup):
                fn()
            elapsed = _batch(fn, 1)
            numbers[name] = 1 if elapsed >= min_time else min(
                10**6, math.ceil(min_time / max(elapsed, 1e-7)))
        times = {name: [] for name in fns}
        for _ in range(reps):
            for name, fn in fns.items():
                times[name].append(_batch(fn, numbers[name]) / numbers[name])
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def _summary(times):
    return {"median": statistics.median(times), "min": min(times), "times": times}


def _set_threads(threads, torch):
    """Limit cybn (OpenMP) and torch to `threads`; returns the threadpoolctl
    context to undo, or None."""
    import cybn

    limits = None
    if cybn.max_threads() != threads:
        from threadpoolctl import threadpool_limits
        limits = threadpool_limits(limits=threads, user_api="openmp")
    if torch is not None:
        torch.set_num_threads(threads)
    return limits


def _import_jax(threads, dtypes):
    if threads == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false"
                                   " intra_op_parallelism_threads=1").strip()
    try:
        import jax
    except ImportError:
        return None
    if "float64" in dtypes:
        jax.config.update("jax_enable_x64", True)
    return jax


def _import_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def run(shapes, dtypes, threads, reps=7, warmup=2, min_time=0.01, use_torch=True,
        use_jax=True, use_numpy=False, targets=(), progress=None):
    """Time every shape, dtype and operation; returns what --json writes."""
    torch = _import_torch() if use_torch else None
    jax = _import_jax(threads, dtypes) if use_jax else None
    limits = _set_threads(threads, torch)
    rows = []
    try:
        for dtype in dtypes:
            for shape in shapes:
                if progress:
                    progress(f"{shape_text(shape)} {dtype}")
                rows += _measure_case(Case(shape, dtype), reps, warmup, min_time,
                                      torch, jax, use_numpy)
    finally:
        if limits is not None:
            limits.restore_original_limits()
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(threads),
        "settings": {"shapes": [list(s) for s in shapes], "dtypes": list(dtypes),
                     "threads": threads, "reps": reps, "warmup": warmup,
                     "min_time": min_time, "torch": torch is not None,
                     "jax": jax is not None, "numpy": use_numpy,
                     "jax_threads": 1 if threads == 1 else "XLA's default (all cores)"},
        "results": rows,
    }
    result["targets"] = check_targets(rows, targets)
    return result


def _faster_torch_form(times):
    """PyTorch's faster form (by median), its summary marked with the form."""
    forms = {form: _summary(times[f"torch_{form}"]) for form in ("default", "out")}
    form = min(forms, key=lambda f: forms[f]["median"])
    return dict(forms[form], form=form)


def _measure_case(case, reps, warmup, min_time, torch, jax, use_numpy):
    """One row per operation: every implementation's times, side by side."""
    fns_by_name = {"cybn": case.cybn_fns()}
    if torch is not None:
        torch_fns = case.torch_fns(torch)
        fns_by_name["torch_default"] = {op: torch_fns[op]["default"] for op in OPS}
        fns_by_name["torch_out"] = {op: torch_fns[op]["out"] for op in OPS}
    if jax is not None:
        fns_by_name["jax"] = case.jax_fns(jax)
    if use_numpy:
        fns_by_name["numpy"] = case.numpy_fns()
    rows = []
    for op in OPS:
        fns = {name: by_op[op] for name, by_op in fns_by_name.items()}
        with torch.inference_mode() if torch is not None else contextlib.nullcontext():
            times = measure_interleaved(fns, reps, warmup, min_time)
        row = {"shape": list(case.shape), "dtype": case.dtype.name, "op": op,
               "cybn": _summary(times["cybn"]),
               "torch": _faster_torch_form(times) if torch is not None else None,
               "jax": _summary(times["jax"]) if jax is not None else None,
               "numpy": _summary(times["numpy"]) if use_numpy else None}
        for other in OTHERS:
            row[f"vs_{other}"] = (row[other]["median"] / row["cybn"]["median"]
                                  if row[other] is not None else None)
        rows.append(row)
    return rows


def geomean(values):
    values = [v for v in values if v is not None]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def check_targets(rows, targets):
    """Each target (op, other, ratio): cybn at least `ratio` times as fast as
    `other` on every shape (medians).  passed is None when `other` was not run."""
    checked = []
    for op, other, ratio in targets:
        ratios = [r[f"vs_{other}"] for r in rows if r["op"] == op]
        known = [v for v in ratios if v is not None]
        passed = (min(known) >= ratio) if known and len(known) == len(ratios) else None
        checked.append({"op": op, "other": other, "ratio": ratio, "passed": passed,
                        "lowest": min(known) if known else None})
    return checked


# ---------------------------------------------------------------------------
# Text.

def format_time(seconds):
    if seconds is None:
        return "n/a"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def format_ratio(value):
    return "n/a" if value is None else f"{value:.2f}×"


def _median(entry):
    return None if entry is None else entry["median"]


def machine_line(result):
    """Two lines: date and machine, then versions."""
    m = result["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    return (f"{result['date']}; {m['cpu']}, {m['cores']} cores, "
            f"{m['last_level_cache'] or 'cache size unknown'}; {m['threads']} threads each\n"
            f"{versions}")


def format_report(result):
    """The terminal table: median time per call, speed-ups = other / cybn."""
    header = ["shape", "dtype", "op", "cybn", "torch", "jax", "numpy",
              "vs torch", "vs jax", "vs numpy"]
    widths = [14, 7, 8, 9, 9, 9, 9, 8, 7, 8]
    lines = ["cybn compared with PyTorch, JAX/XLA and NumPy: median time per call",
             machine_line(result), ""]

    def line(cells):
        return " ".join(str(c).rjust(w) if i >= 3 else str(c).ljust(w)
                        for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    lines.append(line(header))
    lines.append("-" * len(line(header)))
    for r in result["results"]:
        lines.append(line([shape_text(r["shape"]), r["dtype"], r["op"],
                           format_time(_median(r["cybn"])), format_time(_median(r["torch"])),
                           format_time(_median(r["jax"])), format_time(_median(r["numpy"])),
                           format_ratio(r["vs_torch"]), format_ratio(r["vs_jax"]),
                           format_ratio(r["vs_numpy"])]))
    lines.append("")
    lines.append("geometric means of the speed-ups (other's time / cybn's time):")
    for dtype in result["settings"]["dtypes"]:
        for op in OPS:
            rows = [r for r in result["results"] if r["dtype"] == dtype and r["op"] == op]
            parts = [f"vs {other} {format_ratio(geomean([r[f'vs_{other}'] for r in rows]))}"
                     for other in OTHERS if any(r[f"vs_{other}"] is not None for r in rows)]
            lines.append(f"  {dtype} {op}: " + (", ".join(parts) or "n/a"))
    for t in result["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "--"}[t["passed"]]
        lines.append(f"target {t['op']} vs {t['other']} >= {t['ratio']}x on every shape: "
                     f"{verdict} (lowest {format_ratio(t['lowest'])})")
    return "\n".join(lines)


def write_png(result, path):
    """A bar chart of the speed-ups (log scale), one group per shape and op."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    labels = [f"{shape_text(r['shape'])}\n{r['dtype']} {r['op']}" for r in rows]
    others = [o for o in OTHERS if any(r[f"vs_{o}"] is not None for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows)), 4))
    width = 0.8 / max(1, len(others))
    for i, other in enumerate(others):
        xs = [j + i * width for j in range(len(rows))]
        ax.bar(xs, [r[f"vs_{other}"] or 0 for r in rows], width, label=f"vs {other}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("other's time / cybn's time")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], labels, fontsize=6,
                  rotation=90)
    ax.legend()
    ax.set_title(machine_line(result), fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------
# Tables in the documents, rendered from a result.

def _table(rows, columns):
    head = "| " + " | ".join(name for name, _, _ in columns) + " |"
    rule = "|" + "|".join("---" if align == "l" else "---:" for _, align, _ in columns) + "|"
    body = ["| " + " | ".join(get(r) for _, _, get in columns) + " |" for r in rows]
    return [head, rule, *body]


def render_history(result):
    """Geometric means of a run of the former tool (its JSON format)."""
    m, s = result["machine"], result["settings"]
    lines = [f"Measured {m['date'][:16]} on {m['cpu']} ({m['cores']} cores, "
             f"{cache_text(m['last_level_cache'])}), {s['threads']} threads, cybn {m['cybn']}, "
             f"PyTorch {m['torch']}, min of {s['reps']} interleaved repetitions, "
             f"outputs preallocated; geometric means over ResNet-50's nine shapes at "
             f"batch 32 ({HISTORY_JSON.name}).", "",
             "| dtype | train vs PyTorch | eval vs PyTorch | backward vs PyTorch "
             "| train / eval | backward / eval |",
             "|---|---:|---:|---:|---:|---:|"]
    for dtype, summary in result["summary"].items():
        speed, ratio = summary["speedup_torch"], summary["ratio_to_eval"]
        lines.append(f"| {dtype} | " + " | ".join(
            [format_ratio(speed[op]) for op in OPS]
            + [f"{ratio['train']:.2f}", f"{ratio['backward']:.2f}"]) + " |")
    return "\n".join(lines)


def render(result, kind):
    """The Markdown that goes between the markers of kind 'summary' (README),
    'full' or 'resnet50-history' (docs/performance.md)."""
    if kind == "resnet50-history":
        return render_history(result)
    m = result["machine"]
    s = result["settings"]
    rows = result["results"]
    caption = (f"Measured {result['date']} on {m['cpu']} ({m['cores']} cores, "
               f"{cache_text(m['last_level_cache'])}), {s['threads']} threads for each library, "
               f"{', '.join(s['dtypes'])}, median of {s['reps']} interleaved repetitions; "
               f"reproduce with `{DOCS_COMMAND}`.")
    speed = [("vs PyTorch", "r", lambda r: format_ratio(r["vs_torch"])),
             ("vs JAX", "r", lambda r: format_ratio(r["vs_jax"]))]
    if kind == "summary":
        # One row per shape and dtype: cybn's times, then "vs PyTorch / vs JAX".
        keys = list(dict.fromkeys((tuple(r["shape"]), r["dtype"]) for r in rows))
        by_key = {(tuple(r["shape"]), r["dtype"], r["op"]): r for r in rows}
        dtype_column = len(s["dtypes"]) > 1
        head = ["shape"] + (["dtype"] if dtype_column else []) + [
            f"{op}: cybn, × PyTorch / × JAX" for op in OPS]
        lines = ["| " + " | ".join(head) + " |",
                 "|" + "|".join(["---"] * (1 + dtype_column) + ["---:"] * len(OPS)) + "|"]
        for shape, dtype in keys:
            cells = [shape_text(shape)] + ([dtype] if dtype_column else [])
            for op in OPS:
                r = by_key[(shape, dtype, op)]
                cells.append(f"{format_time(_median(r['cybn']))}, {format_ratio(r['vs_torch'])}"
                             f" / {format_ratio(r['vs_jax'])}")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join([*lines, "", caption + " ×: the other library's time over cybn's."])
    columns = [("shape", "l", lambda r: shape_text(r["shape"])),
               ("dtype", "l", lambda r: r["dtype"]),
               ("operation", "l", lambda r: r["op"]),
               ("cybn", "r", lambda r: format_time(_median(r["cybn"]))),
               ("PyTorch", "r", lambda r: format_time(_median(r["torch"]))),
               ("JAX", "r", lambda r: format_time(_median(r["jax"]))), *speed,
               ("cybn min", "r", lambda r: format_time(r["cybn"]["min"]))]
    means = [f"| {dtype} | {op} | "
             + " | ".join(format_ratio(geomean([r[f"vs_{o}"] for r in rows
                                              if r["dtype"] == dtype and r["op"] == op]))
                          for o in ("torch", "jax")) + " |"
             for dtype in s["dtypes"] for op in OPS]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    return "\n".join([caption, f"Versions: Python {m['python']}, {versions}; "
                      f"1-minute load average at the start: {m['load_average_1min']}.", "",
                      *_table(rows, columns), "",
                      "Geometric means of the speed-ups over these shapes:", "",
                      "| dtype | operation | vs PyTorch | vs JAX |", "|---|---|---:|---:|",
                      *means])


def _markers(kind):
    return (f"<!-- benchmark table ({kind}): generated by {DOCS_COMMAND}, do not edit -->",
            f"<!-- end of benchmark table ({kind}) -->")


def replace_table(text, kind, table):
    """text with what lies between the markers of `kind` replaced by table."""
    start, end = _markers(kind)
    head, sep, rest = text.partition(start)
    if not sep or end not in rest:
        raise ValueError(f"the markers of the {kind} table are missing")
    return head + start + "\n" + table + "\n" + end + rest.split(end, 1)[1]


def rendered_tables():
    """(document, kind, table) for every generated table, from the committed JSON."""
    tables = []
    for name, kind, json_path in TABLES:
        with open(json_path, encoding="utf-8") as f:
            tables.append((name, kind, render(json.load(f), kind)))
    return tables


def render_docs(root=ROOT):
    """Rewrite the generated tables in README.md and docs/performance.md from
    the committed JSON; returns the documents changed."""
    changed = []
    for name, kind, table in rendered_tables():
        path = Path(root) / name
        text = path.read_text(encoding="utf-8")
        new = replace_table(text, kind, table)
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(name)
    return sorted(set(changed))


# ---------------------------------------------------------------------------
# Command line.

def _parser():
    p = argparse.ArgumentParser(
        prog="python benchmarks/compare.py",
        description="Time cybn against PyTorch, JAX/XLA and the NumPy reference, side by side.")
    p.add_argument("--shapes", type=parse_shapes, help="NxC[xHxW...],... (default: "
                   + ",".join(map(shape_text, DEFAULT_SHAPES)) + ")")
    p.add_argument("--quick", action="store_true",
                   help="small shapes, 3 repetitions: a smoke run of a few seconds")
    p.add_argument("--dtype", choices=["float32", "float64", "both"], default="float32")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for every library (default: every core available)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 7)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    p.add_argument("--min-time", type=float, default=0.01,
                   help="seconds a timed batch of calls lasts at least (default 0.01)")
    p.add_argument("--no-torch", action="store_true", help="do not time PyTorch")
    p.add_argument("--no-jax", action="store_true", help="do not time JAX")
    p.add_argument("--numpy", action="store_true",
                   help="also time the float64 NumPy reference (slow on large shapes)")
    p.add_argument("--target", type=parse_target, action="append", default=[],
                   metavar="OP:OTHER=RATIO",
                   help="report whether cybn is RATIO times as fast as OTHER on every shape")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--png", metavar="PATH", help="write a bar chart of the speed-ups")
    p.add_argument("--docs", action="store_true",
                   help=f"run the documented configuration, write {DOCS_JSON.relative_to(ROOT)}"
                   " and the tables of README.md and docs/performance.md")
    p.add_argument("--render-docs", action="store_true",
                   help="only rewrite the documents' tables from the committed JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.render_docs:
        for name in render_docs():
            print(f"rewrote the table in {name}")
        return 0
    if args.docs:
        settings = dict(DOCS_SETTINGS)
        shapes, dtypes = settings.pop("shapes"), settings.pop("dtypes")
        threads = settings.pop("threads")
        use_numpy = settings.pop("numpy")
    else:
        shapes = args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
        dtypes = ["float32", "float64"] if args.dtype == "both" else [args.dtype]
        threads = args.threads or available_cores()
        settings = {"reps": args.reps or (3 if args.quick else 7), "warmup": args.warmup,
                    "min_time": args.min_time / 5 if args.quick else args.min_time}
        use_numpy = args.numpy

    def progress(text):
        if not args.quiet:
            print(f"... {text}", file=sys.stderr, flush=True)

    result = run(shapes, dtypes, threads, use_torch=not args.no_torch,
                 use_jax=not args.no_jax, use_numpy=use_numpy, targets=args.target,
                 progress=progress, **settings)
    if args.docs:
        result["command"] = DOCS_COMMAND
    print(format_report(result))
    json_path = DOCS_JSON if args.docs else args.json
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    if args.png:
        write_png(result, args.png)
    if args.docs:
        for name in render_docs():
            print(f"rewrote the table in {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
