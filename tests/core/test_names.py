"""The memory-name rule (`zmem_core.names`): one pattern, the same verdict on both sides."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from zmem_client import ZMemClient
from zmem_core.names import NAME_PATTERN, check_name, is_valid_name

GOOD = ["default", "a", "_", "0", "run-1.v2_x", "A" * 64, "x.", "a..b"]
BAD = [".", "..", "", "-a", ".hidden", "A" * 65, "a/b", "a b", "é", "a\n", "a%2F", "a\x00"]


@pytest.mark.parametrize("name", GOOD)
def test_names_that_are_names(name: str) -> None:
    assert is_valid_name(name) and check_name(name) == name
    assert re.fullmatch(f"^{NAME_PATTERN}$", name)  # the OpenAPI form of the pattern


@pytest.mark.parametrize("name", BAD)
def test_names_that_are_not(name: str) -> None:
    assert not is_valid_name(name)
    with pytest.raises(ValueError, match=re.escape(f"memory name {name!r} must match {NAME_PATTERN}")):
        check_name(name)


@pytest.mark.parametrize("name", ["default", "run-1.v2_x", "A" * 64, "-a", ".hidden", "A" * 65, "a b"])
def test_the_client_and_the_service_agree(name: str, client: TestClient) -> None:
    """The client's constructor refuses exactly the names the service's routes refuse (422)."""
    try:
        ZMemClient("http://zmem.test", memory=name).close()
        client_takes = True
    except ValueError:
        client_takes = False
    r = client.get(f"/memories/{name}/stats")
    assert client_takes == (r.status_code != 422), (name, r.status_code)


def test_the_openapi_schema_states_the_rule(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    patterns = {
        p["schema"]["pattern"]
        for ops in spec["paths"].values()
        for op in ops.values()
        for p in op.get("parameters", [])
        if p.get("name") == "name" and p.get("in") == "path"
    }
    assert patterns == {f"^{NAME_PATTERN}$"}
