"""uvicorn's HTTP protocol, with the contract's JSON body on the errors it answers itself.

A request the HTTP parser rejects (a malformed header, a URL past its
limits) never reaches the app: uvicorn answers 400 with a plain-text body
of its own. Every body of this service is JSON, these included.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.schemas import ErrorResponse, json_encoder


class JsonErrorsHttpToolsProtocol(HttpToolsProtocol):
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
