"""Without chromium the browser tests are skipped, and the run ends saying so with the command to fix it."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import INSTALL_CHROMIUM, ROOT

# A browser test and a plain one, run with tests/conftest.py as a plugin and chromium hidden.
TINY = '''
import pytest

import tests.conftest as shared

shared.CHROMIUM = shared.Path("/nonexistent/chromium")


@pytest.mark.browser
def test_in_the_browser(browser):
    pass


def test_plain():
    pass
'''


def run_pytest(tmp_path, *args: str) -> str:
    """Run pytest -q on the tiny file the way `make test` runs the suite; its output."""
    (tmp_path / "test_tiny.py").write_text(TINY)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
           "--rootdir", str(tmp_path), "-W", "ignore::pytest.PytestUnknownMarkWarning", *args,
           str(tmp_path / "test_tiny.py")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_skipped_browser_tests_end_the_run_with_the_install_command(tmp_path):
    out = run_pytest(tmp_path)
    assert "1 passed, 1 skipped" in out, out
    block = out[out.index("1 browser test did not run"):]  # ValueError: no closing block
    assert "needs Debian chromium" in block, block
    assert f"Install chromium, then run make test again:  {INSTALL_CHROMIUM}" in block, block


def test_no_block_when_no_browser_test_was_skipped(tmp_path):
    out = run_pytest(tmp_path, "-k", "plain")
    assert "1 passed" in out and "did not run" not in out, out
