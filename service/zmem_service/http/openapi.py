"""The OpenAPI schema, made true in one place.

The routes read their bodies themselves (JSON or safetensors, streamed with a size
limit), take the memory name from the path through a dependency, and answer errors
as problem+json from one handler, so FastAPI's generated schema misses all of
that. `openapi(app)` post-processes it: the `{name}` path parameter on every
`/memories/{name}/…` operation, request bodies as each route declares them
(`edge.declare`: media types, the JSON body's model), every error as
`application/problem+json`, the media types of PNG, npz, HTML and Prometheus
answers, and the bearer tokens (`securitySchemes`) on every operation that isn't open,
as each route declares its access. A service started without tokens says so: the
token is optional there (an empty alternative, `{}`).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from zmem_core.names import NAME_PATTERN
from zmem_core.wire import SAFETENSORS

from ..errors import PROBLEM
from .edge import JSON, Edge, declared_routes

BINARY = {"type": "string", "format": "binary"}
# Answers that aren't JSON, by the last segment of the path.
MEDIA = {
    "metrics": ("text/plain; version=0.0.4", {"type": "string"}),
    "export": ("application/octet-stream", BINARY),
    "map.png": ("image/png", BINARY),
    "trail.png": ("image/png", BINARY),
    "risk.png": ("image/png", BINARY),
}
BEARER = "bearer"
BEARER_SCHEME = {
    "type": "http",
    "scheme": "bearer",
    "description": "`Authorization: Bearer <token>`: the write token (ZMEM_TOKEN, --token-file) "
    "for every route, or the read token (ZMEM_READ_TOKEN, --read-token-file) for the reads: GET "
    "routes, neighbors, risk and queries. Browsers: `GET /?token=...` sets a cookie that reads carry.",
}
PROBLEM_SCHEMA = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["loc", "msg"],
                "properties": {
                    "loc": {"type": "array", "items": {"type": ["string", "integer"]}},
                    "msg": {"type": "string"},
                },
            },
        },
    },
}


def _problem(description: str, retry: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
    if retry:
        response["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
    return response


def _model_schema(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(schema.pop("$defs", {}))
    components[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def openapi(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI schema (built once, then cached on the app)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Problem"] = PROBLEM_SCHEMA
    schema["components"]["securitySchemes"] = {BEARER: BEARER_SCHEME}
    tokens = getattr(app.state, "tokens", None)
    secured: list[dict[str, list[str]]] = [{BEARER: []}]
    if tokens is None or not tokens.enabled:
        secured.append({})  # this service takes no token
    edges = {(d.path, method.lower()): d.edge for d in declared_routes(app.routes) for method in d.methods}
    for path, operations in schema["paths"].items():
        last = path.rstrip("/").rsplit("/", 1)[-1]
        for method, op in operations.items():
            if "{name}" in path:
                _name_parameter(op)
            edge = edges.get((path, method))
            if edge is not None:
                op["security"] = [] if edge.access == "open" else [*secured]
            if edge is not None and edge.bodies and "requestBody" not in op:
                op["requestBody"] = _body(edge, components)
            responses = op.setdefault("responses", {})
            if last in MEDIA and "200" in responses:
                media, body_schema = MEDIA[last]
                responses["200"]["content"] = {media: {"schema": body_schema}}
            if last in ("neighbors", "risk"):
                responses["200"]["content"] = {JSON: {"schema": {}}, SAFETENSORS: {"schema": BINARY}}
            if method == "put" and path == "/memories/{name}":
                responses["201"] = {**responses["200"], "description": "created"}
                responses["200"]["description"] = "the same settings again: nothing changed"
            responses.pop("422", None)
            responses["4XX"] = _problem("invalid request: RFC 9457 problem naming the field")
            responses["503"] = _problem("loading, overloaded or shutting down; retry later", retry=True)
            if method != "get":
                responses["507"] = _problem("the memory budget would be exceeded")
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    app.openapi_schema = schema
    return schema


def _name_parameter(op: dict[str, Any]) -> None:
    params = op.setdefault("parameters", [])
    params[:] = [p for p in params if not (p.get("in") == "path" and p.get("name") == "name")]
    params.insert(
        0,
        {
            "name": "name",
            "in": "path",
            "required": True,
            "description": "the memory's name",
            "schema": {"type": "string", "pattern": f"^{NAME_PATTERN}$"},
        },
    )


def _body(edge: Edge, components: dict[str, Any]) -> dict[str, Any]:
    """The request body a route declares: its JSON model, and binary for the others (safetensors;
    an npz as its first, generic type)."""
    content: dict[str, Any] = {}
    for media in edge.bodies[:1] if edge.untyped else edge.bodies:
        if media == JSON and edge.schema is not None:
            content[JSON] = {"schema": _model_schema(edge.schema, components)}
        elif media != JSON:
            content[media] = {"schema": BINARY}
    return {"required": True, "content": content}


def install(app: FastAPI) -> None:
    app.openapi = lambda: openapi(app)  # type: ignore[method-assign]
