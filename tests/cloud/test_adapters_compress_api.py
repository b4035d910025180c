"""`POST /v1/admin/adapters/compress` on a real server: admin only; tenants' private adapters never
share a basis with another tenant's (public ones and opted-in tenants do); compressed adapters
answer; deleting one drops its Σ_i from the store at once."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pice.bench.lora_adapters import write_shared_adapters
from pice.cloud.tenants import hash_key
from pice.shared.config import ServeSettings
from pice.shared.lora.compress.serve import shape_from_config
from tests.cloud.test_adapters_api import auth, chat, upload
from tests.conftest import LiveServer, _free_port

ALICE, BOB, CAROL, ADMIN = "pk-alice", "pk-bob", "pk-carol", "pk-admin"
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def site(sketch_model_dir: Path, tiny_model_dir: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("compress-site")
    keys = tmp / "keys.json"
    keys.write_text(json.dumps({"tenants": {"alice": [hash_key(ALICE)],
                                            "bob": [hash_key(BOB)],
                                            "carol": [hash_key(CAROL)],
                                            "admin": [hash_key(ADMIN)]}}))
    settings = ServeSettings(port=_free_port(), cloud_model=str(sketch_model_dir),
                             edge_models=[str(tiny_model_dir)], max_context=1024,
                             default_max_tokens=16, cache_dir=tmp / "cache",
                             api_keys_file=keys, state_dir=tmp / "state", adapter_upload_mb=1)
    live = LiveServer(settings)
    live.start()
    # one subspace population: every adapter could share a basis with every other
    ads = write_shared_adapters(tmp / "ads", shape_from_config(tiny_model_dir), 8, clusters=1,
                                rank=4, subspace=4, targets=ATTN, noise=0.01, std=0.2, seed=4)
    owners = [ALICE, ALICE, BOB, BOB, CAROL, CAROL, ALICE, BOB]
    for i, (key, path) in enumerate(zip(owners, ads, strict=True)):
        public = "true" if i >= 6 else "false"
        r = upload(live.url, key, f"ad{i}", path, public=public)
        assert r.status_code == 201, r.text
    yield live.url, tmp
    live.stop()


def test_compress_is_admin_only_and_keeps_tenants_apart(site: tuple[str, Path]) -> None:
    url, tmp = site
    body = {"ranks": [4], "clusters": [1, 2], "budget": 0.3, "share_tenants": ["carol"]}
    r = httpx.post(f"{url}/v1/admin/adapters/compress", headers=auth(ALICE), json=body,
                   timeout=60)
    assert r.status_code == 403, r.text
    r = httpx.post(f"{url}/v1/admin/adapters/compress", headers=auth(ADMIN),
                   json=body | {"budget": -1}, timeout=60)
    assert r.status_code in (400, 422) and "budget" in r.text
    r = httpx.post(f"{url}/v1/admin/adapters/compress", headers=auth(ADMIN), json=body,
                   timeout=300)
    assert r.status_code == 200, r.text
    out = r.json()
    ads = out["adapters"]
    assert out["totals"]["compressed"] == 8, ads
    assert {ads[f"alice/ad{i}"]["group"] for i in (0, 1)} == {"tenant-alice"}
    assert {ads[f"bob/ad{i}"]["group"] for i in (2, 3)} == {"tenant-bob"}
    # carol opted in, the public ones: the shared group
    assert {ads[n]["group"] for n in ("carol/ad4", "carol/ad5", "alice/ad6", "bob/ad7")} \
        == {"shared"}
    clusters = {n: a["cluster"] for n, a in ads.items()}
    assert clusters["alice/ad0"] != clusters["bob/ad2"]
    assert clusters["alice/ad0"] != clusters["alice/ad6"]  # public ones leave the private group
    # compressed adapters answer, for their owner and (public) for others
    assert chat(url, ALICE, "ad0", "hello").status_code == 200
    assert chat(url, BOB, "alice/ad6", "hello").status_code == 200
    info = httpx.get(f"{url}/v1/adapters", headers=auth(ADMIN), timeout=10)
    assert info.status_code == 200

    store = next((tmp / "state" / "compressed").iterdir())
    sigma = store / json.loads((store / "manifest.json").read_text())["adapters"][
        "bob/ad3"]["sigma"]
    assert sigma.is_file()
    r = httpx.delete(f"{url}/v1/adapters/ad3", headers=auth(BOB), timeout=10)
    assert r.status_code == 200
    assert not sigma.exists()
    assert "bob/ad3" not in json.loads((store / "manifest.json").read_text())["adapters"]
    assert chat(url, BOB, "ad2", "hello").status_code == 200  # its cluster-mate still serves
