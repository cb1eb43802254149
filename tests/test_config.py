"""cybn.show_config() and the cache sizes it reports."""
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cybn
from cybn import _config


def test_environment_overrides_the_detected_sizes(monkeypatch):
    monkeypatch.setenv("CYBN_CACHE_SIZES", "L2=1536K, l3=256MiB")
    sizes = _config.cache_sizes()
    assert sizes["L2"] == 1536 * 1024 and sizes["L3"] == 256 << 20
    assert sizes["source"] == {"L2": "CYBN_CACHE_SIZES", "L3": "CYBN_CACHE_SIZES"}
    monkeypatch.setenv("CYBN_CACHE_SIZES", "L3=8388608")  # L2 is then detected
    sizes = _config.cache_sizes()
    assert sizes["L3"] == 8 << 20 and sizes["source"]["L2"] != "CYBN_CACHE_SIZES"


@pytest.mark.parametrize("bad", ["L4=1M", "L2=0", "L2=big", "L2"])
def test_bad_environment_value_names_the_variable(monkeypatch, bad):
    monkeypatch.setenv("CYBN_CACHE_SIZES", bad)
    with pytest.raises(ValueError, match="CYBN_CACHE_SIZES"):
        _config.cache_sizes()


def test_sysfs_is_read_level_by_level(tmp_path):
    for index, (level, kind, size) in enumerate(
            [(1, "Data", "48K"), (1, "Instruction", "32K"), (2, "Unified", "2048K"),
             (3, "Unified", "32768K")]):
        entry = tmp_path / f"index{index}"
        entry.mkdir()
        for name, value in (("level", level), ("type", kind), ("size", size)):
            (entry / name).write_text(f"{value}\n")
    assert _config._from_sysfs(str(tmp_path)) == {"L2": 2 << 20, "L3": 32 << 20}
    assert _config._from_sysfs(str(tmp_path / "missing")) == {}


def test_fallback_when_nothing_says(monkeypatch):
    monkeypatch.delenv("CYBN_CACHE_SIZES", raising=False)
    monkeypatch.setattr(_config, "_from_sysconf", lambda: {})
    monkeypatch.setattr(_config, "_from_sysfs", lambda: {})
    sizes = _config.cache_sizes()
    assert (sizes["L2"], sizes["L3"]) == (1 << 20, 32 << 20)
    assert sizes["source"] == {"L2": "fallback", "L3": "fallback"}


def test_show_config_reports_the_cpu_as_numpy_sees_it():
    out = io.StringIO()
    cybn.show_config(file=out)
    text = out.getvalue()
    assert text.startswith(f"cybn {cybn.__version__}")
    numpy_features = np._core._multiarray_umath.__cpu_features__
    features = text.split("CPU features")[1].split(";")[0]
    for ours, numpys in (("avx2", "AVX2"), ("fma", "FMA3"), ("avx512f", "AVX512F")):
        assert (ours in features) == bool(numpy_features.get(numpys)), (ours, features)
    assert f"threads      {cybn.max_threads()} " in text
    assert "L3 cache" in text and "L2 cache" in text


def test_show_config_threads_follow_omp_num_threads():
    env = dict(os.environ, OMP_NUM_THREADS="1", CYBN_CACHE_SIZES="L2=512K,L3=16M")
    root = str(Path(cybn.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    text = subprocess.run([sys.executable, "-c", "import cybn; cybn.show_config()"],
                          capture_output=True, text=True, env=env, check=True,
                          timeout=60).stdout
    assert "threads      1 " in text
    assert "L2 cache     512 KiB (from CYBN_CACHE_SIZES)" in text
    assert "L3 cache     16 MiB (from CYBN_CACHE_SIZES)" in text
