"""Timing and machine facts.

Every figure is the median of ``repeats`` timed runs after ``warmup`` untimed ones. The systems being
compared alternate inside the run (A B A B ..., or A B C A B C ...), so a slow spell of the machine
hits all of them alike rather than one. ``gc.collect()`` runs before each timed call, outside the timer.

Shared machines: with 2 cores, another process computing at the same time slows a 2-thread torch
call several-fold (OpenMP threads wait on each other). Each timed call therefore also records the
share of the machine's CPU time that *other* processes used meanwhile (from /proc/stat minus this
process's own CPU time). When `CONTENTION_LIMIT` is set, a round (one call of every system) in which
any call saw more than that share is discarded and run again, at most as many extra rounds as
``repeats``; discarded rounds are counted in `STATS`, and the kept rounds' worst share is reported.
"""

from __future__ import annotations

import gc
import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def quiet() -> None:
    """No progress bars or deprecation chatter from the libraries in the benchmark's output."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # PEFT, on every prompt-learning forward that transformers' generate gives position ids to.
    warnings.filterwarnings("ignore", message="Position ids are not supported for parameter efficient tuning")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging

        logging.disable_progress_bar()
        logging.set_verbosity_error()
    except ImportError:
        pass


CONTENTION_LIMIT: float | None = None  # set by research.run (full mode: 0.10)
STATS = {"rounds": 0, "discarded_rounds": 0, "worst_foreign_share": 0.0}


def reset_stats() -> dict:
    old = dict(STATS)
    STATS.update(rounds=0, discarded_rounds=0, worst_foreign_share=0.0)
    return old


def _cpu_snapshot() -> tuple[float, float, float]:
    """(wall seconds, busy CPU seconds of the whole machine, CPU seconds of this process)."""
    wall = time.perf_counter()
    busy = 0.0
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal ...: everything but idle and iowait is busy.
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    t = os.times()
    return wall, busy, t.user + t.system


def foreign_share(before, after) -> float:
    """Share of the machine's CPU capacity used by other processes between two snapshots."""
    wall = after[0] - before[0]
    if wall <= 0:
        return 0.0
    other = (after[1] - before[1]) - (after[2] - before[2])
    return min(1.0, max(0.0, other / (wall * (os.cpu_count() or 1))))


def interleaved(fns: dict[str, Callable[[], object]], *, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each function, alternating between them: warm-up rounds, then timed rounds.

    Each round starts one function later than the last (A B C, B C A, C A B, ...), so no function is
    always the one that runs first or right after a given other; ``times[k][r]`` is round ``r``'s call
    of ``k`` whatever its place, so ratios can be paired round by round (`paired_ratio`).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    extra = 0
    while len(next(iter(times.values()))) < repeats:
        round_times, worst = {}, 0.0
        start = STATS["rounds"] % len(keys)
        for key in keys[start:] + keys[:start]:
            fn = fns[key]
            gc.collect()
            before = _cpu_snapshot()
            fn()
            after = _cpu_snapshot()
            round_times[key] = after[0] - before[0]
            worst = max(worst, foreign_share(before, after))
        STATS["rounds"] += 1
        if CONTENTION_LIMIT is not None and worst > CONTENTION_LIMIT and extra < repeats:
            extra += 1
            STATS["discarded_rounds"] += 1
            continue
        STATS["worst_foreign_share"] = max(STATS["worst_foreign_share"], worst)
        for key, t in round_times.items():
            times[key].append(t)
    return times


def _round_ratios(a: list[float], b: list[float]) -> list[float]:
    return [x / y for x, y in zip(a, b) if y]


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of ``a[r] / b[r]``: two calls of one round ran seconds apart, so a slow spell
    of the machine (this VM's calls drift by 10-15% over a minute) scales both and cancels out."""
    return statistics.median(_round_ratios(a, b))


def paired_ratio_ci(
    a: list[float], b: list[float], *, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Bootstrap interval of `paired_ratio`: resample the rounds (with replacement), take each resample's
    median per-round ratio, report the central ``level`` share. Seeded, so a results file reproduces it."""
    ratios = _round_ratios(a, b)
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    tail = (1 - level) / 2
    return medians[int(tail * (resamples - 1))], medians[int(round((1 - tail) * (resamples - 1)))]


def median_ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1000.0


def spread(seconds: list[float]) -> float:
    """(max - min) / median of the timed runs: a rough noise gauge shown next to each figure."""
    m = statistics.median(seconds)
    return (max(seconds) - min(seconds)) / m if m else 0.0


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


# ------------------------------------------------------------------------------------------ memory
def rss_kib() -> int:
    return _status_field("VmRSS")


def hwm_kib() -> int:
    return _status_field("VmHWM")


def _status_field(name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{name} not in /proc/self/status")


def reset_hwm() -> bool:
    """Reset the process's resident-set high-water mark (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so a later peak is not hidden by reused pages."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------------------------------ machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma"})
    except OSError:
        pass
    return []


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine(threads: int) -> dict:
    import peft
    import torch
    import transformers

    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            mem_gib = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "memory_gib": mem_gib,
        "torch_threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "platform": platform.platform(),
        "git_commit": git_commit(),
    }


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []
