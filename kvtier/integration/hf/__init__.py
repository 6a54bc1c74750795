"""Cached generation for any transformers causal LM."""

from kvtier.integration.hf.cached_model import CachedModel, GenerationStats

__all__ = ["CachedModel", "GenerationStats"]
