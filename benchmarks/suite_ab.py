"""Test-suite time against an earlier commit's, timed A B B A on one machine (the VM's speed drifts
between runs, so the two suites alternate and each ratio pairs neighbours).

    python benchmarks/suite_ab.py --baseline ../repghost-507bdb2 --out docs/results/tests/suite_ab

--baseline: a checkout of the earlier commit (e.g. `git worktree add ../repghost-507bdb2 507bdb2`),
run the way that commit ran its suite (one process: `python -m pytest -q`, with its `src/` first on
the path) with this checkout's virtual environment; this checkout runs `make test`'s pytest command
(xdist workers). Times are pytest's own "in N s" (collection included, set-up excluded). Writes
OUT.json and OUT.md: each run (order, commit, tests passed, seconds) and the ratios now/baseline of
each adjacent pair with their median. Nothing else should run on the machine meanwhile.

    python benchmarks/suite_ab.py --fast-tier --rounds 2 --out docs/results/tests/fast_tier

--fast-tier times `make test-fast`'s pytest command (the tests not marked slow or network) of this
checkout alone, --rounds times, and writes the same kind of record (no baseline, no ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"(\d+) passed.*? in ([\d.]+)s")


def _makefile_pytest_args() -> list:
    """`make test`'s pytest options (PARALLEL in the Makefile), so this times what CI runs."""
    text = (REPO / "Makefile").read_text()
    match = re.search(r"^PARALLEL\s*:?=\s*(.*)$", text, re.M)
    return match.group(1).split() if match else []


def _makefile_fast_marker() -> str:
    """`make test-fast`'s marker expression (its `-m "..."`), so --fast-tier times what that target runs."""
    match = re.search(r'^test-fast:.*\n\t.*-m "([^"]+)"', (REPO / "Makefile").read_text(), re.M)
    if not match:
        raise SystemExit("the Makefile's test-fast target has no -m \"...\" marker expression")
    return match.group(1)


def _write(out: Path, record: dict, lines: list) -> None:
    """OUT.json (the record) and OUT.md (``lines``), and the Markdown on stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


def _commit(folder: Path) -> str:
    return subprocess.run(["git", "-C", str(folder), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def _run(label: str, folder: Path, args: list, env: dict) -> dict:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=folder, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    match = SUMMARY.search(tail)
    if proc.returncode != 0 or not match:
        raise SystemExit(f"{label}: pytest failed (exit {proc.returncode}): {tail or proc.stderr[-500:]}")
    row = dict(suite=label, commit=_commit(folder), passed=int(match.group(1)), pytest_seconds=float(match.group(2)),
               wall_seconds=round(wall, 1), summary=tail)
    print(f"{label} ({row['commit']}): {row['passed']} passed in {row['pytest_seconds']:.0f} s", file=sys.stderr)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", type=Path, help="a checkout of the earlier commit (needed unless --fast-tier)")
    p.add_argument("--fast-tier", action="store_true", help="time this checkout's fast tier (make test-fast) alone")
    p.add_argument("--rounds", type=int, default=2, help="A B B A blocks (each runs both suites twice); with --fast-tier, runs")
    p.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = p.parse_args()
    if args.fast_tier:
        return _fast_tier(args)
    if args.baseline is None:
        p.error("--baseline is required (or pass --fast-tier)")
    from repghost.bench.report import environment

    base_env = dict(os.environ, PYTHONPATH=str(args.baseline.resolve() / "src"))
    now_env = dict(os.environ)
    suites = {"baseline": (args.baseline.resolve(), [], base_env), "now": (REPO, _makefile_pytest_args(), now_env)}
    order = ["now", "baseline", "baseline", "now"] * args.rounds
    runs = [dict(_run(name, *suites[name]), order=i) for i, name in enumerate(order)]
    ratios = []
    for a, b in zip(runs, runs[1:]):  # every adjacent (now, baseline) pair, in either order
        if {a["suite"], b["suite"]} == {"now", "baseline"}:
            now, base = (a, b) if a["suite"] == "now" else (b, a)
            ratios.append(round(now["pytest_seconds"] / base["pytest_seconds"], 3))
    record = dict(environment=environment(threads=os.cpu_count() or 1),
                  command=" ".join(["benchmarks/suite_ab.py", "--baseline", f"<checkout of {runs[1]['commit']}>",
                                    "--rounds", str(args.rounds), "--out", os.path.relpath(args.out.resolve(), REPO)]),
                  now_command=f"python -m pytest -q {' '.join(_makefile_pytest_args())}",
                  baseline_command="python -m pytest -q (one process, the baseline's src/ first on the path)",
                  runs=runs, pair_ratios=ratios, median_ratio=statistics.median(ratios))
    env = record["environment"]
    lines = ["# Test-suite time: now against the baseline commit, A B B A\n",
             f"Written by `python {record['command']}` on {env['date']}, {env['cpu']}, {env['cpu_count']} cores. "
             "Seconds: pytest's own summary (set-up excluded).\n",
             "| order | suite | commit | passed | pytest s |", "|---|---|---|---|---|"]
    lines += [f"| {r['order']} | {r['suite']} | {r['commit']} | {r['passed']} | {r['pytest_seconds']:.0f} |" for r in runs]
    lines += ["", f"Ratios now/baseline of adjacent pairs: {', '.join(f'{r:.3f}' for r in ratios)}; "
                  f"median **{record['median_ratio']:.3f}**.", ""]
    _write(args.out, record, lines)
    return 0


def _fast_tier(args: argparse.Namespace) -> int:
    from repghost.bench.report import environment
    from repghost.deploy.quantize import int8_flag_names

    marker = _makefile_fast_marker()
    runs = [dict(_run("fast tier", REPO, _makefile_pytest_args() + ["-m", marker], dict(os.environ)), order=i)
            for i in range(args.rounds)]
    record = dict(environment=environment(threads=os.cpu_count() or 1),
                  command=f"benchmarks/suite_ab.py --fast-tier --rounds {args.rounds} --out {os.path.relpath(args.out.resolve(), REPO)}",
                  pytest_command=f"python -m pytest -q {' '.join(_makefile_pytest_args())} -m '{marker}'", runs=runs)
    env = record["environment"]
    lines = ["# Test-suite time: the fast tier (make test-fast)\n",
             f"Written by `python {record['command']}` on {env['date']}, {env['cpu']}, {env['cpu_count']} cores "
             f"(flags {', '.join(int8_flag_names(env['cpu_flags']))}). Seconds: pytest's own summary (set-up excluded).\n",
             "| order | commit | passed | pytest s |", "|---|---|---|---|"]
    lines += [f"| {r['order']} | {r['commit']} | {r['passed']} | {r['pytest_seconds']:.0f} |" for r in runs] + [""]
    _write(args.out, record, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
