"""The service's two HTML pages, the web page (``static/index.html``) and the API docs (Swagger UI),
served from this machine: Swagger UI's files come from the installed ``fastapi-offline`` package,
never from a CDN, and each page carries a Content-Security-Policy that runs only its own scripts
(the inline ones by their SHA-256) and may not be framed by another site.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response

INDEX_PAGE = Path(__file__).with_name("static") / "index.html"
DOCS_ASSETS_ROUTE = "/docs/assets"
# name -> media type; the files are fastapi-offline's copy of Swagger UI 5 (OpenAPI 3.1, which FastAPI writes)
DOCS_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon.png": "image/png"}
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


def content_security_policy(html: str) -> str:
    """Scripts from this origin and the page's own inline scripts only; no framing, no plugins."""
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()}'"
                      for script in _INLINE_SCRIPT.findall(html))
    return (f"default-src 'self'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
            "form-action 'self'; frame-ancestors 'none'")


def html_page(html: str) -> HTMLResponse:
    return HTMLResponse(html, headers={"Content-Security-Policy": content_security_policy(html),
                                       "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})


def docs_page(root_path: str, title: str) -> HTMLResponse:
    assets = f"{root_path}{DOCS_ASSETS_ROUTE}"
    html = get_swagger_ui_html(openapi_url=f"{root_path}/openapi.json", title=title,
                               swagger_js_url=f"{assets}/swagger-ui-bundle.js",
                               swagger_css_url=f"{assets}/swagger-ui.css",
                               swagger_favicon_url=f"{assets}/favicon.png").body.decode()
    return html_page(html)


def load_docs_assets() -> dict[str, bytes]:
    import fastapi_offline

    folder = Path(fastapi_offline.__file__).with_name("static")
    return {name: (folder / name).read_bytes() for name in DOCS_ASSETS}


def docs_asset(assets: dict[str, bytes], name: str) -> Response | None:
    """One of :data:`DOCS_ASSETS`, cached for a day; None for any other name."""
    if name not in assets:
        return None
    return Response(assets[name], media_type=DOCS_ASSETS[name],
                    headers={"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"})
