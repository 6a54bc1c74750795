"""Controller bookkeeping: registration, sequence numbers and resyncs, liveness, lookups."""

from __future__ import annotations

import pytest

from kvtier.cluster.events import encode_keys, encode_record
from kvtier.cluster.state import OK, RESYNC, UNKNOWN, ControllerState, Registration
from kvtier.keys import ChunkHasher

NS = bytes(range(16))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def reg(instance_id: str, model: str = "m", namespace: bytes = NS) -> Registration:
    return Registration(instance_id, model, namespace.hex(), chunk_size=4, hash="xxh128", save_partial=True,
                        heartbeat_s=1.0)  # fmt: skip


def keys_of(tokens: list[int]) -> list[bytes]:
    hasher = ChunkHasher(4, NS, "xxh128")
    return [c.key.namespace + c.key.digest for c in hasher.chunks(tokens)]


def admits(keys: list[bytes]) -> bytes:
    return b"".join(encode_record(0, True, key) for key in keys)


@pytest.fixture
def state() -> ControllerState:
    return ControllerState(missed_beats=3, clock=Clock())


def test_events_need_a_snapshot_first_and_no_gaps(state):
    keys = keys_of(list(range(12)))
    assert state.ingest("a", 1, b"") == UNKNOWN
    state.register(reg("a"))
    assert state.heartbeat("a") == RESYNC
    assert state.ingest("a", 1, admits(keys[:1])) == RESYNC
    assert state.snapshot("a", 0, {"l1": encode_keys([])}) == OK
    assert state.ingest("a", 1, admits(keys[:2])) == OK
    assert state.ingest("a", 1, admits(keys[:2])) == OK  # a repeat is ignored
    assert state.ingest("a", 3, admits(keys)) == RESYNC  # batch 2 is missing
    assert state.lookup_keys(keys).prefixes == {}  # an unsynced instance is not routed to
    assert state.snapshot("a", 3, {"l1": b"".join(keys)}) == OK
    assert state.lookup_keys(keys).prefixes == {"a": 3}
    state.index.check()


def test_lookup_picks_the_longest_prefix_among_live_instances(state):
    keys = keys_of(list(range(40)))  # 10 chunks
    for iid, n in (("a", 3), ("b", 7), ("c", 5)):
        state.register(reg(iid))
        state.snapshot(iid, 0, {"l2": b"".join(keys[:n])})
    result = state.lookup_keys(keys)
    assert result.prefixes == {"a": 3, "b": 7, "c": 5} and result.best == "b"
    state.clock.now += 2.5
    state.heartbeat("a")
    state.heartbeat("c")
    state.clock.now += 1.0  # b is 3.5 s silent with 1 s heartbeats and 3 allowed misses: dead
    result = state.lookup_keys(keys)
    assert result.best == "c" and "b" not in result.prefixes
    state.heartbeat("b")  # back (it was only slow): routed to again
    assert state.lookup_keys(keys).best == "b"


def test_reregistration_drops_the_old_chunks_and_keeps_the_slot(state):
    keys = keys_of(list(range(8)))
    state.register(reg("a"))
    slot = state.register(reg("b")).slot
    state.snapshot("b", 0, {"l1": b"".join(keys)})
    assert state.register(reg("b")).slot == slot
    assert len(state.index) == 0 and state.heartbeat("b") == RESYNC
    assert state.remove("a") and state.register(reg("d")).slot == 0


def test_hasher_for_tokens(state):
    state.register(reg("a"))
    state.register(reg("b", model="other", namespace=bytes(16)))
    assert state.hasher_for("m", None).namespace == NS
    assert state.hasher_for(None, bytes(16).hex()).namespace == bytes(16)
    with pytest.raises(LookupError, match="several"):
        state.hasher_for(None, None)
    with pytest.raises(LookupError, match="no registered"):
        state.hasher_for("nope", None)


def test_bad_snapshot_and_keys_are_value_errors(state):
    state.register(reg("a"))
    with pytest.raises(ValueError, match="unknown tier"):
        state.snapshot("a", 0, {"l9": b""})
    with pytest.raises(ValueError, match="32-byte"):
        state.snapshot("a", 0, {"l1": b"abc"})
    with pytest.raises(ValueError, match="32 bytes"):
        state.lookup_keys([b"short"])


def test_cluster_config_needs_an_instance_id_with_a_controller():
    from kvtier.config import Config
    from kvtier.errors import ConfigError

    with pytest.raises(ConfigError, match="instance_id"):
        Config.load(env={"KVTIER_CLUSTER_CONTROLLER_URL": "http://127.0.0.1:9000"})
    with pytest.raises(ConfigError, match="http"):
        Config.load(env={"KVTIER_CLUSTER_CONTROLLER_URL": "127.0.0.1:9000", "KVTIER_CLUSTER_INSTANCE_ID": "a"})
    cfg = Config.load(env={"KVTIER_CLUSTER_CONTROLLER_URL": "http://h:1", "KVTIER_CLUSTER_INSTANCE_ID": "a",
                           "KVTIER_CONTROLLER_TOKEN": "not a config key"})  # fmt: skip
    assert cfg.cluster.instance_id == "a" and cfg.cluster.heartbeat_ms == 1000
