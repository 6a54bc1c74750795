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


@pytest.mark.parametrize("family", ["redis", "rediss", "valkey", "valkeys"])
@pytest.mark.parametrize(("topology", "path"), [("cluster", ""), ("sentinel", "/mymaster/2")])
def test_cluster_and_sentinel_schemes_open(family, topology, path):
    scheme = f"{family}+{topology}"
    store = open_store(f"{scheme}://user:p%40ss@127.0.0.1:1,[::1]:2,localhost{path}")  # connects lazily
    default_port = 6379 if topology == "cluster" else 26379
    assert store.where == f"{scheme}://127.0.0.1:1,[::1]:2,localhost:{default_port}{path}"
    assert store._auth == {"username": "user", "password": "p@ss"}
    assert store.tls == (family in ("rediss", "valkeys"))
    store.close()


def test_tls_options_reach_the_client():
    store = open_store("rediss+cluster://10.0.0.1:7000?ssl_cert_reqs=none&ssl_ca_certs=/etc/ca.pem")
    assert store._auth == {"ssl_cert_reqs": "none", "ssl_ca_certs": "/etc/ca.pem"}
    store.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+cluster://h:1,h:x", "'h:x' is not host:port"),
        ("redis+cluster://h:1,h:99999", "'h:99999' is not host:port"),
        ("redis+cluster://h:1,,h:2", "'' is not host:port"),
        ("redis+cluster://h:1/3", "a Redis Cluster has only database 0"),
        ("redis+sentinel://h:26379", "expected redis\\+sentinel://host:port.*/service_name"),
        ("redis+sentinel://h:26379/mymaster/x", "expected redis\\+sentinel://"),
        ("rediss+cluster://h:1?socket_timeout=5", "does not take socket_timeout.*remote.\\* settings"),
        ("redis+sentinel://h:1/m?ssl_cert_reqs=none", "TLS options need rediss\\+"),
    ],
)
def test_bad_cluster_and_sentinel_urls(url, message):
    with pytest.raises(ConfigError, match=message):
        open_store(url)


def test_lmcache_sentinel_url_gets_a_hint():
    with pytest.raises(ConfigError, match="redis\\+sentinel://h1:p1,h2:p2/<master name>"):
        Config.from_dict({"remote": {"url": "redis-sentinel://10.0.0.1:26379,10.0.0.2:26379"}})
