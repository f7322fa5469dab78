"""Interactive API docs (Swagger UI 5) served from the package: no CDN, works offline.

The assets are read once when the app is built and answered from memory,
so serving them needs no file I/O (and no threads) on the event loop.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response

from service.http.responses import HtmlResponse, NotedResponse, error_response

ASSET_DIR = Path(__file__).resolve().parent.parent / "static" / "swagger-ui"
MEDIA_TYPES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
    "swagger-init.js": "text/javascript; charset=utf-8",
}
BUNDLED = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")
# The assets change only with the package version; let browsers keep them.
CACHE = {"Cache-Control": "public, max-age=86400"}

# Relative URLs, so the page also works behind a path-prefixing proxy.
PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Prediction service - API docs</title>
  <link rel="icon" type="image/png" href="docs/static/favicon-32x32.png">
  <link rel="stylesheet" href="docs/static/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="docs/static/swagger-ui-bundle.js"></script>
  <script src="docs/static/swagger-init.js"></script>
</body>
</html>
"""
# A file, not an inline script, so the policy below needs no exception for it.
INIT_SCRIPT = b"""window.ui = SwaggerUIBundle({url: "openapi.json", dom_id: "#swagger-ui",
                            deepLinking: true, tryItOutEnabled: true});
"""
# Only this service's own files and /openapi.json: an injected script,
# style or frame has nowhere to load from and nowhere to send to. Swagger
# UI's icons are data: URIs in its stylesheet.
POLICY = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self';"
    " img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none';"
    " frame-ancestors 'none'"
}


class SwaggerDocs:
    def __init__(self) -> None:
        self._assets = {
            name: (ASSET_DIR / name).read_bytes() for name in MEDIA_TYPES if name in BUNDLED
        }
        self._assets["swagger-init.js"] = INIT_SCRIPT

    async def page(self, _: Request) -> Response:
        return HtmlResponse(PAGE, headers=POLICY)

    async def asset(self, request: Request) -> Response:
        name: str = request.path_params["name"]
        body = self._assets.get(name)
        if body is None:
            return error_response(404, "Not Found")
        return NotedResponse(body, media_type=MEDIA_TYPES[name], headers=CACHE)
