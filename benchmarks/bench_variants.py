"""Batch renormalization and ghost batches (docs/variants.md) next to plain
batch norm (cybn >= the commit that added them; older commits skip these
benchmarks).

asv times each call with outputs preallocated.  Run as a script,
`python -m benchmarks.bench_variants`, it prints the cost of each variant
over plain batch norm on ResNet-50's shapes at batch 32 (the table in
docs/variants.md): the calls interleaved in one process, medians of
--repeats runs.
"""
import argparse
import inspect
import math
import time

import numpy as np

import cybn

from . import EPS, MOMENTUM, Benchmark, Data

RENORM = (3.0, 5.0)  # the paper's final limits: r and d are clipped on this data
# ResNet-50's batch-norm inputs at batch 32.
RESNET50_SHAPES = [
    (32, 64, 112, 112), (32, 256, 56, 56), (32, 64, 56, 56),
    (32, 512, 28, 28), (32, 128, 28, 28), (32, 1024, 14, 14),
    (32, 256, 14, 14), (32, 2048, 7, 7), (32, 512, 7, 7),
]


def _ghost_batch_size(n_batch):
    """Four ghost batches of 8 at batch 32; one ghost batch when N is not a multiple of 8."""
    return 8 if n_batch % 8 == 0 else n_batch


class _Calls:
    """The calls compared: plain, renorm and ghost forward and backward, on Data d."""

    def __init__(self, d):
        self.d = d
        self.ghost = _ghost_batch_size(d.shape[0])
        self.rm, self.rv = d.running_mean.copy(), d.running_var.copy()
        _, self.mean, self.invstd, self.r, self.d_shift = cybn.forward_train(
            d.x, d.weight, d.bias, d.running_mean.copy(), d.running_var.copy(), renorm=RENORM)
        _, self.ghost_mean, self.ghost_invstd = cybn.forward_train(
            d.x, d.weight, d.bias, ghost_batch_size=self.ghost)

    def forward_plain(self):
        d = self.d
        cybn.forward_train(d.x, d.weight, d.bias, self.rm, self.rv, momentum=MOMENTUM, eps=EPS,
                           out=d.out)

    def forward_renorm(self):
        d = self.d
        cybn.forward_train(d.x, d.weight, d.bias, self.rm, self.rv, momentum=MOMENTUM, eps=EPS,
                           out=d.out, renorm=RENORM)

    def forward_ghost(self):
        d = self.d
        cybn.forward_train(d.x, d.weight, d.bias, self.rm, self.rv, momentum=MOMENTUM, eps=EPS,
                           out=d.out, ghost_batch_size=self.ghost)

    def backward_plain(self):
        d = self.d
        cybn.backward(d.dy, d.x, self.mean, self.invstd, d.weight, out=d.out)

    def backward_renorm(self):
        d = self.d
        cybn.backward(d.dy, d.x, self.mean, self.invstd, d.weight, out=d.out,
                      renorm=(self.r, self.d_shift))

    def backward_ghost(self):
        d = self.d
        cybn.backward(d.dy, d.x, self.ghost_mean, self.ghost_invstd, d.weight, out=d.out,
                      ghost_batch_size=self.ghost)


class Variants(Benchmark):
    """Time per call of the variants; compare with bench_functional's plain calls."""

    def setup(self, dtype, shape, threads):
        if "renorm" not in inspect.signature(cybn.forward_train).parameters:
            raise NotImplementedError("this cybn has no batch renormalization")
        super().setup(dtype, shape, threads)
        self.calls = _Calls(self.data)
        for name in ("forward_renorm", "forward_ghost", "backward_renorm", "backward_ghost"):
            getattr(self.calls, name)()  # warm-up

    def time_forward_renorm(self, dtype, shape, threads):
        self.calls.forward_renorm()

    def time_forward_ghost(self, dtype, shape, threads):
        self.calls.forward_ghost()

    def time_backward_renorm(self, dtype, shape, threads):
        self.calls.backward_renorm()

    def time_backward_ghost(self, dtype, shape, threads):
        self.calls.backward_ghost()


def cost_table(shapes, dtype="float32", repeats=15, statistic=np.median,
               clock=time.perf_counter):
    """Per shape, the median (or `statistic`) time of each call and its ratio
    to plain's, the calls interleaved; then the geometric means of the ratios."""
    names = ("forward_plain", "forward_renorm", "forward_ghost",
             "backward_plain", "backward_renorm", "backward_ghost")
    lines = [f"{'shape':>18} " + " ".join(f"{n:>15}" for n in names)]
    ratios = {n: [] for n in names}
    for shape in shapes:
        calls = _Calls(Data(dtype, "x".join(map(str, shape))))
        functions = [getattr(calls, n) for n in names]
        for f in functions:
            f()
        times = {n: [] for n in names}
        for _ in range(repeats):
            for n, f in zip(names, functions):
                start = clock()
                f()
                times[n].append(clock() - start)
        median = {n: float(statistic(t)) for n, t in times.items()}
        cells = []
        for n in names:
            plain = median[n.split("_")[0] + "_plain"]
            ratios[n].append(median[n] / plain)
            cells.append(f"{median[n] * 1e3:8.3f} ({median[n] / plain:.2f}x)")
        lines.append(f"{str(shape):>18} " + " ".join(f"{c:>15}" for c in cells))
    lines.append(f"{'geometric mean':>18} " + " ".join(
        f"{math.exp(np.mean(np.log(ratios[n]))):14.2f}x" for n in names))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description="the cost of the variants over plain batch norm")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None,
                        help="OpenMP threads (threadpoolctl; default: cybn's default)")
    parser.add_argument("--statistic", choices=("median", "min"), default="median",
                        help="min: the fastest run, robust to other processes on the cores")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: the process's CPU time (with --threads 1, the work done, "
                             "whatever else runs on the cores)")
    args = parser.parse_args(argv)
    limits = None
    if args.threads is not None:
        from threadpoolctl import threadpool_limits
        limits = threadpool_limits(limits=args.threads, user_api="openmp")
    try:
        print(f"cybn {cybn.__version__}, {cybn.max_threads()} threads, {args.dtype}, "
              f"{args.statistic} of {args.repeats} interleaved runs, {args.clock} ms "
              f"(ratio to plain); "
              f"renorm={RENORM}, ghost batches of 8")
        print(cost_table(RESNET50_SHAPES, args.dtype, args.repeats,
                         np.median if args.statistic == "median" else np.min,
                         time.perf_counter if args.clock == "wall" else time.process_time))
    finally:
        if limits is not None:
            limits.restore_original_limits()


if __name__ == "__main__":
    main()
