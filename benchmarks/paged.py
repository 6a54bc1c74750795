"""Paged KV adapters: a request's chunks scattered into and gathered from vLLM-style paged memory,
token-major and head-major chunks (see kvtier/layout.py), against memcpy of the same bytes.

The shape is the built-in model's (30 layers, 3 KV heads, head dim 64) in float32, chunks of 256
tokens, blocks of 128 (vLLM's CPU default), 31 chunks (the 8k-token prompt of ttft_vllm.py) into
consecutive blocks. Every row is timed alternately with memcpy of the same bytes (a contiguous
copy_ of one tensor into another), so its ratio is independent of the machine's drift.

`cpu-amx` is the cpu layout in bfloat16 with the block orders of vLLM's `amx` kernel (AMX tiles
with VNNI pairs, learned from vLLM's cache-write op, which needs vllm installed but no AMX), and
`cpu-bf16` the same dtype with the `vec` kernel's orders, its reference.

    python -m benchmarks.paged [--kinds cpu flash_nhd ... cpu-amx cpu-bf16] [--chunks 31] [--repeat 9]
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch

from benchmarks._common import paired, report
from kvtier.adapters.paged import HEAD_MAJOR_KINDS, PLANE_VIEWS, PagedKV, expected_shape
from kvtier.layout import KVLayout

MODEL = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype=torch.float32)
MLA = KVLayout(num_layers=30, num_kv_heads=1, head_dim=192, dtype=torch.float32, mla=True)
CHUNK = 256
BLOCK = 128
BF16_KINDS = {"cpu-amx": "amx", "cpu-bf16": "vec"}  # the cpu layout in bf16, with a vLLM kernel's block orders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", default=["cpu", "flash_nhd", "flash_hnd"],
                        choices=[*PLANE_VIEWS, *BF16_KINDS])  # fmt: skip
    parser.add_argument("--chunks", type=int, default=31, help="chunks per request")
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    headers = ["kind", "chunk order", "operation", "GB/s", "vs memcpy", "vs other order"]
    rows: list[list[object]] = []
    summary: dict[str, Any] = {}
    for kind in args.kinds:
        rows += run(kind, args.chunks, args.repeat, summary)
    report("paged", headers, rows, summary)


def run(kind: str, chunks: int, repeat: int, summary: dict[str, Any]) -> list[list[object]]:
    """Scatter and gather of `chunks` chunks in both orders, each against memcpy."""
    layout = MLA if kind == "mla" else MODEL
    block_orders = None
    if kind in BF16_KINDS:
        from kvtier.integration.vllm.cpu_check import cpu_block_orders

        layout = KVLayout(MODEL.num_layers, MODEL.num_kv_heads, MODEL.head_dim, torch.bfloat16)
        block_orders = cpu_block_orders(layout, BLOCK, isa=BF16_KINDS[kind])
    layout_kind = "cpu" if kind in BF16_KINDS else kind
    blocks = chunks * CHUNK // BLOCK
    caches = [torch.zeros(expected_shape(layout_kind, layout, blocks + 2, BLOCK), dtype=layout.dtype)
              for _ in range(layout.num_layers)]  # fmt: skip
    paged = PagedKV(layout_kind, layout, caches, BLOCK, block_orders)
    ids = torch.arange(1, blocks + 1)  # consecutive, as vLLM mostly hands them out
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(layout.shape(CHUNK), generator=gen).to(layout.dtype)
    orders = {
        "token-major": [data.clone() for _ in range(chunks)],
        "head-major": [layout.empty(CHUNK, head_major=True).copy_(data) for _ in range(chunks)],
    }
    nbytes = chunks * data.nbytes
    src = torch.randn(nbytes // 4, generator=gen)  # float32 of the same bytes
    dst = torch.empty_like(src)

    def memcpy() -> None:
        dst.copy_(src)

    gathered: list[torch.Tensor] = []

    def gather() -> None:
        gathered[:] = [paged.gather(ids, i * CHUNK, (i + 1) * CHUNK) for i in range(chunks)]

    seconds: dict[tuple[str, str], float] = {}
    refs: list[float] = []
    for order, kvs in orders.items():

        def scatter(kvs: list[torch.Tensor] = kvs) -> None:
            for i, kv in enumerate(kvs):
                paged.scatter(ids, i * CHUNK, kv)

        ref_s, sub_s = paired(memcpy, scatter, repeat)
        refs.append(ref_s)
        seconds[(order, "scatter")] = sub_s / ref_s  # in memcpy times, so drift cancels
        assert all(torch.equal(paged.gather(ids, i * CHUNK, (i + 1) * CHUNK), data) for i in range(chunks))
    ref_s, sub_s = paired(memcpy, gather, repeat)
    gather_order = "head-major" if layout_kind in HEAD_MAJOR_KINDS and layout.num_kv_heads > 1 else "token-major"
    seconds[(gather_order, "gather")] = sub_s / ref_s
    memcpy_gbps = nbytes / 1e9 / statistics.median([*refs, ref_s])
    rows: list[list[object]] = [
        [kind, "-", f"memcpy of {nbytes / 1e6:.0f} MB (reference)", round(memcpy_gbps, 2), 1.0, "-"]
    ]
    for (order, op), rel in seconds.items():
        other = seconds.get(("token-major" if order == "head-major" else "head-major", op))
        speedup = round(other / rel, 2) if other else "-"
        rows.append([kind, order, op, round(memcpy_gbps / rel, 2), round(1 / rel, 3), speedup])
        summary[f"{kind}_{op}_{order.replace('-', '_')}_vs_memcpy"] = round(1 / rel, 3)
    return rows


if __name__ == "__main__":
    main()
