"""uvicorn's httptools protocol, with the changes this service needs.

- A request the HTTP parser rejects (a malformed header, a URL past its
  limits) never reaches the app: uvicorn answers 400 with a plain-text
  body of its own. Every body of this service is JSON, these included.
- uvicorn does not cancel a request whose client went away. A sync
  prediction would keep its model slot for the model's whole 10-17 s,
  for nobody; a handler that names its task in the scope is cancelled.
- A request head is bounded: MAX_HEADER_BYTES in all (request line and
  headers) and MAX_HEADERS headers, else 431. Its bytes are counted before
  the parser sees them: httptools joins the pieces of a header value as
  they arrive, so its work grows with the square of the value's size (one
  128 MiB value took 25 s of CPU); it now never sees more than the limit
  (plus, for a pipelined head that starts in the read ending the request
  before it, the rest of that read: its count starts with the next read).
- Slow clients get 408: a head not complete HEADER_TIMEOUT_S after the
  connection opened (for later requests on the connection: after their
  first byte; until then, uvicorn's keep-alive timeout applies), or a body
  silent for BODY_IDLE_TIMEOUT_S while the app waits for it. In uvicorn, a
  client sending a byte now and then holds a connection, and a request's
  task, forever.

The limits come from the settings in the lifespan state, which uvicorn
hands to every connection: `http=ServiceHttpProtocol` needs nothing more.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, cast

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from service.schemas import ErrorResponse, json_encoder
from service.settings import Settings

if TYPE_CHECKING:
    from service.services import Services

log = logging.getLogger(__name__)

# Scope keys: the task to cancel if the client goes away, and the mark
# that it was cancelled for that reason.
CANCEL_ON_DISCONNECT_KEY = "service.cancel_on_disconnect"
CLIENT_GONE_KEY = "service.client_gone"
# Set when this protocol ended a request whose body stalled (it answered 408).
BODY_TIMED_OUT_KEY = "service.body_timed_out"
# After a 408 or 431, how long what the client still sends is read and dropped.
LINGER_S = 1.0
# The limits when the app's lifespan state has no settings (another app).
_DEFAULT_SETTINGS = Settings()


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a request that was refused."""


class ServiceHttpProtocol(HttpToolsProtocol):
    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        services: Services | None = app_state.get("services")
        settings = services.settings if services is not None else _DEFAULT_SETTINGS
        # Refusals the app never sees are counted here, in http_requests_total.
        self._http_metrics = services.metrics.http if services is not None else None
        self._max_header_bytes = settings.max_header_bytes
        self._max_headers = settings.max_headers
        self._header_timeout_s = settings.header_timeout_s
        self._body_idle_timeout_s = settings.body_idle_timeout_s
        # True from the end of a request (or the connection's start) to the
        # end of the next head: the bytes received meanwhile are the head's.
        self._reading_head = True
        self._head_bytes_left = settings.max_header_bytes
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._last_body_data_s = 0.0
        self._refused = False

    # The connection

    def connection_made(  # type: ignore[override]
        self, transport: asyncio.Transport
    ) -> None:
        super().connection_made(transport)
        # A connection that never sends a byte is timed out too.
        self._start_head_clock()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_clocks()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            scope = cast("dict[str, Any]", cycle.scope)  # an ASGI scope, open to extensions
            task = scope.get(CANCEL_ON_DISCONNECT_KEY)
            if isinstance(task, asyncio.Task) and not task.done():
                scope[CLIENT_GONE_KEY] = True
                task.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # The hot path: a read within the head's budget (or of a body) costs
        # a comparison and a subtraction more than in uvicorn.
        if self._reading_head and len(data) > self._head_bytes_left:
            self._receive_past_head_budget(data)
            return
        self._head_bytes_left -= len(data)  # counts only while reading a head
        # self._feed(data), inlined: a call costs on every read.
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._stop_parsing(exc)
            return
        # A request read whole starts no clock; a head or body left unfinished does.
        if not self._reading_head or self._head_bytes_left < self._max_header_bytes:
            self._time_unfinished_message()

    def _receive_past_head_budget(self, data: bytes) -> None:
        """Feed the parser only what fits in the head's budget; past it, 431.

        What follows a head that fits (its body, pipelined requests) is
        received as usual, against a new budget once its message is complete.
        """
        while self._reading_head and len(data) > self._head_bytes_left:
            if self._refused:
                return  # dropped: the connection is closing
            fits = self._head_bytes_left
            self._head_bytes_left = 0
            if not self._feed(data[:fits]):
                return
            if self._reading_head and self._head_bytes_left == 0:
                too_large = f"Request headers exceed {self._max_header_bytes} bytes."
                self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, too_large)
                return
            data = data[fits:]
        self.data_received(data)

    def _feed(self, data: bytes) -> bool:
        """uvicorn's data_received; False once the connection is no longer read as HTTP/1."""
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._stop_parsing(exc)
            return False
        return True

    def _stop_parsing(self, exc: Exception) -> None:
        """As uvicorn: a malformed request gets 400, an upgrade its protocol."""
        if isinstance(exc, httptools.HttpParserUpgrade):
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        elif not self._refused:  # else a callback stopped the parser, having answered
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)

    # Parser callbacks

    def on_headers_complete(self) -> None:
        self._reading_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if len(self.headers) > self._max_headers:
            too_many = f"More than {self._max_headers} request headers."
            self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, too_many)
            raise _Refused  # the app never sees this request
        # Not super(): these run on every request, and building it costs.
        HttpToolsProtocol.on_headers_complete(self)

    def on_message_complete(self) -> None:
        # What comes next is the head of the next request.
        self._reading_head = True
        self._head_bytes_left = self._max_header_bytes
        HttpToolsProtocol.on_message_complete(self)

    # Slow clients

    def _time_unfinished_message(self) -> None:
        if not self._reading_head:
            self._note_body_data()
        elif self._head_timer is None:
            self._start_head_clock()

    def _start_head_clock(self) -> None:
        self._head_timer = self.loop.call_later(self._header_timeout_s, self._on_head_timeout)

    def _on_head_timeout(self) -> None:
        self._head_timer = None
        if self._answering():
            # A pipelined head waits for the answers before it: it is not late yet.
            self._start_head_clock()
            return
        late = f"Request headers not received within {self._header_timeout_s:g} s."
        self._refuse(HTTPStatus.REQUEST_TIMEOUT, late)

    def _note_body_data(self) -> None:
        # A clock per body, not per read: the timer checks this time when it fires.
        self._last_body_data_s = self.loop.time()
        if self._body_timer is None:
            self._body_timer = self.loop.call_later(self._body_idle_timeout_s, self._on_body_timer)

    def _on_body_timer(self) -> None:
        self._body_timer = None
        if self._reading_head or self.transport.is_closing():
            return  # that body arrived whole
        now_s = self.loop.time()
        if not self._app_awaits_body():
            self._last_body_data_s = now_s  # the server holds the client up, not the reverse
        idle_until_s = self._last_body_data_s + self._body_idle_timeout_s
        if now_s < idle_until_s:
            self._body_timer = self.loop.call_at(idle_until_s, self._on_body_timer)
        else:
            self._end_stalled_request(self.cycle)

    def _app_awaits_body(self) -> bool:
        # uvicorn stops reading while the app has not taken what it holds,
        # or while the request waits behind a pipelined one.
        queued = any(cycle is self.cycle for cycle, _ in self.pipeline)
        return not self.flow.read_paused and not queued

    def _end_stalled_request(self, cycle: RequestResponseCycle) -> None:
        # The app's receive() now returns http.disconnect, and whatever it
        # answers then is dropped: the 408 below is the answer.
        cast("dict[str, Any]", cycle.scope)[BODY_TIMED_OUT_KEY] = True  # for the log and /metrics
        cycle.disconnected = True
        cycle.message_event.set()
        self._drop_input()
        if cycle.response_started:
            self.transport.close()
        else:
            idle = (
                f"Request body not received: nothing arrived for {self._body_idle_timeout_s:g} s."
            )
            self._answer_and_close(HTTPStatus.REQUEST_TIMEOUT, idle)

    def _stop_clocks(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None

    # Refusals

    def _refuse(self, status: HTTPStatus, message: str) -> None:
        """Answer for the request being read, which the app never sees, then close."""
        if self._refused or self.transport.is_closing():
            return
        if self._http_metrics is not None:
            self._http_metrics.record(self._method(), "unmatched", status, 0.0)
        self._drop_input()
        cycle = self.cycle
        if self._answering():
            self._answer_after(cycle, status, message)
        else:
            self._answer_and_close(status, message)

    def _method(self) -> str:
        # Known once the URL has begun (uvicorn collects it in `url`); before,
        # httptools reports its first method, DELETE.
        if not getattr(self, "url", b""):
            return "-"
        return str(self.parser.get_method().decode("ascii"))

    def _answering(self) -> bool:
        """Whether a response is still owed; pipelined, the last request's is written last."""
        return self.cycle is not None and not self.cycle.response_complete

    def _drop_input(self) -> None:
        self._refused = True
        self._stop_clocks()  # one answer is all the connection gets
        # Every read now takes the budget's path, which drops it.
        self._reading_head = True
        self._head_bytes_left = -1

    def _answer_after(self, cycle: RequestResponseCycle, status: HTTPStatus, message: str) -> None:
        on_response = cycle.on_response

        def then_answer() -> None:
            on_response()
            self._answer_and_close(status, message)

        cycle.on_response = then_answer

    def _answer_and_close(self, status: HTTPStatus, message: str) -> None:
        if self.transport.is_closing():
            return
        log.info("%s %d: %s", _peer(self.client), status, message)
        self.transport.write(_json_error(status, message, self.server_state.default_headers))
        self._linger_then_close()

    def _linger_then_close(self) -> None:
        # Closing a socket with unread input makes the kernel reset the
        # connection, and a reset may destroy the answer before the client
        # reads it. So: end our side at once, drop what still comes, and
        # close when the client does (eof_received) or after LINGER_S.
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self.flow.resume_reading()
        self.loop.call_later(LINGER_S, self.transport.close)

    def send_400_response(self, msg: str) -> None:
        self.transport.write(
            _json_error(HTTPStatus.BAD_REQUEST, msg, self.server_state.default_headers)
        )
        self.transport.close()


def _json_error(
    status: HTTPStatus, message: str, default_headers: list[tuple[bytes, bytes]]
) -> bytes:
    """A whole response {"error": message}, for errors answered outside the app."""
    body = json_encoder.encode(ErrorResponse(message))
    head = [b"HTTP/1.1 %d %s\r\n" % (status, status.phrase.encode())]
    # uvicorn's own (date, nosniff), as on every other response.
    head += [name + b": " + value + b"\r\n" for name, value in default_headers]
    head += [
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
        b"connection: close\r\n\r\n",
    ]
    return b"".join(head) + body


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "-"


# What every uvicorn server of this service is given (the tests' too): this
# protocol; no `server` header (it names the software, and helps no client);
# nosniff on every response, the ones answered above included, so no
# browser reads a JSON error as a page or a script.
UVICORN_OPTIONS: dict[str, Any] = {
    "http": ServiceHttpProtocol,
    # No WebSocket route exists; with the `websockets` package installed,
    # uvicorn would answer an upgrade with a 403 of its own (plain text,
    # none of the headers here). Off, an upgrade is a plain HTTP request.
    "ws": "none",
    "server_header": False,
    "headers": [("X-Content-Type-Options", "nosniff")],
}
