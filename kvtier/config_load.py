"""Loading a Config from YAML files and environment variables, kvtier's own and LMCache's.

Precedence, lowest first: defaults, LMCache YAML (`LMCACHE_CONFIG_FILE`), `LMCACHE_*` variables,
kvtier YAML (`KVTIER_CONFIG`), `KVTIER_*` variables. A key that an LMCache source and a kvtier
source both set to different values is an error: we never silently pick one of two user settings.

This module sits below `config.py`: it reads sources into any frozen dataclass tree (a root whose
sections are dataclass fields with a `default_factory`, every leaf field with a "kind" in its
metadata) and is handed the root class, so the two never import each other.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import yaml

from kvtier.errors import ConfigError, closest
from kvtier.units import GiB, parse_bool, parse_size

log = logging.getLogger("kvtier.config")

# (where the values came from, whether it is an LMCache source, dotted key -> raw value)
Source = tuple[str, bool, dict[str, Any]]
# variables of kvtier that are not config keys: the config file, the tokens of the kvtier server, the
# cluster controller and the admin API (never in a config file or its printout)
RESERVED_ENV = {"KVTIER_CONFIG", "KVTIER_SERVER_TOKEN", "KVTIER_CONTROLLER_TOKEN", "KVTIER_ADMIN_TOKEN"}
C = TypeVar("C")  # the root dataclass of a config tree


def load(root: type[C], path: str | None, env: Mapping[str, str] | None) -> C:
    """Read every source in precedence order and build the config tree of `root`."""
    env = os.environ if env is None else env
    sources: list[Source] = []
    lmcache_file = env.get("LMCACHE_CONFIG_FILE")
    if lmcache_file:
        sources.append((lmcache_file, True, lmcache_keys(read_yaml(lmcache_file), lmcache_file)))
    sources.append(("LMCACHE_* variables", True, lmcache_env(env)))
    path = path or env.get("KVTIER_CONFIG")
    if path:
        sources.append((path, False, flatten(root, read_yaml(path), path)))
    sources.append(("KVTIER_* variables", False, kvtier_env(root, env)))
    return build(root, sources)


def sections(root: type) -> dict[str, type]:
    """The sections of a config tree: {"l1": L1Config, ...}."""
    return {
        f.name: f.default_factory  # type: ignore[misc]
        for f in dataclasses.fields(root)
        if dataclasses.is_dataclass(f.default_factory)
    }


def leaf_fields(root: type) -> dict[str, dataclasses.Field[Any]]:
    """Map every dotted key ("chunk_size", "l1.size", ...) of a config tree to its dataclass field."""
    out: dict[str, dataclasses.Field[Any]] = {}
    parts = sections(root)
    for f in dataclasses.fields(root):
        if f.name in parts:
            for sub in dataclasses.fields(parts[f.name]):
                out[f"{f.name}.{sub.name}"] = sub
        else:
            out[f.name] = f
    return out


def flatten(root: type, data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Flatten {"l1": {"size": x}} into {"l1.size": x}; reject keys `root` does not have."""
    keys = leaf_fields(root)
    parts = sections(root)
    out: dict[str, Any] = {}
    for name, value in data.items():
        if name in parts and isinstance(value, Mapping):
            for sub, subvalue in value.items():
                out[f"{name}.{sub}"] = subvalue
        else:
            out[str(name)] = value
    for key in out:
        if key not in keys:
            raise ConfigError(f"unknown key '{key}' in {source}{closest(key, keys)}")
    return out


def read_yaml(path: str) -> dict[str, Any]:
    """Parse a YAML mapping; an unreadable file or a non-mapping is a ConfigError."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, not {type(data).__name__}")
    return data


def env_name(key: str) -> str:
    """The environment variable of a dotted key: "l1.size" -> "KVTIER_L1_SIZE"."""
    return "KVTIER_" + key.replace(".", "_").upper()


def kvtier_env(root: type, env: Mapping[str, str]) -> dict[str, Any]:
    """Collect KVTIER_* variables; an unknown one is an error naming the closest valid name."""
    names = {env_name(key): key for key in leaf_fields(root)}
    out: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith("KVTIER_") or name in RESERVED_ENV:
            continue
        if name not in names:
            raise ConfigError(f"unknown variable {name}{closest(name, list(names) + list(RESERVED_ENV))}")
        out[names[name]] = value
    return out


# --- parsing -------------------------------------------------------------------------------------


def parse_value(root: type, key: str, value: Any, source: str) -> Any:
    """Convert a raw YAML or environment value to the type of `key`'s field ("choice" fields are
    lowercased: one of a few words)."""
    kind = leaf_fields(root)[key].metadata["kind"]
    try:
        if kind == "size":
            return parse_size(value)
        if kind == "bool":
            return parse_bool(value)
        if kind == "int":
            return _parse_int(value)
        if kind == "optstr":
            return None if value is None or str(value).strip() in ("", "None", "null") else str(value)
        text = "" if value is None else str(value)
        return text.lower() if kind == "choice" else text
    except ValueError as exc:
        raise ConfigError(f"{key} (from {source}): {exc}") from exc


def _parse_int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"expected an integer, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected an integer, got {value!r}") from None


def build(root: type[C], sources: list[Source]) -> C:
    """Merge parsed sources (later wins) and construct the validated dataclass tree of `root`."""
    merged: dict[str, Any] = {}
    origin: dict[str, tuple[str, bool]] = {}
    for source, is_lmcache, values in sources:
        for key, raw in values.items():
            value = parse_value(root, key, raw, source)
            if key in merged and merged[key] != value and origin[key][1] != is_lmcache:
                raise ConfigError(
                    f"{key} is set to {merged[key]!r} by {origin[key][0]} and to {value!r} by {source}; "
                    "remove one of them"
                )
            merged[key], origin[key] = value, (source, is_lmcache)
    top: dict[str, Any] = {}
    parts = sections(root)
    nested: dict[str, dict[str, Any]] = {name: {} for name in parts}
    for key, value in merged.items():
        section, _, sub = key.partition(".")
        if sub:
            nested[section][sub] = value
        else:
            top[key] = value
    built = {name: cls(**nested[name]) for name, cls in parts.items()}
    return root(**top, **built)


# --- LMCache compatibility -----------------------------------------------------------------------


def _gb(value: Any) -> int:
    try:
        return int(float(value) * GiB)
    except (TypeError, ValueError):
        raise ConfigError(f"expected a number of GB, got {value!r}") from None


def _local_disk(value: Any) -> Any:
    if value is None or str(value).strip() in ("", "None", "null"):
        return None
    text = str(value)
    if text.startswith("file://"):
        return text[len("file://") :]
    if "://" in text:
        raise ConfigError(f"local_disk: expected file:///path, got {text!r}")
    return text


def _serde(value: Any) -> str:
    return "raw" if str(value).lower() == "naive" else str(value)


# LMCache key -> (kvtier key, converter)
LMCACHE_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "chunk_size": ("chunk_size", lambda v: v),
    "max_local_cpu_size": ("l1.size", _gb),
    "local_disk": ("disk.path", _local_disk),
    "max_local_disk_size": ("disk.size", _gb),
    "cache_policy": ("l1.policy", lambda v: str(v).lower()),
    "save_unfull_chunk": ("save_partial_chunks", lambda v: v),
    "remote_url": ("remote.url", lambda v: v),
    "remote_serde": ("remote.codec", _serde),
}


def lmcache_keys(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Translate LMCache keys; keys without a kvtier meaning are logged and ignored."""
    out: dict[str, Any] = {}
    for name, value in data.items():
        if name == "local_cpu":
            if not parse_bool(value):
                out["l1.size"] = 0
        elif name in LMCACHE_KEYS:
            key, convert = LMCACHE_KEYS[name]
            try:
                out[key] = convert(value)
            except ConfigError as exc:
                raise ConfigError(f"{name} (from {source}): {exc}") from exc
        else:
            hint = closest(name, [*LMCACHE_KEYS, "local_cpu"])
            if hint:  # most likely a typo of a key we do support
                raise ConfigError(f"unknown LMCache key '{name}' in {source}{hint}")
            log.warning("ignoring LMCache key %r from %s: kvtier has no equivalent", name, source)
    if out.get("l1.size") == 0 and "max_local_cpu_size" in data:
        log.info("local_cpu is false: the CPU tier is disabled despite max_local_cpu_size")
    return out


def lmcache_env(env: Mapping[str, str]) -> dict[str, Any]:
    """Translate LMCACHE_<KEY> variables the same way as LMCache YAML keys."""
    data = {
        name[len("LMCACHE_") :].lower(): value
        for name, value in env.items()
        if name.startswith("LMCACHE_") and name != "LMCACHE_CONFIG_FILE"
    }
    return lmcache_keys(data, "LMCACHE_* variables")
