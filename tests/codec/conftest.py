"""Fixtures of the codec tests: every codec spec, and KV shaped like a real model's."""

from __future__ import annotations

import pytest
import torch

from kvtier.layout import KVLayout

# one spec per codec and variant, with non-default options too
SPECS = [
    "raw",
    "fp8",
    "fp8-e5m2",
    "fp8:scale=token",
    "fp8-e5m2:scale=token",
    "kivi-2",
    "kivi-4",
    "kivi-2:group=32",
    "kivi-4:group=7",
    "cachegen",
    "cachegen:delta=on,anchor=4",
    "cachegen:kbits=8-2,vbits=2-3-4-8,delta=off",
]
LOSSY = [s for s in SPECS if s != "raw"]
MODEL_LIKE = KVLayout(num_layers=4, num_kv_heads=3, head_dim=64, dtype=torch.float32)


@pytest.fixture(params=SPECS)
def spec(request) -> str:
    return request.param


def model_like_kv(layout: KVLayout, num_tokens: int, seed: int = 0) -> torch.Tensor:
    """KV with the structure of a real model's: keys with per-channel offsets, scales and a few
    outlier channels, smoothly varying over tokens; values roughly independent per token."""
    gen = torch.Generator().manual_seed(seed)
    planes, layers, _, heads, dim = layout.shape(num_tokens)
    shape = (layers, num_tokens, heads, dim)
    offset = torch.randn(layers, 1, heads, dim, generator=gen) * 2
    scale = torch.rand(layers, 1, heads, dim, generator=gen) + 0.2
    scale[..., :2] *= 8  # outlier channels
    walk = torch.randn(shape, generator=gen).cumsum(1) / (num_tokens**0.5)
    keys = offset + scale * (walk + torch.randn(shape, generator=gen))
    values = torch.randn(shape, generator=gen) * (torch.rand(layers, num_tokens, 1, 1, generator=gen) + 0.1)
    kv = torch.stack([keys, values])[:planes]
    return kv.to(layout.dtype)
