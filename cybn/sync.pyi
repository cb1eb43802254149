from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from ._api import Activation
from .layer import BatchNorm

class SyncBatchNorm(BatchNorm):
    comm: Any  # an mpi4py intracommunicator (mpi4py is optional, imported lazily)
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        dtype: DTypeLike = np.float32,
        comm: Any = None,
        *,
        axis: int = 1,
        activation: Activation = None,
        renorm: bool = False,
        rmax: float = 3.0,
        dmax: float = 5.0,
        ghost_batch_size: None = None,
    ) -> None: ...
