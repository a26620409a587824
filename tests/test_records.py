"""The published records and docs: paths in them are relative to the repository (a reader's clone),
never a machine's absolute paths."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Machine-specific absolute locations (system data paths such as /usr/share/... are fine: they name a package).
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|tmp|root|home|mnt|Users)/[\w.-]+")


def test_records_and_docs_hold_no_machine_paths():
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*"))]
    found = []
    for path in files:
        if path.is_file() and path.suffix in (".md", ".json", ".jsonl", ".yaml", ".yml", ".log", ".txt", ".csv"):
            for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                for match in MACHINE_PATH.finditer(line):
                    found.append(f"{path.relative_to(ROOT)}:{lineno}: {match.group(0)}")
    assert found == [], "absolute machine paths in records (store them relative to the repository):\n" + "\n".join(found[:20])
