"""A controller and three cache instances as real processes on loopback."""

from __future__ import annotations

import json

import pytest

from tests.cluster.procs import Controller, Instance, http_get, wait_for

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

CHUNK = 4  # tokens
DOC = list(range(1000, 1040))  # 10 chunks
OTHER = list(range(5000, 5024))  # 6 chunks


@pytest.fixture
def cluster(tmp_path):
    controller = Controller(missed_beats=10)
    started: list[Instance] = []

    def start(instance_id: str, l1_size: str, disk: bool = False, admin: bool = False) -> Instance:
        inst = Instance(instance_id, controller, l1_size, tmp_path / instance_id if disk else None, admin)
        started.append(inst)
        return inst

    yield controller, start
    for inst in started:
        inst.stop()
    controller.stop()


def assert_index_matches(controller: Controller, inst: Instance) -> None:
    """The controller's view of `inst` equals what its tiers really hold."""
    held = inst.call("keys")
    namespace = controller.instances()[inst.id]["namespace"]
    everything = sorted({d for keys in held.values() for d in keys})
    holders = controller.post("/holders", {"namespace": namespace, "hashes": everything})["holders"]
    for digest, found in zip(everything, holders, strict=True):
        assert sorted(found.get(inst.id, [])) == sorted(t for t, keys in held.items() if digest in keys), digest
    counts = controller.instances()[inst.id]["chunks"]
    assert counts == {"l1": len(held.get("l1", [])), "l2": len(held.get("l2", []))}


def lookup(controller: Controller, tokens: list[int]) -> dict:
    return controller.post("/lookup", {"tokens": tokens, "model": "test-model"})


def test_index_lookup_death_and_resync(cluster):
    controller, start = cluster
    a = start("a", l1_size=f"{3 * CHUNK * 256}")  # room for 3 chunks: storing 6 evicts 3
    b = start("b", l1_size="1MiB", disk=True)
    c = start("c", l1_size="1MiB")
    assert b.call("store", tokens=DOC[:28])["stored"] == 28
    assert c.call("store", tokens=DOC[:12])["stored"] == 12
    assert a.call("store", tokens=DOC[:8] + OTHER[:16])["stored"] == 24
    assert len(a.call("keys")["l1"]) == 3
    for inst in (a, b, c):
        assert_index_matches(controller, inst)

    # a evicted DOC's first chunks: it holds no prefix of DOC; b holds the longest
    answer = lookup(controller, DOC)
    assert answer["best"] == "b" and answer["best_tokens"] == 28
    assert {e["id"]: e["tokens"] for e in answer["instances"]} == {"b": 28, "c": 12}

    b.kill9()
    wait_for(lambda: not controller.instances()["b"]["alive"], 15, "b marked dead")  # 10 missed heartbeats
    answer = lookup(controller, DOC)
    assert answer["best"] == "c" and [e["id"] for e in answer["instances"]] == ["c"]

    b = start("b", l1_size="1MiB", disk=True)  # same id, same disk: re-registers and resyncs
    wait_for(lambda: controller.instances()["b"]["synced"], 30, "b resynced")
    b.call("sync")
    info = controller.instances()["b"]
    assert info["alive"] and info["chunks"] == {"l1": 0, "l2": 7}
    assert lookup(controller, DOC)["best"] == "b"
    assert_index_matches(controller, b)


def test_instances_survive_a_controller_restart(cluster):
    controller, start = cluster
    a = start("a", l1_size="1MiB")
    a.call("store", tokens=DOC[:8])
    port = controller.port
    controller.stop()
    a.send("store", tokens=DOC[:20])  # stored while the controller is away
    controller.restart(port)
    assert a.answer()["stored"] == 12  # it answers once the new controller has its chunks
    wait_for(lambda: controller.instances()["a"]["synced"], 30, "a registered again")
    assert lookup(controller, DOC)["best_tokens"] == 20
    assert_index_matches(controller, a)


def test_admin_api_metrics_and_clear_through_the_controller(cluster):
    controller, start = cluster
    a = start("a", l1_size="1MiB", disk=True, admin=True)
    b = start("b", l1_size="1MiB")  # no admin API
    a.call("store", tokens=DOC[:12])
    b.call("store", tokens=DOC[:8])
    assert controller.instances()["a"]["admin_url"] == a.admin_url
    assert json.loads(http_get(a.admin_url + "/health")[1])["cluster"] == {"registered": True, "synced": True}
    config = json.loads(http_get(a.admin_url + "/config")[1])
    assert config["cluster"]["instance_id"] == "a" and config["namespace"] == controller.instances()["a"]["namespace"]
    assert json.loads(http_get(a.admin_url + "/stats")[1])["l2"]["objects"] == 3
    kind, text = http_get(a.admin_url + "/metrics")
    assert kind.startswith("text/plain") and b'kvtier_tier_objects{tier="l2"} 3.0' in text

    cleared = controller.post("/clear", {})["cleared"]
    assert cleared == {"a": 6, "b": "no admin API (admin.port is 0)"}  # 3 chunks in L1, 3 on disk
    a.call("sync")
    assert controller.instances()["a"]["chunks"] == {"l1": 0, "l2": 0}
    assert lookup(controller, DOC)["best"] == "b"
    metrics = http_get(controller.url + "/metrics")[1].decode()
    assert 'kvtier_controller_instances{state="alive"} 2.0' in metrics
    assert "kvtier_controller_lookup_seconds_count 1.0" in metrics
