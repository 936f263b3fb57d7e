"""The ASGI application: FastAPI routes behind a body-size limit and (optionally) basic auth, with every error
answered as A1111 answers it: a JSON body `{"error": <kind>, "detail": <one line>}` and a 4xx status.

FastAPI because A1111's API is FastAPI: its pydantic request and response models map one to one onto ours, and
uvicorn serves it (and the page) from one process. ComfyUI's API (ldm/serve/comfy) is mounted on the same app, so
its prompts go through the same worker, queue, body limit and auth.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ldm.errors import UserError
from ldm.models.spec import ModelSpec
from ldm.serve.api import IPAdapterDirs, Limits, build_router
from ldm.serve.auth import BasicAuth
from ldm.serve.comfy.routes import build_comfy_routers
from ldm.serve.comfy.state import State
from ldm.serve.controlnet import build_controlnet_router
from ldm.serve.models import VAEFile
from ldm.serve.page import mount_page
from ldm.serve.worker import ModelUnavailable, QueueFull, ServerStopping, Worker, first_line

log = logging.getLogger(__name__)


def create_app(models: dict[str, ModelSpec], worker: Worker, limits: Limits,
               credentials: dict[str, str] | None = None, lora_dir: str | None = None,
               embeddings_dir: str | None = None, controlnet_dir: str | None = None,
               ip: IPAdapterDirs = IPAdapterDirs(), comfy_dir: str | None = None,
               vaes: dict[str, VAEFile] | None = None) -> FastAPI:
    """`comfy_dir`: ComfyUI's input/output/temp folders (a temporary directory, removed with the app, if None);
    `vaes`: --vae-dir's VAEs, for ComfyUI's VAELoader."""
    # no /docs or /redoc: their pages load scripts from a CDN, and this server works offline
    app = FastAPI(title="ldm-serve", docs_url=None, redoc_url=None)
    app.include_router(build_router(models, worker, limits, lora_dir, embeddings_dir, controlnet_dir, ip))
    app.include_router(build_controlnet_router(controlnet_dir, ip.directory))
    if comfy_dir is None:
        app.state.comfy_tmp = tempfile.TemporaryDirectory(prefix="ldm-serve-comfy-")  # removed with the app
        comfy_dir = app.state.comfy_tmp.name
    for router in build_comfy_routers(models, worker, limits, State(Path(comfy_dir)), lora_dir, embeddings_dir,
                                      controlnet_dir, vaes):
        app.include_router(router)
    mount_page(app)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        return _error(422, "RequestValidationError", _one_line(e))

    @app.exception_handler(UserError)
    async def user_error(request: Request, e: UserError):  # also those raised inside a job (a LoRA that does not fit)
        return _error(422, "UserError", first_line(e))

    @app.exception_handler(ModelUnavailable)
    @app.exception_handler(ServerStopping)
    async def unavailable(request: Request, e: Exception):
        return _error(503, type(e).__name__, first_line(e))

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, e: QueueFull):
        return _error(429, "QueueFull", str(e), headers={"Retry-After": "1"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return _error(e.status_code, "HTTPException", str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        log.exception("error in %s %s", request.method, request.url.path)
        return _error(500, type(e).__name__, first_line(e))

    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)  # added last = outermost but auth
    if credentials:
        app.add_middleware(BasicAuth, credentials=credentials)
    return app


def _error(status: int, kind: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": kind, "detail": detail}, headers=headers)


def _one_line(e: RequestValidationError) -> str:
    """pydantic's list of errors -> 'steps: Input should be a valid integer (got "many")'; the first one, and a count."""
    errors = e.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
    got = first.get("input")
    if first.get("type") == "model_attributes_type" and isinstance(got, bytes):
        return "the body must be a JSON object, sent with Content-Type: application/json"

    shown = json.dumps(got)[:60] if isinstance(got, (str, int, float, bool, type(None))) else type(got).__name__
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg')} (got {shown}){more}"


class BodyTooLarge(HTTPException):
    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"the request body is over this server's limit of {max_bytes} bytes "
                              "(ldm-serve --max-body-mb)")


class BodyLimit:
    """413 for a body over `max_bytes`: at once from Content-Length, else while a chunked body is being read."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            body = json.dumps({"error": "HTTPException", "detail": BodyTooLarge(self.max_bytes).detail}).encode()
            await send({"type": "http.response.start", "status": 413, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)  # an HTTPException: FastAPI passes it to the handler above
            return message

        await self.app(scope, limited, send)
