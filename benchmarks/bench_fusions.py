"""The fused ReLU and residual add, and channels-last data (cybn >= the
commit that added them; older commits skip these benchmarks)."""
import inspect

import numpy as np

import cybn

from . import EPS, MOMENTUM, Benchmark


def _channels_last(a):
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)


class Fusions(Benchmark):
    """Time per call of the fused forms, next to the separate NumPy steps
    they replace; outputs preallocated."""

    def setup(self, dtype, shape, threads):
        if "activation" not in inspect.signature(cybn.forward_train).parameters:
            raise NotImplementedError("this cybn has no fused activation")
        super().setup(dtype, shape, threads)
        d = self.data
        self.rm, self.rv = d.running_mean.copy(), d.running_var.copy()
        self.residual = np.random.default_rng(1).random(d.shape, dtype=d.x.dtype) - 0.5
        self.y_relu, self.mean, self.invstd = cybn.forward_train(
            d.x, d.weight, d.bias, residual=self.residual, activation="relu")
        self.dx, self.grad_residual, self.masked = (np.empty_like(d.x) for _ in range(3))

    def time_forward_relu(self, dtype, shape, threads):
        d = self.data
        cybn.forward_train(d.x, d.weight, d.bias, self.rm, self.rv, momentum=MOMENTUM,
                           eps=EPS, out=d.out, activation="relu")

    def time_forward_add_relu(self, dtype, shape, threads):
        d = self.data
        cybn.forward_train(d.x, d.weight, d.bias, self.rm, self.rv, momentum=MOMENTUM,
                           eps=EPS, out=d.out, residual=self.residual, activation="relu")

    def time_forward_then_numpy_add_relu(self, dtype, shape, threads):
        d = self.data
        cybn.forward_train(d.x, d.weight, d.bias, self.rm, self.rv, momentum=MOMENTUM,
                           eps=EPS, out=d.out)
        np.add(d.out, self.residual, out=d.out)
        np.maximum(d.out, 0, out=d.out)

    def time_backward_relu(self, dtype, shape, threads):
        d = self.data
        cybn.backward(d.dy, d.x, self.mean, self.invstd, d.weight, out=self.dx,
                      activation="relu", y=self.y_relu, grad_residual=self.grad_residual)

    def time_numpy_mask_then_backward(self, dtype, shape, threads):
        d = self.data
        np.multiply(d.dy, self.y_relu > 0, out=self.masked)
        cybn.backward(self.masked, d.x, self.mean, self.invstd, d.weight, out=self.dx)


class ChannelsLast(Benchmark):
    """NCHW-shaped views of channels-last (NHWC) memory."""

    def setup(self, dtype, shape, threads):
        super().setup(dtype, shape, threads)
        d = self.data
        self.x, self.dy = _channels_last(d.x), _channels_last(d.dy)
        self.out = _channels_last(d.out)
        self.rm, self.rv = d.running_mean.copy(), d.running_var.copy()
        _, self.mean, self.invstd = cybn.forward_train(self.x, d.weight, d.bias)

    def time_forward_train(self, dtype, shape, threads):
        d = self.data
        cybn.forward_train(self.x, d.weight, d.bias, self.rm, self.rv, momentum=MOMENTUM,
                           eps=EPS, out=self.out)

    def time_backward(self, dtype, shape, threads):
        d = self.data
        cybn.backward(self.dy, self.x, self.mean, self.invstd, d.weight, out=self.out)
