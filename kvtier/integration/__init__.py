"""Integrations with serving engines: Hugging Face transformers (hf), vLLM (vllm)."""
