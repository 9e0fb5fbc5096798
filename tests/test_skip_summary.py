"""Nothing skipped in silence: `make test` ends with a block naming each group of skipped tests and the
command that makes it run, and every skip in the suite gives its command."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.conftest import INSTALL_CHROMIUM, NEEDS_GO, ROOT, RUN

# A browser test (chromium hidden), two tests skipped for want of Go, one skipped with no command, a plain
# one; run with tests/conftest.py as a plugin.
TINY = '''
import pytest

import tests.conftest as shared

shared.CHROMIUM = shared.Path("/nonexistent/chromium")


@pytest.mark.browser
def test_in_the_browser(browser):
    pass


@pytest.mark.parametrize("n", [1, 2])
def test_against_go(n):
    pytest.skip(shared.NEEDS_GO)


def test_bare():
    pytest.skip("no reason to run")


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


# make test runs the suite in worker processes (pytest-xdist): skip reports travel from them to the summary.
@pytest.mark.parametrize("workers", [(), ("-n", "2", "--dist", "loadfile")], ids=["one process", "xdist"])
def test_skipped_tests_end_the_run_with_each_group_and_its_command(tmp_path, workers):
    out = run_pytest(tmp_path, *workers)
    assert "1 passed, 4 skipped" in out, out
    block = out[out.index("4 tests were skipped: run each command below, then make test"):]  # ValueError: none
    go_why, _, go_command = NEEDS_GO.partition(RUN)
    go = block[block.index(go_why):]
    assert go.splitlines()[1:3] == ["    2 tests in test_tiny.py", f"    to run them: {go_command}"], block
    browser = block[block.index("Browser tests"):]
    assert browser.splitlines()[1:3] == ["    1 test in test_tiny.py", f"    to run them: {INSTALL_CHROMIUM}"], block
    bare = block[block.index("no reason to run"):]
    assert "no command given" in bare.splitlines()[2], block


def test_no_block_when_nothing_was_skipped(tmp_path):
    out = run_pytest(tmp_path, "-k", "plain")
    assert "1 passed" in out and "skipped" not in out, out


def skip_calls(tree: ast.AST):
    """(line, reason node) of every pytest.skip, importorskip, mark.skip and mark.skipif in a module."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        if name in ("pytest.skip", "pytest.mark.skip", "pytest.mark.skipif", "pytest.importorskip"):
            keyword = next((k.value for k in node.keywords if k.arg == "reason"), None)
            positional = {"pytest.skip": 0, "pytest.mark.skip": 0}.get(name)
            if keyword is None and positional is not None and len(node.args) > positional:
                keyword = node.args[positional]
            yield node.lineno, keyword


def test_every_skip_in_the_suite_says_what_makes_it_run():
    bare = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for line, reason in skip_calls(ast.parse(path.read_text(), str(path))):
            text = "" if reason is None else ast.unparse(reason)
            if not (text.startswith(("NEEDS_", "shared.NEEDS_", "needs(")) or RUN in text):
                bare.append(f"{path.name}:{line}: {text or 'no reason'}")
    assert not bare, "skip with a tests.conftest.NEEDS_* reason (or needs(why, command)):\n" + "\n".join(bare)
