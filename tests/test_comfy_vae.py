"""ComfyUI's VAELoader on `ldm-serve`: --vae-dir's VAEs by name (never a path), put on the model per request by
`Pipeline.use_vae` and taken off again for a request that names none; a VAE of another latent space refused in one
line. The app in-process on the bundled demo model; its VAE copied, with a brighter decoder, as the VAE to load."""

from __future__ import annotations

import http.client
import io
import json
import shutil
import time

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file, save_file

from comfy_graphs import img2img, txt2img, with_vae_loader
from ldm.demo import NAME
from ldm.demo import MODEL_DIR as DEMO_DIR
from ldm.errors import UserError
from ldm.serve.comfy.graph import validate
from ldm.serve.comfy.nodes import Catalog, node_types
from ldm.serve.comfy.plan import GraphError, plan

PROMPT = "a large red circle in the center"
SETTINGS = dict(seed=3, steps=2, cfg=7.0, size=32, sampler="euler_ancestral")  # ldm-generate's euler_a, below
TYPES = node_types(Catalog(checkpoints=[NAME], vaes=["bright", "bright.safetensors"], images=["in.png"]))


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """bright/: the demo's VAE with +0.3 on the decoder's output bias (other images, same latent space);
    wide/: its config claiming 8 latent channels (refused from the config alone, never loaded); eight.safetensors: a
    random VAE of the demo's shape with 8 latent channels, in one file (its latents known only once loaded)."""
    root = tmp_path_factory.mktemp("vae")
    shutil.copytree(DEMO_DIR / "vae", root / "bright")
    weights = root / "bright" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["decoder.conv_out.bias"] = state["decoder.conv_out.bias"] + 0.3
    save_file(state, weights)
    shutil.copytree(DEMO_DIR / "vae", root / "wide")
    config = json.loads((root / "wide" / "config.json").read_text())
    (root / "wide" / "config.json").write_text(json.dumps({**config, "latent_channels": 8}))
    (root / "notes.txt").write_text("not a VAE: not listed")
    torch.manual_seed(0)
    eight = AutoencoderKL(**{k: v for k, v in config.items() if not k.startswith("_")} | {"latent_channels": 8})
    save_file({k: v.contiguous() for k, v in eight.state_dict().items()}, root / "eight.safetensors")
    return root


def test_vae_loader_becomes_the_requests_vae(tmp_path):
    [run] = plan(with_vae_loader(txt2img(NAME, PROMPT, **SETTINGS), "bright"), ["9"], tmp_path, 1 << 20)
    assert run.layer["vae"] == "bright" and run.vae_node == "20" and run.nodes.index("20") < run.nodes.index("8")
    [run] = plan(txt2img(NAME, PROMPT, **SETTINGS), ["9"], tmp_path, 1 << 20)
    assert "vae" not in run.layer and run.vae_node == ""


def test_encode_and_decode_must_share_the_vae(tmp_path):
    Image.new("RGB", (32, 32), "white").save(tmp_path / "in.png")
    g = with_vae_loader(img2img(NAME, PROMPT, "in.png", **SETTINGS), "bright")  # VAEEncode keeps the checkpoint's
    assert validate(g, TYPES).error is None
    with pytest.raises(GraphError, match="one VAE per image") as e:
        plan(g, ["9"], tmp_path, 1 << 20)
    assert e.value.node_id == "11" and e.value.input_name == "vae"
    g["11"]["inputs"]["vae"] = ["20", 0]  # both from the VAELoader: one request
    [run] = plan(g, ["9"], tmp_path, 1 << 20)
    assert run.layer["vae"] == "bright" and run.layer["init_image"].size == (32, 32)


@pytest.mark.parametrize("name", ["/tmp/bright", "../vae/bright", "bright/",
                                  "bright/diffusion_pytorch_model.safetensors"])
def test_a_path_as_vae_name_is_not_in_the_list(name):
    checked = validate(with_vae_loader(txt2img(NAME, PROMPT, **SETTINGS), name), TYPES)
    [e] = checked.node_errors["20"]["errors"]
    assert e["type"] == "value_not_in_list" and e["extra_info"]["received_value"] == name


def test_vae_dir_lists_files_and_directories_by_name(vae_dir, tmp_path):
    from ldm.serve.models import list_vaes

    vaes = list_vaes(str(vae_dir))
    assert list(vaes) == ["bright", "eight.safetensors", "wide"] and vaes["bright"].path == str(vae_dir / "bright")
    assert vaes["wide"].config["latent_channels"] == 8 and vaes["eight.safetensors"].config is None
    with pytest.raises(UserError, match=r"^--vae-dir '.*' holds no VAE \(a diffusers VAE directory"):
        list_vaes(str(tmp_path))
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 3)  # a truncated file fails at start-up, named
    with pytest.raises(UserError, match="broken.safetensors"):
        list_vaes(str(tmp_path))


@pytest.mark.slow  # opens the demo model twice, runs it four times (~6 s on one core)
@pytest.mark.usefixtures("one_torch_thread")
def test_vae_loader_over_http_switches_the_vae_per_request(vae_dir):
    """A graph with VAELoader('bright') gives the image that the demo model opened with --vae bright gives
    (ldm-generate's path: the spec's VAE, loaded at open); the next graph, without one, gives the model's own image
    again, equal to a run before any switch; 'wide' (8 latent channels) is a 422 node error on the VAELoader in one
    line, before it is queued; a path is ComfyUI's value_not_in_list."""
    from test_serve_worker import app_server_for

    from ldm.models.spec import inspect_model
    from ldm.pipeline import Pipeline
    from ldm.serve.api import Limits
    from ldm.serve.app import create_app
    from ldm.serve.models import list_vaes
    from ldm.serve.worker import Worker

    spec = inspect_model(NAME)
    kw = dict(seed=3, steps=2, cfg=7.0, sampler="euler_a", show_progress=False)
    pipe = Pipeline.open(spec, "cpu", "fp32")
    own = np.asarray(pipe(PROMPT, **kw).images[0])
    bright_cli = np.asarray(Pipeline.open(inspect_model(NAME, vae=str(vae_dir / "bright")), "cpu", "fp32")(
        PROMPT, **kw).images[0])
    assert np.abs(bright_cli.astype(int) - own).max() > 10  # the VAE changes the image: the test can fail

    worker = Worker(lambda name: pipe, NAME, queue_size=2)
    worker.start()
    try:
        app = create_app({NAME: spec}, worker, Limits(), vaes=list_vaes(str(vae_dir)))
        with app_server_for(app) as port:
            status, info = call(port, "GET", "/object_info/VAELoader")
            assert info["VAELoader"]["input"]["required"] == {"vae_name": [["bright", "eight.safetensors", "wide"]]}
            assert info["VAELoader"]["output"] == ["VAE"]

            graph = with_vae_loader(txt2img(NAME, PROMPT, **SETTINGS), "bright")
            np.testing.assert_array_equal(served(port, graph), bright_cli)
            assert pipe.vae_name == "bright"
            # a file's latents are known once it is loaded: the job fails in the VAELoader, one line
            status, answer = call(port, "POST", "/prompt", {
                "prompt": with_vae_loader(txt2img(NAME, PROMPT, **SETTINGS), "eight.safetensors")})
            assert status == 200, answer
            entry = finished(port, answer["prompt_id"])
            [[event, error]] = [m for m in entry["status"]["messages"] if m[0] == "execution_error"]
            assert error["node_id"] == "20" and error["node_type"] == "VAELoader"
            assert error["exception_message"].startswith("VAE 'eight.safetensors' does not fit this model: its "
                                                         "latents are 8 channels at 1/2 size")
            assert pipe.vae_name == "bright"  # the VAE on the model is left as it was
            np.testing.assert_array_equal(served(port, txt2img(NAME, PROMPT, **SETTINGS)), own)
            assert pipe.vae_name == "" and pipe.vae is pipe.opened_vae[0]

            wide = with_vae_loader(txt2img(NAME, PROMPT, **SETTINGS), "wide")
            status, answer = call(port, "POST", "/prompt", {"prompt": wide})
            assert status == 422, answer
            [e] = answer["node_errors"]["20"]["errors"]
            assert e["message"] == (
                "VAE 'wide' does not fit this model: its latents are 8 channels at 1/2 size, scaling factor "
                "0.266376, the model's are 4 channels at 1/2 size, scaling factor 0.266376; pick a VAE made for this "
                "model's family")
            status, answer = call(port, "POST", "/prompt", {"prompt": with_vae_loader(
                txt2img(NAME, PROMPT, **SETTINGS), str(vae_dir / "bright"))})
            assert status == 400 and answer["node_errors"]["20"]["errors"][0]["type"] == "value_not_in_list"
    finally:
        worker.stop()
    with pytest.raises(UserError, match=r"^the request names the VAE 'bright' but the pipeline has its own on: "):
        pipe(PROMPT, vae="bright", **kw)  # a request runs only on the VAE it names


def call(port: int, method: str, path: str, body=None) -> tuple[int, dict | bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        return r.status, json.loads(data) if r.getheader("content-type") == "application/json" else data
    finally:
        conn.close()


def finished(port: int, prompt_id: str) -> dict:
    """The prompt's history entry, once it has one."""
    deadline = time.monotonic() + 60
    while True:
        status, history = call(port, "GET", f"/history/{prompt_id}")
        if prompt_id in history:
            return history[prompt_id]
        assert time.monotonic() < deadline, "the prompt did not finish"
        time.sleep(0.05)


def served(port: int, graph: dict) -> np.ndarray:
    """POST /prompt, wait for its history entry, and GET /view its one image."""
    status, answer = call(port, "POST", "/prompt", {"prompt": graph})
    assert status == 200, answer
    entry = finished(port, answer["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    [image] = entry["outputs"]["9"]["images"]
    status, data = call(port, "GET", f"/view?filename={image['filename']}&subfolder={image['subfolder']}"
                        f"&type={image['type']}")
    assert status == 200
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
