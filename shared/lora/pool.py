"""The adapter pool over three memory tiers (EdgeLoRA's heterogeneous memory management):

- disk: every registered adapter (validated, nothing loaded);
- host: adapters read into RAM, LRU by bytes up to `host_bytes`, filled by a background loader
  (prefetch for waiting requests, or on a miss) so the engine loop never waits on a disk read;
- device: `num_slots` pre-allocated slot buffers; a swap copies into a slot. LRU eviction only
  among slots no running sequence pins.

Reference counts: `users` counts live requests naming an adapter (removal is refused while any
exist: 409), `pins` counts running sequences holding its slot (never evicted while pinned).
Thread-safe: the engine loop acquires/releases, API threads add/remove/list."""

from __future__ import annotations

import heapq
import logging
import re
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from pice.shared.errors import (
    BadRequestError,
    ConflictError,
    InvalidAdapterError,
    NotFoundError,
)
from pice.shared.lora.adapter import (
    AdapterInfo,
    AdapterSpec,
    LoadedAdapter,
    ModelShape,
    load_adapter,
    validate_adapter,
)
from pice.shared.lora.compress.pooled import CompressedPool
from pice.shared.lora.slots import SlotBuffers, slot_bytes

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,127}$")


@dataclass
class _Entry:
    spec: AdapterSpec
    uid: int  # registration number: keys the prefix cache, so a re-added name never hits
    host: LoadedAdapter | None = None
    slot: int | None = None
    pins: int = 0
    users: int = 0
    loading: bool = False
    error: BaseException | None = None  # the last background load failed with this
    basis: str | None = None  # compressed: the entry of its cluster's basis (serves its slot)
    store: Path | None = None  # compressed: the store holding its Σ (removed with it)
    hidden: bool = False  # a cluster basis, not an adapter anyone names


class AdapterPool(CompressedPool):
    def __init__(self, shape: ModelShape, *, num_slots: int, max_rank: int, host_bytes: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.shape = shape
        self.num_slots, self.max_rank, self.host_bytes = num_slots, max_rank, host_bytes
        self.dtype, self.device = dtype, device
        # the largest valid adapter file: every projection at max rank in float32, plus header
        self.max_file_bytes = slot_bytes(shape, max_rank, 4) + 2**20
        self.buffers: SlotBuffers | None = None  # allocated when the first adapter is added
        self._lock = threading.RLock()
        self._loaded = threading.Condition(self._lock)
        self._entries: dict[str, _Entry] = {}
        self._owner: list[str | None] = [None] * num_slots
        # free slots, lowest first: resident adapters stay in a compact slot range, which is
        # what a decode step's batched matmul reads (pice.kernels.lora.bgmv_)
        self._free = list(range(num_slots))
        self._unpinned: OrderedDict[int, None] = OrderedDict()  # resident, unpinned; LRU first
        self._host: OrderedDict[str, None] = OrderedDict()  # host tier, LRU first
        self.host_used = 0
        self._next_uid = 1
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="lora-loader")
        self.stats = {"hits": 0, "misses": 0, "disk_loads": 0, "swaps": 0, "evictions": 0}

    # ---- registry (API side) ------------------------------------------------------------------
    def add(self, name: str, directory: Path) -> AdapterInfo:
        if not isinstance(name, str) or not _NAME.match(name):
            raise BadRequestError(
                f"adapter name must be 1-128 characters of letters, digits and ._:/@- starting "
                f"with a letter or digit, got {name!r}", field="name")
        with self._lock:
            if name in self._entries:
                raise ConflictError(f"adapter {name!r} already exists", field="name")
        spec = validate_adapter(name, Path(directory), self.shape, max_rank=self.max_rank,
                                max_bytes=self.max_file_bytes, dtype=self.dtype)
        with self._lock:
            if name in self._entries:
                raise ConflictError(f"adapter {name!r} already exists", field="name")
            if self.buffers is None:
                self.buffers = SlotBuffers(self.shape, self.num_slots, self.max_rank,
                                           self.dtype, self.device)
            self._entries[name] = _Entry(spec, self._next_uid)
            self._next_uid += 1
            return self._info(name)

    def remove(self, name: str) -> None:
        """Drop an adapter from every tier. Refused (409) while requests still use it."""
        with self._lock:
            entry = self._get(name)
            if entry.hidden:
                raise NotFoundError(f"adapter {name!r} does not exist", field="adapter")
            if entry.users:
                raise ConflictError(f"adapter {name!r} is in use by {entry.users} request(s); "
                                    "remove it when they finish", field="name")
            del self._entries[name]
            self._forget_sigma(name, entry)
            self._drop_host(name, entry)
            if entry.slot is not None:
                slot = entry.slot
                self._unpinned.pop(slot, None)
                self._owner[slot] = None
                assert self.buffers is not None
                self.buffers.clear(slot)
                heapq.heappush(self._free, slot)

    def infos(self) -> list[AdapterInfo]:
        with self._lock:
            return [self._info(name) for name in sorted(self._entries)
                    if not self._entries[name].hidden]

    def info(self, name: str) -> AdapterInfo:
        with self._lock:
            self._get(name)
            return self._info(name)

    def resident(self) -> set[str]:
        with self._lock:
            slots = {name for name in self._owner if name is not None}
            return {n for n, e in self._entries.items()
                    if not e.hidden and (e.basis or n) in slots}

    def on_host(self) -> set[str]:
        with self._lock:
            return set(self._host)

    def _info(self, name: str) -> AdapterInfo:
        e = self._entries[name]
        t = self._entries[e.basis] if e.basis is not None else e
        tier = "device" if t.slot is not None else "host" if t.host is not None else "disk"
        s = e.spec
        return AdapterInfo(name=name, rank=s.rank, alpha=s.alpha, use_rslora=s.use_rslora,
                           target_modules=list(s.target_modules), size_bytes=s.size_bytes,
                           tier=tier, base_model=s.base_model,
                           compressed=None if e.basis is None
                           else e.basis.split("/", 1)[1].rsplit("@", 1)[0])

    def _get(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise NotFoundError(f"adapter {name!r} does not exist", field="adapter")
        return entry

    # ---- requests ------------------------------------------------------------------------------
    def use(self, name: str) -> int:
        """A request naming the adapter was accepted; returns its registration id."""
        with self._lock:
            entry = self._get(name)
            entry.users += 1
            return entry.uid

    def unuse(self, name: str) -> None:
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None and entry.users > 0:
                entry.users -= 1

    def is_resident(self, name: str) -> bool:
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None and entry.basis is not None:
                entry = self._entries.get(entry.basis)
            return entry is not None and entry.slot is not None

    def acquire(self, name: str) -> int | None:
        """Pin the adapter's device slot for a sequence about to run: its slot, or None when it
        must wait (still loading from disk, or every slot is pinned). Raises the load error when
        reading its file failed."""
        with self._lock:
            entry = self._get(name)
            if entry.basis is not None:  # compressed: its cluster's basis is its slot
                return self.acquire(entry.basis)
            if entry.slot is not None:
                if entry.pins == 0:
                    self._unpinned.pop(entry.slot)
                entry.pins += 1
                return entry.slot
            if entry.host is None:
                if entry.error is not None:
                    raise entry.error
                self._request_load(name, entry)
                return None
            if self._free:
                slot = heapq.heappop(self._free)
            elif self._unpinned:
                slot, _ = self._unpinned.popitem(last=False)
                evicted = self._owner[slot]
                assert evicted is not None
                self._entries[evicted].slot = None
                self.stats["evictions"] += 1
            else:
                return None
            assert self.buffers is not None
            self.buffers.write(slot, entry.host)
            self._host.move_to_end(name)
            self.stats["swaps"] += 1
            self._owner[slot], entry.slot, entry.pins = name, slot, 1
            return slot

    def release(self, name: str) -> None:
        """A sequence holding the adapter's slot finished or was preempted."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None and entry.basis is not None:
                entry = self._entries.get(entry.basis)
            if entry is None or entry.slot is None or entry.pins == 0:
                return
            entry.pins -= 1
            if entry.pins == 0:
                self._unpinned[entry.slot] = None  # most recently used

    def record(self, hit: bool) -> None:
        with self._lock:
            self.stats["hits" if hit else "misses"] += 1

    def prefetch(self, names: list[str]) -> None:
        """Start reading the adapters waiting requests need into host RAM."""
        with self._lock:
            for name in names:
                entry = self._entries.get(name)
                if entry is not None and entry.basis is not None:
                    name, entry = entry.basis, self._entries.get(entry.basis)
                if entry is not None and entry.slot is None and entry.host is None \
                        and entry.error is None:
                    self._request_load(name, entry)

    def loads_pending(self) -> int:
        """Background loads not finished yet."""
        with self._lock:
            return sum(e.loading for e in self._entries.values())

    def wait_for_load(self, timeout: float) -> None:
        """Block until a background load finishes (or the timeout)."""
        with self._loaded:
            if any(e.loading for e in self._entries.values()):
                self._loaded.wait(timeout)

    # ---- host tier ----------------------------------------------------------------------------
    def _request_load(self, name: str, entry: _Entry) -> None:
        if not entry.loading:
            entry.loading = True
            self._loader.submit(self._load, name, entry)

    def _load(self, name: str, entry: _Entry) -> None:
        try:
            loaded: LoadedAdapter | None = load_adapter(entry.spec, self.dtype)
        except Exception as exc:  # file changed or vanished since validation
            log.warning("loading adapter %r failed: %s", name, exc)
            loaded = None
            entry.error = InvalidAdapterError(
                f"adapter {name!r} could not be read ({type(exc).__name__}: {exc}); remove it "
                "and add it again", field="adapter")
        with self._loaded:
            entry.loading = False
            if loaded is not None and self._entries.get(name) is entry:
                self.stats["disk_loads"] += 1
                entry.host = loaded
                self._host[name] = None
                self.host_used += loaded.nbytes
                self._shrink_host(keep=name)
            self._loaded.notify_all()

    def _shrink_host(self, keep: str) -> None:
        for name in list(self._host):
            if self.host_used <= self.host_bytes:
                break
            if name != keep:
                self._drop_host(name, self._entries[name])

    def _drop_host(self, name: str, entry: _Entry) -> None:
        if entry.host is not None:
            self.host_used -= entry.host.nbytes
            entry.host = None
            self._host.pop(name, None)
