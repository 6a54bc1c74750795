"""Adapters move KV between a serving engine's own memory and kvtier's canonical chunk tensors."""
