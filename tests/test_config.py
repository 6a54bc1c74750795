"""Config: defaults, YAML, environment, LMCache compatibility and the errors for bad input."""

from __future__ import annotations

import logging

import pytest

from kvtier.config import Config
from kvtier.errors import ConfigError
from kvtier.units import GiB, MiB, parse_size


def load(tmp_path, yaml_text=None, env=None, lmcache_yaml=None):
    env = dict(env or {})
    if yaml_text is not None:
        path = tmp_path / "kvtier.yaml"
        path.write_text(yaml_text)
        env["KVTIER_CONFIG"] = str(path)
    if lmcache_yaml is not None:
        path = tmp_path / "lmcache.yaml"
        path.write_text(lmcache_yaml)
        env["LMCACHE_CONFIG_FILE"] = str(path)
    return Config.load(env=env)


def test_defaults(tmp_path):
    cfg = load(tmp_path)
    assert cfg == Config()
    assert (cfg.chunk_size, cfg.hash, cfg.l1.size, cfg.l1.policy) == (256, "blake3", 4 * GiB, "lru")
    assert cfg.disk.path is None and cfg.remote.url is None


def test_yaml_and_env(tmp_path):
    cfg = load(
        tmp_path,
        "chunk_size: 128\nhash: xxh128\nl1: {size: 512MiB, policy: LFU}\ndisk: {path: /tmp/x, size: 2GB}\n",
        {"KVTIER_L1_POLICY": "mru", "KVTIER_SAVE_PARTIAL_CHUNKS": "no"},
    )
    assert cfg.chunk_size == 128 and cfg.hash == "xxh128"
    assert cfg.l1.size == 512 * MiB and cfg.l1.policy == "mru"  # the variable wins over the file
    assert cfg.disk.path == "/tmp/x" and cfg.disk.size == 2_000_000_000
    assert cfg.save_partial_chunks is False


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.chunk_size = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("chunk_sise: 256\n", "unknown key 'chunk_sise'.*did you mean 'chunk_size'"),
        ("l1: {sise: 1GiB}\n", "unknown key 'l1.sise'.*did you mean 'l1.size'"),
        ("hash: md5\n", "hash: 'md5' is not one of blake3, sha256, xxh128"),
        ("l1: {policy: lruu}\n", "l1.policy: 'lruu'.*did you mean 'lru'"),
        ("chunk_size: 0\n", "chunk_size: 0 is not between"),
        ("chunk_size: 12.5\n", "chunk_size.*expected an integer"),
        ("l1: {size: lots}\n", "l1.size.*expected a size such as 4GiB"),
        ("save_partial_chunks: maybe\n", "save_partial_chunks.*expected true or false"),
        ("- a list\n", "must hold a mapping"),
        ("chunk_size: [\n", "not valid YAML"),
    ],
)
def test_bad_yaml_values(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, text)


def test_unknown_variable_names_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown variable KVTIER_L1_SIZ .*KVTIER_L1_SIZE"):
        load(tmp_path, env={"KVTIER_L1_SIZ": "1GiB"})


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read config file"):
        Config.load(str(tmp_path / "absent.yaml"), env={})


def test_lmcache_yaml_keys(tmp_path):
    cfg = load(
        tmp_path,
        lmcache_yaml=(
            "chunk_size: 512\nlocal_cpu: true\nmax_local_cpu_size: 2.5\nlocal_disk: file:///tmp/lmc\n"
            "max_local_disk_size: 5\ncache_policy: LFU\nsave_unfull_chunk: false\nremote_url: null\n"
            "remote_serde: naive\n"
        ),
    )
    assert cfg.chunk_size == 512
    assert cfg.l1.size == int(2.5 * GiB) and cfg.l1.policy == "lfu"
    assert cfg.disk.path == "/tmp/lmc" and cfg.disk.size == 5 * GiB
    assert cfg.save_partial_chunks is False and cfg.remote.codec == "raw"


def test_lmcache_env(tmp_path):
    cfg = load(
        tmp_path,
        env={"LMCACHE_CHUNK_SIZE": "256", "LMCACHE_LOCAL_DISK": "file:///data/kv", "LMCACHE_MAX_LOCAL_DISK_SIZE": "5",
             "LMCACHE_REMOTE_URL": "redis://localhost:6379", "LMCACHE_LOCAL_CPU": "False"},
    )  # fmt: skip
    assert cfg.disk.path == "/data/kv" and cfg.disk.size == 5 * GiB
    assert cfg.remote.url == "redis://localhost:6379"
    assert cfg.l1.size == 0  # local_cpu: false disables the CPU tier


def test_lmcache_unsupported_key_is_ignored_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="kvtier.config"):
        cfg = load(tmp_path, lmcache_yaml="chunk_size: 256\nenable_blending: true\n")
    assert cfg.chunk_size == 256
    assert "enable_blending" in caplog.text


def test_lmcache_typo_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown LMCache key 'chunk_sizee'.*did you mean 'chunk_size'"):
        load(tmp_path, lmcache_yaml="chunk_sizee: 256\n")


def test_lmcache_bad_local_disk(tmp_path):
    with pytest.raises(ConfigError, match=r"local_disk.*expected file:///path"):
        load(tmp_path, env={"LMCACHE_LOCAL_DISK": "s3://bucket"})


def test_conflicting_lmcache_and_kvtier_settings(tmp_path):
    with pytest.raises(ConfigError, match=r"chunk_size is set to 512 by LMCACHE.*and to 256 by KVTIER"):
        load(tmp_path, env={"LMCACHE_CHUNK_SIZE": "512", "KVTIER_CHUNK_SIZE": "256"})
    same = load(tmp_path, env={"LMCACHE_CHUNK_SIZE": "256", "KVTIER_CHUNK_SIZE": "256"})
    assert same.chunk_size == 256


def test_from_dict_and_round_trip():
    cfg = Config.from_dict({"chunk_size": 64, "disk": {"path": "/tmp/d", "size": "1GiB"}})
    assert Config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("text", "value"),
    [("4GiB", 4 * GiB), ("4 GiB", 4 * GiB), ("512mib", 512 * MiB), ("1.5GiB", int(1.5 * GiB)), ("4GB", 4 * 10**9),
     ("100", 100), (100, 100), ("2k", 2000), ("2KiB", 2048)],
)  # fmt: skip
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["-1", "four", "4XB", "", True, -5, None])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_merged_overrides():
    cfg = Config.from_dict({"chunk_size": 128, "l1": {"size": "1GiB"}})
    out = cfg.merged({"l1": {"policy": "lfu"}, "disk": {"path": "/tmp/m"}}, "extra")
    assert (out.chunk_size, out.l1.size, out.l1.policy, out.disk.path) == (128, GiB, "lfu", "/tmp/m")
    with pytest.raises(ConfigError, match=r"unknown key 'l1.sise' in extra"):
        cfg.merged({"l1": {"sise": 1}}, "extra")


def test_kvtier_variables_that_are_not_config_keys_are_allowed():
    config = Config.load(env={"KVTIER_SERVER_TOKEN": "secret", "KVTIER_CONFIG": ""})
    assert "secret" not in str(config.to_dict())
