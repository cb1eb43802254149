"""examples/train_digits.py --variants: batch renormalization and ghost batches
in the NumPy CNN (docs/variants.md)."""
import numpy as np
import pytest

# td, the example imported as a module, is a fixture of conftest.py.


def test_batch_indices(td):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 37)  # 370 samples, 37 per class
    iid = td.batch_indices(rng, labels, 16, "iid")
    assert len(iid) == 24 and len(iid[-1]) == 370 - 23 * 16
    assert sorted(np.concatenate(iid).tolist()) == list(range(370))
    full = td.batch_indices(rng, labels, 16, "iid-full")
    assert len(full) == 23 and all(len(b) == 16 for b in full)
    two = td.batch_indices(rng, labels, 16, "two-class")
    assert len(two) == 5 * (74 // 16) and all(len(b) == 16 for b in two)
    assert all(len(np.unique(labels[b])) <= 2 for b in two)
    assert len({tuple(np.unique(labels[b])) for b in two}) == 5  # five pairs of classes
    with pytest.raises(ValueError, match="unknown batch kind"):
        td.batch_indices(rng, labels, 16, "sorted")


def test_renorm_schedule(td):
    assert td.renorm_limits(0, 1000) == (1.0, 0.0)
    assert td.renorm_limits(50, 1000) == (1.0, 0.0)
    rmax, dmax = td.renorm_limits(275, 1000)
    assert rmax == pytest.approx(2.0) and dmax == pytest.approx(2.5)
    assert td.renorm_limits(500, 1000) == (3.0, 5.0)
    assert td.renorm_limits(999, 1000) == (3.0, 5.0)


@pytest.mark.slow
def test_variants_run(td, tmp_path):
    import matplotlib  # noqa: F401  (the example's dependencies, part of cybn[test])
    import sklearn  # noqa: F401
    import tqdm  # noqa: F401
    from threadpoolctl import threadpool_limits

    out = tmp_path / "variants.png"
    with threadpool_limits(1):
        results = td.main(["--variants", "--epochs", "4", "--no-progress", "--seed", "0",
                           "--out", str(out)])
    assert list(results) == [name for name, *_ in td.VARIANT_RUNS]
    for name, r in results.items():
        assert not r["diverged"], name
        epochs = 4 * (td.LARGE_BATCH_EPOCHS if r["config"]["batch_size"] >= 512 else 1)
        assert len(r["test_acc"]) == epochs, name
        assert r["final_acc"] > 0.5, (name, r["test_acc"])  # chance is 0.1
        if r["config"]["bn_options"].get("renorm"):
            assert r["final_limits"] == (3.0, 5.0), name  # the schedule ran to its end
    # i.i.d. batches of 4 train well with either; the two-class batches cost
    # plain batch norm accuracy (its running statistics and its batches
    # disagree)
    assert results["BN, batch 4"]["final_acc"] > 0.9
    assert results["renorm, batch 4"]["final_acc"] > 0.9
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
