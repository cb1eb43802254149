"""SyncBatchNorm: what the communication costs per training step, against
the compute.

Under MPI, a global batch split across the processes:

    mpiexec -n 2 python benchmarks/bench_sync.py [--dtype float64] [--repeat 30]
                                                 [--statistic min]

prints, per global shape, the time of a forward + backward of SyncBatchNorm
on each process's slice, of BatchNorm on the same slice (no communication),
the part of the SyncBatchNorm step spent inside Allgather and Allreduce
(which includes waiting for the slowest process), and the same three
collectives alone, started together (their latency).  Times are medians
over the repeats (--statistic min: the best, less sensitive to a busy
machine), then the maximum over the processes: a step is as slow as its
slowest process.  Give each process its own cores (OMP_NUM_THREADS).

For asv, SyncBatchNormSelf times the layer over MPI.COMM_SELF: the cost of
the split functions in one process, to set against bench_layer's BatchNorm.
"""
import argparse
import time

import numpy as np

import cybn

SHAPES = [(32, 256, 14, 14), (32, 64, 56, 56)]


def _timed_comm_class(MPI):
    class TimedComm(MPI.Intracomm):
        """The same communicator, adding up the seconds spent in its
        buffer collectives."""
        seconds = 0.0

        def Allgather(self, *args, **kwargs):
            start = time.perf_counter()
            super().Allgather(*args, **kwargs)
            self.seconds += time.perf_counter() - start

        def Allreduce(self, *args, **kwargs):
            start = time.perf_counter()
            super().Allreduce(*args, **kwargs)
            self.seconds += time.perf_counter() - start

    return TimedComm


def _local_slice(shape, rank, size, dtype, seed):
    """This process's part of a global batch of `shape`, split along N as
    evenly as np.array_split does."""
    n_local = len(np.array_split(np.arange(shape[0]), size)[rank])
    rng = np.random.default_rng(seed + rank)
    local_shape = (n_local,) + tuple(shape[1:])
    return (rng.standard_normal(local_shape, dtype=dtype),
            rng.standard_normal(local_shape, dtype=dtype))


def _step(layer, x, dy):
    layer(x)
    layer.backward(dy)


def _collectives_alone(comm, n_channels):
    """The collectives of one SyncBatchNorm step, with its message sizes:
    the header and statistics Allgathers, the 2C + 1 sums' Allreduce."""
    from mpi4py import MPI

    size = comm.Get_size()
    header, headers = np.zeros(4, np.int64), np.empty((size, 4), np.int64)
    moments, gathered = np.zeros((2, n_channels)), np.empty((size, 2, n_channels))
    sums = np.zeros(2 * n_channels + 1)
    comm.Barrier()
    start = time.perf_counter()
    comm.Allgather(header, headers)
    comm.Allgather(moments, gathered)
    comm.Allreduce(MPI.IN_PLACE, sums)
    return time.perf_counter() - start


def run_sync_benchmark(shapes=SHAPES, dtype="float32", repeat=30, warmup=3,
                       statistic="median"):
    """Time SyncBatchNorm against BatchNorm over MPI.COMM_WORLD; prints on
    rank 0 and returns the rows (rank 0) or None (other ranks)."""
    from mpi4py import MPI
    from cybn.sync import SyncBatchNorm

    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    comm = _timed_comm_class(MPI)(world)
    rows = []
    for shape in shapes:
        x, dy = _local_slice(shape, rank, size, np.dtype(dtype), seed=len(rows))
        sync = SyncBatchNorm(shape[1], dtype=dtype, comm=comm)
        local = cybn.BatchNorm(shape[1], dtype=dtype)
        times = {"local": [], "sync": [], "comm": [], "alone": []}
        for i in range(warmup + repeat):
            world.Barrier()  # start together: waiting inside a step is its cost
            start = time.perf_counter()
            _step(local, x, dy)
            local_s = time.perf_counter() - start

            world.Barrier()
            comm.seconds = 0.0
            start = time.perf_counter()
            _step(sync, x, dy)
            sync_s = time.perf_counter() - start
            if i >= warmup:
                times["local"].append(local_s)
                times["sync"].append(sync_s)
                times["comm"].append(comm.seconds)
                times["alone"].append(_collectives_alone(world, shape[1]))
        summary = getattr(np, statistic)
        typical = np.array([summary(times[key]) for key in ("local", "sync", "comm", "alone")])
        slowest = np.empty_like(typical)
        world.Allreduce(typical, slowest, op=MPI.MAX)
        rows.append((shape, x.shape, *(1e3 * slowest)))

    if rank != 0:
        return None
    print(f"{size} processes, {dtype}, {cybn.max_threads()} OpenMP thread(s) per process "
          f"(rank 0), {statistic} of {repeat} steps, slowest process; times in ms")
    print(f"{'global shape':>14} {'local slice':>14} {'BatchNorm':>10} {'SyncBN':>8} "
          f"{'in MPI':>8} {'MPI/SyncBN':>10} {'MPI alone':>10}")
    for shape, local_shape, local_ms, sync_ms, comm_ms, alone_ms in rows:
        print(f"{'x'.join(map(str, shape)):>14} {'x'.join(map(str, local_shape)):>14} "
              f"{local_ms:10.3f} {sync_ms:8.3f} {comm_ms:8.3f} {comm_ms / sync_ms:10.1%} "
              f"{alone_ms:10.3f}")
    return rows


# ---------------------------------------------------------------------------
# asv: one process, over COMM_SELF.

class SyncBatchNormSelf:
    params = [["float32", "float64"], ["x".join(map(str, s)) for s in SHAPES]]
    param_names = ["dtype", "shape"]
    timeout = 300

    def setup(self, dtype, shape):
        try:
            from mpi4py import MPI
        except ImportError:
            raise NotImplementedError("mpi4py is not installed (pip install 'cybn[mpi]')")
        from cybn.sync import SyncBatchNorm

        shape = tuple(int(n) for n in shape.split("x"))
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal(shape, dtype=np.dtype(dtype))
        self.dy = rng.standard_normal(shape, dtype=np.dtype(dtype))
        self.bn = SyncBatchNorm(shape[1], dtype=dtype, comm=MPI.COMM_SELF)
        _step(self.bn, self.x, self.dy)  # warm-up

    def time_forward_backward(self, dtype, shape):
        _step(self.bn, self.x, self.dy)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--statistic", default="median", choices=["median", "min"])
    args = parser.parse_args()
    run_sync_benchmark(dtype=args.dtype, repeat=args.repeat, statistic=args.statistic)


if __name__ == "__main__":
    main()
