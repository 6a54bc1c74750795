"""The GPU checks in one run: paged layouts on CUDA tensors, chunk transfer against a plain copy_, codec
decode on the device.

1. Layout adapters: for every paged layout (vLLM's CPU layout, flash-attention NHD and HND,
   FlashInfer, MLA), KV caches on the device; a canonical chunk is scattered into scattered and
   consecutive block ids and gathered back: bit-exact round trips, or the run fails.
2. Transfer: a 256-token chunk of the built-in model's shape (bf16, 5.9 MB) gathered from
   flash-attention NHD blocks into pinned CPU memory (GPU -> CPU) and scattered back from pinned
   memory (CPU -> GPU), against a plain `copy_` of the same bytes between pinned memory and one
   contiguous device tensor (the PCIe reference), measured in the same run, alternately.
3. Codecs: each codec decodes the same chunk on the device (compressed bytes copied over, then
   dequantized there) and on the CPU: GB/s of bf16 KV, and the device result must equal the CPU's
   within the codec's documented bound.

Without CUDA it runs the same checks on the CPU (`--device cpu`, a dry run of the script itself).

    python -m benchmarks.gpu [--device cuda] [--repeat 20]
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any

import torch

from benchmarks._common import median, paired, report, timeit
from kvtier.adapters.paged import PagedKV, expected_shape
from kvtier.codec import get_codec
from kvtier.layout import KVLayout

MODEL = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype=torch.bfloat16)  # the built-in model
MLA = KVLayout(num_layers=30, num_kv_heads=1, head_dim=576, dtype=torch.bfloat16, mla=True)
CHUNK, BLOCK = 256, 16
KINDS = ["cpu", "flash_nhd", "flash_hnd", "flashinfer", "mla"]
CODECS = ["fp8", "fp8-e5m2", "kivi-4", "kivi-2", "cachegen"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=20, help="timed repetitions (median reported)")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows: list[list[object]] = []
    summary: dict[str, Any] = {"device": _device_name(device)}
    rows += round_trips(device, summary)
    rows += transfers(device, args.repeat, summary)
    rows += codecs(device, args.repeat, summary)
    report("gpu", ["check", "result", "vs reference", "reference"], rows, summary)


def round_trips(device: torch.device, summary: dict[str, Any]) -> list[list[object]]:
    """Scatter a chunk into device blocks and gather it back, for every layout and block pattern."""
    rows: list[list[object]] = []
    gen = torch.Generator().manual_seed(0)
    blocks_per_chunk = CHUNK // BLOCK
    patterns = {
        "consecutive": list(range(3, 3 + blocks_per_chunk)),
        "scattered": torch.randperm(4 * blocks_per_chunk, generator=gen)[:blocks_per_chunk].tolist(),
    }
    for kind in KINDS:
        layout = MLA if kind == "mla" else MODEL
        shape = expected_shape(kind, layout, 4 * blocks_per_chunk, BLOCK)
        caches = [torch.zeros(shape, dtype=layout.dtype, device=device) for _ in range(layout.num_layers)]
        paged = PagedKV(kind, layout, caches, BLOCK)
        kv = torch.randn(layout.shape(CHUNK), generator=gen).to(layout.dtype)
        for name, ids in patterns.items():
            block_ids = torch.tensor(ids)
            paged.scatter(block_ids, 0, kv)
            back = paged.gather(block_ids, 0, CHUNK).cpu()
            exact = torch.equal(back, kv)
            summary[f"round_trip_{kind}_{name}"] = exact
            rows.append([f"round trip {kind}, {name} blocks", "bit-exact" if exact else "MISMATCH", "", ""])
            if not exact:
                raise SystemExit(f"{kind} ({name} blocks): the gathered chunk differs from the scattered one")
    return rows


def transfers(device: torch.device, repeat: int, summary: dict[str, Any]) -> list[list[object]]:
    """Chunk gather to pinned memory and scatter from it, against copy_ of the same bytes."""
    pin = device.type == "cuda"
    kv = torch.randn(MODEL.shape(CHUNK)).to(MODEL.dtype)
    host = kv.pin_memory() if pin else kv.clone()
    flat_dev = torch.empty(kv.numel(), dtype=kv.dtype, device=device)
    flat_host = host.view(-1)
    shape = expected_shape("flash_nhd", MODEL, 2 * CHUNK // BLOCK, BLOCK)
    caches = [torch.zeros(shape, dtype=MODEL.dtype, device=device) for _ in range(MODEL.num_layers)]
    paged = PagedKV("flash_nhd", MODEL, caches, BLOCK)
    ids = torch.arange(CHUNK // BLOCK)
    out = torch.empty_like(host).pin_memory() if pin else torch.empty_like(host)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def h2d_copy() -> None:
        flat_dev.copy_(flat_host, non_blocking=True)
        sync()

    def h2d_scatter() -> None:
        paged.scatter(ids, 0, host)
        sync()

    def d2h_copy() -> None:
        flat_host.copy_(flat_dev, non_blocking=True)
        sync()

    def d2h_gather() -> None:
        out.copy_(paged.gather(ids, 0, CHUNK), non_blocking=True)
        sync()

    gb = kv.nbytes / 1e9
    rows: list[list[object]] = []
    for name, reference, subject in (("CPU -> device", h2d_copy, h2d_scatter), ("device -> CPU", d2h_copy, d2h_gather)):
        ref_s, sub_s = paired(reference, subject, repeat)
        key = "h2d" if name.startswith("CPU") else "d2h"
        summary |= {f"{key}_copy_gbps": round(gb / ref_s, 2), f"{key}_chunk_gbps": round(gb / sub_s, 2),
                    f"{key}_vs_copy": round(ref_s / sub_s, 3)}  # fmt: skip
        rows.append([f"{name}: copy_ of {kv.nbytes / 1e6:.1f} MB (reference)", f"{gb / ref_s:.2f} GB/s", 1.0, "-"])
        rows.append([f"{name}: chunk {'scatter' if key == 'h2d' else 'gather'} (flash NHD)",
                     f"{gb / sub_s:.2f} GB/s", round(ref_s / sub_s, 3), "copy_"])  # fmt: skip
    assert torch.equal(out, host), "the gathered chunk differs from the scattered one"
    return rows


def codecs(device: torch.device, repeat: int, summary: dict[str, Any]) -> list[list[object]]:
    """Decode each codec's encoding of one chunk on the device and on the CPU."""
    kv = torch.randn(MODEL.shape(CHUNK)).to(MODEL.dtype)
    gb = kv.nbytes / 1e9
    rows: list[list[object]] = []
    for spec in CODECS:
        codec = get_codec(spec)
        payload = bytearray(codec.encode(kv))
        decode = functools.partial(_decode, codec, payload, tuple(kv.shape), kv.dtype)
        on_device, on_cpu = decode(device), decode(None)
        if not bool(((on_device.cpu().float() - kv.float()).abs() <= codec.error_bound(kv)).all()):
            raise SystemExit(f"{spec}: decoded on {device} outside the codec's error bound")
        same = torch.equal(on_device.cpu(), on_cpu)
        dev_s = median(timeit(lambda decode=decode: _synced(decode, device), repeat))
        cpu_s = median(timeit(lambda decode=decode: decode(None), max(3, repeat // 4)))
        summary[f"{spec}_decode_gbps_{device.type}"] = round(gb / dev_s, 2)
        summary[f"{spec}_decode_gbps_cpu"] = round(gb / cpu_s, 2)
        summary[f"{spec}_same_as_cpu"] = same
        where = f"decode {spec} on {device.type} ({len(payload) / 1e6:.2f} MB in)"
        rows.append([where, f"{gb / dev_s:.2f} GB/s", round(cpu_s / dev_s, 2),
                     "CPU decode" + ("" if same else " (differs within bound)")])  # fmt: skip
    return rows


def _decode(codec: Any, payload: bytearray, shape: tuple[int, ...], dtype: torch.dtype,
            where: torch.device | None) -> torch.Tensor:  # fmt: skip
    return codec.decode(payload, shape, dtype, codec.params, where)


def _synced(decode: Callable[[torch.device], torch.Tensor], device: torch.device) -> None:
    decode(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return str(device)


if __name__ == "__main__":
    main()
