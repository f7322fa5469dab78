"""`python -m service`: run the service under uvicorn (uvloop, httptools)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import math
import os
import signal
import socket
import sys
from collections.abc import Iterator
from types import FrameType

import uvicorn

from service.app import create_app
from service.http.protocol import UVICORN_OPTIONS
from service.lifecycle import BrokerSide
from service.logs import close_logging, configure_logging
from service.settings import ConfigError, Settings

# uvicorn's exit status when it cannot start serving (uvicorn.server.STARTUP_FAILURE).
STARTUP_FAILURE = 3
# glibc mallopt(3) parameters.
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 128 * 1024
MALLOC_ARENAS = 2


class UvicornErrors(logging.Filter):
    """Remembers the last error uvicorn logs, so that a failed start ends saying why.

    uvicorn logs why it cannot listen (a port taken, an address not this
    host's), then exits with STARTUP_FAILURE: the reason would otherwise
    be lines above the last one, and inside JSON with LOG_FORMAT=json.
    """

    def __init__(self) -> None:
        super().__init__()
        self.last: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            self.last = _reason(record)
        return True


def _reason(record: logging.LogRecord) -> str:
    error = record.msg
    # asyncio's text repeats the address the `error:` line already names.
    if isinstance(error, OSError) and error.errno is not None:
        return f"[Errno {error.errno}] {os.strerror(error.errno).lower()}"
    return record.getMessage()


class Server(uvicorn.Server):
    """uvicorn's server, which also tells the app the moment a signal arrives."""

    def __init__(self, config: uvicorn.Config, broker_side: BrokerSide, grace_s: float) -> None:
        super().__init__(config)
        self._broker_side = broker_side
        self._grace_s = grace_s
        broker_side.on_fatal = self.fail
        self.fatal_error: str | None = None
        self.uvicorn_errors = UvicornErrors()
        logging.getLogger("uvicorn.error").addFilter(self.uvicorn_errors)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            try:
                yield
            finally:
                # As this exits, uvicorn ends the process by the signal it
                # caught (SIGTERM kills it there): the log lines still
                # waiting for the writer thread are written first.
                close_logging()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # Runs in the loop's thread, between two steps of the loop.
        asyncio.get_running_loop().call_soon_threadsafe(self._broker_side.begin_stop, self._grace_s)

    def fail(self, message: str) -> None:
        """Stop serving because the service cannot work (the broker never came up)."""
        self.fatal_error = message
        self.should_exit = True


def main() -> None:
    _answer_arguments(sys.argv[1:])
    _return_freed_memory()
    try:
        _serve()
    finally:
        close_logging()  # every line written, before any last `error:` line


def _answer_arguments(arguments: list[str]) -> None:
    """--help prints the settings; any other argument is refused, not ignored.

    Settings come from the environment only: a flag that started the
    service on its defaults (0.0.0.0:8080, the shared namespace) would
    surprise whoever typed it.
    """
    if not arguments:
        return
    if arguments[0] in ("-h", "--help"):
        print(_usage())
        sys.exit(0)
    print(
        f"error: python -m service takes no arguments (got {arguments[0]!r}); "
        "settings come from environment variables, listed by --help",
        file=sys.stderr,
    )
    sys.exit(2)


def _usage() -> str:
    settings = Settings()
    lines = [
        "usage: [NAME=value ...] python -m service",
        "",
        "Runs the prediction service. Every setting is an environment variable;",
        "README.md's settings table says what each does. Names and defaults:",
        "",
    ]
    for name in Settings.__struct_fields__:
        value = getattr(settings, name)
        lines.append(f"  {name.upper()}={value}" if value != "" else f"  {name.upper()} (unset)")
    return "\n".join(lines)


def _serve() -> None:
    try:
        settings = Settings.from_env()
        configure_logging(settings.log_level, settings.log_format)
        server = _build_server(settings)
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
    try:
        server.run()
    except KeyboardInterrupt:
        # Ctrl-C after a clean stop: uvicorn re-raises SIGINT, and asyncio
        # turns it into this. The stop is already logged; no traceback.
        sys.exit(128 + signal.SIGINT)
    except SystemExit as exc:
        # uvicorn exits with 3 when it cannot start serving (the port is
        # taken, most often) after logging why; end with the usual line.
        if exc.code == STARTUP_FAILURE:
            why = server.uvicorn_errors.last or "see the log above"
            sys.exit(f"error: could not serve on {settings.host}:{settings.port}: {why}")
        raise
    if server.fatal_error:
        sys.exit(f"error: {server.fatal_error}")


def _build_server(settings: Settings) -> Server:
    _check_host(settings.host, settings.port)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        **UVICORN_OPTIONS,  # httptools: JSON errors, head limits, timeouts; nosniff
        lifespan="on",
        access_log=False,  # the app logs requests itself, with prediction ids
        log_config=None,  # keep the handlers configure_logging installed
        # uvicorn reads None as "wait forever"; a 0 s grace must mean no wait.
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s),
        backlog=4096,
    )
    return Server(config, app.state.broker_side, settings.shutdown_grace_s)


def _return_freed_memory() -> None:
    """Make glibc give large freed blocks back to the system.

    glibc raises its mmap threshold each time a large block is freed, so
    later ones of that size come from the heap, which it rarely returns:
    after 600 async predictions of 1 MB the replica that took them kept
    723 MiB of RSS; with the threshold pinned at 128 KiB, 329 MiB (the
    budget's 256 MiB and the process). Each thread would also get arenas
    of its own (the disk writer, model threads); two are enough here.
    Elsewhere than glibc, nothing to do.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    libc.mallopt(M_ARENA_MAX, MALLOC_ARENAS)


def _check_host(host: str, port: int) -> None:
    """A HOST that names no address is a setting error, said in one line."""
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise ConfigError(f"HOST={host!r} is not an address to listen on: {exc.strerror}") from None


if __name__ == "__main__":
    main()
