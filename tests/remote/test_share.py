"""Two engines in separate processes share KV through each remote: the second reads what the first stored."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from kvtier import CacheEngine, Config
from tests.conftest import SMALL, random_kv

TOKENS = [(i * 7919) % 49152 for i in range(1000)]  # 3 full chunks of 256 and a partial one
CHILD = """
import json, sys, torch
from kvtier import CacheEngine, Config
from tests.conftest import SMALL, random_kv
url, tokens = sys.argv[1], json.loads(sys.argv[2])
config = Config.from_dict({"remote": {"url": url, "lookup_timeout_ms": 2000, "timeout_ms": 5000}})
with CacheEngine(config, SMALL, "share-test") as engine:
    engine.store(tokens, random_kv(SMALL, len(tokens), seed=11))
    assert engine.flush(timeout=30)
    print(json.dumps(engine.stats()["remote"]))
"""


def test_second_process_reads_what_the_first_stored(remote_url):
    out = subprocess.run(
        [sys.executable, "-c", CHILD, remote_url, json.dumps(TOKENS)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["puts"] == 4
    config = Config.from_dict({"remote": {"url": remote_url, "lookup_timeout_ms": 2000, "timeout_ms": 5000}})
    with CacheEngine(config, SMALL, "share-test") as engine:
        assert engine.lookup(TOKENS) == len(TOKENS)
        got = engine.retrieve(TOKENS)
        assert torch.equal(got, random_kv(SMALL, len(TOKENS), seed=11))
        assert engine.stats()["remote"]["hits"] == 4
        again = engine.retrieve(TOKENS)  # promoted: now from L1
        assert torch.equal(again, got) and engine.stats()["remote"]["hits"] == 4


@pytest.mark.parametrize("remote_url", ["redis"], indirect=True)
def test_other_model_or_tenant_sees_nothing(remote_url):
    config = Config.from_dict({"remote": {"url": remote_url}})
    with CacheEngine(config, SMALL, "tenant-test") as engine:
        engine.store(TOKENS, random_kv(SMALL, len(TOKENS)))
        engine.flush()
    with CacheEngine(config.replace(tenant="other"), SMALL, "tenant-test") as other:
        assert other.lookup(TOKENS) == 0
    with CacheEngine(config, SMALL, "another-model") as other:
        assert other.lookup(TOKENS) == 0
