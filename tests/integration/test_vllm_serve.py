"""The README's vLLM server command, run as written: an OpenAI-compatible server with kvtier.

The kv-transfer config is taken from README.md itself (only the disk path is pointed at a temporary
folder), so a README that drifts from what works fails here. A second server, a new process, must
answer a repeated completion from the KV the first one stored, with the same text.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.remote.servers import ServerProcess

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed"),
]
ROOT = Path(__file__).parents[2]
CORPUS = ROOT / "benchmarks" / "data" / "pride-and-prejudice-opening.txt"
LOADED = re.compile(r"loaded (\d+) tokens \[")
STORED = re.compile(r"stored (\d+) new tokens of \[")
START_S = 600  # a cold vLLM start on two cores takes 30-60 s; CI machines may be slower
STOP_S = 60  # the connector writes its pending stores to disk on shutdown
LOG_CHARS = 1 << 24


def readme_transfer_config() -> dict:
    """The JSON after `--kv-transfer-config` in the README's `vllm serve` command."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"vllm serve .*?--kv-transfer-config \\\n\s*'(\{.*?\})'", text, re.S)
    assert match, "README.md has no `vllm serve ... --kv-transfer-config '{...}'` command"
    config: dict = json.loads(match.group(1))
    return config


def vllm_server(model: str, transfer_config: dict) -> ServerProcess:
    """`python -m vllm.entrypoints.openai.api_server` (what `vllm serve` runs), ready once /health answers."""

    def argv(port: int) -> list[str]:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--dtype", "float32",
                "--kv-transfer-config", json.dumps(transfer_config), "--host", "127.0.0.1", "--port", str(port),
                "--max-model-len", "4096"]  # fmt: skip

    def ready(port: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    return ServerProcess(argv, ready, "vLLM server")


def complete(server: ServerProcess, model: str, prompt: list[int]) -> str:
    """Greedy completion of `prompt` (token ids)."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=300) as response:
        text: str = json.loads(response.read())["choices"][0]["text"]
        return text


def serve_once(model: str, config: dict, prompt: list[int]) -> tuple[str, str]:
    """Start a server, complete `prompt`, stop it (its connector flushes its stores); the text and the log."""
    server = vllm_server(model, config).start(timeout=START_S)
    try:
        return complete(server, model, prompt), server.log_tail(LOG_CHARS)
    finally:
        server.stop(timeout=STOP_S)


def test_readme_server_command_reuses_kv_across_servers(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from kvtier.models import export_default_model

    model = str(export_default_model())
    prompt = AutoTokenizer.from_pretrained(model)(CORPUS.read_text(), add_special_tokens=False).input_ids[:1400]
    config = readme_transfer_config()
    config["kv_connector_extra_config"]["disk"]["path"] = str(tmp_path / "kvtier")
    monkeypatch.setenv("KVTIER_LOG_LEVEL", "info")  # the connector's load and store lines
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")

    cold, log = serve_once(model, config, prompt)
    assert not LOADED.findall(log), "the first server found KV in an empty cache"
    assert sum(int(n) for n in STORED.findall(log)) == len(prompt), log[-4000:]

    warm, log = serve_once(model, config, prompt)
    loaded = [int(n) for n in LOADED.findall(log)]
    assert sum(loaded) == len(prompt) - 1, (loaded, log[-4000:])  # vLLM computes the last token
    assert warm == cold
