"""The schedule (cybn._kernels.plan): which plan representative shapes get
for given cache sizes, and how evenly its tasks deal out to many threads.

These machines have 2 cores, so balance on 16 and 64 is shown on paper: each
parallel region's tasks are dealt to the threads exactly as the kernels do
(OpenMP's static schedule: contiguous runs of tasks, the first n % T threads
taking one more; the per-channel path: channels [t*C//T, (t+1)*C//T) to
thread t), and the busiest thread may do at most 1.25 times the mean."""
import numpy as np
import pytest

from cybn import _kernels

MiB = 1 << 20
# A 64-core server's caches: 1 MiB L2 per core, a 256 MiB L3.
SERVER = {"l2": 1 * MiB, "l3": 256 * MiB}
RESNET50 = [(64, 112, 112), (256, 56, 56), (64, 56, 56), (512, 28, 28), (128, 28, 28),
            (1024, 14, 14), (256, 14, 14), (2048, 7, 7), (512, 7, 7)]
OTHER = [(256, 512, 1, 1), (8, 3, 224, 224)]
ROWS = [(4096, 1024), (64, 2048), (256, 512)]


def static_deal(n_tasks, n_threads):
    """Tasks [begin, end) of each thread under schedule(static)."""
    q, r = divmod(n_tasks, n_threads)
    bounds = np.cumsum([0] + [q + (t < r) for t in range(n_threads)])
    return list(zip(bounds[:-1], bounds[1:]))


def channel_deal(n_channels, n_threads):
    return [(t * n_channels // n_threads, (t + 1) * n_channels // n_threads)
            for t in range(n_threads)]


def busiest_over_mean(region, tasks, n_threads):
    deal = channel_deal if region == "channels" else static_deal
    work = [sum(tasks[a:b]) for a, b in deal(len(tasks), n_threads)]
    return max(work) / (sum(work) / n_threads)


def balance_cases():
    for batch in (32, 256):
        for c, h, w in RESNET50:
            yield (batch, c, h, w), False
            yield (batch * h * w, c), True  # channels-last: rows of C values
    for shape in OTHER:
        yield shape, False
    for shape in ROWS:
        yield shape, True


@pytest.mark.parametrize("threads", [16, 64])
@pytest.mark.parametrize("op", ["train", "backward", "eval", "sums"])
@pytest.mark.parametrize("itemsize", [4, 8], ids=["float32", "float64"])
def test_busiest_thread_does_at_most_a_quarter_more_than_the_mean(threads, op, itemsize):
    worst = []
    for shape, rows in balance_cases():
        plan = _kernels.plan(op, shape, itemsize, rows=rows, threads=threads, **SERVER)
        assert 1 <= plan["threads"] <= threads
        assert plan["tasks"], (shape, plan)
        for region, tasks in plan["tasks"].items():
            assert sum(tasks) == np.prod(shape), (shape, region)
            ratio = busiest_over_mean(region, tasks, plan["threads"])
            worst.append((ratio, shape, region, plan["threads"], len(tasks)))
    assert max(worst)[0] <= 1.25, max(worst)


def test_small_calls_run_on_one_thread_and_threads_grow_with_size():
    assert _kernels.plan("train", (2, 8, 4, 4), 4, threads=64, **SERVER)["threads"] == 1
    sizes = [_kernels.plan("train", (n, 64, 32, 32), 4, threads=64, **SERVER)["threads"]
             for n in (1, 2, 4, 8, 32, 128)]
    assert sizes == sorted(sizes) and sizes[0] == 1 and sizes[-1] == 64
    assert all(t & (t - 1) == 0 for t in sizes)  # powers of two


def test_the_plan_does_not_depend_on_the_thread_count_where_values_do():
    """The tasks whose sums are merged (parts, ranges) are fixed by the shape
    and caches; only the threads and the channel blocks (which no value
    depends on) may change."""
    for shape, rows in balance_cases():
        for op in ("train", "backward"):
            plans = [_kernels.plan(op, shape, 4, rows=rows, threads=t, **SERVER)
                     for t in (1, 2, 16, 64)]
            for p in plans[1:]:
                for key in ("per_channel", "memory_order", "parts", "ranges", "stream"):
                    assert p[key] == plans[0][key], (shape, op, key)


@pytest.mark.parametrize("shape, rows, expected", [
    # many channels: a task per channel, statistics then y while in cache
    ((32, 64, 112, 112), False, {"per_channel": True, "memory_order": False}),
    ((32, 512, 7, 7), False, {"per_channel": True, "memory_order": False}),
    # short runs over half the cache: memory order, ranges of the batch
    ((256, 2048, 7, 7), False, {"per_channel": False, "memory_order": True, "ranges": 16}),
    # few channels: cut into parts
    ((8, 3, 224, 224), False, {"per_channel": False, "memory_order": False, "parts": 11}),
    # rows: blocks of channels of a page or more, then ranges of rows
    ((4096, 1024), True, {"per_channel": False, "ranges": 16, "blocks": 1}),
    ((64, 2048), True, {"ranges": 1, "blocks": 16}),
], ids=str)
def test_representative_shapes_get_their_paths(shape, rows, expected):
    plan = _kernels.plan("train", shape, 4, rows=rows, l2=MiB, l3=32 * MiB)
    assert {key: plan[key] for key in expected} == expected


def test_thresholds_follow_the_detected_cache():
    """Streaming and memory order are decided against the L3 (capped at 32
    MiB), the next-channel overlap against half the L2."""
    shape = (32, 256, 14, 14)  # 6.4 MB of float32
    big, small = {"l2": MiB, "l3": 32 * MiB}, {"l2": MiB, "l3": 4 * MiB}
    assert not _kernels.plan("train", shape, 4, **big)["stream"]
    assert _kernels.plan("train", shape, 4, **small)["stream"]
    assert not _kernels.plan("train", shape, 4, **big)["memory_order"]
    assert _kernels.plan("train", shape, 4, **small)["memory_order"]
    # a 64-core server's 256 MiB L3 counts as 32 MiB, as a VM may report its host's
    assert (_kernels.plan("train", (32, 256, 56, 56), 4, **SERVER)["stream"]
            == _kernels.plan("train", (32, 256, 56, 56), 4, l2=MiB, l3=32 * MiB)["stream"])
    channel = (32, 128, 56, 56)  # 400 KB a channel: overlap with a 1 MiB L2, not 512 KiB
    assert _kernels.plan("train", channel, 4, l2=MiB, l3=MiB)["overlap"]
    assert not _kernels.plan("train", channel, 4, l2=MiB // 2, l3=MiB)["overlap"]


# Every path on small data, forced by the caches the schedule is given
# (_kernels.forcing), checked against the float64 reference and for the
# same bits on 1, 2 and 3 threads.
FORCED = [
    ((16, 70, 12, 12), {}, {"per_channel": True}),
    ((16, 70, 12, 12), {"l3": 64 << 10}, {"memory_order": True}),
    ((16, 70, 12, 12), {"stream_cache": 0, "l2": 64 << 20}, {"per_channel": True,
                                                             "overlap": True, "stream": True}),
    ((64, 5, 24, 24), {}, {"per_channel": False, "memory_order": False}),
    ((1300, 130), {}, {"ranges": 16, "blocks": 1}),
    ((1300, 130), {"l3": 64 << 10}, {"ranges": 4, "blocks": 1}),
    ((300, 520), {}, {"ranges": 4, "blocks": 4}),
]


@pytest.mark.parametrize("shape, inputs, expected", FORCED, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_every_path_forced_by_the_caches_matches_the_reference(shape, inputs, expected, dtype):
    from threadpoolctl import threadpool_limits

    import cybn
    from cybn import reference
    from conftest import assert_close, random_batch

    rows = len(shape) == 2
    plan = _kernels.plan("train", shape, np.dtype(dtype).itemsize, rows=rows, **inputs)
    assert {key: plan[key] for key in expected} == expected
    x = random_batch(shape, dtype, seed=11, offset=4.0)
    dy = random_batch(shape, dtype, seed=12)
    c = shape[1]
    w, b = np.linspace(0.5, 1.5, c), np.linspace(-1, 1, c)
    results = []
    for threads in (1, 2, 3):
        with threadpool_limits(threads, user_api="openmp"), _kernels.forcing(**inputs):
            y, mean, invstd = cybn.forward_train(x, w, b)
            dx, dw, db = cybn.backward(dy, x, mean, invstd, w)
            y_eval = cybn.forward_eval(x, mean, 1 / invstd ** 2, w, b, eps=0.0)
            count, m, m2 = cybn.batch_moments(x)
        results.append([y, mean, invstd, dx, dw, db, y_eval, m, m2])
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            assert a.tobytes() == b_.tobytes()
    y, mean, invstd, dx, dw, db, y_eval, m, m2 = results[0]
    y_ref, mean_ref, invstd_ref, *_ = reference.forward_train(x, w, b)
    assert_close(y, y_ref, dtype, "y")
    assert_close(mean, mean_ref, dtype, "mean")
    assert_close(invstd, invstd_ref, dtype, "invstd")
    for name, got, want in zip(["dx", "dw", "db"], (dx, dw, db),
                               reference.backward(dy, x, mean, invstd, w)):
        assert_close(got, want, dtype, name)
    assert_close(y_eval, y_ref, dtype, "y_eval")


def test_forcing_takes_only_the_schedules_inputs_and_ends_with_its_block():
    with pytest.raises(TypeError, match="unknown inputs"):
        with _kernels.forcing(threads=3):
            pass
    shape = (16, 70, 12, 12)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    import cybn

    with _kernels.forcing(l3=64 << 10):
        forced = cybn.batch_moments(x)[2]
    plain = cybn.batch_moments(x)[2]
    again = cybn.batch_moments(x)[2]
    assert plain.tobytes() == again.tobytes()
    np.testing.assert_allclose(forced, plain, rtol=1e-12)
