"""The parts of benchmarks/serve.py that talk to vLLM: its OpenAI-compatible server, and the client.

`Server` starts `python -m vllm.entrypoints.openai.api_server` on a free loopback port, waits for
/health, and stops it (SIGINT, then SIGTERM: vLLM flushes the connector on shutdown). `ask` sends
one streamed chat completion with the OpenAI Python client and times the first content token.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(slots=True)
class Arm:
    """One server configuration: vLLM alone, or with kvtier configured by `kvtier` (extra config)."""

    name: str
    kvtier: dict[str, Any] | None = None  # kv_connector_extra_config; None: no connector
    dtype: str = "float32"
    blocks: int | None = None  # vLLM's own KV cache, in blocks of 128 tokens (None: VLLM_CPU_KVCACHE_SPACE)
    restart_of: str | None = None  # runs only the query rounds, on the disk of this earlier arm


@dataclass(slots=True)
class Reply:
    """One request's outcome."""

    workload: str
    round: int
    index: int
    started: float  # seconds since the arm's first request
    ttft: float
    total: float
    text: str
    prompt_tokens: int = 0
    cached_tokens: int | None = None  # as vLLM reports it (its own prefix cache and the connector's)


@dataclass
class Server:
    """A vLLM OpenAI-compatible server process for one arm."""

    arm: Arm
    model: str
    max_model_len: int
    log: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 600) -> float:
        """Start the server; seconds until /health answers."""
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
               "--served-model-name", "bench", "--host", "127.0.0.1", "--port", str(self.port),
               "--dtype", self.arm.dtype, "--max-model-len", str(self.max_model_len), "--seed", "0",
               "--enable-prefix-caching", "--enable-prompt-tokens-details"]  # fmt: skip
        if self.arm.blocks:
            cmd += ["--num-gpu-blocks-override", str(self.arm.blocks)]
        if self.arm.kvtier is not None:
            config = {"kv_connector": "KVTierConnector", "kv_connector_module_path": "kvtier.integration.vllm",
                      "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                      "kv_connector_extra_config": self.arm.kvtier}  # fmt: skip
            cmd += ["--kv-transfer-config", json.dumps(config)]
        # one core for vLLM's own threads in every arm: with a connector it reserves one by itself,
        # without one it would not, and the two arms would compute with different thread counts
        env = os.environ | {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1", "VLLM_CPU_KVCACHE_SPACE": "4"}
        began = time.monotonic()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        while time.monotonic() - began < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.arm.name}: the server exited with {self.proc.returncode}; see {self.log}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - began
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"{self.arm.name}: no answer from {self.url}/health in {timeout} s; see {self.log}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, grace: float = 60) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            self.proc.send_signal(sig)
            try:
                self.proc.wait(grace)
                return
            except subprocess.TimeoutExpired:
                continue


async def ask(client: Any, messages: list[dict[str, str]], max_tokens: int) -> tuple[float, float, str, Any]:
    """One streamed, greedy chat completion: (TTFT, total seconds, text, usage)."""
    began = time.perf_counter()
    ttft = None
    parts: list[str] = []
    usage = None
    stream = await client.chat.completions.create(
        model="bench", messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            if ttft is None:
                ttft = time.perf_counter() - began
            parts.append(chunk.choices[0].delta.content)
    total = time.perf_counter() - began
    return (total if ttft is None else ttft), total, "".join(parts), usage


async def ask_all(
    url: str, requests: list[tuple[int, list[dict[str, str]]]], max_inflight: int, max_tokens: int, clock: float,
    workload: str, round_: int,
) -> list[Reply]:  # fmt: skip
    """Send `requests` ((index, messages)) with at most `max_inflight` in flight; replies in index order."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", timeout=1800, max_retries=0)
    gate = asyncio.Semaphore(max_inflight)

    async def one(index: int, messages: list[dict[str, str]]) -> Reply:
        async with gate:
            started = time.perf_counter() - clock
            ttft, total, text, usage = await ask(client, messages, max_tokens)
        details = getattr(usage, "prompt_tokens_details", None)
        return Reply(workload, round_, index, started, ttft, total, text,
                     prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                     cached_tokens=getattr(details, "cached_tokens", None))  # fmt: skip

    try:
        return sorted(await asyncio.gather(*(one(i, m) for i, m in requests)), key=lambda r: r.index)
    finally:
        await client.close()
