"""Thread count independence (bitwise) and the GIL released in kernels."""
import threading
import time

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

import cybn
from cybn import _kernels
from conftest import random_batch

# Big enough to run in parallel (the kernels stay serial below 2**17 values),
# channel counts that do not divide evenly among threads, and every work
# split: one task per channel, parts of channels, rows (short, middling and
# over 4 KiB long; below and above 4 MiB; few rows cut into channel blocks),
# and (calls of over 16 MiB with short runs) the batch walked in memory order.
SHAPES = [(8, 13, 40, 40), (4096, 67), (1024, 130, 1, 1), (20001, 24), (2050, 1030),
          (8200, 130), (300, 520), (130, 1100), (6, 3, 100, 100), (4, 5, 128, 128),
          (8, 80, 40, 40), (160, 1024, 8, 8)]


def _all_results(x, dy):
    w = np.linspace(0.5, 1.5, x.shape[1])
    b = np.linspace(-1, 1, x.shape[1])
    rm, rv = np.zeros(x.shape[1], x.dtype), np.ones(x.shape[1], x.dtype)
    y, mean, invstd = cybn.forward_train(x, w, b, rm, rv)
    dx, dw, db = cybn.backward(dy, x, mean, invstd, w)
    dx_eval, _, _ = cybn.backward(dy, x, mean, invstd, w, training=False)
    y_eval = cybn.forward_eval(x, rm, rv, w, b)
    count, m, m2 = cybn.batch_moments(x)
    return [y, mean, invstd, rm, rv, dx, dw, db, dx_eval, y_eval, m, m2]


def test_openmp_runtime_is_controlled_by_threadpoolctl():
    assert any(info["user_api"] == "openmp" for info in threadpool_info())
    with threadpool_limits(1, user_api="openmp"):
        assert cybn.max_threads() == 1
    with threadpool_limits(3, user_api="openmp"):
        assert cybn.max_threads() == 3


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_results_are_bitwise_identical_for_any_thread_count(shape, dtype):
    x = random_batch(shape, dtype, seed=1, offset=3)
    dy = random_batch(shape, dtype, seed=2)
    results = {}
    for n in (1, 2, 3, 4, 7):
        with threadpool_limits(n, user_api="openmp"):
            assert cybn.max_threads() == n
            results[n] = _all_results(x, dy)
    for n, values in results.items():
        for i, (a, b) in enumerate(zip(values, results[1])):
            assert a.tobytes() == b.tobytes(), f"result {i} differs with {n} threads"


@pytest.mark.parametrize("shape", [(8, 80, 40, 40), (3, 67, 48, 48)], ids=str)
def test_streamed_per_channel_path_is_bitwise_identical_for_any_thread_count(shape, dtype):
    """With every output streamed, the per-channel path reads each thread's
    next channel along with the current one's output (overlaps_next): its
    channels split among threads differently for each count."""
    x = random_batch(shape, dtype, seed=3, offset=-2)
    dy = random_batch(shape, dtype, seed=4)
    results = {}
    with _kernels.forcing(stream_cache=0):
        for n in (1, 2, 3, 4, 7):
            with threadpool_limits(n, user_api="openmp"):
                results[n] = _all_results(x, dy)
    for n, values in results.items():
        for i, (a, b) in enumerate(zip(values, results[1])):
            assert a.tobytes() == b.tobytes(), f"result {i} differs with {n} threads"


def _assert_threads_match_serial(run, n_runs):
    """run(i) for each i in Python threads at once gives what it gives alone."""
    serial = [run(i) for i in range(n_runs)]
    concurrent = [None] * n_runs
    threads = [threading.Thread(target=lambda i=i: concurrent.__setitem__(i, run(i)))
               for i in range(n_runs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s, c in zip(serial, concurrent):
        for a, b in zip(s, c):
            assert a.tobytes() == b.tobytes()


def test_python_threads_get_the_serial_results():
    inputs = [(random_batch(s, np.float32, seed=i), random_batch(s, np.float32, seed=i + 50))
              for i, s in enumerate(SHAPES * 2)]

    def run(i):
        for _ in range(3):
            results = _all_results(*inputs[i])
        return results

    _assert_threads_match_serial(run, len(inputs))


def test_gil_is_released_during_a_kernel():
    """Another Python thread makes progress while a long kernel runs."""
    x = random_batch((64, 64, 64, 64), np.float32)  # 64 MiB
    out = np.empty_like(x)
    ticks = []
    running = threading.Event()
    done = threading.Event()

    def ticker():
        running.set()
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.0005)

    with threadpool_limits(1, user_api="openmp"):
        cybn.forward_train(x, out=out)  # warm up
        t = threading.Thread(target=ticker)
        t.start()
        running.wait()
        start = time.perf_counter()
        for _ in range(3):
            cybn.forward_train(x, out=out)
            cybn.backward(x, x, np.zeros(64), np.ones(64), out=out)
        end = time.perf_counter()
        done.set()
        t.join()
    during = [tick for tick in ticks if start < tick < end]
    # With the GIL held the ticker could run only between calls (a handful of ticks).
    assert len(during) > 20, f"only {len(during)} ticks in {end - start:.3f} s"


def test_separate_layers_in_python_threads_match_serial_runs():
    def run(seed):
        bn = cybn.BatchNorm2d(6, activation="relu")
        rng = np.random.default_rng(seed)
        outputs = []
        for _ in range(4):
            x = rng.standard_normal((16, 6, 24, 24)).astype(np.float32)
            r = rng.standard_normal(x.shape).astype(np.float32)
            outputs.append(bn(x, r))
            outputs.append(bn.backward(rng.standard_normal(x.shape).astype(np.float32)))
        return outputs + [bn.running_mean, bn.running_var, bn.grad_weight, bn.grad_residual]

    _assert_threads_match_serial(run, 6)
