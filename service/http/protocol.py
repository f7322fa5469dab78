"""uvicorn's httptools protocol, with two changes for this service.

- A request the HTTP parser rejects (a malformed header, a URL past its
  limits) never reaches the app: uvicorn answers 400 with a plain-text
  body of its own. Every body of this service is JSON, these included.
- uvicorn does not cancel a request whose client went away. A sync
  prediction would keep its model slot for the model's whole 10-17 s,
  for nobody; a handler that names its task in the scope is cancelled.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.schemas import ErrorResponse, json_encoder

# Scope keys: the task to cancel if the client goes away, and the mark
# that it was cancelled for that reason.
CANCEL_ON_DISCONNECT_KEY = "service.cancel_on_disconnect"
CLIENT_GONE_KEY = "service.client_gone"


class ServiceHttpProtocol(HttpToolsProtocol):
    def connection_lost(self, exc: Exception | None) -> None:
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            scope = cast("dict[str, Any]", cycle.scope)  # an ASGI scope, open to extensions
            task = scope.get(CANCEL_ON_DISCONNECT_KEY)
            if isinstance(task, asyncio.Task) and not task.done():
                scope[CLIENT_GONE_KEY] = True
                task.cancel()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        body = json_encoder.encode(ErrorResponse(msg))
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
        # uvicorn's own (date, server), as on every other response.
        defaults = self.server_state.default_headers
        head += [name + b": " + value + b"\r\n" for name, value in defaults]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()
