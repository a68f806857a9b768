"""The CI crash witness (tests/crash_witness.py): a test process that dies of a native abort has its last captured
output printed; a run that ends normally prints nothing extra."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

CONFTEST = """
import crash_witness

def pytest_configure(config):
    crash_witness.start(config)

def pytest_unconfigure(config):
    crash_witness.stop()
"""

DIES = """
import os

def test_passes():
    print("an earlier test's output, already collected")

def test_native_code_aborts():
    os.write(2, b"terminate called after throwing an instance of 'std::system_error' (last words)\\n")
    os.abort()
"""

PASSES = """
def test_passes():
    print("nothing to see")
"""


def _run(tmp_path: Path, body: str, witness: str = "1") -> subprocess.CompletedProcess:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_probe.py").write_text(body)
    env = {**os.environ, "CXR_CRASH_WITNESS": witness, "PYTHONPATH": str(TESTS)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_a_native_abort_shows_what_the_test_wrote_before_it(tmp_path):
    done = _run(tmp_path, DIES)
    assert done.returncode in (-6, 134), done.stdout + done.stderr
    assert "Fatal Python error: Aborted" in done.stderr  # faulthandler's dump, as CI saw it
    assert "crash witness: the last" in done.stderr
    assert "'std::system_error' (last words)" in done.stderr
    # Only what was captured since the last test ended, not the earlier test's output.
    assert "an earlier test's output" not in done.stderr


def test_no_witness_output_when_the_run_ends_normally_or_it_is_off(tmp_path):
    done = _run(tmp_path, PASSES)
    assert done.returncode == 0 and "1 passed" in done.stdout
    assert "crash witness" not in done.stdout + done.stderr
    off = _run(tmp_path, DIES, witness="0")
    assert off.returncode in (-6, 134)
    assert "(last words)" not in off.stdout + off.stderr
