"""The web page at `/`: three files shipped in `ldm/serve/static`, served from memory, nothing fetched at run time.

The page talks to the same `/sdapi/v1` API any client uses. Only the files listed here are served: a request
path never reaches the file system.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.responses import Response

STATIC_DIR = Path(__file__).parent / "static"
_TYPES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}


def mount_page(app: FastAPI) -> None:
    files = {name: (STATIC_DIR / name).read_bytes() for name in _TYPES if (STATIC_DIR / name).is_file()}

    @app.get("/", include_in_schema=False)
    def index():
        if "index.html" not in files:
            raise HTTPException(404, "this installation has no web page (ldm/serve/static/index.html is missing)")
        return Response(files["index.html"], media_type=_TYPES["index.html"])

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str):
        if name not in files:
            raise HTTPException(404, f"no static file '{name}'")
        return Response(files[name], media_type=_TYPES[name])
