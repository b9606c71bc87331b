"""Health, readiness and the memory collection."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ...registry import check_name
from ...settings import MemorySettingsIn
from ..edge import JSON, declare
from .deps import ZMemDep

router = APIRouter()


@router.get("/healthz")
@declare("open")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
@declare("open")
async def readyz(zmem: ZMemDep) -> JSONResponse:
    if not zmem.ready:
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})
    body: dict[str, Any] = {"status": "ready", "knn": zmem.engine.name, "device_reason": zmem.engine.reason}
    if zmem.memories.skipped:
        body["skipped_memories"] = zmem.memories.skipped
    return JSONResponse(body)


@router.get("/metrics")
@declare("read")
async def get_metrics(request: Request) -> Response:
    # The memories' gauges are read as the registry is collected (metrics.StateCollector).
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/memories")
@declare("read")
async def list_memories(zmem: ZMemDep) -> dict[str, Any]:
    zmem.memory("default")  # 503 while loading
    return {
        "memories": [
            {
                "name": m.name,
                "size": m.size,
                "capacity": m.settings.capacity,
                "z_dim": m.settings.z_dim,
                "total_written": m.total_written,
            }
            for m in zmem.memories.all()
        ]
    }


@router.get("/memories/{name}")
@declare("read")
async def get_memory(name: str, zmem: ZMemDep) -> dict[str, Any]:
    memory = zmem.memory(name)
    return {"name": memory.name, "size": memory.size, "settings": memory.settings.model_dump()}


@router.put("/memories/{name}")
@declare("write", (JSON,), schema=MemorySettingsIn)
async def put_memory(name: str, body: MemorySettingsIn, zmem: ZMemDep) -> JSONResponse:
    check_name(name)
    settings, created = await zmem.put(name, body)
    return JSONResponse(
        {"name": name, "settings": settings.model_dump()}, status_code=201 if created else 200
    )


@router.delete("/memories/{name}", status_code=204)
@declare("write")
async def delete_memory(name: str, zmem: ZMemDep) -> Response:
    await zmem.delete(name)
    return Response(status_code=204)


# The schema and its page sit behind the tokens like every other route (FastAPI's own
# /openapi.json and /docs would not): the app's dependencies apply to these.
@router.get("/openapi.json", include_in_schema=False)
@declare("read")
async def get_openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs", include_in_schema=False)
@declare("read")
async def get_docs() -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title="zmem")
