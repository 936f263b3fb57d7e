"""A queued ComfyUI prompt run as one worker job, telling its client over the websocket what ComfyUI would.

Message order for a prompt (comfyanonymous/ComfyUI execution.py and main.py's prompt_worker): `execution_start`,
`execution_cached` (no node is cached here: `nodes: []`), then per node `executing` ({node, display_node,
prompt_id}), `progress` ({value, max, prompt_id, node}) while its sampler runs, `executed` ({node, display_node,
output: {"images": [...]}, prompt_id}) for each output node; at the end `execution_success`, or
`execution_interrupted` / `execution_error` naming the node; then always `executing` with `node: null`. The
`status` broadcasts around it come from `State` as the queue changes.

Images are written as ComfyUI's SaveImage writes them: `{prefix}_{counter:05}_.png` in the output folder (the
prefix's directories as the subfolder), PreviewImage's in the temp folder, each PNG with our `parameters` chunk and
ComfyUI's `prompt` and `workflow` chunks (`ldm.pipeline.metadata.comfy_chunks`).
"""

from __future__ import annotations

import glob
import logging
import re
import secrets
import traceback
from pathlib import Path
from typing import Any

from ldm.pipeline.metadata import comfy_chunks, png_bytes
from ldm.pipeline.request import GenerationRequest
from ldm.serve.comfy.plan import Run
from ldm.serve.comfy.state import Item, State, now_ms
from ldm.serve.models import VAEFile
from ldm.serve.worker import Interrupted

log = logging.getLogger(__name__)


def make_job(state: State, item: Item, runs: list[tuple[Run, GenerationRequest]], lora_dir: str | None,
             vaes: dict[str, VAEFile] | None = None):
    """The worker's `run(pipeline, on_step)` for a checked prompt; `vaes`: what its VAELoader nodes name."""
    client = item.extra_data.get("client_id")

    def send(event: str, data: dict[str, Any]) -> None:
        if client is not None:
            state.hub.send(event, {**data, "prompt_id": item.prompt_id}, client)

    def run(pipe, on_step):
        if state.start(item.prompt_id) is None:  # deleted from the queue while it waited
            raise Interrupted()
        messages: list = []

        def note(event: str, data: dict[str, Any]) -> None:
            data = {"prompt_id": item.prompt_id, **data}
            if event.startswith("execution_"):
                messages.append([event, data])
            send(event, data)

        executed: list[str] = []
        outputs: dict[str, dict] = {}
        current = ""
        note("execution_start", {"timestamp": now_ms()})
        note("execution_cached", {"nodes": [], "timestamp": now_ms()})
        try:
            for r, request in runs:
                for node in r.nodes[: r.nodes.index(r.sampler) + 1]:
                    current = node
                    if node not in executed:
                        send("executing", {"node": node, "display_node": node})
                        executed.append(node)
                sampler = r.sampler

                def on_progress(done: int, total: int) -> None:
                    on_step(done, total)  # raises Interrupted when asked to stop
                    send("progress", {"value": done, "max": total, "node": sampler})

                # the request's VAE on the model (kept when it is on; none named: the model's own), as the A1111
                # API's jobs put on their IP-Adapters; a VAE that does not fit fails in its VAELoader node
                current = r.vae_node or current
                pipe.use_vae(vaes[request.vae].path if request.vae else None, request.vae)
                current = sampler
                result = pipe.generate(request, lora_dir=lora_dir, show_progress=False, on_step=on_progress)
                for node in r.nodes[r.nodes.index(r.sampler) + 1:]:
                    current = node
                    if node not in executed:
                        send("executing", {"node": node, "display_node": node})
                        executed.append(node)
                images = [_save(state, r, image, params, item) for image, params in
                          zip(result.images, result.params)]
                outputs[r.output] = {"images": images}
                send("executed", {"node": r.output, "display_node": r.output, "output": outputs[r.output]})
            note("execution_success", {"timestamp": now_ms()})
            status = "success"
        except Interrupted:
            note("execution_interrupted", {"node_id": current, "node_type": item.graph[current]["class_type"],
                                           "executed": executed[:-1], "timestamp": now_ms()})
            status = "error"
        except Exception as e:  # noqa: BLE001 - reported to the client as ComfyUI reports a node's failure
            log.exception("ComfyUI prompt %s failed in node %s", item.prompt_id, current)
            note("execution_error", {
                "node_id": current, "node_type": item.graph.get(current, {}).get("class_type", ""),
                "executed": executed[:-1], "exception_message": str(e).strip().splitlines()[0] if str(e) else "",
                "exception_type": exception_type(e),
                "traceback": traceback.format_tb(e.__traceback__), "current_inputs": {}, "current_outputs": {},
                "timestamp": now_ms()})
            status = "error"
        meta = {n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n} for n in outputs}
        state.finish(item, outputs, status, messages, meta)
        send("executing", {"node": None})
        return outputs

    return run


_COUNTER = re.compile(r"_(\d{5})_\.png$")


def _save(state: State, r: Run, image, params: GenerationRequest, item: Item) -> dict[str, str]:
    """Write one image as ComfyUI's SaveImage/PreviewImage would; returns its {filename, subfolder, type}."""
    for resize in r.after:
        image = resize(image)
    if r.kind == "output":
        prefix = r.prefix
    else:  # PreviewImage: a random prefix in the temp folder (ComfyUI's "ComfyUI_temp_" + 5 letters)
        prefix = "ComfyUI_temp_" + "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5))
    subfolder, _, stem = prefix.rpartition("/")
    folder = state.folder(r.kind) / subfolder
    folder.mkdir(parents=True, exist_ok=True)
    with state.lock:  # one writer at a time picks the next counter
        used = [int(m[1]) for p in folder.glob(f"{glob.escape(stem)}_*_.png") if (m := _COUNTER.search(p.name))]
        name = f"{stem}_{max(used, default=0) + 1:05}_.png"
        extra = comfy_chunks(item.graph, item.extra_data.get("extra_pnginfo"))
        (folder / name).write_bytes(png_bytes(image, params, extra))
    return {"filename": name, "subfolder": subfolder, "type": r.kind}


def exception_type(e: BaseException) -> str:
    """As ComfyUI's execution.py full_type_name names an exception's class: `module.Name`, a builtin's bare."""
    kind = type(e)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def safe_prefix(prefix: str) -> str:
    """SaveImage's filename_prefix, refused when it would leave the output folder ('' if fine)."""
    parts = Path(prefix).parts
    if not prefix or Path(prefix).is_absolute() or ".." in parts or "\\" in prefix or prefix.endswith("/"):
        return "Saving image outside the output folder is not allowed."
    return ""
