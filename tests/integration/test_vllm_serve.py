"""The README's vLLM server command, run as written: an OpenAI-compatible server with kvtier.

The kv-transfer config is taken from README.md itself (only the disk path is pointed at a temporary
folder), so a README that drifts from what works fails here. A second server, a new process, must
answer a repeated completion from the KV the first one stored, with the same text.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed"),
]
ROOT = Path(__file__).parents[2]
CORPUS = ROOT / "benchmarks" / "data" / "pride-and-prejudice-opening.txt"
LOADED = re.compile(r"loaded (\d+) tokens \[")
STORED = re.compile(r"stored (\d+) new tokens of \[")
START_S = 600  # a cold vLLM start on two cores takes 30-60 s; CI machines may be slower


def readme_transfer_config() -> dict:
    """The JSON after `--kv-transfer-config` in the README's `vllm serve` command."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"vllm serve .*?--kv-transfer-config \\\n\s*'(\{.*?\})'", text, re.S)
    assert match, "README.md has no `vllm serve ... --kv-transfer-config '{...}'` command"
    config: dict = json.loads(match.group(1))
    return config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Server:
    """`python -m vllm.entrypoints.openai.api_server` (what `vllm serve` runs) in a new process."""

    def __init__(self, model: str, transfer_config: dict, log: Path) -> None:
        self.port = free_port()
        self.log = log
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--dtype", "float32",
               "--kv-transfer-config", json.dumps(transfer_config), "--host", "127.0.0.1", "--port", str(self.port),
               "--max-model-len", "4096"]  # fmt: skip
        env = {**os.environ, "KVTIER_LOG_LEVEL": "info", "VLLM_CPU_KVCACHE_SPACE": "1"}
        with log.open("w") as out:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        raise AssertionError(f"the server was not up after {START_S} s:\n{self.tail()}")

    def complete(self, model: str, prompt: list[int]) -> str:
        body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=300) as response:
            text: str = json.loads(response.read())["choices"][0]["text"]
            return text

    def tail(self) -> str:
        return self.log.read_text()[-4000:]

    def stop(self) -> str:
        """Stop the server; return its log."""
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return self.log.read_text()


def test_readme_server_command_reuses_kv_across_servers(tmp_path):
    from transformers import AutoTokenizer

    from kvtier.models import export_default_model

    model = str(export_default_model())
    prompt = AutoTokenizer.from_pretrained(model)(CORPUS.read_text(), add_special_tokens=False).input_ids[:1400]
    config = readme_transfer_config()
    config["kv_connector_extra_config"]["disk"]["path"] = str(tmp_path / "kvtier")

    first = Server(model, config, tmp_path / "first.log")
    try:
        cold = first.complete(model, prompt)
    finally:
        log = first.stop()
    assert not LOADED.findall(log), "the first server found KV in an empty cache"
    assert sum(int(n) for n in STORED.findall(log)) == len(prompt), log[-4000:]

    second = Server(model, config, tmp_path / "second.log")
    try:
        warm = second.complete(model, prompt)
    finally:
        log = second.stop()
    loaded = [int(n) for n in LOADED.findall(log)]
    assert sum(loaded) >= 1280, (loaded, log[-4000:])  # 1,399 tokens, block-aligned (128 on CPU)
    assert warm == cold
