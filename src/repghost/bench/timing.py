"""Timing: interleaved rounds, phases, paired ratios, and :func:`time_models`, the one loop that
prepares runners, sets the thread count, times and restores it (used by the latency benchmark,
RQ1 and the ablation sweep).

Method: batch 1, the same number of threads in every runtime; after a warm-up, every runner of a
phase is called once per round in a freshly shuffled order, with the garbage collector paused, so
load changes on a shared machine hit all of them alike. Comparisons are made within a phase: one
phase per runtime, and one phase per cross-runtime pair (two runners of different runtimes timed
against each other). A ratio is the median over rounds of the per-round ratio
(:func:`paired_ratio`), reported with the interquartile range of those per-round ratios
(:func:`ratio_iqr`). Anything compiling during the timed rounds (a compiled model recompiling
after ``torch._dynamo.reset()`` or on a new input shape) raises :class:`CompiledWhileTiming`.
"""

from __future__ import annotations

import gc
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Collection, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .runners import INT8_RUNTIMES, check_runtimes, prepare_runner

__all__ = [
    "Progress", "CompiledWhileTiming", "compilations", "time_interleaved", "time_in_phases", "paired_ratio",
    "ratio_iqr", "TimedModels", "time_models",
]

Progress = Callable[[str, int, int], None]  # (stage, done, total)
Key = Tuple[Hashable, str]  # (model name, runtime)


class CompiledWhileTiming(RuntimeError):
    """Something was compiled inside a timed phase: its samples time a compiler, not a model."""


def compilations() -> int:
    """How many frames torch's compiler (dynamo, which hands graphs to inductor) has compiled in
    this process so far; a counter that ``torch._dynamo.reset()`` does not clear."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["total"])


def time_interleaved(
    runners: Mapping[Hashable, Callable[[], object]],
    *,
    rounds: int,
    warmup: int,
    seed: int = 0,
    progress: Optional[Progress] = None,
    phase: str = "",
) -> Dict[Hashable, List[float]]:
    """Time each zero-argument callable once per round, in a shuffled order; seconds per call.

    ``warmup`` untimed calls per callable come first (a compiled model that lost its compiled
    code may recompile there, with its own settings). The garbage collector is paused while
    timing so that a collection is not charged to whichever call happens to trigger it. Raises
    :class:`CompiledWhileTiming` if anything compiled during the timed rounds.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}")
    names = list(runners)
    for name in names:
        for _ in range(warmup):
            runners[name]()
    samples: Dict[Hashable, List[float]] = {name: [] for name in names}
    rng = random.Random(seed)
    gc.collect()
    gc_was_enabled = gc.isenabled()
    compiled_before = compilations()
    gc.disable()
    try:
        for r in range(rounds):
            rng.shuffle(names)
            for name in names:
                fn = runners[name]
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
            if progress is not None:
                progress("measure", r + 1, rounds)
    finally:
        if gc_was_enabled:
            gc.enable()
    compiled = compilations() - compiled_before
    if compiled:
        raise CompiledWhileTiming(
            f"torch compiled {compiled} frame(s) during the timed rounds{' of ' + phase if phase else ''}, so "
            "those samples time the compiler; a compiled model recompiled (after torch._dynamo.reset(), "
            "e.g. by a torch.export, or on a new input). Give every runner warm-up calls (warmup >= 1) and "
            "compile with torch.compile(options=...) so its settings survive a reset."
        )
    return samples


def time_in_phases(
    runners: Mapping[Hashable, Callable[[], object]],
    phase_of: Callable[[Hashable], Hashable],
    *,
    rounds: int,
    warmup: int,
    seed: int = 0,
    progress: Optional[Progress] = None,
) -> Dict[Hashable, List[float]]:
    """:func:`time_interleaved`, one phase after another for each group of runners with the same
    ``phase_of(key)`` (e.g. the runtime): comparisons are made within a group, and rotating through
    every runner of every group each round would make every call a cold-cache call (measured:
    eager batch-1 latency doubled with 70 (model, runtime) pairs in one rotation)."""
    samples: Dict[Hashable, List[float]] = {}
    for phase in dict.fromkeys(phase_of(key) for key in runners):
        members = {key: fn for key, fn in runners.items() if phase_of(key) == phase}
        report = (lambda stage, done, total, p=phase: progress(f"{stage} {p}", done, total)) if progress else None
        samples.update(
            time_interleaved(members, rounds=rounds, warmup=warmup, seed=seed, progress=report, phase=str(phase))
        )
    return samples


def _per_round(samples: Sequence[float], ref_samples: Sequence[float]) -> np.ndarray:
    a, b = np.asarray(samples, dtype=np.float64), np.asarray(ref_samples, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired samples must be two equally long, non-empty lists, got {a.shape} and {b.shape}")
    if not (np.all(a > 0) and np.all(b > 0)):
        raise ValueError("latency samples must be positive")
    return a / b


def paired_ratio(samples: Sequence[float], ref_samples: Sequence[float]) -> float:
    """Median over rounds of ``samples[r] / ref_samples[r]``: the latency ratio of two runners timed
    in the same rounds (a load change during round r slows both, and cancels in its ratio).

    This is the ratio every report reads; it is not the ratio of the medians. Raises
    ``ValueError`` unless both hold the same number (>= 1) of positive samples.
    """
    return float(np.median(_per_round(samples, ref_samples)))


def ratio_iqr(samples: Sequence[float], ref_samples: Sequence[float]) -> Tuple[float, float]:
    """The 25th and 75th percentiles of the per-round ratios behind :func:`paired_ratio`: how much
    the ratio moved from round to round (reported beside every paired ratio)."""
    per_round = _per_round(samples, ref_samples)
    return float(np.percentile(per_round, 25)), float(np.percentile(per_round, 75))


@dataclass
class TimedModels:
    """What :func:`time_models` measured: seconds per call for each (name, runtime); each
    artefact's largest output error against eager PyTorch; and per cross-runtime pair, both
    members' samples from their own phase."""

    samples: Dict[Key, List[float]]
    errors: Dict[Key, float]
    pairs: Dict[Tuple[Key, Key], Tuple[List[float], List[float]]] = field(default_factory=dict)


def _file_name(index: int, name: Hashable) -> str:
    return f"m{index}_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))[:60]


def time_models(
    models: Mapping[Hashable, nn.Module],
    runtimes: Sequence[str],
    *,
    input_size: Union[Sequence[int], Mapping[Hashable, Sequence[int]]],
    rounds: int,
    warmup: int,
    threads: int = 1,
    seed: int = 0,
    int8: Collection[Hashable] = (),
    inner: int = 1,
    pairs: Sequence[Tuple[Key, Key]] = (),
    work_dir: Optional[str] = None,
    progress: Optional[Progress] = None,
) -> TimedModels:
    """Prepare every model in every runtime (exported, verified), then time them: one phase per
    runtime, then one phase per cross-runtime pair.

    ``input_size``: ``(C, H, W)`` for all models, or a mapping name -> size. Models named in
    ``int8`` are quantized in each runtime's own tool and skipped in runtimes without an int8 path.
    Each sample averages ``inner`` back-to-back calls (for microsecond ops). ``pairs``: ``((name,
    runtime), (name, runtime))`` pairs to time against each other in a phase of their own (their
    ratio is then paired, round by round). ``threads`` is set for the timing and the caller's
    thread count restored afterwards. Exports go to ``work_dir`` (default: a temporary folder,
    removed afterwards).
    """
    check_runtimes(runtimes)
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
    if inner < 1:
        raise ValueError(f"inner must be >= 1, got {inner}")
    names = list(models)
    for a, b in pairs:
        for name, runtime in (a, b):
            if name not in models or runtime not in runtimes:
                raise ValueError(f"pair member {name!r} in {runtime!r} is not among the models and runtimes timed")
            if name in int8 and runtime not in INT8_RUNTIMES:
                raise ValueError(f"pair member {name!r} is int8 and {runtime} has no int8 path")

    def size_of(name: Hashable) -> Sequence[int]:
        return input_size[name] if isinstance(input_size, Mapping) else input_size  # type: ignore[index]

    saved_threads = torch.get_num_threads()
    own_dir = work_dir is None
    work = tempfile.mkdtemp(prefix="repghost-bench-") if own_dir else str(work_dir)
    os.makedirs(work, exist_ok=True)
    runners: Dict[Key, Callable[[], object]] = {}
    errors: Dict[Key, float] = {}
    try:
        todo = [(n, rt) for n in names for rt in runtimes if n not in int8 or rt in INT8_RUNTIMES]
        for done, (name, runtime) in enumerate(todo, 1):
            x = np.random.default_rng(seed).standard_normal((1, *size_of(name)), dtype=np.float32)
            run, max_rel = prepare_runner(
                models[name], runtime, input_size=size_of(name), threads=threads, work_dir=work,
                name=_file_name(names.index(name), name), int8=name in int8,
            )
            runners[(name, runtime)] = (lambda run=run, x=x: [run(x) for _ in range(inner)])
            errors[(name, runtime)] = max_rel
            if progress is not None:
                progress("prepare", done, len(todo))
        torch.set_num_threads(threads)
        raw = time_in_phases(runners, lambda key: key[1], rounds=rounds, warmup=warmup, seed=seed, progress=progress)  # type: ignore[index]
        paired: Dict[Tuple[Key, Key], Tuple[List[float], List[float]]] = {}
        for a, b in pairs:
            phase = f"{a[0]} in {a[1]} vs {b[0]} in {b[1]}"
            report = (lambda stage, done, total, p=phase: progress(f"{stage} {p}", done, total)) if progress else None
            got = time_interleaved({0: runners[a], 1: runners[b]}, rounds=rounds, warmup=warmup, seed=seed,
                                   progress=report, phase=phase)
            paired[(a, b)] = ([s / inner for s in got[0]], [s / inner for s in got[1]])
    finally:
        torch.set_num_threads(saved_threads)
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)
    samples = {key: [s / inner for s in values] for key, values in raw.items()}
    return TimedModels(samples, errors, paired)  # type: ignore[arg-type]
