"""GET /docs in a real (headless) Chromium, with no internet.

Swagger UI must render the operations from the service's own assets and
/openapi.json, and "Try it out" on POST /predict must get a 200 with a
`result`. The browser is driven over the Chrome DevTools Protocol with the
`websockets` client, so the test needs Debian's `chromium` and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.support import live_app, settings_for_test

CHROMIUM = next(
    (found for name in ("chromium", "chromium-browser") if (found := shutil.which(name))), None
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary (apt-get install chromium); .ci/run installs it"
)

# The closed network refuses many connections: keep the browser from trying.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--mute-audio",
    "--window-size=1280,2000",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
]
# Schemes that never leave the machine.
LOCAL_SCHEMES = {"data", "blob", "about"}


class DevTools:
    """A minimal Chrome DevTools Protocol session over one page's websocket."""

    def __init__(self, connection: ClientConnection) -> None:
        self._connection = connection
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []

    async def read(self) -> None:
        async for raw in self._connection:
            message = json.loads(raw)
            future = self._pending.pop(message.get("id", -1), None)
            if future is None:
                self.events.append(message)
            elif "error" in message:
                future.set_exception(RuntimeError(f"CDP error: {message['error']}"))
            else:
                future.set_result(message.get("result", {}))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        await self._connection.send(json.dumps({"id": call_id, "method": method, "params": params}))
        with anyio.fail_after(10):
            return await future

    async def evaluate(self, expression: str) -> Any:
        reply = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in reply:
            raise RuntimeError(f"page script failed: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float = 15) -> Any:
        """Evaluate until the value is truthy; fail with the page's text otherwise."""
        try:
            with anyio.fail_after(timeout_s):
                while not (value := await self.evaluate(expression)):
                    await asyncio.sleep(0.1)
                return value
        except TimeoutError:
            text = await self.evaluate("document.body ? document.body.innerText : ''")
            raise AssertionError(f"timed out waiting for {expression!r}; page:\n{text}") from None

    def requested_urls(self) -> list[str]:
        return [
            event["params"]["request"]["url"]
            for event in self.events
            if event.get("method") == "Network.requestWillBeSent"
        ]

    def exceptions(self) -> list[str]:
        return [
            json.dumps(event["params"]["exceptionDetails"])[:500]
            for event in self.events
            if event.get("method") == "Runtime.exceptionThrown"
        ]


@contextlib.asynccontextmanager
async def chromium(user_data_dir: Path) -> AsyncIterator[DevTools]:
    """Headless Chromium with a fresh profile, and a DevTools session on its page."""
    assert CHROMIUM is not None
    log = (user_data_dir.parent / "chromium.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        CHROMIUM,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={user_data_dir}",
        "about:blank",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,  # its zygote and renderers share our process group id
    )
    try:
        port = await _devtools_port(user_data_dir, process)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            targets = (await client.get("/json/list")).json()
        (page,) = [target for target in targets if target["type"] == "page"]
        async with connect(
            page["webSocketDebuggerUrl"], max_size=None, open_timeout=5, close_timeout=2
        ) as connection:
            devtools = DevTools(connection)
            reader = asyncio.create_task(devtools.read())
            try:
                yield devtools
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
    finally:
        await _stop(process)
        log.close()


async def _devtools_port(user_data_dir: Path, process: asyncio.subprocess.Process) -> int:
    """Chromium writes the port it chose (with --remote-debugging-port=0) to this file."""
    active_port = user_data_dir / "DevToolsActivePort"
    with anyio.fail_after(20):
        while True:
            if process.returncode is not None:
                log = (user_data_dir.parent / "chromium.log").read_text(errors="replace")
                raise AssertionError(f"chromium exited with {process.returncode}:\n{log}")
            with contextlib.suppress(FileNotFoundError, ValueError):
                return int(active_port.read_text().split()[0])
            await asyncio.sleep(0.05)


async def _stop(process: asyncio.subprocess.Process) -> None:
    """End the browser, then any helper left in its process group (its own), bounded."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(TimeoutError), anyio.fail_after(5):
        await process.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with anyio.fail_after(5):
        await process.wait()


# Reads Swagger UI's operation blocks as "METHOD /path".
OPERATIONS_JS = """
[...document.querySelectorAll('.opblock')].map(block =>
  block.querySelector('.opblock-summary-method').textContent.trim() + ' ' +
  block.querySelector('.opblock-summary-path').dataset.path)
"""
POST_PREDICT = "document.querySelector('.opblock.opblock-post')"
# The live response Swagger UI shows after Execute: status and body text.
LIVE_RESPONSE_JS = f"""(() => {{
  const row = {POST_PREDICT}.querySelector('.live-responses-table .response');
  if (!row) return null;
  return {{
    status: row.querySelector('.response-col_status').textContent.trim(),
    body: row.querySelector('.response-col_description pre').textContent,
  }};
}})()"""


async def test_docs_render_and_try_it_out_works_offline(rabbitmq_url: str, tmp_path: Path) -> None:
    async with (
        live_app(settings_for_test(rabbitmq_url)) as live,
        chromium(tmp_path / "profile") as page,
    ):
        base_url = f"http://127.0.0.1:{live.settings.port}"
        await page.send("Network.enable")
        await page.send("Runtime.enable")
        await page.send("Page.enable")
        await page.send("Page.navigate", url=f"{base_url}/docs")

        # The page renders every operation of /openapi.json.
        operations = await page.wait_for(f"({OPERATIONS_JS}).length >= 7 && {OPERATIONS_JS}")
        assert {"POST /predict", "GET /predict/{prediction_id}", "GET /healthz"} <= set(operations)
        title = await page.evaluate("document.querySelector('.info .title').textContent")
        assert "Prediction service" in title

        # "Try it out" on POST /predict: open it, execute the example body, read the answer.
        await page.evaluate(f"{POST_PREDICT}.querySelector('.opblock-summary-control').click()")
        await page.wait_for(f"{POST_PREDICT}.querySelector('.try-out__btn') !== null")
        if not await page.evaluate(f"{POST_PREDICT}.querySelector('button.execute') !== null"):
            await page.evaluate(f"{POST_PREDICT}.querySelector('.try-out__btn').click()")
        body = await page.wait_for(f"{POST_PREDICT}.querySelector('.body-param textarea')?.value")
        assert json.loads(body) == {"input": "string"}
        await page.wait_for(f"{POST_PREDICT}.querySelector('button.execute') !== null")
        await page.evaluate(f"{POST_PREDICT}.querySelector('button.execute').click()")
        response = await page.wait_for(LIVE_RESPONSE_JS)
        assert response["status"] == "200", response
        answer = json.loads(response["body"])
        assert answer["input"] == "string"
        assert answer["result"].isdigit()

        assert page.exceptions() == []
        urls = page.requested_urls()

    # Offline: every request the page made went to the service itself.
    assert f"{base_url}/docs" in urls
    assert f"{base_url}/openapi.json" in urls
    assert f"{base_url}/predict" in urls
    elsewhere = [
        url
        for url in urls
        if urlsplit(url).scheme not in LOCAL_SCHEMES and urlsplit(url).hostname != "127.0.0.1"
    ]
    assert elsewhere == []
