"""The adapter pool's compressed side (mixed into pice.shared.lora.pool.AdapterPool): a
compressed adapter's slot is its cluster's basis, a hidden pool entry loaded and evicted like
any adapter; its Σ_i sits in the slot buffers' SigmaTable. Deleting the adapter drops its Σ_i
from the table and from the store at once."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pice.shared.lora.adapter import ModelShape

_GENERATION = itertools.count(1)


class CompressedPool:
    # provided by AdapterPool
    shape: ModelShape
    max_rank: int
    max_file_bytes: int
    buffers: Any
    _lock: threading.RLock
    _entries: dict[str, Any]
    _owner: list[str | None]
    _unpinned: Any
    _free: list[int]
    _next_uid: int
    _drop_host: Callable[[str, Any], None]
    _request_load: Callable[[str, Any], None]

    def add_compressed(self, root: Path) -> list[str]:
        """Serve the registered adapters a compressed store holds through their cluster's basis
        (one slot per cluster) and their Σ_i; returns their names. Replaces what an earlier
        store set up: its unpinned bases go, its adapters the new store does not compress are
        served plain again. Adapters in use now keep what they had."""
        from pice.shared.lora.compress.serve import read_store
        from pice.shared.lora.pool import _Entry

        root = Path(root)
        clusters, sigmas = read_store(root, self.shape, set(self._entries), self.max_rank,
                                      self.max_file_bytes)
        gen = next(_GENERATION)
        done = []
        with self._lock:
            stale = {n for n, e in self._entries.items() if e.hidden and not e.pins}
            for name, entry in self._entries.items():
                if entry.basis in stale and not entry.users:
                    self._plain(name, entry)
            for name in stale:
                if not any(e.basis == name for e in self._entries.values()):
                    self._drop_basis(name)
            for cid, spec in clusters.items():
                key = f"~basis/{cid}@{gen}"
                self._entries[key] = _Entry(spec, self._next_uid, hidden=True)
                self._next_uid += 1
                # bases are few and serve many adapters: read them into host RAM now, so a
                # cold basis costs a copy into a slot, not a disk read on the request's path
                self._request_load(key, self._entries[key])
            for name, (cid, kind, rank, cores) in sigmas.items():
                entry = self._entries.get(name)
                if entry is None or entry.hidden or entry.users or self.buffers is None:
                    continue  # removed meanwhile, or in use: it stays as it was
                self.buffers.sigma.add(name, kind, rank, cores)
                entry.basis, entry.store = f"~basis/{cid}@{gen}", root
                entry.uid = self._new_uid()  # other weights now: no cached prefix reuse
                done.append(name)
        return done

    def _plain(self, name: str, entry: Any) -> None:
        """Serve a compressed adapter from its own weights again (its store keeps its Σ)."""
        if self.buffers is not None:
            self.buffers.sigma.remove(name)
        entry.basis = entry.store = None
        entry.uid = self._new_uid()

    def _new_uid(self) -> int:
        self._next_uid += 1
        return self._next_uid - 1

    def _drop_basis(self, name: str) -> None:
        import heapq

        entry = self._entries.pop(name)
        self._drop_host(name, entry)
        if entry.slot is not None:
            self._unpinned.pop(entry.slot, None)
            self._owner[entry.slot] = None
            self.buffers.clear(entry.slot)
            heapq.heappush(self._free, entry.slot)

    def _forget_sigma(self, name: str, entry: Any) -> None:
        """A compressed adapter's Σ_i goes at once, from the device table and from its store."""
        if entry.basis is None:
            return
        from pice.shared.lora.compress.store import drop_sigma

        store = entry.store
        self._plain(name, entry)
        if store is not None:
            drop_sigma(store, name)
