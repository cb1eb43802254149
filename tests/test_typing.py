"""The shipped type information: mypy --strict accepts tests/typed_usage.py,
which uses the whole public API, and rejects wrong uses (so the stubs are
really read, not replaced by Any)."""
import subprocess
import sys
from pathlib import Path

import pytest

USAGE = Path(__file__).resolve().parent / "typed_usage.py"


def mypy(path, cache):
    """mypy --strict on path.  An installed package is found in site-packages;
    an editable install's import hook is invisible to mypy, so then mypy runs
    from the directory that holds the imported cybn package."""
    import cybn

    pytest.importorskip("mypy", reason="pip install 'cybn[typing]'")
    holder = Path(cybn.__file__).parents[1]
    installed = holder.name in ("site-packages", "dist-packages")
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental",
                           "--cache-dir", str(cache / ".mypy_cache"), str(path)],
                          capture_output=True, text=True, timeout=600,
                          cwd=cache if installed else holder)


def test_package_ships_type_information():
    import cybn

    package = Path(cybn.__file__).parent
    for name in ("py.typed", "__init__.py", "_api.pyi", "layer.pyi", "sync.pyi",
                 "_kernels.pyi"):
        assert (package / name).is_file(), name


@pytest.mark.slow
def test_mypy_strict_accepts_the_typed_usage(tmp_path):
    proc = mypy(USAGE, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success: no issues found" in proc.stdout


@pytest.mark.slow
def test_mypy_strict_rejects_wrong_uses(tmp_path):
    bad = tmp_path / "bad_usage.py"
    bad.write_text(
        "import numpy as np\n"
        "import cybn\n"
        "x = np.ones((2, 3), np.float32)\n"
        "y, mean, invstd = cybn.forward_train(x, momentum='fast')\n"
        "bn = cybn.BatchNorm1d(3)\n"
        "n: str = bn.num_features\n"
        "cybn.backward(x, x, mean, invstd, training=True, activaton='relu')\n",
        encoding="utf-8")
    proc = mypy(bad, tmp_path)
    assert proc.returncode == 1
    for line in (4, 6, 7):
        assert f"bad_usage.py:{line}: error" in proc.stdout, proc.stdout
