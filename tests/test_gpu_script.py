"""benchmarks/gpu.py, the script a GPU session runs in one call, works (here on the CPU)."""

from __future__ import annotations

import torch

from benchmarks import gpu


def test_round_trips_at_the_models_shape_are_bit_exact_in_every_layout():
    summary: dict = {}
    rows = gpu.round_trips(torch.device("cpu"), summary)
    assert len(rows) == 2 * len(gpu.KINDS) and all(summary.values())


def test_transfer_and_codec_checks_run_and_agree_with_the_cpu():
    summary: dict = {}
    gpu.transfers(torch.device("cpu"), 1, summary)
    gpu.codecs(torch.device("cpu"), 1, summary)
    assert summary["h2d_chunk_gbps"] > 0 and summary["d2h_chunk_gbps"] > 0
    assert all(summary[f"{spec}_same_as_cpu"] for spec in gpu.CODECS)
