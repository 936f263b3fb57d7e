"""ComfyUI's queue controls and failures on `ldm-serve`, the app in-process on the demo model, its client on the
websocket: deleting a waiting prompt and interrupting the running one by prompt_id, and a model that fails to load
after the server listed it (`execution_error` in ComfyUI's shape, then the next prompt is served).

ComfyUI's semantics (comfyanonymous/ComfyUI server.py): `POST /queue {"delete": [ids]}` removes those prompts from
the pending queue and never touches the running one; `POST /interrupt` stops the running prompt, and with
`{"prompt_id": id}` (newer versions) only when that prompt is the running one.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import time
import uuid

import pytest
import websocket  # websocket-client

from comfy_graphs import txt2img
from ldm.demo import MODEL_DIR as DEMO_DIR
from ldm.demo import NAME

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]  # the demo model opened and run

# ComfyUI's execution_error data (execution.py handle_execution_error, + the message timestamp)
EXECUTION_ERROR_KEYS = {"prompt_id", "node_id", "node_type", "executed", "exception_message", "exception_type",
                        "traceback", "current_inputs", "current_outputs", "timestamp"}


@pytest.fixture(scope="module")
def demo_pipe(one_torch_thread):
    from ldm.models.spec import inspect_model
    from ldm.pipeline import Pipeline

    return Pipeline.open(inspect_model(NAME), "cpu", "fp32")


def serve(models: dict, load, limits=None):
    from test_serve_worker import app_server_for

    from ldm.serve.api import Limits
    from ldm.serve.app import create_app
    from ldm.serve.worker import Worker

    worker = Worker(load, NAME, queue_size=4)
    worker.start()
    return worker, app_server_for(create_app(models, worker, limits or Limits()))


def post(port: int, path: str, body: dict) -> tuple[int, dict]:
    """(status, JSON body, {} for ComfyUI's empty 200s)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        return r.status, json.loads(data) if data else {}
    finally:
        conn.close()


def follow(ws, prompt_id: str, messages: list, timeout: float = 60) -> None:
    """Read the websocket into `messages` up to `executing` with node null for `prompt_id`."""
    ws.settimeout(timeout)
    while True:
        m = json.loads(ws.recv())
        messages.append(m)
        if m["type"] == "executing" and m["data"]["node"] is None and m["data"].get("prompt_id") == prompt_id:
            return


def of(messages: list, prompt_id: str) -> list[str]:
    return [m["type"] for m in messages if m["type"] != "status" and m["data"].get("prompt_id") == prompt_id]


def test_delete_a_waiting_prompt_and_interrupt_the_running_one_by_id(demo_pipe):
    """a runs (1000 steps), b and c wait: deleting b by id leaves a running and c waiting; interrupting c (not
    running) stops nothing; interrupting a stops it at its next step (execution_interrupted in its KSampler); b never
    runs nor gets a message or a history entry; c then runs to success."""
    from test_serve_worker import request

    from ldm.models.spec import inspect_model
    from ldm.serve.api import Limits

    worker, served = serve({NAME: inspect_model(NAME)}, lambda name: demo_pipe, Limits(max_steps=1000))
    client = uuid.uuid4().hex
    try:
        with served as port:
            ws = websocket.create_connection(f"ws://127.0.0.1:{port}/ws?clientId={client}", timeout=30)
            ids = []
            for steps in (1000, 2, 2):  # a: long enough to be running while the others wait
                status, answer = post(port, "/prompt", {"prompt": txt2img(NAME, "a red circle", size=32, steps=steps),
                                                        "client_id": client})
                assert status == 200, answer
                ids.append(answer["prompt_id"])
            a, b, c = ids
            while worker.progress()["state"]["sampling_step"] < 2:
                time.sleep(0.01)
            assert request(port, "GET", "/queue")[1]["queue_running"][0][1] == a

            assert post(port, "/queue", {"delete": [b]})[0] == 200
            queue = request(port, "GET", "/queue")[1]
            assert [i[1] for i in queue["queue_pending"]] == [c] and queue["queue_running"][0][1] == a

            assert post(port, "/interrupt", {"prompt_id": c})[0] == 200  # not the running one: nothing stops
            step = worker.progress()["state"]["sampling_step"]
            while worker.progress()["state"]["sampling_step"] < step + 3:
                time.sleep(0.01)
            assert worker.progress()["state"]["interrupted"] is False

            assert post(port, "/interrupt", {"prompt_id": a})[0] == 200
            messages: list = []
            follow(ws, c, messages)
            ws.close()
            history = request(port, "GET", "/history")[1]
        assert of(messages, b) == [] and b not in history  # deleted: never ran, nothing said
        assert of(messages, a)[-2:] == ["execution_interrupted", "executing"]
        stopped = next(m["data"] for m in messages if m["type"] == "execution_interrupted")
        assert stopped["node_id"] == "3" and stopped["node_type"] == "KSampler"
        progress = [m["data"]["value"] for m in messages if m["type"] == "progress" and m["data"]["prompt_id"] == a]
        assert max(progress) < 1000  # stopped early (a's 1000 steps are 2000 U-Net calls)
        assert history[a]["status"]["status_str"] == "error" and history[a]["outputs"] == {}
        assert of(messages, c)[0] == "execution_start" and of(messages, c)[-2:] == ["execution_success", "executing"]
        assert history[c]["status"]["status_str"] == "success"
    finally:
        worker.stop()


def test_a_model_that_fails_to_load_is_an_execution_error_and_the_next_prompt_runs(demo_pipe, tmp_path):
    """'broken' (a copy of the demo model) is listed, then its U-Net weights are truncated: its prompt gets
    ComfyUI's execution_error (in CheckpointLoaderSimple, one line naming the file), its history says error, the
    demo model stays loaded and the next prompt runs to success."""
    from test_serve_worker import request

    from ldm.models.spec import inspect_model
    from ldm.pipeline import Pipeline

    broken = tmp_path / "broken"
    broken.mkdir()
    for part in os.listdir(DEMO_DIR):
        if part != "unet":
            os.symlink(DEMO_DIR / part, broken / part)
    shutil.copytree(DEMO_DIR / "unet", broken / "unet")
    models = {NAME: inspect_model(NAME), "broken": inspect_model(str(broken))}  # listed while it is whole
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])

    def load(name: str):
        return demo_pipe if name == NAME else Pipeline.open(models[name], "cpu", "fp32")

    worker, served = serve(models, load)
    client = uuid.uuid4().hex
    try:
        with served as port:
            ws = websocket.create_connection(f"ws://127.0.0.1:{port}/ws?clientId={client}", timeout=30)
            status, answer = post(port, "/prompt", {"prompt": txt2img("broken", "a red circle", size=32, steps=2),
                                                    "client_id": client})
            assert status == 200, answer
            failed = answer["prompt_id"]
            messages: list = []
            follow(ws, failed, messages)
            status, answer = post(port, "/prompt", {"prompt": txt2img(NAME, "a red circle", size=32, steps=2),
                                                    "client_id": client})
            assert status == 200, answer
            follow(ws, answer["prompt_id"], messages)
            ws.close()
            history = request(port, "GET", "/history")[1]
        error = next(m["data"] for m in messages if m["type"] == "execution_error")
        assert set(error) == EXECUTION_ERROR_KEYS
        assert error["prompt_id"] == failed and error["node_id"] == "4"
        assert error["node_type"] == "CheckpointLoaderSimple" and error["exception_type"] == "ldm.errors.UserError"
        assert error["exception_message"].startswith(f"cannot load unet from '{broken / 'unet'}'")
        assert "\n" not in error["exception_message"]
        assert history[failed]["status"]["status_str"] == "error"
        assert history[failed]["status"]["messages"] == [["execution_error", error]]
        assert of(messages, answer["prompt_id"])[-2:] == ["execution_success", "executing"]
        assert worker.model_name == NAME
    finally:
        worker.stop()
