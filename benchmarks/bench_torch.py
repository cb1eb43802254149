"""PyTorch's CPU batch norm on the same data, for comparison.

aten.native_batch_norm and aten.native_batch_norm_backward under
torch.inference_mode with torch.set_num_threads(threads), all cores only:
the comparison is at equal thread counts (`python benchmarks/compare.py
--threads 1` gives the one-thread comparison).  time_* call the .out overloads
(preallocated outputs, as cybn's benchmarks do); track_speedup_* time cybn
and both of torch's forms (default and .out) side by side in one process and
report the time of torch's faster form over cybn's.

Skipped (setup raises NotImplementedError) when torch is not installed, as
in the virtualenv environments of a history run: asv.conf.json leaves torch
out of the matrix, because the history tracks cybn's own speed and a 200 MB
torch in every environment would only add the comparison that
benchmarks/compare.py makes.  `asv run --python=same` in an environment with
torch includes this suite.
torch is imported in setup rather than with the module, so that the other
modules' benchmarks (peakmem_* above all) never carry it, whatever asv's
launch method.  With asv's default launch method (a fresh interpreter per
benchmark) that import is most of the run time of each benchmark here.
"""
import gc
import math
import time

import cybn

from . import EPS, MOMENTUM, THREADS, Benchmark


def _import_torch():
    try:
        import torch
    except ImportError:
        raise NotImplementedError("torch is not installed") from None
    return torch


class Torch(Benchmark):

    params = Benchmark.params[:2] + [[max(THREADS)]]

    def setup(self, dtype, shape, threads):
        torch = _import_torch()
        super().setup(dtype, shape, threads)
        self._torch_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        self._mode = torch.inference_mode()
        self._mode.__enter__()
        d = self.data
        aten = torch.ops.aten
        bn, bn_backward = aten.native_batch_norm, aten.native_batch_norm_backward
        x, dy = torch.from_numpy(d.x), torch.from_numpy(d.dy)
        w, b = torch.from_numpy(d.weight), torch.from_numpy(d.bias)
        rm, rv = torch.from_numpy(d.running_mean), torch.from_numpy(d.running_var)
        rm_train, rv_train = rm.clone(), rv.clone()
        out = torch.from_numpy(d.out)
        c = d.channels
        save_mean, save_invstd = torch.empty(c, dtype=x.dtype), torch.empty(c, dtype=x.dtype)
        no_mean, no_invstd = torch.empty(0, dtype=x.dtype), torch.empty(0, dtype=x.dtype)
        _, mean, invstd = bn(x, w, b, None, None, True, MOMENTUM, EPS)
        dw, db = torch.empty(c, dtype=x.dtype), torch.empty(c, dtype=x.dtype)
        mask = [True, True, True]
        self.torch_calls = {
            "train_default": lambda: bn(x, w, b, rm_train, rv_train, True, MOMENTUM, EPS),
            "train_out": lambda: bn.out(x, w, b, rm_train, rv_train, True, MOMENTUM, EPS,
                                        out=out, save_mean=save_mean,
                                        save_invstd=save_invstd),
            "eval_default": lambda: bn(x, w, b, rm, rv, False, MOMENTUM, EPS),
            "eval_out": lambda: bn.out(x, w, b, rm, rv, False, MOMENTUM, EPS, out=out,
                                       save_mean=no_mean, save_invstd=no_invstd),
            "backward_default": lambda: bn_backward(dy, x, w, rm, rv, mean, invstd, True,
                                                    EPS, mask),
            "backward_out": lambda: bn_backward.out(dy, x, w, rm, rv, mean, invstd, True,
                                                    EPS, mask, out0=out, out1=dw, out2=db),
        }
        cybn_rm, cybn_rv = d.running_mean.copy(), d.running_var.copy()
        self.cybn_calls = {
            "train": lambda: cybn.forward_train(d.x, d.weight, d.bias, cybn_rm, cybn_rv,
                                                momentum=MOMENTUM, eps=EPS, out=d.out),
            "eval": lambda: cybn.forward_eval(d.x, d.running_mean, d.running_var, d.weight,
                                              d.bias, eps=EPS, out=d.out),
            "backward": lambda: cybn.backward(d.dy, d.x, d.mean, d.invstd, d.weight,
                                              training=True, out=d.out),
        }
        for call in self.torch_calls.values():  # warm-up
            call()

    def teardown(self, dtype, shape, threads):
        mode = getattr(self, "_mode", None)
        if mode is not None:
            mode.__exit__(None, None, None)
            self._mode = None
            _import_torch().set_num_threads(self._torch_threads)
        super().teardown(dtype, shape, threads)

    # -- PyTorch's times ------------------------------------------------------

    def time_train(self, dtype, shape, threads):
        self.torch_calls["train_out"]()

    def time_eval(self, dtype, shape, threads):
        self.torch_calls["eval_out"]()

    def time_backward(self, dtype, shape, threads):
        self.torch_calls["backward_out"]()

    # -- speed-ups measured side by side ---------------------------------------

    def _speedup(self, op, reps=5, min_time=0.005):
        """min time of torch's faster form over cybn's, with interleaved
        repetitions, each a batch of calls lasting at least min_time."""
        fns = [self.cybn_calls[op], self.torch_calls[op + "_default"],
               self.torch_calls[op + "_out"]]
        numbers = []
        for fn in fns:
            fn()
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            numbers.append(max(1, math.ceil(min_time / max(elapsed, 1e-7))))
        best = [math.inf] * len(fns)
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            for _ in range(reps):
                for i, (fn, number) in enumerate(zip(fns, numbers)):
                    start = time.perf_counter()
                    for _ in range(number):
                        fn()
                    best[i] = min(best[i], (time.perf_counter() - start) / number)
        finally:
            if gc_was_enabled:
                gc.enable()
        return min(best[1:]) / best[0]

    def track_speedup_train(self, dtype, shape, threads):
        return self._speedup("train")

    def track_speedup_eval(self, dtype, shape, threads):
        return self._speedup("eval")

    def track_speedup_backward(self, dtype, shape, threads):
        return self._speedup("backward")

    track_speedup_train.unit = "x (torch time / cybn time)"
    track_speedup_eval.unit = "x (torch time / cybn time)"
    track_speedup_backward.unit = "x (torch time / cybn time)"
