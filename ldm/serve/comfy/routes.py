"""ComfyUI's HTTP and websocket API (comfyanonymous/ComfyUI server.py), at `/` and again under `/api/`, on the
A1111 API's worker, queue, limits and auth.

`POST /prompt` checks the whole graph (`graph.validate`, then `plan` and each request resolved against the model
and the server's limits, in the thread pool) before it takes a place in the worker's queue; refusals are ComfyUI's
`{"error", "node_errors"}` body: 400 for a graph ComfyUI would refuse or this server cannot run, 422 for a request
over this server's limits (as the A1111 API answers them); a full queue is 429. A prompt runs as one worker job
(`execute.make_job`); its outputs are files that `/view` serves and `/history` lists.
"""

from __future__ import annotations

import asyncio
import json
import platform
import sys
import uuid
from pathlib import Path
from typing import Any

import torch
from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ldm.controlnet.load import check_units, list_controlnets
from ldm.errors import UserError
from ldm.lora.prompt_tags import check_lora_inputs
from ldm.models.spec import ModelSpec
from ldm.pipeline.request import GenerationRequest
from ldm.serve.api import Limits, check_limits
from ldm.serve.comfy.execute import exception_type, make_job, safe_prefix
from ldm.serve.comfy.graph import Checked, validate
from ldm.serve.comfy.nodes import Catalog, node_types, object_info
from ldm.serve.comfy.plan import GraphError, plan
from ldm.serve.comfy.state import FOLDERS, Item, State, now_ms
from ldm.serve.comfy.uploads import save_upload
from ldm.serve.controlnet import check_unit_names
from ldm.serve.models import VAEFile, check_vae_fits
from ldm.serve.worker import Job, ServerStopping, Worker, first_line
from ldm.text.embedding_files import EmbeddingLibrary
from ldm.text.embeddings import check_references


def build_comfy_routers(models: dict[str, ModelSpec], worker: Worker, limits: Limits, state: State,
                        lora_dir: str | None = None, embeddings_dir: str | None = None,
                        controlnet_dir: str | None = None, vaes: dict[str, VAEFile] | None = None
                        ) -> list[APIRouter]:
    """The same routes twice: at the root, as ComfyUI serves them, and under /api/ (its newer clients' prefix).
    `vaes`: what VAELoader may name (`ldm.serve.models.list_vaes`)."""
    vaes = vaes or {}
    embeddings = EmbeddingLibrary.read(embeddings_dir) if embeddings_dir is not None else None

    def catalog() -> Catalog:
        return Catalog(checkpoints=list(models), vaes=sorted(vaes), loras=_files(lora_dir, "*.safetensors"),
                       controlnets=sorted(list_controlnets(controlnet_dir)) if controlnet_dir else [],
                       images=_files(str(state.folder("input")), "*"))

    def check(body: dict) -> tuple[int, dict, list]:
        """(status, refusal body or {}, [(run, resolved request)]). Blocking: in the thread pool."""
        graph = body.get("prompt")
        checked = validate(graph, node_types(catalog()))
        if checked.error is not None:
            return 400, checked.body(), []
        for out in checked.good_outputs:
            problem = safe_prefix(str(graph[out]["inputs"].get("filename_prefix", "ComfyUI")))
            if problem and graph[out]["class_type"] == "SaveImage":
                return 400, _refusal(out, graph, "filename_prefix", problem, checked), []
        try:
            runs = plan(graph, checked.good_outputs, state.folder("input"), 4 * limits.max_pixels)
        except GraphError as e:
            return 400, _refusal(e.node_id, graph, e.input_name, e.message, checked), []
        except UserError as e:  # an uploaded image that cannot be read
            return 400, _refusal(checked.good_outputs[0], graph, "image", str(e), checked), []
        if len({r.model for r in runs}) > 1:
            return 400, _refusal(runs[1].output, graph, "images", "one checkpoint per prompt on this server: queue "
                                 "a prompt per checkpoint", checked), []
        out = []
        for r in runs:
            try:
                out.append((r, _resolve(GenerationRequest.layered(r.layer), models[r.model], limits, lora_dir,
                                        embeddings, controlnet_dir)))
            except UserError as e:
                return 422, _refusal(r.sampler, graph, "", str(e).splitlines()[0], checked), []
            if out[-1][1].vae:  # a VAELoader's: a directory's latent space checked now, a file's when loaded
                try:
                    check_vae_fits(vaes[out[-1][1].vae], out[-1][1].vae, models[r.model])
                except UserError as e:
                    return 422, _refusal(r.vae_node, graph, "vae_name", str(e).splitlines()[0], checked), []
        return 200, {"node_errors": checked.node_errors}, out

    router = APIRouter()

    @router.post("/prompt")
    async def post_prompt(request: Request):
        state.hub.loop = asyncio.get_running_loop()
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return JSONResponse(_no_prompt(f"the body is not valid JSON: {e}"), status_code=400)
        if not isinstance(body, dict) or "prompt" not in body:
            return JSONResponse(_no_prompt("No prompt provided"), status_code=400)
        status, answer, runs = await run_in_threadpool(check, body)
        if status != 200:
            return JSONResponse(answer, status_code=status)
        extra = dict(body.get("extra_data") or {}) if isinstance(body.get("extra_data"), dict) else {}
        if body.get("client_id") is not None:
            extra["client_id"] = str(body["client_id"])
        item = Item(state.next_number(), str(body.get("prompt_id") or uuid.uuid4()), body["prompt"], extra,
                    [r.output for r, _ in runs])
        job = Job(runs[0][0].model, make_job(state, item, runs, lora_dir, vaes), description="comfyui")
        job.cancel = item.cancel
        state.add(item)
        try:
            worker.submit(job)  # QueueFull: 429, ServerStopping: 503 (the app's handlers)
        except Exception:
            state.drop(item.prompt_id)
            raise
        job.future.add_done_callback(lambda f: _never_ran(state, item, f.exception()))
        return {"prompt_id": item.prompt_id, "number": item.number, "node_errors": answer["node_errors"]}

    @router.get("/prompt")
    def get_prompt():
        return {"exec_info": state.status()["status"]["exec_info"]}

    @router.get("/queue")
    def get_queue():
        return state.queue()

    @router.post("/queue")
    async def post_queue(request: Request):
        body = await _body(request)
        if body.get("clear"):
            state.delete_pending(None)
        if isinstance(body.get("delete"), list):
            state.delete_pending([str(i) for i in body["delete"]])
        return Response(status_code=200)

    @router.post("/interrupt")
    async def interrupt(request: Request):
        body = await _body(request)
        running = state.queue()["queue_running"]
        if body.get("prompt_id") and (not running or running[0][1] != body["prompt_id"]):
            return Response(status_code=200)  # ComfyUI: only the named prompt, if it is the running one
        worker.interrupt()
        return Response(status_code=200)

    @router.get("/history")
    def history(max_items: int | None = None):
        return state.get_history(max_items=max_items)

    @router.get("/history/{prompt_id}")
    def history_item(prompt_id: str):
        return state.get_history(prompt_id)

    @router.post("/history")
    async def edit_history(request: Request):
        body = await _body(request)
        state.edit_history(bool(body.get("clear")), [str(i) for i in body.get("delete") or []])
        return Response(status_code=200)

    @router.get("/view")
    def view(filename: str, subfolder: str = "", type: str = "output"):  # noqa: A002 - ComfyUI's parameter
        if type not in FOLDERS or not filename or filename.startswith("/") or ".." in filename:
            return Response(status_code=400)
        root = state.folder(type).resolve()
        path = (root / subfolder / filename).resolve()
        if root not in path.parents or not path.is_file():
            return Response(status_code=404)
        media = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
        return Response(path.read_bytes(), media_type=media.get(path.suffix.lower(), "application/octet-stream"),
                        headers={"Content-Disposition": f'filename="{path.name}"'})

    @router.post("/upload/image")
    async def upload_image(request: Request):
        return await _upload(request, mask=False)

    @router.post("/upload/mask")
    async def upload_mask(request: Request):
        return await _upload(request, mask=True)

    async def _upload(request: Request, mask: bool):
        data = await request.body()
        status, answer = await run_in_threadpool(save_upload, request.headers.get("content-type", ""), data,
                                                 state, 4 * limits.max_pixels, mask)
        return JSONResponse(answer, status_code=status) if status == 200 else Response(answer, status_code=status)

    @router.get("/object_info")
    def get_object_info():
        return object_info(node_types(catalog()))

    @router.get("/object_info/{node_class}")
    def get_node_info(node_class: str):
        info = object_info(node_types(catalog()))
        return {node_class: info[node_class]} if node_class in info else {}

    @router.get("/embeddings")
    def get_embeddings():
        if embeddings is None:
            return []
        embeddings.refresh()
        return sorted(embeddings.split(lambda e: True)[0])

    @router.get("/system_stats")
    def system_stats():
        return _system_stats()

    @router.websocket("/ws")
    async def ws(websocket: WebSocket, clientId: str | None = None):  # noqa: N803 - ComfyUI's parameter
        client = clientId or uuid.uuid4().hex
        await websocket.accept()
        queue = state.hub.attach(client)
        closed = asyncio.create_task(_until_closed(websocket))
        try:
            await websocket.send_json({"type": "status", "data": {**state.status(), "sid": client}})
            while True:
                get = asyncio.create_task(queue.get())
                done, _ = await asyncio.wait({get, closed}, return_when=asyncio.FIRST_COMPLETED)
                if closed in done:
                    get.cancel()
                    break
                await websocket.send_json(get.result())
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            closed.cancel()
            state.hub.detach(client, queue)

    api = APIRouter(prefix="/api")
    api.include_router(router)
    return [router, api]


def _never_ran(state: State, item: Item, error: BaseException | None) -> None:
    """A prompt whose job failed before it started (its model failed to load, the server is stopping): its client
    is told as ComfyUI tells of a failed node (a model that fails to load fails in ComfyUI's CheckpointLoaderSimple
    node: that node is named), and its history says so. One deleted from the queue just goes."""
    if error is None:
        return
    state.drop(item.prompt_id)
    if item.cancel.is_set() or item.prompt_id in state.get_history(item.prompt_id):
        return
    loader = None if isinstance(error, ServerStopping) else next(
        (n for n, node in item.graph.items() if node.get("class_type") == "CheckpointLoaderSimple"), None)
    data = {"prompt_id": item.prompt_id, "node_id": loader, "node_type": loader and "CheckpointLoaderSimple",
            "executed": [], "exception_message": first_line(error),
            "exception_type": exception_type(error), "traceback": [],
            "current_inputs": {}, "current_outputs": {}, "timestamp": now_ms()}
    state.finish(item, {}, "error", [["execution_error", data]], {})
    client = item.extra_data.get("client_id")
    if client is not None:
        state.hub.send("execution_error", data, client)
        state.hub.send("executing", {"node": None, "prompt_id": item.prompt_id}, client)


async def _until_closed(websocket: WebSocket) -> None:
    """Read (and ignore) what the client sends until it goes away."""
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
    except (WebSocketDisconnect, RuntimeError):
        return


async def _body(request: Request) -> dict:
    try:
        body = json.loads(await request.body() or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return body if isinstance(body, dict) else {}


def _resolve(request: GenerationRequest, spec: ModelSpec, limits: Limits, lora_dir: str | None,
             embeddings: EmbeddingLibrary | None, controlnet_dir: str | None = None) -> GenerationRequest:
    """As the A1111 API checks its requests: LoRA names in --lora-dir, ControlNets in --controlnet-dir (each fits
    the model), the model, embedding:NAME, the limits."""
    check_lora_inputs([], request.prompt, lora_dir)
    check_unit_names(request.controlnets, controlnet_dir)
    r = request.resolve(spec)
    if r.controlnets:
        check_units(r.controlnets, spec.unet_config, spec.vae_factor, controlnet_dir)
    if embeddings is not None:
        embeddings.refresh()
    check_references(embeddings, [r.prompt, r.negative_prompt], spec.arch,
                     getattr(spec, "unet_config", {}).get("cross_attention_dim"))
    check_limits(r, limits, images_field="EmptyLatentImage batch_size")
    return r


def _no_prompt(details: str) -> dict:
    return {"error": {"type": "no_prompt", "message": "No prompt provided", "details": details, "extra_info": {}},
            "node_errors": {}}


def _refusal(node_id: str, graph: dict, input_name: str, message: str, checked: Checked) -> dict:
    """ComfyUI's body for a graph whose outputs cannot run: the node, its input and why."""
    node_errors = dict(checked.node_errors)
    node_errors[node_id] = GraphError(node_id, input_name, message).node_error(graph[node_id]["class_type"],
                                                                                checked.good_outputs[0])
    return {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                      "details": f"{message}: {input_name}", "extra_info": {}}, "node_errors": node_errors}


def _files(directory: str | None, pattern: str) -> list[str]:
    if directory is None or not Path(directory).is_dir():
        return []
    root = Path(directory)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob(pattern) if p.is_file())


def _system_stats() -> dict[str, Any]:
    """ComfyUI's GET /system_stats: the system and the devices."""
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            devices.append({"name": torch.cuda.get_device_name(i), "type": "cuda", "index": i, "vram_total": total,
                            "vram_free": free, "torch_vram_total": torch.cuda.memory_reserved(i),
                            "torch_vram_free": torch.cuda.memory_reserved(i) - torch.cuda.memory_allocated(i)})
    else:
        devices.append({"name": "cpu", "type": "cpu", "index": None, "vram_total": 0, "vram_free": 0,
                        "torch_vram_total": 0, "torch_vram_free": 0})
    return {"system": {"os": sys.platform, "python_version": sys.version, "embedded_python": False,
                       "comfyui_version": "ldm-serve", "pytorch_version": torch.__version__,
                       "argv": sys.argv, "ram_total": 0, "ram_free": 0, "platform": platform.platform()},
            "devices": devices}
