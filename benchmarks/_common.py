"""Helpers shared by the benchmark scripts: timing, tables and the final JSON line."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from kvtier.report import format_table


def timeit(fn: Callable[[], Any], repeat: int, warmup: int = 1, setup: Callable[[], Any] | None = None) -> list[float]:
    """Seconds per call of `fn`, `repeat` times after `warmup` calls; `setup` runs untimed before each."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    times = []
    for _ in range(repeat):
        if setup:
            setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def paired(
    reference: Callable[[], Any],
    subject: Callable[[], Any],
    repeat: int,
    setup: Callable[[], Any] | None = None,
    subject_setup: Callable[[], Any] | None = None,
) -> tuple[float, float]:
    """Median seconds of `reference` and of `subject`, timed alternately so that drift of the
    machine (other tenants, frequency, page cache) affects both alike."""
    ref: list[float] = []
    sub: list[float] = []
    for i in range(repeat + 1):
        for fn, prep, out in ((reference, setup, ref), (subject, subject_setup or setup, sub)):
            if prep:
                prep()
            start = time.perf_counter()
            fn()
            if i:  # the first round warms up
                out.append(time.perf_counter() - start)
    return median(ref), median(sub)


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    """A one-line description of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def report(name: str, headers: list[str], rows: list[list[object]], summary: dict[str, Any]) -> None:
    """Print the table, then one JSON line with the summary (the line scripts and CI parse)."""
    print(format_table(headers, rows))
    print(json.dumps({"benchmark": name, "machine": machine(), **summary}))
