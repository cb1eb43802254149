from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from ._api import Activation, FloatArray

class BatchNorm:
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    dtype: np.dtype[Any]
    axis: int
    activation: Activation
    training: bool
    weight: FloatArray | None
    bias: FloatArray | None
    grad_weight: FloatArray | None
    grad_bias: FloatArray | None
    grad_residual: FloatArray | None
    running_mean: FloatArray | None
    running_var: FloatArray | None
    num_batches_tracked: int | None
    renorm: bool
    rmax: float
    dmax: float
    ghost_batch_size: int | None
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        dtype: DTypeLike = np.float32,
        axis: int = 1,
        activation: Activation = None,
        *,
        renorm: bool = False,
        rmax: float = 3.0,
        dmax: float = 5.0,
        ghost_batch_size: int | None = None,
    ) -> None: ...
    def train(self, mode: bool = True) -> BatchNorm: ...
    def eval(self) -> BatchNorm: ...
    def __call__(self, x: FloatArray, residual: FloatArray | None = None) -> FloatArray: ...
    def forward(self, x: FloatArray, residual: FloatArray | None = None) -> FloatArray: ...
    def backward(self, dy: FloatArray) -> FloatArray: ...
    def reset_running_stats(self) -> None: ...
    def reset_parameters(self) -> None: ...
    def state_dict(self) -> dict[str, NDArray[Any]]: ...
    def load_state_dict(self, state_dict: Mapping[str, ArrayLike]) -> None: ...

class BatchNorm1d(BatchNorm): ...
class BatchNorm2d(BatchNorm): ...
class BatchNorm3d(BatchNorm): ...
