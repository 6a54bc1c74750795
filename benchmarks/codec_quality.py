"""Codec quality on the built-in model, and codec speed on this machine.

For each passage of benchmarks/data/codec-passages.jsonl (its first 1,024 tokens): the prefix KV
(768 tokens, three 256-token chunks) is computed exactly, then each codec encodes and decodes it
chunk by chunk, as the disk and remote tiers do. With that KV the model then
- scores the continuation (256 tokens): perplexity, against the same with exact KV;
- predicts the 64 greedy tokens that exact KV produces after the prefix, each from the exact
  history (teacher forcing): agreement = share of the 64 predicted identically; "same run" = how
  many of them a free-running greedy decode with the codec's KV reproduces before it first differs.
Size is against bf16 (2 bytes per value; HF runs the model in float32 on the CPU, codecs encode
that). Encode and decode speeds are GB/s of bf16 KV for one real 256-token chunk in bf16 (5.9 MB),
median of --repeat after a warm-up. "beats raw below" is the link bandwidth under which fetching
the compressed chunk and decoding it is faster than fetching the raw bf16 chunk:
(raw bytes - compressed bytes) / decode time.
Targets: cachegen >= 4x smaller, perplexity +<= 3%, agreement >= 90%; kivi-2 >= 6x smaller;
fp8 and kivi decode >= 1 GB/s.

    python -m benchmarks.codec_quality [--passages 24] [--codecs raw fp8 kivi-2:group=32] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash
from tqdm.auto import tqdm

from benchmarks._common import median, report, timeit
from kvtier.adapters.hf import gather_chunk, install_layer, new_cache
from kvtier.codec import get_codec
from kvtier.models import layout_of, load_default_model

CORPUS = Path(__file__).parent / "data" / "codec-passages.jsonl"
PREFIX, TOKENS, GREEDY, CHUNK = 768, 1024, 64, 256
DEFAULT_CODECS = ["raw", "fp8", "fp8-e5m2", "kivi-4", "kivi-2", "cachegen", "cachegen:delta=on"]


@dataclass
class Passage:
    ids: list[int]
    kv: torch.Tensor  # exact canonical KV of ids[:PREFIX]
    greedy: list[int]  # exact greedy continuation after ids[:PREFIX + 1]


@dataclass
class Quality:
    nll: float = 0.0  # summed over scored tokens
    scored: int = 0
    agree: int = 0
    same_run: int = 0
    passages: int = 0
    compressed: int = 0  # bytes of the encoded prefix chunks
    values: int = 0  # values of the prefix KV

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.scored)

    def add(self, scores: tuple[float, int, int], compressed: int, values: int) -> None:
        nll, agree, run = scores
        self.nll, self.scored = self.nll + nll, self.scored + TOKENS - PREFIX - 1
        self.agree, self.same_run, self.passages = self.agree + agree, self.same_run + run, self.passages + 1
        self.compressed, self.values = self.compressed + compressed, self.values + values


class Evaluator:
    """The built-in model scoring continuations from a given prefix KV."""

    def __init__(self) -> None:
        self.model, self.tokenizer = load_default_model()
        self.layout = layout_of(self.model)

    def forward(self, kv: torch.Tensor, ids: list[int]) -> torch.Tensor:
        """Logits of `ids` after a cache holding `kv` (canonical, for the tokens before them)."""
        cache = new_cache(self.model)
        for layer in range(self.layout.num_layers):
            k = kv[0, layer].transpose(0, 1).unsqueeze(0).contiguous()
            v = kv[1, layer].transpose(0, 1).unsqueeze(0).contiguous()
            install_layer(cache, layer, k, v)
        return self.model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True).logits[0]

    @torch.inference_mode()
    def prepare(self, ids: list[int]) -> Passage:
        cache = new_cache(self.model)
        for lo in range(0, PREFIX, CHUNK):  # chunk-aligned steps, as kvtier's HF integration prefills
            self.model(input_ids=torch.tensor([ids[lo : lo + CHUNK]]), past_key_values=cache, use_cache=True)
        kv = gather_chunk(cache, self.layout, 0, PREFIX)
        greedy, token = [], ids[PREFIX]
        for _ in range(GREEDY):
            logits = self.model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits
            token = int(logits[0, -1].argmax())
            greedy.append(token)
        return Passage(ids, kv, greedy)

    @torch.inference_mode()
    def score(self, passage: Passage, kv: torch.Tensor) -> tuple[float, int, int]:
        """(summed NLL of the continuation, greedy tokens agreed, length of the identical run)."""
        logits = self.forward(kv, passage.ids[PREFIX:TOKENS])[:-1].float()
        targets = torch.tensor(passage.ids[PREFIX + 1 : TOKENS])
        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        history = [passage.ids[PREFIX], *passage.greedy[:-1]]
        predicted = self.forward(kv, history).argmax(-1).tolist()
        hits = [p == g for p, g in zip(predicted, passage.greedy, strict=True)]
        return float(nll), sum(hits), hits.index(False) if False in hits else GREEDY


def through_codec(spec: str, kv: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`kv` encoded and decoded chunk by chunk, as the tiers store it; and the bytes the chunks
    take when the KV is bf16 (the size this benchmark reports)."""
    codec = get_codec(spec)
    parts, size = [], 0
    for lo in range(0, kv.shape[2], CHUNK):
        chunk = kv[:, :, lo : lo + CHUNK].contiguous()
        payload = codec.encode(chunk)
        size += len(payload) if spec != "raw" else chunk.numel() * 2
        if spec.startswith("cachegen"):  # the only codec whose size depends on the values' dtype
            size += len(codec.encode(chunk.bfloat16())) - len(payload)
        parts.append(codec.decode(bytearray(payload), tuple(chunk.shape), chunk.dtype))
    return torch.cat(parts, 2), size


def evaluate(evaluator: Evaluator, passages: list[Passage], specs: list[str]) -> dict[str, Quality]:
    results = {spec: Quality() for spec in specs}
    bar = tqdm(total=len(passages) * len(specs), desc="quality", unit="run")
    for passage in passages:
        seen: dict[bytes, tuple[float, int, int]] = {}  # codecs that decode identically score identically
        for spec in specs:
            decoded, size = through_codec(spec, passage.kv)
            digest = xxhash.xxh3_128_digest(decoded.numpy().data)
            if digest not in seen:
                seen[digest] = evaluator.score(passage, decoded)
            results[spec].add(seen[digest], size, passage.kv.numel())
            bar.update()
    bar.close()
    return results


def speed(spec: str, chunk: torch.Tensor, repeat: int) -> tuple[float, float, int]:
    """(encode seconds, decode seconds, payload bytes) of one bf16 chunk, medians."""
    codec = get_codec(spec)
    payload = bytearray(codec.encode(chunk))
    encode = median(timeit(lambda: codec.encode(chunk), repeat))
    decode = median(timeit(lambda: codec.decode(payload, tuple(chunk.shape), chunk.dtype), repeat))
    return encode, decode, len(payload)


def metrics(q: Quality, base: Quality | None, timing: tuple[float, float, int], raw_bytes: int) -> dict[str, float]:
    """The summary numbers of one codec."""
    enc, dec, size = timing
    return {
        "ratio_vs_bf16": 2 * q.values / q.compressed,
        "ppl": q.ppl,
        "ppl_increase_pct": (q.ppl / base.ppl - 1) * 100 if base else math.nan,
        "agreement": q.agree / (q.passages * GREEDY),
        "same_run_tokens": q.same_run / q.passages,
        "encode_gbps": raw_bytes / enc / 1e9,
        "decode_gbps": raw_bytes / dec / 1e9 if dec > 0 else math.inf,
        "beats_raw_below_gbit": (raw_bytes - size) * 8 / dec / 1e9 if dec > 0 and size < raw_bytes else math.nan,
    }


def row(spec: str, m: dict[str, float]) -> list[object]:
    link = "-" if math.isnan(m["beats_raw_below_gbit"]) else f"{m['beats_raw_below_gbit']:.2f}"
    return [
        spec, f"{m['ratio_vs_bf16']:.2f}x", f"{m['ppl']:.3f}", f"{m['ppl_increase_pct']:+.2f}%",
        f"{m['agreement']:.1%}", f"{m['same_run_tokens']:.1f}", f"{m['encode_gbps']:.2f}",
        f"{m['decode_gbps']:.2f}", link,
    ]  # fmt: skip


def targets(summary: dict[str, dict[str, float]]) -> dict[str, bool]:
    checks: dict[str, Callable[[dict[str, float]], bool]] = {
        "cachegen": lambda s: s["ratio_vs_bf16"] >= 4 and s["ppl_increase_pct"] <= 3 and s["agreement"] >= 0.9,
        "kivi-2": lambda s: s["ratio_vs_bf16"] >= 6 and s["decode_gbps"] >= 1,
        "kivi-4": lambda s: s["decode_gbps"] >= 1,
        "fp8": lambda s: s["decode_gbps"] >= 1,
        "fp8-e5m2": lambda s: s["decode_gbps"] >= 1,
    }
    return {f"target_{spec}": check(summary[spec]) for spec, check in checks.items() if spec in summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=24, help="passages to use, spread over the corpus's 24")
    parser.add_argument("--codecs", nargs="+", default=DEFAULT_CODECS, help="codec specs ('raw' is the baseline)")
    parser.add_argument("--repeat", type=int, default=9, help="timed repetitions of the speed measurements")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    specs = list(dict.fromkeys(args.codecs))
    evaluator = Evaluator()
    texts = [json.loads(line)["text"] for line in CORPUS.read_text(encoding="utf-8").splitlines()]
    texts = [texts[i * len(texts) // args.passages] for i in range(min(args.passages, len(texts)))]  # all books
    tokenize = lambda text: evaluator.tokenizer(text, add_special_tokens=False).input_ids[:TOKENS]  # noqa: E731
    passages = [evaluator.prepare(tokenize(t)) for t in tqdm(texts, desc="exact KV", unit="passage")]
    quality = evaluate(evaluator, passages, specs)
    chunk = passages[0].kv[:, :, :CHUNK].to(torch.bfloat16).contiguous()
    speeds = {spec: speed(spec, chunk, args.repeat) for spec in tqdm(specs, desc="speed", unit="codec")}
    summary = {s: metrics(q, quality.get("raw"), speeds[s], chunk.nbytes) for s, q in quality.items()}
    headers = ["codec", "vs bf16", "ppl", "ppl +", "agreement", "same run", "enc GB/s", "dec GB/s", "beats raw below"]
    # JSON has no NaN or Infinity: what has no value (raw's break-even bandwidth) becomes null
    rounded = {s: {k: round(v, 4) if math.isfinite(v) else None for k, v in m.items()} for s, m in summary.items()}
    rows = [row(s, m) for s, m in summary.items()]
    report("codec_quality", headers, rows, {"passages": len(passages), "codecs": rounded, **targets(summary)})


if __name__ == "__main__":
    main()
