"""CI's own rules: a skip fails where REPGHOST_NO_SKIPS=1 (set by .ci/run), except the network tier's
skip when pip's index does not answer."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INNER = (
    "import pytest\n\n"
    "def test_skips():\n    pytest.skip('no network')\n\n"
    "@pytest.fixture\ndef data():\n    pytest.skip('fetch failed')\n\n"
    "def test_fixture_skips(data):\n    pass\n\n"
    "@pytest.mark.network\ndef test_network_tier_offline():\n    pytest.skip(\"pip's package index does not answer (offline?)\")\n\n"
    "@pytest.mark.network\ndef test_network_tier_other_reason():\n    pytest.skip('the archive changed')\n\n"
    "def test_passes():\n    assert True\n"
)


def _inner_suite(tmp_path: Path, no_skips: bool, source: str) -> subprocess.CompletedProcess:
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_inner.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["REPGHOST_NO_SKIPS"] = "1" if no_skips else "0"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_a_skip_fails_where_skips_are_not_allowed(tmp_path):
    strict = _inner_suite(tmp_path, True, INNER)
    assert strict.returncode == 1, strict.stdout
    # the plain skips fail (the fixture's as an error), and so does a network test skipped for another
    # reason; only the network tier's offline skip stays a skip
    summary = strict.stdout.splitlines()[-1]
    assert all(part in summary for part in ("2 failed", "1 passed", "1 skipped", "1 error")), strict.stdout
    assert "REPGHOST_NO_SKIPS=1 allows no skip" in strict.stdout and "the archive changed" in strict.stdout
    relaxed = _inner_suite(tmp_path, False, INNER)
    assert relaxed.returncode == 0 and "1 passed, 4 skipped" in relaxed.stdout.splitlines()[-1], relaxed.stdout


def test_a_module_skipped_when_collected_fails_too(tmp_path):
    source = "import pytest\n\npytest.importorskip('no_such_module_anywhere')\n\ndef test_never_runs():\n    pass\n"
    strict = _inner_suite(tmp_path, True, source)
    assert strict.returncode != 0 and "module skipped, and REPGHOST_NO_SKIPS=1" in strict.stdout, strict.stdout
    relaxed = _inner_suite(tmp_path, False, source)  # exit 5: no test ran, which is not a failure
    assert relaxed.returncode == 5 and "1 skipped" in relaxed.stdout.splitlines()[-1], relaxed.stdout


def test_ci_forbids_skips_and_runs_the_readme_test_command():
    run = (ROOT / ".ci" / "run").read_text()
    assert "export REPGHOST_NO_SKIPS=1" in run and "make test" in run
    assert "make test" in (ROOT / "README.md").read_text()
