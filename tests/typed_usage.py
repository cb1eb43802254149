"""The public API used with its types; CI runs `mypy --strict` on this file
(tests/test_typing.py), against the stubs shipped with the package.  It is
also an ordinary script that runs."""
import io
from typing import Any

import numpy as np
from numpy.typing import NDArray

import cybn


def train_step(bn: cybn.BatchNorm, x: NDArray[np.float32], lr: float) -> float:
    y = bn(x)
    loss = 0.5 * float(np.mean(y * y))
    dx: NDArray[np.floating[Any]] = bn.backward(y / y.size)
    assert dx.shape == x.shape
    if bn.weight is not None and bn.grad_weight is not None:
        bn.weight -= lr * bn.grad_weight
    return loss


def main() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 4, 5, 5)).astype(np.float32)
    y, mean, invstd = cybn.forward_train(x, np.ones(4), None, momentum=0.1, eps=1e-5)
    dx, dweight, dbias = cybn.backward(np.ones_like(y), x, mean, invstd, training=True)
    y_eval = cybn.forward_eval(x, np.zeros(4), np.ones(4), out=np.empty_like(x))
    count, batch_mean, m2 = cybn.batch_moments(x)
    total, mean64, m2_total = cybn.combine_moments([count, count], [batch_mean, batch_mean],
                                                   [m2, m2])
    invstd64 = 1 / np.sqrt(m2_total / total + 1e-5)
    normalized = cybn.normalize(x, mean64, invstd64, activation="relu")
    sum_dy, sum_dy_xmu = cybn.grad_sums(np.ones_like(x), x, mean64)
    grad = cybn.grad_input(np.ones_like(x), x, mean64, invstd64, sum_dy, sum_dy_xmu, count)

    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    y_renorm, mean_b, invstd_b, r, d = cybn.forward_train(x, running_mean=rm, running_var=rv,
                                                          renorm=(3.0, 5.0))
    dx_renorm, _, _ = cybn.backward(np.ones_like(x), x, mean_b, invstd_b, renorm=(r, d))
    y_ghost, mean_g, invstd_g = cybn.forward_train(x, ghost_batch_size=4)
    dx_ghost, _, _ = cybn.backward(np.ones_like(x), x, mean_g, invstd_g, ghost_batch_size=4)
    variant = cybn.BatchNorm2d(4, renorm=True, rmax=1.0, dmax=0.0, ghost_batch_size=2)
    variant.rmax, variant.dmax = 2.0, 1.0
    assert variant(x).shape == dx_renorm.shape == dx_ghost.shape == y_renorm.shape

    bn: cybn.BatchNorm = cybn.BatchNorm2d(4, momentum=None)
    losses = [train_step(bn, x, 0.1) for _ in range(3)]
    state = bn.state_dict()
    restored = cybn.BatchNorm2d(4)
    restored.load_state_dict(state)
    restored.eval()
    w, b = cybn.fold_batch_norm(np.ones((4, 6)), None, restored)
    threads: int = cybn.max_threads()
    y_full, mean_full, invstd_full = cybn.forward_train(x, stats_dtype=np.float64)
    cybn.backward(np.ones_like(y_full), x, mean_full, invstd_full)
    cybn.show_config(file=io.StringIO())
    version: str = cybn.__version__
    assert y.shape == dx.shape == y_eval.shape == normalized.shape == grad.shape
    assert dweight.shape == dbias.shape == (4,) and w.shape == (4, 6) and b.shape == (4,)
    assert losses[-1] <= losses[0] and threads >= 1 and version


if __name__ == "__main__":
    main()
