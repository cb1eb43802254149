# Type stubs of cybn's functions (cybn/_api.py is compiled by Cython, so the
# types live here).  Data arrays are float32 or float64 ndarrays; per-channel
# parameters are any real array-likes.
from typing import Any, Literal, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .layer import BatchNorm

FloatArray = NDArray[np.floating[Any]]
Float64Array = NDArray[np.float64]
Activation = Literal["relu"] | None

@overload
def forward_train(
    x: FloatArray,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    running_mean: FloatArray | None = None,
    running_var: FloatArray | None = None,
    *,
    momentum: float = 0.1,
    eps: float = 1e-5,
    out: FloatArray | None = None,
    axis: int = 1,
    residual: FloatArray | None = None,
    activation: Activation = None,
    stats_dtype: type[np.floating[Any]] | np.dtype[np.floating[Any]] | str | None = None,
    renorm: None = None,
    ghost_batch_size: int | None = None,
) -> tuple[FloatArray, FloatArray, FloatArray]: ...
@overload
def forward_train(
    x: FloatArray,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    running_mean: FloatArray | None = None,
    running_var: FloatArray | None = None,
    *,
    momentum: float = 0.1,
    eps: float = 1e-5,
    out: FloatArray | None = None,
    axis: int = 1,
    residual: FloatArray | None = None,
    activation: Activation = None,
    stats_dtype: type[np.floating[Any]] | np.dtype[np.floating[Any]] | str | None = None,
    renorm: tuple[float, float],
    ghost_batch_size: int | None = None,
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray, FloatArray]: ...
def forward_eval(
    x: FloatArray,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    eps: float = 1e-5,
    out: FloatArray | None = None,
    axis: int = 1,
    residual: FloatArray | None = None,
    activation: Activation = None,
) -> FloatArray: ...
def normalize(
    x: FloatArray,
    mean: ArrayLike,
    invstd: ArrayLike,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    out: FloatArray | None = None,
    axis: int = 1,
    residual: FloatArray | None = None,
    activation: Activation = None,
) -> FloatArray: ...
def backward(
    dy: FloatArray,
    x: FloatArray,
    mean: ArrayLike,
    invstd: ArrayLike,
    weight: ArrayLike | None = None,
    *,
    training: bool = True,
    out: FloatArray | None = None,
    axis: int = 1,
    activation: Activation = None,
    y: FloatArray | None = None,
    grad_residual: FloatArray | None = None,
    renorm: tuple[ArrayLike, ArrayLike] | None = None,
    ghost_batch_size: int | None = None,
) -> tuple[FloatArray, FloatArray, FloatArray]: ...
def fold_batch_norm(
    weight: ArrayLike, bias: ArrayLike | None, bn: BatchNorm
) -> tuple[FloatArray, FloatArray]: ...
def batch_moments(x: FloatArray, *, axis: int = 1) -> tuple[int, Float64Array, Float64Array]: ...
def combine_moments(
    counts: ArrayLike, means: ArrayLike, m2s: ArrayLike
) -> tuple[int, Float64Array, Float64Array]: ...
def grad_sums(
    dy: FloatArray,
    x: FloatArray,
    mean: ArrayLike,
    *,
    axis: int = 1,
    activation: Activation = None,
    y: FloatArray | None = None,
) -> tuple[Float64Array, Float64Array]: ...
def grad_input(
    dy: FloatArray,
    x: FloatArray,
    mean: ArrayLike,
    invstd: ArrayLike,
    sum_dy: ArrayLike,
    sum_dy_xmu: ArrayLike,
    count: int,
    weight: ArrayLike | None = None,
    *,
    training: bool = True,
    out: FloatArray | None = None,
    axis: int = 1,
    activation: Activation = None,
    y: FloatArray | None = None,
    grad_residual: FloatArray | None = None,
) -> FloatArray: ...
