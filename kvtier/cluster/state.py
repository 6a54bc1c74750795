"""The controller's state: registered instances, their liveness and event sequence, and the index.

Pure bookkeeping (no HTTP, no threads; the clock is injected), so it is tested directly. Each
instance numbers its event batches 1, 2, 3...; a batch that is not the next one (a gap, or events
before the first snapshot) gets the answer `resync`, and the instance sends a full snapshot.
An instance is dead when it missed `missed_beats` heartbeats; lookups never route to it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvtier.cluster.address import split_address
from kvtier.cluster.events import KEY_BYTES, TIER_CODES
from kvtier.cluster.index import ChunkIndex
from kvtier.keys import ChunkHasher

OK, RESYNC, UNKNOWN = "ok", "resync", "unknown"  # answers to heartbeats and event batches
HISTORY = 720  # heartbeat samples kept per instance (12 minutes at one per second)


@dataclass(frozen=True, slots=True)
class Registration:
    """What an instance tells the controller about itself."""

    id: str  # unique and stable across restarts of the instance
    model: str  # model id, for lookups by tokens
    namespace: str  # hex of the 16-byte key namespace of its chunks
    chunk_size: int  # tokens per chunk
    hash: str  # chunk hash name
    save_partial: bool  # whether a trailing partial chunk is stored
    heartbeat_s: float  # seconds between its heartbeats
    address: str = ""  # host:port where peers reach it (P2P), "" if none
    admin_url: str = ""  # its admin API, "" if none


def check_registration(reg: Registration) -> None:
    """ValueError naming the first field of `reg` that is not usable."""
    if not reg.id or len(reg.id) > 256:
        raise ValueError("id: 1 to 256 characters")
    if len(bytes.fromhex(reg.namespace)) != 16:
        raise ValueError(f"namespace: 32 hex digits, got {reg.namespace!r:.80}")
    if not 0 < reg.heartbeat_s <= 3600:  # also refuses NaN
        raise ValueError(f"heartbeat_s: a number of seconds in (0, 3600], got {reg.heartbeat_s}")
    if reg.address:
        split_address(reg.address)
    if reg.admin_url and not reg.admin_url.startswith(("http://", "https://")):
        raise ValueError(f"admin_url: an http:// or https:// URL, got {reg.admin_url!r:.80}")


@dataclass(slots=True)
class Instance:
    """A registered instance as the controller sees it."""

    reg: Registration
    slot: int  # bit position in the index
    last_seen: float  # clock time of its last message
    registered_at: float
    seq: int | None = None  # last batch applied; None until the first snapshot
    events: int = 0  # events applied
    resyncs: int = 0  # snapshots applied
    # (clock time, counters and gauges the instance sent with a heartbeat), the latest HISTORY
    history: deque[tuple[float, dict[str, float]]] = field(default_factory=lambda: deque(maxlen=HISTORY))
    hasher: ChunkHasher = field(init=False)

    def __post_init__(self) -> None:
        self.hasher = ChunkHasher(
            self.reg.chunk_size, bytes.fromhex(self.reg.namespace), self.reg.hash, self.reg.save_partial
        )


@dataclass(frozen=True, slots=True)
class LookupResult:
    """The cached prefix of a chunk sequence on every live instance holding some of it."""

    chunks: int  # chunks looked up
    prefixes: dict[str, int]  # instance id -> leading chunks it holds (only those with > 0)
    best: str | None  # the instance with the longest prefix (ties: the most recently seen), or None


class ControllerState:
    """Instances and the chunk index; every method runs on one thread (the HTTP event loop)."""

    def __init__(self, missed_beats: int = 3, clock: Callable[[], float] = time.monotonic) -> None:
        self.missed_beats = missed_beats  # heartbeats an instance may miss before it counts as dead
        self.clock = clock
        self.index = ChunkIndex()
        self.instances: dict[str, Instance] = {}
        self.events = 0  # events applied, all instances
        self.resyncs = 0  # snapshots applied
        self.gaps = 0  # batches refused because one before them was missing

    # --- instances ------------------------------------------------------------------------------

    def register(self, reg: Registration) -> Instance:
        """Add (or re-add after a restart) an instance; it must send a snapshot next. ValueError
        for a registration that is not usable (it is not added)."""
        check_registration(reg)
        old = self.instances.pop(reg.id, None)
        if old is not None:
            self.index.drop(old.slot)
            slot = old.slot
        else:
            slot = self._next_slot()
        now = self.clock()
        inst = Instance(reg, slot, last_seen=now, registered_at=now)
        self.instances[reg.id] = inst
        return inst

    def _next_slot(self) -> int:
        """The lowest slot no instance uses (slots of removed instances are reused)."""
        used = {i.slot for i in self.instances.values()}
        return next(s for s in range(len(used) + 1) if s not in used)

    def remove(self, instance_id: str) -> bool:
        """Forget an instance and its chunks."""
        inst = self.instances.pop(instance_id, None)
        if inst is None:
            return False
        self.index.drop(inst.slot)
        return True

    def alive(self, inst: Instance) -> bool:
        """Whether `inst` was heard from within its last `missed_beats` heartbeat intervals."""
        return self.clock() - inst.last_seen <= self.missed_beats * inst.reg.heartbeat_s

    def heartbeat(self, instance_id: str, stats: dict[str, float] | None = None) -> str:
        """Note that the instance is alive (and its `stats`, kept as history for the dashboard);
        UNKNOWN if it must register, RESYNC if it owes a snapshot."""
        inst = self.instances.get(instance_id)
        if inst is None:
            return UNKNOWN
        inst.last_seen = self.clock()
        if stats:
            inst.history.append((inst.last_seen, {k: float(v) for k, v in stats.items()}))
        return OK if inst.seq is not None else RESYNC

    # --- events ---------------------------------------------------------------------------------

    def ingest(self, instance_id: str, seq: int, blob: bytes) -> str:
        """Apply event batch `seq`; a repeat is ignored, a gap asks for a snapshot."""
        inst = self.instances.get(instance_id)
        if inst is None:
            return UNKNOWN
        inst.last_seen = self.clock()
        if inst.seq is None or seq > inst.seq + 1:
            self.gaps += inst.seq is not None
            inst.seq = None  # whatever comes next, only a snapshot can repair the index
            return RESYNC
        if seq <= inst.seq:
            return OK  # a batch sent again after a lost answer: already applied
        applied = self.index.apply(inst.slot, blob)
        inst.events += applied
        self.events += applied
        inst.seq = seq
        return OK

    def snapshot(self, instance_id: str, seq: int, tiers: dict[str, bytes]) -> str:
        """Replace the instance's chunks by a full snapshot taken after its batch `seq`."""
        inst = self.instances.get(instance_id)
        if inst is None:
            return UNKNOWN
        codes = {}
        for name, blob in tiers.items():
            if name not in TIER_CODES:
                raise ValueError(f"unknown tier {name!r} in snapshot; expected one of {', '.join(TIER_CODES)}")
            codes[TIER_CODES[name]] = blob
        self.index.replace(inst.slot, codes)
        inst.last_seen = self.clock()
        inst.seq = seq
        inst.resyncs += 1
        self.resyncs += 1
        return OK

    # --- lookup ---------------------------------------------------------------------------------

    def lookup_keys(self, keys: Sequence[bytes]) -> LookupResult:
        """Leading `keys` (32 bytes each) held by each live, synced instance."""
        for key in keys:
            if len(key) != KEY_BYTES:
                raise ValueError(f"a chunk key is {KEY_BYTES} bytes (namespace + digest), got {len(key)}")
        live = [i for i in self.instances.values() if i.seq is not None and self.alive(i)]
        by_slot = {i.slot: i for i in live}
        found = self.index.prefixes(keys, by_slot) if keys else {}
        prefixes = {by_slot[s].reg.id: n for s, n in found.items() if n}
        best = max(prefixes, key=lambda iid: (prefixes[iid], self.instances[iid].last_seen), default=None)
        return LookupResult(len(keys), prefixes, best)

    def hasher_for(self, model: str | None, namespace: str | None) -> ChunkHasher:
        """The chunk hasher of the instances registered with `namespace` (or with `model`)."""
        found = {
            i.reg.namespace: i.hasher
            for i in self.instances.values()
            if (namespace is None or i.reg.namespace == namespace) and (model is None or i.reg.model == model)
        }
        if len(found) != 1:
            what = f"namespace {namespace}" if namespace else f"model {model!r}" if model else "any model"
            many = "several namespaces; give one" if found else "no registered instance"
            raise LookupError(f"{what}: {many}")
        return next(iter(found.values()))
