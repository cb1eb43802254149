"""The float32 element-wise passes in their fused multiply-add form (on CPUs
with fma) and the unfused one (the others): both must round the exact value.

The form is chosen once, at import, from the CPU, or from the environment
variable CYBN_FMA (0 or 1).  The tests below run in this process's form, and
again in each form in a subprocess (test_each_form_in_its_own_process)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cybn
from cybn import _kernels, reference
from conftest import assert_close, random_batch

HERE = Path(__file__).resolve().parent


def _in_form(form, code):
    """Run `code` in a new interpreter with CYBN_FMA=form; returns its stdout."""
    env = {**os.environ, "CYBN_FMA": form}
    proc = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.parametrize("form", ["0", "1"], ids=["unfused", "fused"])
def test_each_form_in_its_own_process(form):
    env = {**os.environ, "CYBN_FMA": form}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
         "not own_process and not agree and not environment", str(HERE / "test_fma.py")],
        cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout


def test_the_form_follows_the_cpu_unless_the_environment_says():
    """The default is whether the CPU has fma: on x86, NumPy's own run-time
    detection says (FMA3); the other 64-bit architectures always have it."""
    from numpy._core._multiarray_umath import __cpu_features__ as features

    expected = features["FMA3"] if "FMA3" in features else True
    code = "from cybn import _kernels; print(_kernels.machine_and_build()['fused_float32_passes'])"
    for form, want in (("", expected), ("0", False), ("1", True)):
        assert _in_form(form, code).strip() == str(want), form
    env = {**os.environ, "CYBN_FMA": "yes"}
    proc = subprocess.run([sys.executable, "-c", "import cybn"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode != 0 and "CYBN_FMA" in proc.stderr


def _exact(*terms):
    """Long double (64 significant bits on x86) of the formula's terms."""
    return [np.asarray(t, np.longdouble) for t in terms]


def test_float32_elementwise_passes_round_the_exact_value():
    """y = (x - mean) * scale + shift and dx = ((g - h) - (x - mean) * q) * s,
    computed in long double then rounded to float32, against the kernels,
    values far from zero mean (mean / std = 3) among them."""
    rng = np.random.default_rng(40)
    c = 8
    x = random_batch((16, c, 48, 48), np.float32, seed=41, offset=3.0)
    dy = random_batch(x.shape, np.float32, seed=42)
    mean, scale, shift = rng.standard_normal(c) + 3, rng.uniform(0.5, 2, c), rng.standard_normal(c)
    h, q = 0.1 * rng.standard_normal(c), rng.uniform(0.5, 1.5, c)
    xl, dyl = _exact(x, dy)
    m, s, b, hl, ql = (v[:, None, None] for v in _exact(mean, scale, shift, h, q))
    for name, got, exact in [
        ("y", _kernels.affine_planar["float"], (xl - m) * s + b),
        ("dx", _kernels.grad_input_planar["float"], ((dyl - hl) - (xl - m) * ql) * s),
    ]:
        out = np.empty_like(x)
        if name == "y":
            got(x, out, mean, scale, shift)
        else:
            got(dy, x, out, mean, h, q, scale)
        expected = exact.astype(np.float32)
        ulps = np.abs(out.view(np.int32).astype(np.int64) - expected.view(np.int32))
        # Both forms are off by a double's rounding before the float's: a
        # different float only within ~2^-29 ulp of a tie (none of these).
        assert ulps.max() <= 1, name
        assert np.count_nonzero(ulps) <= x.size // 100000, name


@pytest.mark.parametrize("shape", [(12, 4, 8, 8), (2, 251, 28, 28), (4, 3, 96, 96)], ids=str)
def test_float32_forward_and_backward(shape):
    x = random_batch(shape, np.float32, seed=45, offset=3.0, scale=2.0)
    dy = random_batch(shape, np.float32, seed=46)
    rng = np.random.default_rng(1)
    weight, bias = rng.uniform(0.5, 1.5, shape[1]), rng.standard_normal(shape[1])
    y, mean, invstd = cybn.forward_train(x, weight, bias)
    expected = reference.forward_train(x, weight, bias)
    assert_close(y, expected[0], np.float32, "y")
    dx, dw, db = cybn.backward(dy, x, mean, invstd, weight)
    for name, got, want in zip(["dx", "dw", "db"], (dx, dw, db),
                               reference.backward(dy, x, mean, invstd, weight)):
        assert_close(got, want, np.float32, name)
    rm, rv = np.linspace(-1, 1, shape[1]), np.linspace(0.5, 2, shape[1])
    assert_close(cybn.forward_eval(x, rm, rv, weight, bias),
                 reference.forward_eval(x, rm, rv, weight, bias), np.float32, "y_eval")


_SPECIAL_VALUES = """
import json, sys
import numpy as np
import cybn
from conftest import random_batch
x = random_batch((4, 3, 6, 6), np.float32, seed=43)
x[:, 0] = 2.0  # constant channel: var = 0, with eps = 0 invstd is inf
x[1, 1, 2, 2] = np.inf
x[2, 2, 0, 0] = np.nan
dy = random_batch(x.shape, np.float32, seed=44)
with np.errstate(all="ignore"):
    y, mean, invstd = cybn.forward_train(x, eps=0.0)
    dx, dw, db = cybn.backward(dy, x, mean, invstd)
    dx_eval, _, _ = cybn.backward(dy, x, mean, invstd, training=False)
    y_eval = cybn.forward_eval(x, np.array([2.0, 0, 0]), np.array([0.0, 1, 1]), eps=0.0)
print(json.dumps({name: [a.dtype.str, a.tobytes().hex()] for name, a in
                  dict(y=y, dx=dx, dw=dw, db=db, dx_eval=dx_eval, y_eval=y_eval).items()}))
"""


def test_both_forms_agree_on_special_values():
    """The fused dx keeps the unfused form where its coefficients are not
    finite (var + eps = 0: an infinite scale); the fused y needs no such care."""
    fused, unfused = (json.loads(_in_form(form, _SPECIAL_VALUES)) for form in ("1", "0"))
    assert fused == unfused
    # The constant channel's evaluation-mode dx: g * inf, where the fused form
    # would give inf - inf = NaN.
    dtype, data = fused["dx_eval"]
    dx_eval = np.frombuffer(bytes.fromhex(data), dtype).reshape(4, 3, 6, 6)
    assert np.isinf(dx_eval[:, 0]).all()
