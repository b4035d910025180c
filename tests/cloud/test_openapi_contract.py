"""The OpenAPI document is a true contract: schemathesis generates requests for every operation
of the live server (tiny models on loopback) and checks that none is a server error and that
every status, content type and body is the one the document declares. Bounded examples per
operation (seeded), so the run is small and repeatable."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from pice.cloud.api.app import create_app
from pice.shared.config import ServeSettings
from tests.conftest import LiveServer, _free_port

EXAMPLES = 25  # per operation
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


def _spec() -> dict[str, object]:
    # the document of the app the live server runs (the builder is never called here)
    return create_app(ServeSettings(), lambda s, m: None).openapi()  # type: ignore[arg-type,return-value]


schema = schemathesis.openapi.from_dict(_spec())


@pytest.fixture(scope="module")
def live(sketch_model_dir: Path, tmp_path_factory: pytest.TempPathFactory,
         ) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("contract")
    settings_ = ServeSettings(port=_free_port(), cloud_model=str(sketch_model_dir),
                              edge_models=[str(sketch_model_dir)], max_context=256,
                              default_max_tokens=16, cache_dir=tmp / "cache", guard=False,
                              rate_limit_rps=0, state_dir=tmp / "state")
    server = LiveServer(settings_)
    server.start()
    yield server
    server.stop()


def test_the_document_declares_errors_streams_and_the_upload_body() -> None:
    spec = _spec()
    paths = spec["paths"]
    assert isinstance(paths, dict)
    for ops in paths.values():
        for op in ops.values():
            assert "422" not in op["responses"]  # validation errors are 400s
    chat = paths["/v1/chat/completions"]["post"]["responses"]
    for status in ("400", "401", "429", "503"):
        assert chat[status]["content"]["application/json"]["schema"]["$ref"].endswith(
            "/ErrorResponse")
    assert "text/event-stream" in chat["200"]["content"]
    assert "text/event-stream" in paths["/v1/progressive"]["post"]["responses"]["200"]["content"]
    upload = paths["/v1/adapters"]["post"]
    assert set(upload["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert {"403", "409", "413"} <= set(upload["responses"])


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_live_server_honours_its_openapi_contract(case: schemathesis.Case,
                                                  live: LiveServer) -> None:
    case.call_and_validate(base_url=live.url, checks=CHECKS, timeout=120)
