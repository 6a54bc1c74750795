"""benchmarks/serve.py's report: rows, target ratios and plots from replies (no server needed)."""

from __future__ import annotations

import pytest

from benchmarks.serve import plot, rows_of, save, targets
from benchmarks.serve_client import Reply


def replies(ttft: float, texts: list[str], rounds: int = 2) -> list[Reply]:
    out = []
    for r in range(rounds):
        for i, text in enumerate(texts):
            out.append(Reply("longdoc", r, i, started=10.0 * r + i, ttft=ttft if r else 8.0, total=ttft + 1, text=text))
            out.append(Reply("multiround", r, i, started=30.0 + r, ttft=ttft if r else 3.0, total=ttft + 1, text=text))
    return out


def test_rows_targets_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    results = {
        "vllm-small": {"startup_s": 90.0, "replies": replies(4.0, ["a", "b"])},
        "kvtier-mem-small": {"startup_s": 95.0, "replies": replies(0.4, ["a", "x"])},
    }
    rows, summary = rows_of(results)
    assert summary["kvtier-mem-small/longdoc/1"]["mean"] == pytest.approx(0.4)
    # answers are compared with vLLM alone's: kvtier-mem-small has no vllm reference arm here
    assert summary["vllm-small/longdoc/1"]["same"] == 0
    found = targets(summary, rounds=2)
    assert found["longdoc_query_mem_vs_vllm_small"] == pytest.approx(0.1)
    assert found["multiround_later_mem_vs_vllm_small"] == pytest.approx(0.1)
    assert len(rows) == 8
    pngs = plot(results, tmp_path)
    assert all(p.stat().st_size > 10_000 for p in pngs)
    save(results, tmp_path / "replies.json")
    assert (tmp_path / "replies.json").read_text().count('"ttft"') == 16
