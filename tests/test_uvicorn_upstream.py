"""The server subclasses uvicorn's private `HttpToolsProtocol` and copies its `data_received`
(`zmem_service.http.server.GuardedProtocol`). pyproject.toml bounds uvicorn to the minor
range this was written against; this test fails the day the method it copies, or a private
name the subclass leans on, changes upstream, so a new uvicorn is read before it is trusted."""

from __future__ import annotations

import inspect
import textwrap

import uvicorn
from uvicorn.protocols.http import httptools_impl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# uvicorn 0.54's HttpToolsProtocol.data_received, which GuardedProtocol.data_received follows
# (with the head counted and a 431 for a head over the limit).
COPIED = """
def data_received(self, data: bytes) -> None:
    self._unset_keepalive_if_required()

    try:
        self.parser.feed_data(data)
    except httptools.HttpParserError:
        msg = "Invalid HTTP request received."
        self.logger.warning(msg)
        self.send_400_response(msg)
        return
    except httptools.HttpParserUpgrade:
        if self._should_upgrade():
            self.handle_websocket_upgrade()
        else:
            self._unsupported_upgrade_warning()
"""
LEANED_ON = (
    "_unset_keepalive_if_required",
    "send_400_response",
    "_should_upgrade",
    "handle_websocket_upgrade",
    "_unsupported_upgrade_warning",
    "connection_made",
    "connection_lost",
    "on_message_begin",
    "on_url",
    "on_header",
    "on_headers_complete",
    "on_message_complete",
    "_start_asgi_task",
)


def test_the_copied_method_is_upstream_s() -> None:
    upstream = textwrap.dedent(inspect.getsource(HttpToolsProtocol.data_received))
    assert upstream.strip() == COPIED.strip(), (
        f"uvicorn {uvicorn.__version__} changed HttpToolsProtocol.data_received: bring "
        "GuardedProtocol.data_received (zmem_service/http/server.py) up to date, then this copy"
    )


def test_the_private_names_the_subclass_uses_are_there() -> None:
    missing = [name for name in LEANED_ON if not callable(getattr(HttpToolsProtocol, name, None))]
    assert not missing, f"uvicorn {uvicorn.__version__}'s HttpToolsProtocol lacks {missing}"
    assert isinstance(httptools_impl.STATUS_LINE, dict)


def test_uvicorn_is_the_pinned_minor() -> None:
    assert uvicorn.__version__.split(".")[:2] == ["0", "54"]
