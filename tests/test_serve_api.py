"""`ldm-serve` over HTTP: a real server process on a loopback port with the bundled demo model, one for the module.

What A1111 clients rely on (field names, response shapes, the PNG's `parameters` chunk), images equal to
`ldm-generate`'s, every bad input answered with a one-line 4xx while the server keeps serving, basic auth, the
bounded queue, the interrupt and a client that hangs up mid-job.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from conftest import free_port
from ldm.demo import NAME
from ldm.demo.shapes import Attributes
from ldm.generate import main as generate_main
from serve_server import AUTH, ENV, MAX_PIXELS, ROOT, basic

pytestmark = pytest.mark.slow  # starts processes

README_PROMPT = "a large red circle in the center on a black background"
LONG = {"prompt": "a square", "steps": 1000, "seed": 1}  # ~1 min on a CPU: always still running when interrupted


@pytest.fixture
def server(serve_server):
    return serve_server  # tests/conftest.py: one process for this file and tests/test_serve_page.py


def decode_png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def wait_for(predicate, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def running(server) -> dict:
    p = server.get("/sdapi/v1/progress").json()
    return p if p["state"]["job_count"] == 1 and p["state"]["sampling_step"] >= 1 else None


def test_txt2img_equals_ldm_generate_and_carries_its_parameters(server, tmp_path, capsys, one_torch_thread):
    body = {"prompt": README_PROMPT, "negative_prompt": "blurry", "cfg_scale": 7.5, "seed": 0,
            "sampler_name": "Euler a", "restore_faces": False, "script_args": [], "alwayson_scripts": {}}  # A1111-only fields: ignored
    r = server.post("/sdapi/v1/txt2img", body)
    assert r.status == 200, r.body
    out = r.json()
    assert set(out) == {"images", "parameters", "info"}
    info = json.loads(out["info"])  # a JSON string, as A1111's
    assert info["seed"] == 0 and info["all_seeds"] == [0]
    images = [decode_png(b) for b in out["images"]]
    assert [im.info["parameters"] for im in images] == info["infotexts"]

    # the CLI in this process, on one thread as the server (the same float maths)
    generate_main([README_PROMPT, "--negative", "blurry", "--cfg", "7.5", "--seed", "0", "--outdir", str(tmp_path),
                   "--dtype", "fp32", "--quiet"])  # fp32, as the shared server (tests/serve_server.py)
    [path] = capsys.readouterr().out.split()
    cli_image = Image.open(path)
    assert np.array_equal(np.asarray(images[0]), np.asarray(cli_image))  # pixel for pixel
    assert images[0].info["parameters"] == cli_image.info["parameters"]
    assert images[0].info["parameters"] == (f"{README_PROMPT}\nNegative prompt: blurry\nSteps: 25, Sampler: Euler a, "
                                            f"CFG scale: 7.5, Seed: 0, Size: 32x32, Model: {NAME}")
    from ldm.demo.reader import read_attributes

    assert read_attributes(images[0]) == Attributes("circle", "red", "black", "large", "center")


def test_a1111_listing_endpoints(server):
    samplers = server.get("/sdapi/v1/samplers").json()
    assert {"name": "Euler a", "aliases": ["euler_a"], "options": {}} in samplers
    assert {"name": "DPM++ 2M Karras", "aliases": ["dpmpp_2m_karras"], "options": {"scheduler": "karras"}} in samplers
    assert {"name": "LCM", "aliases": ["lcm"], "options": {}} in samplers
    # A1111's GET /sdapi/v1/schedulers, its entries for the schedules we have
    assert server.get("/sdapi/v1/schedulers").json() == [
        {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1.0, "need_inner_model": False},
        {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False},
        {"name": "sgm_uniform", "label": "SGM Uniform", "aliases": ["SGMUniform"], "default_rho": -1.0,
         "need_inner_model": True}]
    models = server.get("/sdapi/v1/sd-models").json()
    assert all(set(m) == {"title", "model_name", "hash", "sha256", "filename", "config"} for m in models)
    assert [m["title"] for m in models] == [m["model_name"] for m in models] == [NAME, "shapes-copy", "shapes-file"]
    assert server.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == NAME
    assert server.post("/sdapi/v1/options", {"sd_model_checkpoint": NAME, "show_progressbar": False}).status == 200
    progress = server.get("/sdapi/v1/progress").json()
    assert set(progress) == {"progress", "eta_relative", "state", "current_image", "textinfo"}
    assert {"job_count", "sampling_step", "sampling_steps", "interrupted"} <= set(progress["state"])
    # a sampler named the A1111 way with its schedule in the separate field, as A1111 >= 1.9 sends it
    r = server.post("/sdapi/v1/txt2img", {"prompt": "a circle", "steps": 1, "seed": 3, "sampler_name": "DPM++ 2M",
                                          "scheduler": "Karras", "send_images": False, "batch_size": 2})
    assert r.status == 200 and r.json()["images"] == []
    info = json.loads(r.json()["info"])
    assert info["all_seeds"] == [3, 4] and "Sampler: DPM++ 2M, Schedule type: Karras" in info["infotexts"][1]
    # a few-step request as A1111 / ComfyUI users send one: LCM, SGM Uniform, cfg 1
    r = server.post("/sdapi/v1/txt2img", {"prompt": "a circle", "steps": 2, "seed": 3, "sampler_name": "LCM",
                                          "scheduler": "SGM Uniform", "cfg_scale": 1, "send_images": False})
    assert r.status == 200 and (r.json()["parameters"]["sampler_name"], r.json()["parameters"]["scheduler"]) == (
        "LCM", "SGM Uniform")
    assert "Sampler: LCM, Schedule type: SGM Uniform, CFG scale: 1," in json.loads(r.json()["info"])["infotexts"][0]


def test_switching_among_the_listed_models(server):
    body = {"prompt": "a circle", "steps": 1, "seed": 5, "send_images": True}
    model = lambda r: json.loads(r.json()["info"])["infotexts"][0].rsplit("Model: ", 1)[1]  # noqa: E731
    # for one request (A1111's override_settings): the next request is back on the selected model
    r = server.post("/sdapi/v1/txt2img", {**body, "override_settings": {"sd_model_checkpoint": "shapes-copy"}})
    assert r.status == 200 and model(r) == server.second_model  # the PNG names the --model value, as ldm-generate
    assert server.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == NAME
    assert model(server.post("/sdapi/v1/txt2img", body)) == NAME
    # for the server (POST /options), then back
    assert server.post("/sdapi/v1/options", {"sd_model_checkpoint": "shapes-copy"}).status == 200
    assert server.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "shapes-copy"
    assert model(server.post("/sdapi/v1/txt2img", body)) == server.second_model
    assert server.post("/sdapi/v1/options", {"sd_model_checkpoint": NAME}).status == 200
    assert model(server.post("/sdapi/v1/txt2img", body)) == NAME
    r = server.post("/sdapi/v1/options", {"sd_model_checkpoint": str(server.second_model)})  # a path is not a name
    assert r.status == 404 and "listed models: shapes-32px-demo, shapes-copy, shapes-file" in r.json()["detail"]


def test_a_single_file_checkpoint_in_models_dir_serves_the_same_images(server):
    """--models-dir lists `shapes-file.safetensors` (the demo model converted to one file) by its stem; a request
    on it gives the demo directory's pixels. Clip skip over its text encoder's layers: found in the job while the
    model was never loaded (the same one-line 422), refused before the queue once it was."""
    body = {"prompt": "a large red circle", "steps": 2, "seed": 7}
    on_file = {**body, "override_settings": {"sd_model_checkpoint": "shapes-file"}}
    too_deep = {**body, "override_settings": {"sd_model_checkpoint": "shapes-file", "CLIP_stop_at_last_layers": 99}}
    details = []
    for _ in range(2):  # the first loads the file in the worker, whose text encoder refuses; the second never queues
        r = server.post("/sdapi/v1/txt2img", too_deep)
        assert r.status == 422 and r.json()["error"] == "UserError" and "\n" not in r.json()["detail"], r.body
        details.append(r.json()["detail"])
    assert details[0].startswith("clip skip 99 is out of range: this text encoder allows 1.."), details
    assert details[1].startswith("clip skip 99 is out of range: model 'shapes-file' allows 1.."), details
    r = server.post("/sdapi/v1/txt2img", on_file)
    assert r.status == 200, r.body
    assert json.loads(r.json()["info"])["infotexts"][0].endswith(f"Model: {server.file_model}")
    plain = server.post("/sdapi/v1/txt2img", body).json()  # back on the demo directory
    assert np.array_equal(np.asarray(decode_png(r.json()["images"][0])), np.asarray(decode_png(plain["images"][0])))


def test_img2img_and_inpainting_keep_the_unmasked_pixels(server):
    init = Image.new("RGB", (32, 32), (255, 255, 255))
    init.paste((0, 0, 255), (8, 8, 24, 24))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))  # repaint the left half
    b64 = lambda im: base64.b64encode(_png(im)).decode()  # noqa: E731
    r = server.post("/sdapi/v1/img2img", {"prompt": "a red square", "init_images": ["data:image/png;base64," + b64(init)],
                                          "denoising_strength": 0.6, "steps": 5, "seed": 2})
    assert r.status == 200, r.body
    assert "Denoising strength: 0.6" in decode_png(r.json()["images"][0]).info["parameters"]
    assert r.json()["parameters"]["init_images"] is None  # not echoed back unless include_init_images
    for invert, kept in ((0, np.s_[:, 16:]), (1, np.s_[:, :16])):
        r = server.post("/sdapi/v1/img2img", {"prompt": "a red square", "init_images": [b64(init)], "mask": b64(mask),
                                              "inpainting_mask_invert": invert, "steps": 5, "seed": 2})
        assert r.status == 200, r.body
        out = np.asarray(decode_png(r.json()["images"][0]))
        assert np.array_equal(out[kept], np.asarray(init)[kept])  # outside the mask: the init image, bit for bit
        assert not np.array_equal(out, np.asarray(init))
        assert "Mask blur: 4" in decode_png(r.json()["images"][0]).info["parameters"]


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_bad_input_gets_a_one_line_4xx_and_the_server_goes_on(server):
    bomb = base64.b64encode(_png(Image.new("L", (3000, 3000)))).decode()  # 30 KB of PNG, 9 Mpx decoded
    cases = [
        ("txt2img", b'{"prompt": "a cir', 422, "not valid JSON"),
        ("txt2img", {"steps": "many"}, 422, 'steps: Input should be a valid integer'),
        ("txt2img", {"prompt": ["a", "list"]}, 422, "prompt: Input should be a valid string"),
        ("txt2img", [1, 2], 422, "valid dictionary"),
        ("img2img", {"init_images": ["aGVsbG8="]}, 422, "init_images[0] is base64 but not an image"),
        ("img2img", {"init_images": ["%%% not base64"]}, 422, "init_images[0] is not valid base64"),
        ("img2img", {"init_images": [bomb]}, 422, "init_images[0] is 3000x3000, over the limit"),
        ("img2img", {"init_images": []}, 422, "init_images is empty"),
        ("txt2img", {"width": 100000}, 422, "width 100000 is out of range"),
        ("txt2img", {"width": 128, "height": 128}, 422, f"over this server's limit of {MAX_PIXELS} pixels"),
        ("txt2img", {"width": 31}, 422, "not a multiple of 2"),
        ("txt2img", {"steps": -3}, 422, "steps must be at least 1, got -3"),
        ("txt2img", {"steps": 1001}, 422, "exceeds the model's 1000 training timesteps"),
        ("txt2img", {"sampler_name": "Euler z"}, 422, "unknown sampler 'Euler z'; known samplers: DDIM, DDPM, Euler"),
        ("txt2img", {"n_iter": 0}, 422, "n_iter must be at least 1, got 0"),
        ("txt2img", {"scheduler": "Polyexponential"}, 422, "unknown scheduler 'Polyexponential'; known schedulers: "
         "Automatic, Karras, SGM Uniform (GET /sdapi/v1/schedulers)"),
        ("txt2img", {"sampler_name": "LCM", "scheduler": "Karras"}, 422, "sampler 'lcm' takes no Karras schedule"),
        ("txt2img", {"batch_size": 2, "n_iter": 3}, 422, "6 images is over this server's limit of 4"),
        ("txt2img", {"override_settings": {"sd_model_checkpoint": "/etc/passwd"}}, 404, "not found; listed models"),
        ("txt2img", {"prompt": "a (red:abc) circle"}, 422, "prompt: '(red:abc)' is not a weight"),
        ("txt2img", {"negative_prompt": "BREAK blurry"}, 422, "negative prompt has an empty chunk"),
        ("txt2img", {"prompt": "a circle <lora:ink:1>"}, 422, "the prompt names LoRA 'ink' (<lora:ink:1>): pass "
         "--lora-dir"),
        ("txt2img", {"override_settings": {"CLIP_stop_at_last_layers": 0}}, 422, "CLIP_stop_at_last_layers must be"),
    ]
    for endpoint, body, status, message in cases:
        raw = body if isinstance(body, bytes) else None
        r = server.post(f"/sdapi/v1/{endpoint}", None if raw else body, raw=raw)
        assert r.status == status, (body if len(str(body)) < 200 else endpoint, r.body[:300])
        error = r.json()
        assert set(error) == {"error", "detail"} and "\n" not in error["detail"]
        assert message in error["detail"], error
    # too large a body: refused from its Content-Length before it is read, or while a chunked one is read
    too_big = b"x" * (2**20 + 1)
    for head, part in ((f"Content-Length: {len(too_big)}", b"{"),
                       ("Transfer-Encoding: chunked", f"{len(too_big):x}\r\n".encode() + too_big + b"\r\n")):
        status, error = raw_post(server, head, part)
        assert status == 413 and error["detail"].startswith("the request body is over this server's limit of 1048576")
    r = server.post("/sdapi/v1/txt2img", {"prompt": "a circle", "steps": 1, "seed": 1})
    assert r.status == 200 and len(r.json()["images"]) == 1


def test_clip_skip_is_a1111s_option_for_one_request_or_for_the_server(server):
    """`CLIP_stop_at_last_layers` (A1111's "Clip skip") in a request's override_settings, or set by POST /options."""
    body = {"prompt": "a large red circle", "steps": 2, "seed": 3}
    plain = server.post("/sdapi/v1/txt2img", body).json()
    once = server.post("/sdapi/v1/txt2img", {**body, "override_settings": {"CLIP_stop_at_last_layers": 2}}).json()
    assert "Clip skip" not in json.loads(plain["info"])["infotexts"][0], plain["info"]
    assert ", Clip skip: 2" in json.loads(once["info"])["infotexts"][0], once["info"]
    assert once["images"] != plain["images"]
    assert server.post("/sdapi/v1/options", {"CLIP_stop_at_last_layers": 2}).status == 200
    try:
        assert server.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2
        assert server.post("/sdapi/v1/txt2img", body).json()["images"] == once["images"]
    finally:
        assert server.post("/sdapi/v1/options", {"CLIP_stop_at_last_layers": 1}).status == 200


def raw_post(server, head: str, body: bytes) -> tuple[int, dict]:
    """A POST written by hand (a client that is still sending when the server answers); -> (status, JSON body)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(f"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Authorization: {AUTH['Authorization']}\r\n{head}\r\n\r\n".encode() + body)
        reply = http.client.HTTPResponse(sock)
        reply.begin()
        return reply.status, json.loads(reply.read())


def test_every_path_needs_the_credentials(server):
    for path in ("/sdapi/v1/progress", "/sdapi/v1/samplers", "/", "/static/app.js", "/openapi.json"):
        for headers in ({"Authorization": ""}, basic("alice", "wrong"), basic("mallory", "pw2"),
                        {"Authorization": "Basic !!!"}, {"Authorization": "Bearer x"}):
            r = server.get(path, headers=headers)
            assert r.status == 401, (path, headers)
            assert r.headers["www-authenticate"].startswith("Basic")
            assert r.json() == {"error": "HTTPException", "detail": "Incorrect username or password"}
    assert server.post("/sdapi/v1/txt2img", {"steps": 1}, headers={"Authorization": ""}).status == 401
    assert server.get("/sdapi/v1/progress", headers=basic("bob", "pw2")).status == 200  # the second user


def test_full_queue_gets_429_and_interrupt_stops_the_job_at_the_next_step(server):
    results: dict[str, object] = {}

    def post(key: str, body: dict) -> None:
        results[key] = server.post("/sdapi/v1/txt2img", body)

    first = threading.Thread(target=post, args=("first", LONG))
    first.start()
    wait_for(lambda: running(server), what="the first job to start")
    second = threading.Thread(target=post, args=("second", {"prompt": "a circle", "steps": 2, "seed": 4}))
    second.start()
    wait_for(lambda: server.get("/sdapi/v1/progress").json()["state"]["queued"] == 1, what="the second job to queue")
    r = server.post("/sdapi/v1/txt2img", {"prompt": "a third", "steps": 1})  # queue size 1: no room
    assert r.status == 429 and r.json()["error"] == "QueueFull" and "queue is full" in r.json()["detail"]

    step_before = server.get("/sdapi/v1/progress").json()["state"]["sampling_step"]
    start = time.monotonic()
    assert server.post("/sdapi/v1/interrupt").status == 200
    first.join(timeout=60)
    took = time.monotonic() - start
    out = results["first"]
    assert out.status == 200, out.body
    info = json.loads(out.json()["info"])
    assert info["interrupted"] and out.json()["images"] == []
    assert took < 10  # one demo-model step is ~0.1 s: the job stopped at once, not after its 1000 steps
    assert step_before < 1000
    second.join(timeout=60)
    assert results["second"].status == 200 and len(results["second"].json()["images"]) == 1  # queued jobs still run


def test_a_client_that_hangs_up_frees_the_worker(server):
    body = json.dumps(LONG).encode()
    auth = AUTH["Authorization"]
    for _ in range(2):
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: {auth}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_for(lambda: running(server), what="the job to start")
        sock.close()
        # the server notices within its poll interval and the job stops at its next step
        wait_for(lambda: server.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0, timeout=10,
                 what="the abandoned job to stop")
    r = server.post("/sdapi/v1/txt2img", {"prompt": "a circle", "steps": 1, "seed": 1})
    assert r.status == 200 and server.proc.poll() is None


def test_listen_warns_without_auth_and_a_busy_port_is_one_line(capsys):
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "ldm.serve", "--listen", "--port", str(port)], cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "listening on 0.0.0.0 without --api-auth" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: cannot listen on 0.0.0.0:{port}")
    from ldm.serve.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--api-auth", "alice", "--port", str(free_port())])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: --api-auth 'alice' is not user:password (several: user:pass,user2:pass2)\n"


def test_binds_loopback_by_default(server):
    assert f"http://127.0.0.1:{server.port}/" in server.output()
    with socket.socket() as s:  # the port is taken on 127.0.0.1 only: another address can still bind it
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.2", server.port))
