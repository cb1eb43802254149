"""cybn's functional API: forward_train, forward_eval, backward with out= given."""
import tracemalloc

import cybn

from . import EPS, MOMENTUM, Benchmark


class Functional(Benchmark):
    """Time per call, outputs preallocated."""

    def setup(self, dtype, shape, threads):
        super().setup(dtype, shape, threads)
        d = self.data
        self.rm_train, self.rv_train = d.running_mean.copy(), d.running_var.copy()
        # Warm-up: first-call costs (page faults, lazy imports) stay out of the timing.
        self.time_forward_train(dtype, shape, threads)
        self.time_forward_eval(dtype, shape, threads)
        self.time_backward(dtype, shape, threads)

    def time_forward_train(self, dtype, shape, threads):
        d = self.data
        cybn.forward_train(d.x, d.weight, d.bias, self.rm_train, self.rv_train,
                           momentum=MOMENTUM, eps=EPS, out=d.out)

    def time_forward_eval(self, dtype, shape, threads):
        d = self.data
        cybn.forward_eval(d.x, d.running_mean, d.running_var, d.weight, d.bias,
                          eps=EPS, out=d.out)

    def time_backward(self, dtype, shape, threads):
        d = self.data
        cybn.backward(d.dy, d.x, d.mean, d.invstd, d.weight, training=True, out=d.out)

    def time_backward_eval_mode(self, dtype, shape, threads):
        d = self.data
        cybn.backward(d.dy, d.x, d.mean, d.invstd, d.weight, training=False, out=d.out)


class Memory(Benchmark):
    """Memory with out= given: cybn should need only O(threads x C) beyond
    its arguments.

    peakmem_* is the peak resident size of the whole benchmark process
    (inputs and outputs included), so a full-size temporary shows as a jump of
    one array's size; track_extra_bytes_* counts, with tracemalloc, the bytes
    allocated during one call beyond those held before it.
    """

    def setup(self, dtype, shape, threads):
        super().setup(dtype, shape, threads)
        d = self.data
        self.rm_train, self.rv_train = d.running_mean.copy(), d.running_var.copy()
        self.calls = {
            "train": lambda: cybn.forward_train(d.x, d.weight, d.bias, self.rm_train,
                                                self.rv_train, momentum=MOMENTUM, eps=EPS,
                                                out=d.out),
            "eval": lambda: cybn.forward_eval(d.x, d.running_mean, d.running_var, d.weight,
                                              d.bias, eps=EPS, out=d.out),
            "backward": lambda: cybn.backward(d.dy, d.x, d.mean, d.invstd, d.weight,
                                              training=True, out=d.out),
        }

    def peakmem_forward_train(self, dtype, shape, threads):
        self.calls["train"]()

    def peakmem_forward_eval(self, dtype, shape, threads):
        self.calls["eval"]()

    def peakmem_backward(self, dtype, shape, threads):
        self.calls["backward"]()

    def _extra_bytes(self, op):
        call = self.calls[op]
        call()
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            call()
            return max(0, tracemalloc.get_traced_memory()[1] - before)
        finally:
            tracemalloc.stop()

    def track_extra_bytes_forward_train(self, dtype, shape, threads):
        return self._extra_bytes("train")

    def track_extra_bytes_forward_eval(self, dtype, shape, threads):
        return self._extra_bytes("eval")

    def track_extra_bytes_backward(self, dtype, shape, threads):
        return self._extra_bytes("backward")

    track_extra_bytes_forward_train.unit = "bytes"
    track_extra_bytes_forward_eval.unit = "bytes"
    track_extra_bytes_backward.unit = "bytes"
