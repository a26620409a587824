"""CI's own rules: a skip fails where REPGHOST_NO_SKIPS=1 (set by .ci/run), except the network tier's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _inner_suite(tmp_path: Path, no_skips: bool) -> subprocess.CompletedProcess:
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_inner.py").write_text(
        "import pytest\n\n"
        "def test_skips():\n    pytest.skip('no network')\n\n"
        "@pytest.fixture\ndef data():\n    pytest.skip('fetch failed')\n\n"
        "def test_fixture_skips(data):\n    pass\n\n"
        "@pytest.mark.network\ndef test_network_tier_skips():\n    pytest.skip('the index does not answer')\n\n"
        "def test_passes():\n    assert True\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["REPGHOST_NO_SKIPS"] = "1" if no_skips else "0"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_a_skip_fails_where_skips_are_not_allowed(tmp_path):
    strict = _inner_suite(tmp_path, no_skips=True)
    assert strict.returncode == 1, strict.stdout
    # the two plain skips fail (the fixture's as an error); the network tier's skip (index unreachable) stays a skip
    summary = strict.stdout.splitlines()[-1]
    assert all(part in summary for part in ("1 failed", "1 passed", "1 skipped", "1 error")), strict.stdout
    assert "REPGHOST_NO_SKIPS=1 allows no skip" in strict.stdout and "no network" in strict.stdout
    relaxed = _inner_suite(tmp_path, no_skips=False)
    assert relaxed.returncode == 0 and "1 passed, 3 skipped" in relaxed.stdout.splitlines()[-1], relaxed.stdout


def test_ci_forbids_skips_and_runs_the_readme_test_command():
    run = (ROOT / ".ci" / "run").read_text()
    assert "export REPGHOST_NO_SKIPS=1" in run and "make test" in run
    assert "make test" in (ROOT / "README.md").read_text()
