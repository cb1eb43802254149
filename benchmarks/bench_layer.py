"""The BatchNorm layers: a training step's forward and backward, and the
evaluation-mode forward (the layer allocates its outputs)."""
import cybn

from . import Benchmark

_LAYER_FOR_NDIM = {2: cybn.BatchNorm1d, 3: cybn.BatchNorm1d, 4: cybn.BatchNorm2d,
                   5: cybn.BatchNorm3d}


class Layer(Benchmark):

    def setup(self, dtype, shape, threads):
        super().setup(dtype, shape, threads)
        d = self.data
        layer = _LAYER_FOR_NDIM[len(d.shape)]
        self.bn = layer(d.channels, dtype=d.x.dtype)
        self.bn_eval = layer(d.channels, dtype=d.x.dtype).eval()
        self.time_forward_backward(dtype, shape, threads)  # warm-up
        self.time_forward_eval(dtype, shape, threads)

    def time_forward_backward(self, dtype, shape, threads):
        self.bn(self.data.x)
        self.bn.backward(self.data.dy)

    def time_forward_eval(self, dtype, shape, threads):
        self.bn_eval(self.data.x)
