"""Dependencies shared by the routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ...registry import DEFAULT
from ...service import ZMem


async def get_zmem(request: Request) -> ZMem:
    zmem: ZMem = request.app.state.zmem
    return zmem


async def memory_name(request: Request) -> str:
    """`default` on the root routes, the `{name}` path segment under `/memories/{name}/`."""
    name: str = request.path_params.get("name", DEFAULT)
    return name


ZMemDep = Annotated[ZMem, Depends(get_zmem)]
NameDep = Annotated[str, Depends(memory_name)]
