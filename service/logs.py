"""Logging: one line per event, human-readable or JSON (LOG_FORMAT=json).

Every line goes through one `LineWriter`, which writes them to stderr in
batches from a thread of its own: at least every FLUSH_EVERY_S, sooner
once FLUSH_AT_BYTES wait, at once for warnings and errors, and at exit.
The event loop only appends a string to a deque, so a slow, full or
closed stderr (a stalled log collector, a closed pipe) never blocks or
fails a request: past MAX_WAITING_LINES lines waiting, new ones are
dropped and counted, and the count is written once the output drains.

The request log, one line per request, does not go through `logging`:
a LogRecord, a Formatter, `time.strftime` and a locked handler for every
line halved sync throughput. `RequestLog` builds the same line directly,
with the time's text cached per millisecond. Everything else (prediction
events, warnings, errors) still goes through `logging`, into the same
writer, so lines keep their order.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import threading
import time

import msgspec

# Attributes that callers pass with `extra=` and that belong in a JSON line.
EXTRA_FIELDS = ("prediction_id", "http_status", "duration_ms")

FLUSH_EVERY_S = 0.1
FLUSH_AT_BYTES = 64 * 1024
MAX_WAITING_LINES = 100_000  # ~10-20 MB of request lines; beyond, lines are dropped
CLOSE_TIMEOUT_S = 2.0  # at exit, how long a stuck stderr may hold the process

_encoder = msgspec.json.Encoder()


class LineWriter:
    """Lines from any thread, written to a file descriptor in batches by one thread."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        # A deque: appends (the loop's side) and pops (the writer's) need no lock.
        self._lines: collections.deque[str] = collections.deque()
        self._waiting_chars = 0  # approximate: only a hint for an early flush
        self._wake = threading.Event()
        self._closed = False
        self._broken = False  # the fd refused a write: drop everything from now on
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def write(self, line: str) -> None:
        """Queue one line (no newline). Never blocks, never raises."""
        if len(self._lines) >= MAX_WAITING_LINES:
            self.dropped += 1
            return
        self._lines.append(line)
        self._waiting_chars += len(line)
        if self._waiting_chars >= FLUSH_AT_BYTES:
            self._waiting_chars = 0
            self._wake.set()

    def flush_soon(self) -> None:
        self._wake.set()

    def close(self) -> None:
        """Write everything queued, then stop (waiting at most CLOSE_TIMEOUT_S)."""
        self._closed = True
        self._wake.set()
        self._thread.join(CLOSE_TIMEOUT_S)

    def _run(self) -> None:
        while True:
            self._wake.wait(FLUSH_EVERY_S)
            self._wake.clear()
            closing = self._closed  # read before the last drain: nothing is left behind
            self._write_waiting()
            if closing:
                return

    def _write_waiting(self) -> None:
        lines = self._lines
        batch = [lines.popleft() for _ in range(len(lines))]  # those there now; more may come
        dropped, self.dropped = self.dropped, 0
        if dropped:
            batch.append(f"[log: {dropped} lines dropped: the output did not keep up]")
        if batch:
            batch.append("")
            self._write("\n".join(batch).encode("utf-8", "backslashreplace"))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self._broken:
            try:
                written = os.write(self._fd, view)
            except BlockingIOError:
                time.sleep(0.01)  # someone made the fd non-blocking: wait for room
                continue
            except OSError:
                self._broken = True  # closed or gone (EPIPE, EBADF): nobody reads it
                return
            view = view[written:]


class WriterHandler(logging.Handler):
    """A logging handler that hands formatted lines to a LineWriter."""

    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.writer.write(self.format(record))
        except Exception:  # logging must never fail its caller
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING:
            self.writer.flush_soon()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in EXTRA_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return _one_line(_encoder.encode(line).decode())


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        # A message may quote what a client sent (an input, a header): its
        # control characters are escaped, so it cannot forge a line. (A
        # traceback, added after this, keeps its lines.)
        if not record.message.isprintable():
            record.message = _escaped(record.message)
        text = super().formatMessage(record)
        prediction_id = getattr(record, "prediction_id", None)
        if not prediction_id:
            return text
        return f"{text} prediction_id={_escaped(str(prediction_id))}"


# -- the request log -----------------------------------------------------------------


class _AccessLine(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A JSON request line: the fields, in the order, of JsonFormatter's."""

    ts: str
    level: str
    logger: str
    message: str
    prediction_id: str | None = None
    http_status: int
    duration_ms: float


class _Clock:
    """The time's text, built once per millisecond (the date part once per second)."""

    def __init__(self, utc: bool) -> None:
        self._utc = utc
        self._next_ms_s = 0.0  # when the text below goes stale
        self._second = -1
        self._second_text = ""
        self.text = ""

    def now(self) -> str:
        now_s = time.time()
        if now_s >= self._next_ms_s:
            self._refresh(now_s)
        return self.text

    def _refresh(self, now_s: float) -> None:
        ms = int(now_s * 1000)
        self._next_ms_s = (ms + 1) / 1000
        second, milli = divmod(ms, 1000)
        if second != self._second:
            self._second = second
            self._second_text = (
                time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
                if self._utc
                else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            )
        # The separators of each format: logging's ",123", JSON's ".123Z".
        self.text = (
            f"{self._second_text}.{milli:03d}Z" if self._utc else f"{self._second_text},{milli:03d}"
        )


class RequestLog:
    """One line per request, in LOG_FORMAT, written to a LineWriter."""

    def __init__(self, writer: LineWriter, json: bool) -> None:
        self._writer = writer
        self._json = json
        self._clock = _Clock(utc=json)

    def write(
        self, method: str, path: str, status: int, elapsed_s: float, prediction_id: str | None
    ) -> None:
        duration_ms = elapsed_s * 1000
        if self._json:
            message = f"{method} {path} {status} {duration_ms:.1f} ms"
            fields = _AccessLine(
                ts=self._clock.now(),
                level="info",
                logger="service.access",
                message=message,
                prediction_id=prediction_id,
                http_status=status,
                duration_ms=round(duration_ms, 2),
            )
            self._writer.write(_one_line(_encoder.encode(fields).decode()))
            return
        # A path is percent-decoded: a %0a in it would end the line and let
        # the rest pass for a line of its own, ESC codes would drive the
        # reader's terminal. Escaped, they show as \n and \x1b.
        # (The id is a part of the path: printable if the path is.)
        if not path.isprintable():
            path = _escaped(path)
            prediction_id = prediction_id and _escaped(prediction_id)
        now = self._clock.now()
        if prediction_id:
            self._writer.write(
                f"{now} INFO service.access: {method} {path} {status} {duration_ms:.1f} ms"
                f" prediction_id={prediction_id}"
            )
        else:
            self._writer.write(
                f"{now} INFO service.access: {method} {path} {status} {duration_ms:.1f} ms"
            )


# C0, DEL, C1 and the Unicode line separators, spelt as Python would: a
# line of the text log is one line, and no byte of it drives a terminal.
_CONTROLS = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))}
_CONTROLS |= {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def _escaped(text: str) -> str:
    return text.translate(_CONTROLS)


# JSON leaves these raw, and some readers (Python's splitlines) end a line at them.
_JSON_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def _one_line(json_text: str) -> str:
    # JSON escapes every other control character: the text is then printable.
    return json_text if json_text.isprintable() else json_text.translate(_JSON_LINE_BREAKS)


# -- set-up --------------------------------------------------------------------------

_writer: LineWriter | None = None
request_log: RequestLog | None = None  # None: requests go through `logging` (tests, in-process)


def configure_logging(level: str, fmt: str) -> None:
    global _writer, request_log  # noqa: PLW0603 - one writer per process, like logging's root
    close_logging()
    _writer = LineWriter(_stderr_fd())
    handler = WriterHandler(_writer)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    request_log = RequestLog(_writer, json=fmt == "json")
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aio-pika logs every reconnect attempt with a traceback; ours say enough.
    logging.getLogger("aio_pika").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("aiormq").setLevel(max(logging.WARNING, root.level))


def _stderr_fd() -> int:
    # Started with stderr closed (`2>&-`), Python has no sys.stderr: the
    # service still runs, its lines going nowhere, as they would to a
    # stderr closed later.
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return os.open(os.devnull, os.O_WRONLY)


def close_logging() -> None:
    """Write every line still waiting (at exit, before a last `error:` line)."""
    global _writer, request_log  # noqa: PLW0603
    if _writer is None:
        return
    root = logging.getLogger()
    for index, handler in enumerate(root.handlers):
        if isinstance(handler, WriterHandler):
            # Anything logged later still shows, written as it comes.
            plain = logging.StreamHandler(sys.stderr)
            plain.setFormatter(handler.formatter)
            root.handlers[index] = plain
    request_log = None
    _writer.close()
    _writer = None
