"""Codec specs: parsing, canonical forms, clear errors, and the namespace they select."""

from __future__ import annotations

import pytest
import torch

from kvtier import CacheEngine, Config
from kvtier.codec import CODECS, canonical, get_codec, parse_spec
from kvtier.errors import ConfigError
from kvtier.layout import KVLayout
from tests.codec.conftest import SPECS

LAYOUT = KVLayout(2, 1, 8, torch.float32)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("raw", "raw"),
        ("fp8", "fp8-e4m3:scale=channel"),
        ("FP8-E5M2:scale=token", "fp8-e5m2:scale=token"),
        ("kivi-2", "kivi-2:group=64"),
        ("kivi-4", "kivi-4:group=32"),
        (" kivi-2 : group = 032 ", "kivi-2:group=32"),
        ("cachegen", "cachegen:anchor=16,delta=auto,kbits=4-4-4,vbits=3-4-3"),
        ("cachegen:vbits=4,kbits=5-3", "cachegen:anchor=16,delta=auto,kbits=5-3,vbits=4"),
    ],
)
def test_canonical_forms(text, want):
    assert canonical(text) == want
    assert canonical(want) == want
    assert get_codec(text).spec == want


def test_every_registered_codec_instantiates_with_its_name_and_id():
    for name, info in CODECS.items():
        codec = get_codec(name)
        assert codec.name == name and codec.codec_id == info.codec_id


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kivi", "unknown codec 'kivi'.*did you mean 'kivi-"),
        ("cachegne", "did you mean 'cachegen'"),
        ("kivi-2:grop=32", "no option 'grop'.*did you mean 'group'"),
        ("kivi-2:group=1", "between 2 and 4096"),
        ("kivi-2:group=x", "not an integer"),
        ("kivi-2:group", "name=value"),
        ("kivi-2:group=8,group=16", "given twice"),
        ("fp8:scale=tokens", "did you mean 'token'"),
        ("raw:level=1", "raw has no option 'level' \\(options: none\\)"),
        ("cachegen:kbits=4-4-4-4-4", "1 to 4 integers"),
        ("cachegen:vbits=9", "between 2 and 8"),
        ("cachegen:delta=maybe", "auto, on, off"),
    ],
)
def test_bad_specs_name_the_problem(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_spec(text)


def test_config_validates_codec_specs_of_both_tiers():
    config = Config.from_dict({"codec": "KIVI-2:group=32", "remote": {"codec": "cachegen:anchor=8"}})
    assert config.codec == "kivi-2:group=32"  # as the user wrote it (lower-cased), not rewritten
    with pytest.raises(ConfigError, match=r"^codec: unknown codec"):
        Config.from_dict({"codec": "zstd"})
    with pytest.raises(ConfigError, match=r"^remote\.codec: kivi-2 has no option"):
        Config.from_dict({"remote": {"codec": "kivi-2:bits=3"}})
    env = {"KVTIER_CODEC": "fp8-e5m2", "KVTIER_REMOTE_CODEC": "kivi-4:group=16"}
    loaded = Config.load(env=env)
    assert (loaded.codec, loaded.remote.codec) == ("fp8-e5m2", "kivi-4:group=16")
    assert Config.load(env={"LMCACHE_REMOTE_SERDE": "cachegen"}).remote.codec == "cachegen"


def namespace(codec: str) -> bytes:
    with CacheEngine(Config.from_dict({"codec": codec, "l1": {"size": 0}}), LAYOUT) as engine:
        return engine.hasher.namespace


def test_the_canonical_spec_selects_the_namespace():
    assert namespace("kivi-2") == namespace("kivi-2:group=64") == namespace("KIVI-2")
    spaces = {namespace(s) for s in SPECS}
    assert len(spaces) == len(SPECS)  # every codec and option set has its own
    assert namespace("raw") != namespace("kivi-2:group=32") != namespace("kivi-2")


def test_remote_tier_with_another_codec_salts_its_namespace(tmp_path):
    from kvtier.storage.remote import open_store
    from kvtier.storage.remote.tier import RemoteTier
    from tests.conftest import key

    store = open_store(f"fs://{tmp_path}")
    same = RemoteTier(store, LAYOUT, get_codec("kivi-2"), engine_codec=canonical("kivi-2:group=64"))
    other = RemoteTier(store, LAYOUT, get_codec("kivi-2:group=32"), engine_codec=canonical("kivi-2"))
    assert same._remote_key(key(1)) == key(1)
    assert other._remote_key(key(1)) != key(1)
