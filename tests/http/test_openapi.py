"""The OpenAPI schema tells the truth, and schemathesis fuzzes the service through it.

The fuzzing runs against a real `zmem serve` with request bodies (JSON from the
declared models, safetensors and npz as arbitrary bytes), a bounded number of
examples per operation: no answer may be a 5xx, every answer must match the schema
(status, media type, body), and every 4xx must be a problem+json.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from zmem_service.http.app import create_app
from zmem_service.settings import ServiceSettings

from ..server import Server

PROBLEM = "application/problem+json"
EXAMPLES = 12  # per operation and mode (valid, invalid data): 28 operations × 24 ≈ 500 requests


@schemathesis.serializer("application/x-safetensors")
def raw_bytes(context, value) -> bytes:  # type: ignore[no-untyped-def]
    """Arbitrary bytes as a safetensors body: the service must refuse garbage with a 4xx."""
    data = getattr(value, "data", value)
    return data if isinstance(data, bytes) else str(data).encode()


def test_schema_declares_names_bodies_problems_and_media(tmp_path: Path) -> None:
    spec = create_app(ServiceSettings(data_dir=tmp_path)).openapi()
    ops = [(path, method, op) for path, item in spec["paths"].items() for method, op in item.items()]
    for path, method, op in ops:
        if "{name}" in path:
            names = [p for p in op.get("parameters", []) if p["in"] == "path" and p["name"] == "name"]
            assert names and names[0]["required"], (method, path)
        problem = {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}}
        assert op["responses"]["4XX"]["content"] == problem
        assert "Retry-After" in op["responses"]["503"]["headers"]
    bodies = {(path, method) for path, method, op in ops if "requestBody" in op}
    for path, method, _ in ops:
        if method in ("post", "put"):
            assert (path, method) in bodies, (method, path)
    by_path = spec["paths"]
    assert set(by_path["/memories/{name}/episodes"]["post"]["requestBody"]["content"]) == {
        "application/json",
        "application/x-safetensors",
    }
    assert set(by_path["/memories/{name}/import"]["post"]["requestBody"]["content"]) == {
        "application/octet-stream"
    }
    assert set(by_path["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain; version=0.0.4"}
    assert set(by_path["/map.png"]["get"]["responses"]["200"]["content"]) == {"image/png"}


def test_schema_declares_the_bearer_tokens_on_every_operation_that_needs_one(tmp_path: Path) -> None:
    open_ops = {("/healthz", "get"), ("/readyz", "get")}
    secured = create_app(ServiceSettings(data_dir=tmp_path, token="w", read_token="r")).openapi()
    scheme = secured["components"]["securitySchemes"]["bearer"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    without = create_app(ServiceSettings(data_dir=tmp_path / "open")).openapi()
    assert without["components"]["securitySchemes"] == secured["components"]["securitySchemes"]
    for spec, needs in ((secured, [{"bearer": []}]), (without, [{"bearer": []}, {}])):
        ops = {(path, method): op for path, item in spec["paths"].items() for method, op in item.items()}
        assert open_ops <= ops.keys() and len(ops) >= 27
        for key, op in ops.items():
            assert op["security"] == ([] if key in open_ops else needs), key


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data = tmp_path_factory.mktemp("fuzz") / "data"
    srv = Server(data, "--capacity", "64", "--min-size", "2", "--durability", "none").start()
    yield srv
    srv.stop()


@pytest.mark.e2e
@pytest.mark.slow
def test_fuzzing_finds_no_5xx_and_only_problem_json_errors(fuzzed: Server) -> None:
    schema = schemathesis.openapi.from_url(fuzzed.url + "/openapi.json")
    seen: Counter[int] = Counter()
    session = requests.Session()
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]

    def check(case) -> None:  # type: ignore[no-untyped-def]
        response = case.call(base_url=fuzzed.url, session=session, timeout=60)
        seen[response.status_code] += 1
        case.validate_response(response, checks=checks)
        if 400 <= response.status_code < 500:
            media = response.headers.get("content-type", [""])[0].split(";")[0]
            assert media == PROBLEM, (media, response.content[:300])
            problem = json.loads(response.content)
            assert {"type", "title", "status", "detail"} <= set(problem), problem
            assert problem["status"] == response.status_code

    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            run = settings(
                max_examples=EXAMPLES,
                deadline=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
                database=None,
            )(given(case=operation.as_strategy(mode))(check))
            try:
                run()
            except Unsatisfiable:
                assert mode == GenerationMode.NEGATIVE  # nothing in it can be made invalid (/healthz)
    session.close()
    tally = dict(sorted(seen.items()))
    print(f"\nschemathesis: {operations} operations, {sum(seen.values())} requests, by status {tally}")
    assert operations >= 27 and not any(status >= 500 for status in seen)
