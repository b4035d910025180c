"""Edge tokens: stored hashed (never the token), private file, revocable by token or edge id,
and `pice edge-token create|list|revoke`."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from pice.cli import main
from pice.cloud.edge_hub import EdgeHub
from pice.cloud.edge_tokens import EdgeTokenStore
from pice.shared.errors import BadRequestError, NotFoundError


def test_tokens_are_stored_hashed_in_a_private_file(tmp_path: Path) -> None:
    store = EdgeTokenStore(tmp_path / "t.json")
    record, token = store.create("jetson-01")
    text = (tmp_path / "t.json").read_text()
    assert token not in text and token.split(".")[2] not in text
    assert record.sha256 in text
    assert stat.S_IMODE((tmp_path / "t.json").stat().st_mode) == 0o600
    assert store.verify(token) == record
    assert store.verify(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert store.verify("pice-edge." + record.token_id) is None
    assert store.verify("") is None


def test_revoke_by_token_id_or_edge_id(tmp_path: Path) -> None:
    store = EdgeTokenStore(tmp_path / "t.json")
    r1, t1 = store.create("a")
    _, t2 = store.create("a")
    _, t3 = store.create("b")
    assert [r.token_id for r in store.revoke(r1.token_id)] == [r1.token_id]
    assert store.verify(t1) is None and store.verify(t2) is not None
    store.revoke("a")
    assert store.verify(t2) is None and store.verify(t3) is not None
    # another process's store (the server's) sees the change on its next check
    assert EdgeTokenStore(tmp_path / "t.json").verify(t3) is not None
    with pytest.raises(NotFoundError, match="'a'"):
        store.revoke("a")


def test_bad_edge_id_and_malformed_file_are_refused(tmp_path: Path) -> None:
    store = EdgeTokenStore(tmp_path / "t.json")
    with pytest.raises(BadRequestError, match="edge id must match"):
        store.create("has space")
    (tmp_path / "t.json").write_text('{"tokens": [{"token_id": 1}]}')
    with pytest.raises(BadRequestError, match="malformed"):
        store.verify("pice-edge.x.y")


@pytest.mark.parametrize("header", [None, "", "Basic abc", "Bearer ", "bearer nope"])
def test_hub_refuses_missing_or_unknown_bearer(tmp_path: Path, header: str | None) -> None:
    assert EdgeHub(EdgeTokenStore(tmp_path / "t.json")).authenticate(header) is None


def test_edge_token_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "t.json")
    assert main(["edge-token", "create", "jetson-02", "--file", path]) == 0
    token = capsys.readouterr().out.strip()
    assert EdgeTokenStore(Path(path)).verify(token) is not None
    assert main(["edge-token", "list", "--file", path]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["edge_id"] == "jetson-02" and row["revoked"] is None and "token" not in row
    assert main(["edge-token", "revoke", "jetson-02", "--file", path]) == 0
    assert EdgeTokenStore(Path(path)).verify(token) is None
    assert main(["edge-token", "revoke", "jetson-02", "--file", path]) == 2  # nothing active
    assert "no active edge token" in capsys.readouterr().err
