"""Tenants' LoRA adapters: who owns which, who may see it, its card, and where its files live.

State lives under `state_dir`: `adapters.json` (the records, replaced atomically) and
`adapters/<id>/` (each adapter's two files). A new adapter's files are written to `tmp/`, moved
into `adapters/` in one rename, then loaded by the edge model (which validates them); on any
failure its directory is removed and the catalog is unchanged. Engine-side names are
tenant-scoped (`owner/name`), so two tenants may both have an adapter called `sql`."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, cast

from pydantic import BaseModel, Field

from pice.cloud.tenants import Tenant
from pice.scheduler.adapter_router import AdapterRouter, RouterConfig
from pice.shared.config import ServeSettings
from pice.shared.embeddings import get_embedder
from pice.shared.errors import (
    BadRequestError,
    ConflictError,
    ForbiddenError,
    NotFoundError,
    PiceError,
)
from pice.shared.models.cache import default_cache_dir

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
BUILTIN_OWNER = "pice"  # owner shown for the adapters the server loads itself


class AdapterHost(Protocol):
    """What the catalog needs of an edge model (`EngineGenerator`)."""

    def add_adapter(self, name: str, path: Path) -> Any: ...

    def remove_adapter(self, name: str) -> None: ...

    def adapters(self) -> list[Any]: ...

    def resident_adapters(self) -> set[str]: ...


class AdapterCard(BaseModel):
    description: str = Field("", max_length=2000)  # what the adapter is for (AAS matches it)
    examples: list[str] = Field(default_factory=list, max_length=32)  # typical prompts


class AdapterRecord(BaseModel):
    name: str  # the tenant's name for it
    owner: str  # tenant that registered it
    public: bool = False  # visible to (and usable by) every tenant
    card: AdapterCard = Field(default_factory=AdapterCard)
    base_model: str  # edge model spec it applies to
    dir: str  # its directory, relative to the state dir
    created: int  # unix seconds
    error: str | None = None  # why it could not be loaded at startup (then it is unusable)
    # loaded by the server itself (the shipped pice-expander): public, read-only, never saved
    builtin: bool = False

    @property
    def engine_name(self) -> str:
        return self.name if self.builtin else f"{self.owner}/{self.name}"

    def ref(self, tenant: Tenant) -> str:
        """How `tenant` names it: plain for its own, `owner/name` for another's public one."""
        return self.name if self.owner == tenant.name else self.engine_name


class _CatalogFile(BaseModel):
    version: int = 1
    adapters: list[AdapterRecord] = Field(default_factory=list)


class AdapterCatalog:
    def __init__(self, state_dir: Path, hosts: dict[str, AdapterHost], router: AdapterRouter,
                 reserved: set[str] | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.hosts = hosts  # edge model spec → the generator that serves its adapters
        self.router = router
        self.reserved = {r.lower() for r in (reserved or set())} | {"none", "auto"}
        self._lock = threading.RLock()
        self._records: dict[str, AdapterRecord] = {}  # engine_name → record
        (self.state_dir / "adapters").mkdir(parents=True, exist_ok=True)

    @property
    def tmp_dir(self) -> Path:
        """Where uploads are written before they are validated (same filesystem: atomic move)."""
        d = self.state_dir / "tmp"
        d.mkdir(parents=True, exist_ok=True)
        return d

    # ---- startup ------------------------------------------------------------------------------
    def restore(self) -> None:
        """Load the saved records and re-register each adapter; one that fails stays listed
        with its error and is unusable, the rest serve. Leftovers of interrupted uploads go."""
        shutil.rmtree(self.state_dir / "tmp", ignore_errors=True)
        path = self.state_dir / "adapters.json"
        saved = _CatalogFile.model_validate_json(path.read_bytes()) if path.exists() else None
        for rec in saved.adapters if saved else []:
            host = self.hosts.get(rec.base_model)
            try:
                if host is None:
                    raise BadRequestError(f"its base model {rec.base_model} is not served now")
                host.add_adapter(rec.engine_name, self.state_dir / rec.dir)
                rec.error = None
            except Exception as exc:
                rec.error = exc.message if isinstance(exc, PiceError) else str(exc)
                log.warning("adapter %s not restored: %s", rec.engine_name, rec.error)
            self._records[rec.engine_name] = rec
            self.router.set_card(rec.engine_name, rec.card.description, rec.card.examples)
        for base in self.hosts:  # a compressed store from an earlier `compress` serves again
            with contextlib.suppress(FileNotFoundError):
                self._apply_compressed(base)
        known = {rec.dir for rec in self._records.values()}
        for d in (self.state_dir / "adapters").iterdir():  # crashed between move and save
            if f"adapters/{d.name}" not in known:
                shutil.rmtree(d, ignore_errors=True)

    def add_builtin(self) -> None:
        """List the adapters the server loaded itself (the shipped `pice-expander`) for every
        tenant: public, read-only, reserved names. They get no card text, so AAS never picks
        them (they are trained for point expansion, not for chat)."""
        with self._lock:
            for base, host in self.hosts.items():
                for info in host.adapters():
                    if "/" in info.name or info.name in self._records:
                        continue  # tenants' adapters are owner/name
                    card = AdapterCard(description="Loaded by the server at startup; "
                                       "read-only.")
                    self._records[info.name] = AdapterRecord(
                        name=info.name, owner=BUILTIN_OWNER, public=True, card=card,
                        base_model=base, dir="", created=0, builtin=True)
                    self.reserved.add(info.name.lower())

    def _save(self, records: dict[str, AdapterRecord]) -> None:
        path = self.state_dir / "adapters.json"
        tmp = path.with_suffix(".json.tmp")
        body = _CatalogFile(adapters=[r for r in records.values() if not r.builtin]
                            ).model_dump_json(indent=1)
        tmp.write_text(body)
        os.replace(tmp, path)

    # ---- queries ------------------------------------------------------------------------------
    def hidden_from(self, tenant: Tenant, engine_name: str) -> bool:
        """A tenant adapter that `tenant` may not see (server-loaded adapters are never hidden)."""
        with self._lock:
            rec = self._records.get(engine_name)
        return rec is not None and rec.owner != tenant.name and not rec.public

    def visible(self, tenant: Tenant) -> list[AdapterRecord]:
        with self._lock:
            recs = [r for r in self._records.values() if r.owner == tenant.name or r.public]
        return sorted(recs, key=lambda r: (r.owner != tenant.name, r.ref(tenant)))

    def resolve(self, tenant: Tenant, ref: str, field: str = "model") -> AdapterRecord:
        """The adapter `ref` names for `tenant`: its own by name, a public one by name (or
        `owner/name`). An invisible adapter is reported as missing, never as forbidden."""
        with self._lock:
            if "/" in ref:
                rec = self._records.get(ref)
                if rec is not None and (rec.owner == tenant.name or rec.public):
                    return rec
            else:
                own = self._records.get(f"{tenant.name}/{ref}")
                if own is not None:
                    return own
                shared = [r for r in self._records.values() if r.public and r.name == ref]
                if len(shared) == 1:
                    return shared[0]
                if shared:
                    names = ", ".join(sorted(r.engine_name for r in shared))
                    raise BadRequestError(f"several public adapters are named {ref!r} ({names}); "
                                          "name one as owner/name", field=field)
        raise NotFoundError(f"no model or adapter named {ref!r}", field=field)

    def usable(self, tenant: Tenant, ref: str, field: str = "model") -> AdapterRecord:
        rec = self.resolve(tenant, ref, field)
        if rec.error is not None:
            raise ConflictError(f"adapter {ref!r} could not be loaded: {rec.error}", field=field)
        return rec

    def infos(self) -> dict[str, Any]:
        """The engines' `AdapterInfo` (rank, alpha, modules, size, tier) by engine name."""
        return {a.name: a for host in self.hosts.values() for a in host.adapters()}

    def resident(self, base_model: str) -> set[str]:
        host = self.hosts.get(base_model)
        return host.resident_adapters() if host is not None else set()

    # ---- changes ------------------------------------------------------------------------------
    def check_new(self, tenant: Tenant, name: str, base_model: str | None) -> str:
        """Refuse a taken/reserved name or an unknown base model before any bytes are read;
        returns the base model spec."""
        if name.lower() in self.reserved:
            raise BadRequestError(f"name {name!r} is reserved (a model name or keyword)",
                                  field="name")
        with self._lock:
            if f"{tenant.name}/{name}" in self._records:
                raise ConflictError(f"you already have an adapter named {name!r}; delete it "
                                    "first", field="name")
        base = base_model or next(iter(self.hosts), None)
        if base is None or base not in self.hosts:
            served = ", ".join(self.hosts) or "none (the backend serves no adapters)"
            raise BadRequestError(f"base_model {base_model!r} is not an edge model served "
                                  f"here; served: {served}", field="base_model")
        return base

    def register(self, tenant: Tenant, name: str, files_dir: Path, card: AdapterCard,
                 public: bool, base_model: str | None) -> AdapterRecord:
        """Move the validated-on-load files from `files_dir` (under `tmp_dir`) into the store
        and load them. All or nothing: on failure nothing is left behind."""
        base = self.check_new(tenant, name, base_model)
        host = self.hosts[base]
        with self._lock:
            self.check_new(tenant, name, base)  # again, under the lock
            rel = f"adapters/{uuid.uuid4().hex}"
            final = self.state_dir / rel
            os.replace(files_dir, final)
            rec = AdapterRecord(name=name, owner=tenant.name, public=public, card=card,
                                base_model=base, dir=rel, created=int(time.time()))
            try:
                host.add_adapter(rec.engine_name, final)
            except BaseException:
                shutil.rmtree(final, ignore_errors=True)
                raise
            try:
                self._save({**self._records, rec.engine_name: rec})
            except BaseException:
                host.remove_adapter(rec.engine_name)
                shutil.rmtree(final, ignore_errors=True)
                raise
            self._records[rec.engine_name] = rec
            self.router.set_card(rec.engine_name, card.description, card.examples)
        log.info("adapter %s registered (base %s, public=%s)", rec.engine_name, base, public)
        return rec

    def delete(self, tenant: Tenant, ref: str) -> AdapterRecord:
        """Only the owner deletes; the engine frees its memory (409 while requests use it),
        then its record and files go."""
        with self._lock:
            rec = self.resolve(tenant, ref, field="name")
            if rec.builtin:
                raise ForbiddenError(f"adapter {ref!r} ships with the server and is read-only",
                                     field="name")
            if rec.owner != tenant.name:
                raise ForbiddenError(f"adapter {ref!r} belongs to another tenant", field="name")
            host = self.hosts.get(rec.base_model)
            if host is not None and rec.error is None:
                with contextlib.suppress(NotFoundError):
                    host.remove_adapter(rec.engine_name)
            remaining = {k: v for k, v in self._records.items() if k != rec.engine_name}
            try:
                self._save(remaining)
            except BaseException:
                if host is not None and rec.error is None:  # put it back as it was
                    host.add_adapter(rec.engine_name, self.state_dir / rec.dir)
                raise
            self._records = remaining
            self.router.remove(rec.engine_name)
            shutil.rmtree(self.state_dir / rec.dir, ignore_errors=True)
        log.info("adapter %s deleted", rec.engine_name)
        return rec


    # ---- compression (admin) ------------------------------------------------------------------
    def compress(self, base_model: str | None, **options: Any) -> dict[str, Any]:
        """Compress the adapters of one base model into <state>/compressed/<model> (tenant
        groups kept apart; `options` are CompressConfig fields: pice.shared.lora.compress) and
        serve them from it; returns the manifest."""
        from pice.shared.lora.compress import CompressConfig, Source, compress
        from pice.shared.lora.compress.cli import store_dir

        base = base_model or next(iter(self.hosts), None)
        if base is None or base not in self.hosts:
            raise BadRequestError(f"base_model {base_model!r} is not an edge model served here",
                                  field="base_model")
        pool = _pool(self.hosts[base])
        with self._lock:
            recs = [r for r in self._records.values()
                    if r.base_model == base and not r.error and not r.builtin]
        sources = [Source(r.engine_name, self.state_dir / r.dir, r.owner, r.public)
                   for r in recs]
        if not sources:
            raise BadRequestError(f"no adapters of {base} to compress", field="base_model")
        try:
            cfg = CompressConfig(**options, max_rank=pool.max_rank)
        except ValueError as exc:
            raise BadRequestError(str(exc), field="ranks") from exc
        manifest: dict[str, Any] = compress(sources, pool.shape, store_dir(self.state_dir, base),
                                            cfg, progress=False)
        self._apply_compressed(base)
        return manifest

    def _apply_compressed(self, base: str) -> None:
        from pice.shared.lora.compress.cli import store_dir

        host = self.hosts.get(base)
        if host is not None and getattr(getattr(host, "engine", None), "pool", None):
            _pool(host).add_compressed(store_dir(self.state_dir, base))


def _pool(host: AdapterHost) -> Any:
    pool = getattr(getattr(host, "engine", None), "pool", None)
    if pool is None or not hasattr(pool, "add_compressed"):
        raise BadRequestError("this edge model's backend does not serve compressed adapters",
                              field="base_model")
    return pool


def open_catalog(settings: ServeSettings, edge_generators: Mapping[str, object],
                 reserved: set[str]) -> AdapterCatalog:
    """The catalog over the edge models that can serve adapters, restored from its state dir."""
    hosts = {spec: cast(AdapterHost, g) for spec, g in edge_generators.items()
             if callable(getattr(g, "add_adapter", None))}
    state = settings.state_dir or (settings.cache_dir or default_cache_dir()) / "state"
    router = AdapterRouter(lambda texts: get_embedder().encode(texts),
                           RouterConfig(threshold=settings.aas_threshold,
                                        margin=settings.aas_margin))
    catalog = AdapterCatalog(state, hosts, router, reserved)
    catalog.restore()
    catalog.add_builtin()
    return catalog
