"""Smoke tests of the benchmark tool `python -m cybn.bench`.

They run it on tiny shapes and check the structure of what it prints and
writes; no timing is ever judged here.
"""
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from cybn import bench, reference

HAVE_TORCH = importlib.util.find_spec("torch") is not None

TINY = "2x8x4x4,4x16x8x8"
TINY_SHAPES = [[2, 8, 4, 4], [4, 16, 8, 8]]
ROW_KEYS = {
    "shape", "set", "dtype", "op", "channels", "cybn", "torch", "numpy", "speedup_torch",
    "speedup_numpy", "bytes", "gbps", "fraction_of_limit", "ratio_to_eval",
    "peak_extra_bytes", "peak_limit_bytes",
}


def run_bench(tmp_path, *extra):
    json_path, png_path = tmp_path / "bench.json", tmp_path / "bench.png"
    cmd = [sys.executable, "-m", "cybn.bench", "--quick", "--shapes", TINY, "--reps", "2",
           "--warmup", "1", "--bandwidth-mib", "16", "--quiet",
           "--json", str(json_path), "--png", str(png_path), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with open(json_path, encoding="utf-8") as f:
        result = json.load(f)
    with open(png_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return proc.stdout, result


def check_timing(t):
    assert t["min"] > 0 and t["median"] >= t["min"]
    assert t["calls_per_rep"] >= 1 and len(t["times"]) == 2


def test_bench_default(tmp_path):
    out, result = run_bench(tmp_path)

    lines = out.splitlines()
    assert lines[0].startswith("cybn benchmark: ")
    assert "memory bandwidth limit:" in out and "GB/s" in out
    for header in ("shape", "op", "cybn min", "cybn med", "torch min", "numpy min",
                   "vs torch", "vs numpy", "limit", "/eval", "extra mem"):
        assert header in out
    for text in ("2x8x4x4", "4x16x8x8", "float32", "float64", "train", "eval", "backward",
                 "geometric means", "targets"):
        assert text in out

    machine = result["machine"]
    for key in ("cpu", "cores", "threads", "cybn_threads", "python", "numpy", "cybn", "torch"):
        assert key in machine
    assert machine["threads"] == bench.available_cores()
    assert machine["cybn_threads"] >= 1  # equal to threads unless built without OpenMP
    assert result["bandwidth"]["gbps"] > 0 and result["bandwidth"]["method"]
    settings = result["settings"]
    assert settings["shapes"] == TINY_SHAPES
    assert settings["dtypes"] == ["float32", "float64"]
    assert settings["reps"] == 2 and settings["quick"] is True
    assert settings["torch"] is HAVE_TORCH

    rows = result["results"]
    assert len(rows) == 2 * 2 * 3
    assert {(r["dtype"], tuple(r["shape"]), r["op"]) for r in rows} == {
        (d, tuple(s), op) for d in ("float32", "float64") for s in TINY_SHAPES
        for op in ("train", "eval", "backward")}
    for r in rows:
        assert set(r) >= ROW_KEYS
        check_timing(r["cybn"])
        check_timing(r["numpy"])  # tiny shapes: the reference is always timed
        assert r["speedup_numpy"] > 0
        if HAVE_TORCH:
            check_timing(r["torch"])
            assert r["torch"]["variant"] in ("default", "out")
            assert r["torch"]["min"] == min(r["torch"]["default_min"], r["torch"]["out_min"])
            assert r["speedup_torch"] == pytest.approx(r["torch"]["min"] / r["cybn"]["min"])
        else:
            assert r["torch"] is None and r["speedup_torch"] is None
        assert r["set"] == ("overhead" if r["shape"] == [2, 8, 4, 4] else "custom")
        n = int(np.prod(r["shape"])) * np.dtype(r["dtype"]).itemsize
        assert r["bytes"] == (3 if r["op"] == "backward" else 2) * n
        assert r["gbps"] > 0 and r["fraction_of_limit"] > 0 and r["ratio_to_eval"] > 0
        assert r["peak_extra_bytes"] >= 0 and r["peak_limit_bytes"] > 0
    for r in rows:
        if r["op"] == "eval":
            assert r["ratio_to_eval"] == 1.0

    assert set(result["summary"]) == {"float32", "float64"}
    assert result["summary"]["float32"]["n_shapes"] == 0  # no ResNet-50 shape here
    targets = result["targets"]
    assert targets and all(t["passed"] in (True, False, None) for t in targets)
    assert all({"name", "dtype", "passed", "detail"} <= set(t) for t in targets)


def test_bench_without_torch_or_numpy(tmp_path):
    out, result = run_bench(tmp_path, "--no-torch", "--no-numpy", "--dtype", "float64",
                            "--threads", "1")
    assert "n/a" in out
    assert result["machine"]["threads"] == result["machine"]["cybn_threads"] == 1
    assert result["settings"]["dtypes"] == ["float64"]
    assert result["settings"]["numpy_reference"].startswith("skipped")
    assert len(result["results"]) == 2 * 3
    for r in result["results"]:
        assert r["torch"] is None and r["numpy"] is None
        assert r["speedup_torch"] is None and r["speedup_numpy"] is None
        check_timing(r["cybn"])


@pytest.mark.parametrize("text", ["", "32x", "0x4", "5", "2x3x4x5x6x7", "1x3", "ax3"])
def test_bench_rejects_bad_shapes(text, capsys):
    with pytest.raises(SystemExit) as info:
        bench.main(["--shapes", text])
    assert info.value.code == 2
    assert "shape" in capsys.readouterr().err


def test_parse_shapes():
    assert bench.parse_shapes("32x64x56x56, 64x2048") == [(32, 64, 56, 56), (64, 2048)]
    assert bench.shape_set((32, 64, 112, 112)) == "resnet50"
    assert bench.shape_set((64, 2048)) == "wide"
    assert bench.shape_set((2, 8, 4, 4)) == "overhead"
    assert bench.shape_set((3, 5, 7)) == "custom"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_benchmarked_calls_compute_batch_norm(dtype):
    """The functions the tool times, cybn's and torch's (when installed),
    compute what they claim to, on the same data."""
    case = bench.Case((4, 3, 5, 5), dtype)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    rm0, rv0 = case.running_mean.copy(), case.running_var.copy()
    expected = {
        "train": reference.forward_train(case.x, case.weight, case.bias, rm0, rv0,
                                         bench.MOMENTUM, bench.EPS)[0],
        "eval": reference.forward_eval(case.x, rm0, rv0, case.weight, case.bias, bench.EPS),
        "backward": reference.backward(case.dy, case.x, case.mean, case.invstd,
                                       case.weight, True)[0],
    }
    for op, fn in case.cybn_fns().items():
        np.testing.assert_allclose(fn()[0] if op != "eval" else fn(), expected[op],
                                   rtol=tol, atol=tol, err_msg=f"cybn {op}")
    if HAVE_TORCH:
        import torch
        with torch.inference_mode():
            for op, forms in case.torch_fns(torch).items():
                for form, fn in forms.items():
                    np.testing.assert_allclose(fn()[0].numpy(), expected[op], rtol=tol,
                                               atol=tol, err_msg=f"torch {op} {form}")


def test_bench_fusions(tmp_path):
    """--fusions: the fused ReLU/residual and channels-last table (a smoke test)."""
    json_path = tmp_path / "fusions.json"
    cmd = [sys.executable, "-m", "cybn.bench", "--fusions", "--shapes", "2x8x4x4,3x16x8x8",
           "--reps", "2", "--warmup", "1", "--quiet", "--dtype", "float32",
           "--json", str(json_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for header in ("fwd relu/plain", "bwd separate/add+relu", "CL train vs torch"):
        assert header in proc.stdout
    with open(json_path, encoding="utf-8") as f:
        result = json.load(f)
    rows = result["rows"]
    assert [r["shape"] for r in rows] == [[2, 8, 4, 4], [3, 16, 8, 8]]
    for row in rows:
        for op in ("forward", "backward"):
            assert set(row[op]) == {"plain", "relu", "add+relu", "separate"}
            assert all(t > 0 for t in row[op].values())
        assert {"cybn", "torch"} <= set(row["channels_last_train"])
