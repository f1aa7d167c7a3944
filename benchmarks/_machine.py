"""Machine helpers shared by the benchmarks: how busy the other processes keep the CPU.

With 2 cores and 2 torch threads, one other busy process slows torch down 10x or more,
so the timed benchmarks wait for a quiet machine and report what others used.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def _busy_jiffies() -> int | None:
    try:
        with open("/proc/stat") as f:
            parts = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    return parts[0] + parts[1] + parts[2] + parts[5] + parts[6] + parts[7]  # user nice system irq softirq steal


def _self_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class OtherCPU:
    """Share of the machine's CPU capacity used by other processes since ``start``."""

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.cpus = os.cpu_count() or 1
        self.start()

    def start(self) -> None:
        """Measure from now on."""
        self.t0, self.busy0, self.self0 = time.perf_counter(), _busy_jiffies(), _self_cpu_seconds()

    def share(self) -> float:
        busy = _busy_jiffies()
        if busy is None or self.busy0 is None:
            return math.nan
        wall = time.perf_counter() - self.t0
        other = (busy - self.busy0) / self.hz - (_self_cpu_seconds() - self.self0)
        return max(0.0, other) / max(wall * self.cpus, 1e-9)


def wait_quiet(threshold: float, timeout: float) -> float:
    """Wait (at most ``timeout`` s) until other processes use < ``threshold`` of the CPU over 1 s."""
    if threshold <= 0 or timeout <= 0:
        return math.nan
    deadline = time.perf_counter() + timeout
    while True:
        probe = OtherCPU()
        time.sleep(1.0)
        share = probe.share()
        if math.isnan(share) or share < threshold or time.perf_counter() > deadline:
            return share


def add_quiet_arguments(parser: argparse.ArgumentParser, unit: str, timeout: float, budget: float) -> None:
    """The options of waiting for a quiet machine; ``unit`` names what is timed (round, run)."""
    parser.add_argument("--quiet", type=float, default=0.1,
                        help=f"before a {unit}, wait until other processes use less than this share of the CPU (0 = off)")
    parser.add_argument("--quiet-timeout", type=float, default=timeout, help=f"longest wait before one {unit} (s)")
    parser.add_argument("--max-other", type=float, default=0.1,
                        help=f"repeat a {unit} during which other processes used more than this share of the CPU")
    parser.add_argument("--retries", type=int, default=2, help=f"repeats of a disturbed {unit}")
    parser.add_argument("--wait-budget", type=float, default=budget,
                        help="seconds of waiting/repeating; after it, measurements are kept as they come")


def interleaved_rounds(
    args: argparse.Namespace, items: Sequence[T], measure: Callable[[T], Any], key: Callable[[T], Hashable]
) -> tuple[list[dict[Hashable, Any]], list[float], int]:
    """``args.repeats`` rounds, each measuring every item once in a fresh random order
    (seeded), so drift and neighbours hit all contenders alike and ratios can be paired
    per round. Before a round it waits for a quiet machine; a round during which others
    used more than ``args.max_other`` of the CPU is repeated (``args.retries`` times,
    within ``args.wait_budget`` seconds; after that, rounds are kept as they come).

    Returns:
        The rounds (``{key(item): measure(item)}`` each), the other processes' CPU share
        during each kept round, and how many disturbed rounds were repeated.
    """
    rng = random.Random(0)
    deadline = time.perf_counter() + args.wait_budget
    rounds: list[dict[Hashable, Any]] = []
    shares: list[float] = []
    discarded = 0
    for _ in range(args.repeats):
        for attempt in range(args.retries + 1):
            patient = time.perf_counter() < deadline
            if patient:
                wait_quiet(args.quiet, min(args.quiet_timeout, deadline - time.perf_counter()))
            order = list(items)
            rng.shuffle(order)
            probe = OtherCPU()
            got = {key(item): measure(item) for item in order}
            share = probe.share()
            if not (share > args.max_other and patient and attempt < args.retries):
                break
            discarded += 1
        shares.append(share)
        rounds.append(got)
    return rounds, shares, discarded
