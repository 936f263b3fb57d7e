"""`ldm-serve` speaking ComfyUI's API, driven over HTTP and the websocket by clients this package did not write:
the plain protocol (the websocket-client package, as ComfyUI's own script_examples/websockets_api_example.py uses
it) and comfy-api-simplified (a maintained PyPI client, unmodified), on the real server process the A1111 API tests
share (tests/conftest.py `serve_server`: the demo model, basic auth, queue size 1, 64x64 pixels at most).
"""

from __future__ import annotations

import io
import json
import time
import uuid

import numpy as np
import pytest
import websocket  # websocket-client
from PIL import Image

from comfy_graphs import img2img, txt2img
from ldm.demo import NAME
from ldm.demo.reader import read_attributes
from ldm.demo.shapes import Attributes, render
from serve_server import AUTH

# a server process and real generations; the in-process comparison on one thread, as the server runs
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

PROMPT = "a large red circle in the center on a black background"
STEPS = 12


@pytest.fixture
def server(serve_server):
    return serve_server


def follow(ws, prompt_id: str, timeout: float = 120) -> list[dict]:
    """The websocket's messages up to `executing` with node null for `prompt_id`."""
    ws.settimeout(timeout)
    messages = []
    while True:
        m = json.loads(ws.recv())
        messages.append(m)
        if m["type"] == "executing" and m["data"]["node"] is None and m["data"]["prompt_id"] == prompt_id:
            return messages


def connect(server, client_id: str):
    return websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={client_id}",
                                       header=[f"Authorization: {AUTH['Authorization']}"], timeout=60)


def view(server, image: dict) -> Image.Image:
    r = server.get(f"/view?filename={image['filename']}&subfolder={image['subfolder']}&type={image['type']}")
    assert r.status == 200 and r.headers["content-type"] == "image/png"
    out = Image.open(io.BytesIO(r.body))
    out.load()
    return out


def test_plain_protocol_txt2img(server):
    """ComfyUI's default graph posted, the websocket followed to the end, the image fetched by /view: it shows its
    prompt, equals ldm-generate's for the same settings, and carries the graph and workflow as ComfyUI writes them."""
    client = uuid.uuid4().hex
    ws = connect(server, client)
    try:
        hello = json.loads(ws.recv())
        assert hello["type"] == "status" and hello["data"]["sid"] == client
        graph = txt2img(NAME, PROMPT, "blurry", seed=0, steps=STEPS, cfg=7.5, size=32, sampler="euler_ancestral")
        workflow = {"last_node_id": 9, "nodes": [{"id": 9, "type": "SaveImage"}]}
        r = server.post("/prompt", {"prompt": graph, "client_id": client,
                                    "extra_data": {"extra_pnginfo": {"workflow": workflow}}})
        assert r.status == 200, r.body
        prompt_id = r.json()["prompt_id"]
        assert r.json()["number"] >= 1 and r.json()["node_errors"] == {}
        messages = follow(ws, prompt_id)
    finally:
        ws.close()
    mine = [m for m in messages if m["type"] != "status"]
    kinds = [m["type"] for m in mine]
    assert kinds[:2] == ["execution_start", "execution_cached"]
    executing = [m["data"]["node"] for m in mine if m["type"] == "executing"]
    assert executing == ["5", "4", "7", "6", "3", "8", "9", None]  # ComfyUI's order for this graph
    progress = [(m["data"]["value"], m["data"]["max"]) for m in mine if m["type"] == "progress"]
    assert progress == [(i, STEPS) for i in range(1, STEPS + 1)]
    assert kinds.index("progress") > kinds.index("executing") and kinds[-3:] == ["executed", "execution_success",
                                                                               "executing"]
    executed = next(m["data"] for m in mine if m["type"] == "executed")
    [image_ref] = executed["output"]["images"]
    assert executed["node"] == "9" and image_ref["type"] == "output" and image_ref["filename"].endswith("_.png")

    history = server.get(f"/history/{prompt_id}").json()[prompt_id]
    assert history["outputs"] == {"9": {"images": [image_ref]}}
    assert history["status"]["status_str"] == "success" and history["status"]["completed"] is True
    assert history["prompt"][1] == prompt_id and history["prompt"][4] == ["9"]
    assert prompt_id in server.get("/api/history").json()

    image = view(server, image_ref)
    assert read_attributes(image) == Attributes("circle", "red", "black", "large", "center")
    assert json.loads(image.info["prompt"]) == graph and json.loads(image.info["workflow"]) == workflow

    from ldm.models.spec import inspect_model
    from ldm.pipeline import Pipeline

    # what `ldm-generate PROMPT --negative blurry --seed 0 --steps 12` makes (image 0's noise is ComfyUI's draw)
    cli = Pipeline.open(inspect_model(NAME), "cpu", "fp32")(PROMPT, "blurry", seed=0, steps=STEPS, cfg=7.5,
                                                            sampler="euler_a", show_progress=False)
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(cli.images[0]))


BAD = {
    "unknown node": lambda g: g["5"].update(class_type="NoSuchNode"),
    "wrong type": lambda g: g["3"]["inputs"].update(positive=["5", 0]),
    "wrong value type": lambda g: g["3"]["inputs"].update(steps="many"),
    "dangling link": lambda g: g["8"]["inputs"].update(samples=["99", 0]),
    "cycle": lambda g: (g["6"]["inputs"].update(clip=["13", 0]),
                        g.update({"13": {"class_type": "CLIPSetLastLayer",
                                         "inputs": {"clip": ["14", 0], "stop_at_clip_layer": -1}},
                                  "14": {"class_type": "CLIPSetLastLayer",
                                         "inputs": {"clip": ["13", 0], "stop_at_clip_layer": -1}}})),
    "10,000 nodes": lambda g: g.update({f"n{i}": {"class_type": "EmptyLatentImage", "inputs": {}}
                                        for i in range(10_000)}),
    "a path as a model": lambda g: g["4"]["inputs"].update(ckpt_name="../../etc/passwd"),
    "a path as a filename prefix": lambda g: g["9"]["inputs"].update(filename_prefix="../../tmp/x"),
}
EXPECTED = {"unknown node": "invalid_prompt", "wrong type": "return_type_mismatch",
            "wrong value type": "invalid_input_type", "dangling link": "bad_linked_input",
            "cycle": "dependency_cycle", "10,000 nodes": "invalid_prompt", "a path as a model": "value_not_in_list",
            "a path as a filename prefix": "unsupported_graph"}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_graphs_get_comfyuis_error_shape(server, case):
    g = txt2img(NAME, PROMPT, size=32, steps=1)
    BAD[case](g)
    r = server.post("/api/prompt" if case == "cycle" else "/prompt", {"prompt": g})
    assert r.status == 400, r.body
    body = r.json()
    assert set(body) == {"error", "node_errors"}
    assert set(body["error"]) == {"type", "message", "details", "extra_info"}
    kinds = {body["error"]["type"]} | {e["type"] for n in body["node_errors"].values() for e in n["errors"]}
    assert EXPECTED[case] in kinds
    for entry in body["node_errors"].values():
        assert set(entry) == {"errors", "dependent_outputs", "class_type"}
    assert server.get("/queue").json() == {"queue_running": [], "queue_pending": []}  # nothing was queued
    assert server.get("/system_stats").status == 200  # and the server goes on


def test_limits_auth_queue_and_interrupt(server):
    too_big = server.post("/prompt", {"prompt": txt2img(NAME, PROMPT, size=128, steps=1)})
    assert too_big.status == 422 and "--max-pixels" in json.dumps(too_big.json())  # the A1111 API's limit
    assert server.post("/prompt", {"prompt": txt2img(NAME, PROMPT, size=32)}, headers={"Authorization": ""}
                       ).status == 401
    with pytest.raises(websocket.WebSocketBadStatusException):
        websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId=x", timeout=30)

    client = uuid.uuid4().hex
    ws = connect(server, client)
    try:
        long = server.post("/prompt", {"prompt": txt2img(NAME, "a square", seed=1, steps=1000, size=32),
                                       "client_id": client}).json()["prompt_id"]
        deadline = time.monotonic() + 60
        while not server.get("/queue").json()["queue_running"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        waiting = server.post("/prompt", {"prompt": txt2img(NAME, "a square", steps=1, size=32)})
        assert waiting.status == 200  # the one place in the queue (--queue-size 1)
        assert server.post("/prompt", {"prompt": txt2img(NAME, "a square", steps=1, size=32)}).status == 429
        assert [i[1] for i in server.get("/queue").json()["queue_pending"]] == [waiting.json()["prompt_id"]]
        assert server.post("/queue", {"clear": True}).status == 200
        assert server.get("/queue").json()["queue_pending"] == []
        assert server.post("/interrupt").status == 200
        messages = follow(ws, long)
    finally:
        ws.close()
    interrupted = [m["data"] for m in messages if m["type"] == "execution_interrupted"]
    assert interrupted and interrupted[0]["node_id"] == "3" and interrupted[0]["node_type"] == "KSampler"
    assert server.get(f"/history/{long}").json()[long]["status"]["status_str"] == "error"
    assert server.get(f"/history/{waiting.json()['prompt_id']}").json() == {}  # cleared: never ran


def test_object_info_lists_exactly_our_nodes(server):
    info = server.get("/object_info").json()
    assert "KSampler" in info and "UltimateSDUpscale" not in info and len(info) == 21
    assert info["VAELoader"]["input"]["required"] == {"vae_name": [[]]}  # no --vae-dir: nothing to choose
    assert NAME in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert server.get("/api/object_info/KSampler").json()["KSampler"]["output"] == ["LATENT"]
    assert server.get("/embeddings").json() == []


# ------------------------------------------------------------------------ comfy-api-simplified, unmodified

def titled(graph: dict) -> dict:
    """The graph as ComfyUI's "Save (API)" exports it: each node with a `_meta.title` (its class name, the prompts
    "Positive" and "Negative")."""
    for node_id, node in graph.items():
        node["_meta"] = {"title": {"6": "Positive", "7": "Negative"}.get(node_id, node["class_type"])}
    return graph


@pytest.fixture
def client(server):
    from comfy_api_simplified import ComfyApiWrapper

    return ComfyApiWrapper(server.url, user="alice", password="pw:1")


def test_client_txt2img_img2img_inpaint(client, tmp_path):
    from comfy_api_simplified import ComfyWorkflowWrapper

    wf = ComfyWorkflowWrapper(titled(txt2img(NAME, "a square", size=32, steps=STEPS)))
    wf.set_node_param("Positive", "text", PROMPT)
    wf.set_node_param("KSampler", "seed", 3)
    [png] = client.queue_and_wait_images(wf, "SaveImage").values()
    image = Image.open(io.BytesIO(png))
    assert read_attributes(image).shape == "circle"
    assert json.loads(image.info["prompt"])["3"]["inputs"]["seed"] == 3

    # img2img: a picture of a blue square, half re-noised towards "a red circle"
    render(Attributes("square", "blue", "white", "large", "center")).save(tmp_path / "square.png")
    uploaded = client.upload_image(tmp_path / "square.png")
    name = f"{uploaded['subfolder']}/{uploaded['name']}"
    wf = ComfyWorkflowWrapper(titled(img2img(NAME, PROMPT, name, denoise=0.5, steps=STEPS)))
    [png] = client.queue_and_wait_images(wf, "SaveImage").values()
    assert Image.open(io.BytesIO(png)).size == (32, 32)

    # inpainting: the image's transparent pixels (LoadImage's MASK) are repainted, the others kept
    rgba = render(Attributes("square", "blue", "white", "large", "center")).convert("RGBA")
    alpha = Image.new("L", (32, 32), 255)
    alpha.paste(0, (0, 0, 16, 32))  # the left half transparent: repaint it
    rgba.putalpha(alpha)
    rgba.save(tmp_path / "hole.png")
    uploaded = client.upload_image(tmp_path / "hole.png")
    g = img2img(NAME, PROMPT, f"{uploaded['subfolder']}/{uploaded['name']}", denoise=1.0, steps=STEPS)
    g["11"] = {"class_type": "VAEEncodeForInpaint", "inputs": {"pixels": ["10", 0], "vae": ["4", 2],
                                                               "mask": ["10", 1], "grow_mask_by": 6}}
    [png] = client.queue_and_wait_images(ComfyWorkflowWrapper(titled(g)), "SaveImage").values()
    out = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    kept = np.asarray(rgba.convert("RGB")).astype(int)
    # the right quarter is beyond the grown mask and the paste-back's feathering: unchanged pixel for pixel
    assert np.array_equal(out[:, 26:], kept[:, 26:])
    assert np.abs(out[:, :12] - kept[:, :12]).mean() > 10  # the hole was repainted


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{name}"\r\n'
              f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for k, (name, data) in files.items()]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_uploads_image_and_mask_and_refuse_what_is_not_an_image(server):
    red = Image.new("RGB", (32, 32), "red")
    body, kind = multipart({"subfolder": "", "type": "input"}, {"image": ("red.png", png(red))})
    r = server.post("/upload/image", raw=body, headers={"Content-Type": kind})
    assert r.status == 200 and r.json() == {"name": "red.png", "subfolder": "", "type": "input"}
    mask = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 16, 32))  # the mask editor's paint: transparent where to repaint
    body, kind = multipart({"original_ref": json.dumps({"filename": "red.png", "subfolder": "", "type": "input"})},
                           {"image": ("red-mask.png", png(mask))})
    r = server.post("/api/upload/mask", raw=body, headers={"Content-Type": kind})
    assert r.status == 200 and r.json()["name"] == "red-mask.png"
    stored = view(server, {"filename": "red-mask.png", "subfolder": "", "type": "input"})
    assert stored.mode == "RGBA" and stored.getpixel((0, 0)) == (255, 0, 0, 0) and stored.getpixel((31, 0))[3] == 255
    body, kind = multipart({}, {"image": ("evil.png", b"not an image")})
    assert server.post("/upload/image", raw=body, headers={"Content-Type": kind}).status == 400
    body, kind = multipart({"subfolder": "../.."}, {"image": ("red.png", png(red))})
    assert server.post("/upload/image", raw=body, headers={"Content-Type": kind}).status == 400
    assert server.get("/view?filename=../../etc/passwd&type=input").status == 400
    assert server.get("/view?filename=nope.png&type=output").status == 404
