"""Two builds of cybn side by side in one process: how every kernel change is judged.

    python benchmarks/compare_builds.py OLD NEW [--shapes 32x64x56x56,64x2048]
                                        [--dtypes float32,float64] [--rounds 5]

OLD and NEW are each a directory holding a built cybn package (a checkout
after `python setup.py build_ext --inplace`) or a git revision of this
repository, which is then checked out into a temporary directory and built
there (a few minutes).  Both builds are imported into this process, and for
every shape, dtype and operation (train, eval, backward; plus the fused
residual+ReLU forward and channels-last with --all) the two are timed
alternately, `--rounds` times each; the table shows each side's median and
their ratio (old time / new time: above 1 means the new build is faster).
Both run with the same threads (OpenMP's default, or --threads through
threadpoolctl).  Nothing passes or fails: read the ratios against the
machine's noise, e.g. by comparing a build with itself.
"""
import argparse
import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHAPES = ("32x64x56x56,32x256x14x14,32x512x7x7,32x2048x7x7,256x512x1x1,"
                  "4096x1024,64x2048,8x3x224x224,2x8x4x4")


def load_build(directory):
    """Import the cybn package under `directory` and return it; the modules stay
    reachable through the returned package even after another build is imported."""
    for name in [n for n in sys.modules if n == "cybn" or n.startswith("cybn.")]:
        del sys.modules[name]
    sys.path.insert(0, str(directory))
    try:
        package = importlib.import_module("cybn")
    finally:
        sys.path.remove(str(directory))
    if Path(package.__file__).resolve().parent != (Path(directory) / "cybn").resolve():
        raise SystemExit(f"{directory} holds no built cybn (imported {package.__file__})")
    return package


def checkout_and_build(revision, scratch):
    """A build of `revision` of this repository in a new directory under scratch."""
    target = Path(scratch) / revision.replace("/", "_")
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(target),
                    revision], check=True, stdout=subprocess.DEVNULL)
    print(f"building {revision} in {target} ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=target,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return target


def cases(cybn, shape, dtype, all_cases):
    """(operation, zero-argument function) pairs on fixed data, outputs preallocated."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    out = np.empty_like(x)
    c = shape[1]
    running_mean, running_var = np.zeros(c, dtype), np.ones(c, dtype)
    _, mean, invstd = cybn.forward_train(x)
    yield "train", lambda: cybn.forward_train(x, None, None, running_mean, running_var, out=out)
    yield "eval", lambda: cybn.forward_eval(x, running_mean, running_var, out=out)
    yield "backward", lambda: cybn.backward(dy, x, mean, invstd, out=out)
    if all_cases and len(shape) > 2:
        yield "train+res+relu", lambda: cybn.forward_train(x, out=out, residual=dy,
                                                           activation="relu")
        nhwc = np.ascontiguousarray(np.moveaxis(x, 1, -1))
        nhwc_out = np.empty_like(nhwc)
        yield "train NHWC", lambda: cybn.forward_train(nhwc, axis=-1, out=nhwc_out)


def best_time(fn, min_time=0.02):
    """The best time per call over batches of calls lasting at least min_time."""
    fn()
    number, start = 1, time.perf_counter()
    fn()
    once = time.perf_counter() - start
    number = max(1, int(min_time / max(once, 1e-7)))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best


def compare(old, new, shapes, dtypes, rounds, all_cases):
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            old_cases, new_cases = cases(old, shape, dtype, all_cases), cases(new, shape, dtype,
                                                                             all_cases)
            for (op, old_fn), (_, new_fn) in zip(old_cases, new_cases):
                times = {"old": [], "new": []}
                for _ in range(rounds):  # interleaved, so that drift hits both
                    times["old"].append(best_time(old_fn))
                    times["new"].append(best_time(new_fn))
                old_t, new_t = (statistics.median(times[k]) for k in ("old", "new"))
                rows.append((shape, np.dtype(dtype).name, op, old_t, new_t))
                print(format_row(rows[-1]), flush=True)
    return rows


def format_row(row):
    shape, dtype, op, old_t, new_t = row
    return (f"{'x'.join(map(str, shape)):>16} {dtype:>8} {op:>15} {old_t * 1e6:>11.1f} "
            f"{new_t * 1e6:>11.1f} {old_t / new_t:>7.2f}x")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", help="directory with a built cybn, or a git revision")
    parser.add_argument("new", help="directory with a built cybn, or a git revision")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES)
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--all", action="store_true", help="also fusions and channels-last")
    args = parser.parse_args(argv)
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",") if s]
    dtypes = [np.dtype(d) for d in args.dtypes.split(",")]
    with tempfile.TemporaryDirectory() as scratch:
        roots = [Path(a) if Path(a).is_dir() else checkout_and_build(a, scratch)
                 for a in (args.old, args.new)]
        try:
            old, new = (load_build(root) for root in roots)
            print(f"old: {old.__file__}\nnew: {new.__file__}\nthreads: "
                  f"{args.threads or 'default'}, median of {args.rounds} interleaved rounds")
            print(f"{'shape':>16} {'dtype':>8} {'op':>15} {'old (us)':>11} {'new (us)':>11} "
                  f"{'old/new':>8}")
            if args.threads:
                from threadpoolctl import threadpool_limits
                with threadpool_limits(args.threads):
                    compare(old, new, shapes, dtypes, args.rounds, args.all)
            else:
                compare(old, new, shapes, dtypes, args.rounds, args.all)
        finally:
            for root in roots:
                if str(root).startswith(scratch):
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                    str(root)], check=False)


if __name__ == "__main__":
    main()
