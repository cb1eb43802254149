"""The benchmark tools in benchmarks/: the comparison (compare.py) and the
asv suite's torch benchmarks when torch is missing.

The smoke runs check the structure of what the comparison prints and
writes on tiny shapes; no timing is ever judged here.
"""
import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cybn import reference

ROOT = Path(__file__).resolve().parents[1]
COMPARE = ROOT / "benchmarks" / "compare.py"


@pytest.fixture(scope="module")
def compare():
    sys.path.insert(0, str(ROOT))
    try:
        return importlib.import_module("benchmarks.compare")
    finally:
        sys.path.remove(str(ROOT))


def run_compare(tmp_path, *extra):
    pytest.importorskip("matplotlib", reason="the chart needs pip install 'cybn[bench]'")
    json_path, png_path = tmp_path / "compare.json", tmp_path / "compare.png"
    cmd = [sys.executable, str(COMPARE), "--shapes", "2x8x4x4,4x16x8x8", "--reps", "2",
           "--warmup", "1", "--min-time", "0.001", "--quiet", "--json", str(json_path),
           "--png", str(png_path), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with open(png_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return proc.stdout, json.loads(json_path.read_text(encoding="utf-8"))


def check_timing(t):
    assert 0 < t["min"] <= t["median"] and len(t["times"]) == 2


@pytest.mark.slow
def test_compare_against_torch_and_jax(tmp_path):
    pytest.importorskip("torch", reason="pip install 'cybn[torch]'")
    pytest.importorskip("jax", reason="pip install 'cybn[bench]'")
    out, result = run_compare(tmp_path, "--dtype", "both", "--threads", "2",
                              "--target", "eval:torch=0.001", "--target", "train:jax=1e9")
    lines = out.splitlines()
    assert lines[0].startswith("cybn compared with PyTorch, JAX/XLA and NumPy")
    assert max(len(line) for line in lines) <= 100
    assert "issue" not in out.lower()
    for text in ("shape", "vs torch", "vs jax", "2x8x4x4", "4x16x8x8", "float64", "backward",
                 "geometric means"):
        assert text in out
    settings = result["settings"]
    assert settings["shapes"] == [[2, 8, 4, 4], [4, 16, 8, 8]] and settings["threads"] == 2
    assert settings["torch"] is True and settings["jax"] is True and settings["numpy"] is False
    assert result["machine"]["threads"] == 2 and result["machine"]["versions"]["jax"]
    rows = result["results"]
    assert {(r["dtype"], tuple(r["shape"]), r["op"]) for r in rows} == {
        (d, s, op) for d in ("float32", "float64") for s in ((2, 8, 4, 4), (4, 16, 8, 8))
        for op in ("train", "eval", "backward")}
    for r in rows:
        for name in ("cybn", "torch", "jax"):
            check_timing(r[name])
        assert r["torch"]["form"] in ("default", "out")
        assert r["vs_torch"] == pytest.approx(r["torch"]["median"] / r["cybn"]["median"])
        assert r["vs_jax"] == pytest.approx(r["jax"]["median"] / r["cybn"]["median"])
        assert r["numpy"] is None and r["vs_numpy"] is None
    eval_target, jax_target = result["targets"]
    assert eval_target["passed"] is True and eval_target["lowest"] == min(
        r["vs_torch"] for r in rows if r["op"] == "eval")
    assert jax_target["passed"] is False
    assert "target eval vs torch >= 0.001x on every shape: PASS" in out


@pytest.mark.slow
def test_compare_cybn_and_numpy_only(tmp_path):
    out, result = run_compare(tmp_path, "--no-torch", "--no-jax", "--numpy", "--threads", "1",
                              "--target", "train:torch=1")
    assert "n/a" in out
    assert result["settings"]["torch"] is False and result["settings"]["jax"] is False
    assert len(result["results"]) == 2 * 3
    for r in result["results"]:
        assert r["torch"] is None and r["jax"] is None and r["vs_torch"] is None
        check_timing(r["cybn"])
        check_timing(r["numpy"])
        assert r["vs_numpy"] > 0
    assert result["targets"][0]["passed"] is None  # torch was not run: no verdict


@pytest.mark.parametrize("text", ["", "32x", "0x4", "5", "2x3x4x5x6x7", "1x3", "ax3"])
def test_compare_rejects_bad_shapes(compare, text, capsys):
    with pytest.raises(SystemExit) as info:
        compare.main(["--shapes", text])
    assert info.value.code == 2
    assert "shape" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["train", "train:torch", "fit:torch=2", "train:mxnet=2",
                                  "train:torch=0", "train:torch=x"])
def test_compare_rejects_bad_targets(compare, text, capsys):
    with pytest.raises(SystemExit) as info:
        compare.main(["--target", text])
    assert info.value.code == 2
    assert "target" in capsys.readouterr().err


def test_parse_shapes_and_targets(compare):
    assert compare.parse_shapes("32x64x56x56, 64x2048") == [(32, 64, 56, 56), (64, 2048)]
    assert compare.parse_target("backward:jax=1.5") == ("backward", "jax", 1.5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compared_calls_compute_batch_norm(compare, dtype):
    """Every timed function, cybn's, torch's (both forms), JAX's and the
    reference's, computes batch norm on the same data."""
    torch = pytest.importorskip("torch", reason="pip install 'cybn[torch]'")
    pytest.importorskip("jax", reason="pip install 'cybn[bench]'")
    jax = compare._import_jax(2, ["float64"])
    case = compare.Case((4, 3, 5, 5), dtype)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    rm0, rv0 = case.running_mean.copy(), case.running_var.copy()
    expected = {
        "train": reference.forward_train(case.x, case.weight, case.bias, rm0.copy(), rv0.copy(),
                                         compare.MOMENTUM, compare.EPS)[0],
        "eval": reference.forward_eval(case.x, rm0, rv0, case.weight, case.bias, compare.EPS),
        "backward": reference.backward(case.dy, case.x, case.mean, case.invstd,
                                       case.weight, True)[0],
    }
    # cybn and torch's .out forms write into the same preallocated array: copies.
    results = {f"cybn {op}": fn().copy() for op, fn in case.cybn_fns().items()}
    with torch.inference_mode():
        for op, forms in case.torch_fns(torch).items():
            for form, fn in forms.items():
                results[f"torch {form} {op}"] = fn().numpy().copy()
    for op, fn in case.jax_fns(jax).items():
        results[f"jax {op}"] = np.asarray(fn())
    for op, fn in case.numpy_fns().items():
        results[f"numpy {op}"] = fn()
    assert len(results) == 15
    for name, value in results.items():
        np.testing.assert_allclose(value, expected[name.split()[-1]], rtol=tol, atol=tol,
                                   err_msg=name)
        assert value.dtype == (np.float64 if name.startswith("numpy") else dtype), name


def test_replace_table_between_markers(compare):
    start, end = compare._markers("summary")
    text = f"before\n{start}\nold\nrows\n{end}\nafter\n"
    assert compare.replace_table(text, "summary", "| new |") == (
        f"before\n{start}\n| new |\n{end}\nafter\n")
    with pytest.raises(ValueError, match="markers"):
        compare.replace_table("no markers here", "summary", "| new |")


def test_asv_torch_suite_skips_cleanly_without_torch(monkeypatch):
    """asv calls teardown after a setup that skipped (NotImplementedError);
    in a history run torch is not installed, and teardown must not raise."""
    sys.path.insert(0, str(ROOT))
    try:
        bench_torch = importlib.import_module("benchmarks.bench_torch")
    finally:
        sys.path.remove(str(ROOT))

    def missing():
        raise NotImplementedError("torch is not installed")

    monkeypatch.setattr(bench_torch, "_import_torch", missing)
    suite = bench_torch.Torch()
    with pytest.raises(NotImplementedError, match="torch is not installed"):
        suite.setup("float32", "2x8x4x4", 1)
    assert suite.teardown("float32", "2x8x4x4", 1) is None
    assert suite._limits is None and getattr(suite, "_mode", None) is None
