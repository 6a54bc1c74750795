"""Remote URLs and settings: what each scheme accepts and the errors a bad one gets."""

from __future__ import annotations

import pytest

from kvtier import Config
from kvtier.errors import ConfigError
from kvtier.storage.remote import open_store


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis:/no-host", "names no host"),
        ("rediz://127.0.0.1:6379", "unknown scheme 'rediz'.*did you mean 'redis'"),
        ("lm://127.0.0.1:65432", "lm:// server protocol is not supported.*kvtier server"),
        ("fs://relative/path", "expected fs:///absolute/path"),
        ("127.0.0.1:6379", "unknown scheme"),
    ],
)
def test_bad_urls_are_config_errors(url, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict({"remote": {"url": url}})


@pytest.mark.parametrize("key", ["lookup_timeout_ms", "timeout_ms", "max_connections", "backoff_ms"])
def test_settings_must_be_positive(key):
    with pytest.raises(ConfigError, match=f"remote.{key}: 0 must be at least 1"):
        Config.from_dict({"remote": {key: 0}})


def test_lmcache_remote_url_and_env():
    config = Config.load(env={"LMCACHE_REMOTE_URL": "redis://10.0.0.5:6379", "KVTIER_REMOTE_TIMEOUT_MS": "750"})
    assert config.remote.url == "redis://10.0.0.5:6379" and config.remote.timeout_ms == 750


def test_unknown_s3_option_is_named():
    with pytest.raises(ConfigError, match=r"unknown s3:// option.*endpont"):
        open_store("s3://bucket/p?endpont=http://x")


@pytest.mark.parametrize("scheme", ["redis", "rediss", "valkey", "valkeys"])
def test_redis_family_schemes_open(scheme):
    store = open_store(f"{scheme}://127.0.0.1:1/0")  # connects lazily: nothing listens on port 1
    assert store.scheme == scheme and store.where.startswith(f"{scheme}://127.0.0.1:1")
    store.close()
