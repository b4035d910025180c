"""TLS by configuration: the server serves wss:// with a certificate, an agent given the CA file
registers; an agent without it refuses the unverified certificate and keeps retrying."""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from pice.cloud.api.app import create_app
from pice.runtime import build_pipeline
from pice.shared.config import ServeSettings
from tests.conftest import _free_port
from tests.edge.agent_procs import Agent, make_tokens, wait_for

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


class TLSServer:
    def __init__(self, tmp: Path, model_dir: Path) -> None:
        self.cert, key = tmp / "cert.pem", tmp / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-keyout", str(key), "-out", str(self.cert), "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1"], check=True,
                       capture_output=True, timeout=60)
        self.tokens = make_tokens(tmp / "tokens.json", "tls-edge", "no-ca-edge")
        port = _free_port()
        settings = ServeSettings(port=port, cloud_model=str(model_dir),
                                 edge_models=[str(model_dir)], local_edges=False,
                                 edge_tokens_file=tmp / "tokens.json", max_context=1024,
                                 cache_dir=tmp / "cache")
        self.url = f"https://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(
            create_app(settings, build_pipeline), host="127.0.0.1", port=port,
            log_level="warning", ssl_certfile=str(self.cert), ssl_keyfile=str(key)))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def edges(self) -> set[str]:
        r = httpx.get(f"{self.url}/v1/edges", verify=str(self.cert), timeout=10)
        return {e["edge_id"] for e in r.json()["data"]} if r.status_code == 200 else set()


@pytest.fixture(scope="module")
def tls(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSServer]:
    s = TLSServer(tmp_path_factory.mktemp("tls"), tiny_model_dir)
    s.thread.start()
    yield s
    s.server.should_exit = True
    s.thread.join(30)


def test_agent_with_the_ca_file_registers_over_wss(tls: TLSServer, tiny_model_dir: Path,
                                                    tmp_path: Path) -> None:
    wss = tls.url.replace("https://", "wss://")
    good = Agent(wss, tls.tokens["tls-edge"], "tls-edge", tiny_model_dir, tmp_path / "cache",
                 tmp_path, extra=("--ca-file", str(tls.cert)))
    bad = Agent(wss, tls.tokens["no-ca-edge"], "no-ca-edge", tiny_model_dir,
                tmp_path / "cache", tmp_path)
    try:
        wait_for("the agent to register over wss", lambda: "tls-edge" in tls.edges())
        wait_for("the agent without the CA to refuse the certificate",
                 lambda: "CERTIFICATE_VERIFY_FAILED" in bad.log())
        assert bad.proc.poll() is None  # it keeps retrying (with backoff)
        assert "no-ca-edge" not in tls.edges()
    finally:
        good.stop()
        bad.stop()
