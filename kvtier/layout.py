"""KVLayout: the shape and dtype of a model's KV cache, and the canonical chunk tensor.

The canonical chunk tensor is `[2, num_layers, num_tokens, num_kv_heads, head_dim]` (K then V) in the
engine's dtype; MLA models, which cache one latent vector per token, use `[1, L, T, 1, latent_dim]`.
Adapters convert an engine's own memory layout to and from it.

A chunk tensor always has the canonical shape, in one of two memory orders: *token-major* (plain
contiguous) or *head-major*, the transposed view of a contiguous `[planes, layers, heads, tokens,
head_dim]` tensor, where each head's tokens are contiguous. Engines that keep each head's tokens
together (FlashAttention's HND layout, transformers' `[batch, heads, tokens, dim]` caches, the V
half of vLLM's CPU blocks, whose K half is `[head_dim, block_size]`) gather and scatter head-major
chunks as whole-block copies, where a token-major chunk costs one strided copy per head-dim row
(benchmarks/paged.py; into vLLM's CPU layout, where K is transposed either way, the two orders are
within the noise of each other).
The raw codec stores either order as it is and says which in its header parameters.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from kvtier.errors import LayoutError

# Stable names and wire codes of the dtypes a layout may use (codes go into stored headers).
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "float32": (torch.float32, 1),
    "float16": (torch.float16, 2),
    "bfloat16": (torch.bfloat16, 3),
    "float8_e4m3fn": (torch.float8_e4m3fn, 4),
    "float8_e5m2": (torch.float8_e5m2, 5),
    "uint8": (torch.uint8, 6),
    "int8": (torch.int8, 7),
}
_BY_DTYPE = {dtype: name for name, (dtype, _) in DTYPES.items()}
_BY_CODE = {code: dtype for dtype, code in DTYPES.values()}


def dtype_name(dtype: torch.dtype) -> str:
    """Stable name of a torch dtype ("bfloat16"); LayoutError for unsupported dtypes."""
    if dtype not in _BY_DTYPE:
        raise LayoutError(f"unsupported KV dtype {dtype}; supported: {', '.join(DTYPES)}")
    return _BY_DTYPE[dtype]


def dtype_code(dtype: torch.dtype) -> int:
    """Wire code of a dtype, stored in object headers."""
    return DTYPES[dtype_name(dtype)][1]


def dtype_from_code(code: int) -> torch.dtype:
    """Inverse of dtype_code; LayoutError for unknown codes."""
    if code not in _BY_CODE:
        raise LayoutError(f"unknown dtype code {code}")
    return _BY_CODE[code]


def _to_dtype(value: Any) -> torch.dtype:
    if isinstance(value, torch.dtype):
        dtype_name(value)
        return value
    name = str(value).removeprefix("torch.")
    if name not in DTYPES:
        raise LayoutError(f"unsupported KV dtype {value!r}; supported: {', '.join(DTYPES)}")
    return DTYPES[name][0]


@dataclass(frozen=True, slots=True)
class KVLayout:
    """Shape of a model's KV cache: layers, KV heads, head dim, dtype, and whether it is MLA."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.bfloat16
    mla: bool = False  # one latent per token: canonical shape [1, L, T, 1, head_dim]
    _fingerprint: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", _to_dtype(self.dtype))
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LayoutError(f"KVLayout.{name} must be a positive int, got {value!r}")
        if self.mla and self.num_kv_heads != 1:
            raise LayoutError(f"an MLA layout has one latent per token, not {self.num_kv_heads} heads")
        kind = "mla" if self.mla else "mha"
        text = f"{kind}:{self.num_layers}:{self.num_kv_heads}:{self.head_dim}:{dtype_name(self.dtype)}"
        object.__setattr__(self, "_fingerprint", hashlib.sha256(text.encode()).hexdigest()[:16])

    @property
    def kv_planes(self) -> int:
        """2 (K and V) for attention layouts, 1 for MLA latents."""
        return 1 if self.mla else 2

    @property
    def bytes_per_token(self) -> int:
        """Bytes of KV one token occupies across all layers."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return self.kv_planes * self.num_layers * self.num_kv_heads * self.head_dim * elem

    def shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        """Canonical chunk shape for `num_tokens` tokens."""
        return (self.kv_planes, self.num_layers, num_tokens, self.num_kv_heads, self.head_dim)

    def empty(self, num_tokens: int, device: str | torch.device = "cpu", head_major: bool = False) -> torch.Tensor:
        """An uninitialised canonical tensor for `num_tokens` tokens (head-major: see the module doc)."""
        if not head_major:
            return torch.empty(self.shape(num_tokens), dtype=self.dtype, device=device)
        planes, layers, tokens, heads, dim = self.shape(num_tokens)
        return torch.empty((planes, layers, heads, tokens, dim), dtype=self.dtype, device=device).transpose(2, 3)

    @property
    def fingerprint(self) -> str:
        """Short stable identity of this layout, part of every key namespace and header."""
        return self._fingerprint

    def check(self, kv: torch.Tensor, num_tokens: int | None = None) -> None:
        """Raise LayoutError unless `kv` is a canonical tensor of this layout."""
        if not isinstance(kv, torch.Tensor):
            raise LayoutError(f"KV must be a torch.Tensor, got {type(kv).__name__}")
        if kv.dtype != self.dtype:
            raise LayoutError(f"KV dtype {kv.dtype} does not match the layout's {self.dtype}")
        tokens = kv.shape[2] if kv.dim() == 5 else -1
        expected = self.shape(tokens if num_tokens is None else num_tokens)
        if tuple(kv.shape) != expected:
            raise LayoutError(
                f"KV shape {tuple(kv.shape)} does not match the layout's {expected} "
                "[planes, layers, tokens, kv_heads, head_dim]"
            )


def is_head_major(kv: torch.Tensor) -> bool:
    """Whether canonical `kv` is the transposed view of a contiguous `[planes, layers, heads, tokens,
    dim]` tensor (and not also plainly contiguous: with one head or one token the orders coincide)."""
    return kv.dim() == 5 and not kv.is_contiguous() and kv.transpose(2, 3).is_contiguous()


def compact(kv: torch.Tensor, head_major: bool | None = None) -> torch.Tensor:
    """`kv` itself if it is contiguous in either memory order, else a copy in one: head-major if
    `head_major`, token-major if False, and if None, whichever `kv`'s strides are closer to."""
    if kv.is_contiguous() or is_head_major(kv):
        return kv
    if head_major is None:
        head_major = kv.stride(3) > kv.stride(2)
    return kv.transpose(2, 3).contiguous().transpose(2, 3) if head_major else kv.contiguous()
