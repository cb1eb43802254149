"""cybn: fast batch normalization for NumPy on the CPU.

Functions (channels on axis 1 of (N, C, *spatial) float32/float64 arrays):
    forward_train, forward_eval, backward
and their steps, for combining statistics across processes:
    batch_moments, combine_moments, normalize, grad_sums, grad_input
Layers with PyTorch's module semantics:
    BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, and SyncBatchNorm over MPI
Inference: fold_batch_norm folds a BatchNorm into the layer before it.
The machine and build as cybn sees them: show_config().
"""
from ._api import (backward, batch_moments, combine_moments, fold_batch_norm, forward_eval,
                   forward_train, grad_input, grad_sums, normalize)
from ._config import show_config
from ._kernels import max_threads
from .layer import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from .sync import SyncBatchNorm  # mpi4py is imported only when one is built

__version__ = "0.1.0"

__all__ = [
    "forward_train", "forward_eval", "backward",
    "batch_moments", "combine_moments", "normalize", "grad_sums", "grad_input",
    "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm",
    "fold_batch_norm", "max_threads", "show_config",
]
