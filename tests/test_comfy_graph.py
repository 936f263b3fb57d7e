"""ComfyUI graphs checked whole before they are queued, answered in ComfyUI's error shapes (ldm/serve/comfy/graph.py).

The shapes are ComfyUI's `execution.validate_prompt` (comfyanonymous/ComfyUI execution.py): `error` with type,
message, details, extra_info and `node_errors` {id: {errors, dependent_outputs, class_type}}.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_graphs import img2img, txt2img
from ldm.demo import NAME
from ldm.pipeline.metadata import format_parameters, parse_parameters
from ldm.pipeline.request import GenerationRequest
from ldm.pipeline.validation import steps_to_run
from ldm.serve.comfy.graph import MAX_NODES, validate
from ldm.serve.comfy.nodes import Catalog, node_types, object_info
from ldm.serve.comfy.plan import GraphError, plan

TYPES = node_types(Catalog(checkpoints=["shapes-32px-demo"], loras=["style.safetensors"],
                           images=["in.png", "mask.png", "../../etc/passwd"]))


@pytest.fixture(scope="module")
def demo_pipeline(one_torch_thread):
    from ldm.models.spec import inspect_model
    from ldm.pipeline import Pipeline

    return Pipeline.open(inspect_model(NAME), "cpu", "fp32")


def graph():
    return txt2img("shapes-32px-demo", "a red circle", size=32, steps=2)


def only_error(checked, node_id):
    """The one node error of `node_id`, after checking the body's shape."""
    assert checked.error["type"] == "prompt_outputs_failed_validation"
    assert set(checked.error) == {"type", "message", "details", "extra_info"}
    entry = checked.node_errors[node_id]
    assert set(entry) == {"errors", "dependent_outputs", "class_type"}
    assert entry["dependent_outputs"] == ["9"]
    assert len(entry["errors"]) == 1
    return entry["errors"][0]


def test_the_default_graph_is_valid():
    checked = validate(graph(), TYPES)
    assert checked.error is None and checked.node_errors == {} and checked.good_outputs == ["9"]


def test_unknown_node_is_comfyuis_invalid_prompt_and_names_the_node():
    g = graph()
    g["5"]["class_type"] = "UltimateSDUpscale"
    checked = validate(g, TYPES)
    assert checked.error == {"type": "invalid_prompt", "details": "Node ID '#5'", "extra_info": {},
                             "message": "Cannot execute because node UltimateSDUpscale does not exist."}
    assert checked.node_errors["5"]["class_type"] == "UltimateSDUpscale"


def test_missing_class_type_and_empty_prompt():
    g = graph()
    del g["5"]["class_type"]
    assert validate(g, TYPES).error["message"] == "Cannot execute because a node is missing the class_type property."
    assert validate({}, TYPES).error["type"] == "no_prompt"
    assert validate("not a graph", TYPES).error["type"] == "no_prompt"


def test_no_output_node():
    g = graph()
    del g["9"]
    assert validate(g, TYPES).error == {"type": "prompt_no_outputs", "message": "Prompt has no outputs",
                                        "details": "", "extra_info": {}}


def test_wrong_widget_type():
    g = graph()
    g["3"]["inputs"]["steps"] = "many"
    e = only_error(validate(g, TYPES), "3")
    assert e["type"] == "invalid_input_type"
    assert e["message"] == "Failed to convert an input value to a INT value"
    assert e["details"].startswith("steps, many, ")
    assert e["extra_info"]["input_name"] == "steps"


def test_wrong_link_type():
    g = graph()
    g["3"]["inputs"]["positive"] = ["5", 0]  # a LATENT where CONDITIONING goes
    e = only_error(validate(g, TYPES), "3")
    assert (e["type"], e["details"]) == ("return_type_mismatch", "positive, LATENT != CONDITIONING")


def test_dangling_link_and_missing_slot():
    g = graph()
    g["8"]["inputs"]["samples"] = ["42", 0]
    e = only_error(validate(g, TYPES), "8")
    assert e["type"] == "bad_linked_input" and "node '42' is not in the prompt" in e["message"]
    g = graph()
    g["8"]["inputs"]["vae"] = ["4", 7]
    e = only_error(validate(g, TYPES), "8")
    assert e["type"] == "bad_linked_input" and "has no output slot 7" in e["message"]


def test_missing_input():
    g = graph()
    del g["3"]["inputs"]["seed"]
    e = only_error(validate(g, TYPES), "3")
    assert e == {"type": "required_input_missing", "message": "Required input is missing", "details": "seed",
                 "extra_info": {"input_name": "seed"}}


def test_out_of_range_and_not_in_list():
    g = graph()
    g["3"]["inputs"]["denoise"] = 1.5
    assert only_error(validate(g, TYPES), "3")["type"] == "value_bigger_than_max"
    g = graph()
    g["3"]["inputs"]["sampler_name"] = "dpmpp_3m_sde_gpu"  # ComfyUI's, not ours
    e = only_error(validate(g, TYPES), "3")
    assert e["type"] == "value_not_in_list" and e["details"].startswith("sampler_name: 'dpmpp_3m_sde_gpu' not in")


@pytest.mark.parametrize("name", ["/etc/passwd", "../models/x.safetensors", "models/shapes-32px-demo",
                                  "shapes-32px-demo/../../x"])
def test_a_path_as_model_name_is_not_in_the_list(name):
    g = graph()
    g["4"]["inputs"]["ckpt_name"] = name
    e = only_error(validate(g, TYPES), "4")
    assert e["type"] == "value_not_in_list" and e["extra_info"]["received_value"] == name


def test_cycle_is_found_without_recursion():
    g = graph()
    g["6"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["13", 0], "stop_at_clip_layer": -1}}
    g["13"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["6", 0], "stop_at_clip_layer": -1}}
    g["7"]["inputs"]["clip"] = ["6", 0]
    g["3"]["inputs"]["positive"] = ["7", 0]
    checked = validate(g, TYPES)
    assert checked.error["type"] == "prompt_outputs_failed_validation"
    assert {n for n, e in checked.node_errors.items() if e["errors"][0]["type"] == "dependency_cycle"} == {"6", "13"}
    # a long chain (deeper than Python's recursion limit) that closes on itself
    n = 990
    g = graph()
    for i in range(n):
        g[f"c{i}"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": [f"c{(i + 1) % n}", 0],
                                                                   "stop_at_clip_layer": -1}}
    g["6"]["inputs"]["clip"] = ["c0", 0]
    checked = validate(g, TYPES)
    assert len([e for e in checked.node_errors.values() if e["errors"][0]["type"] == "dependency_cycle"]) == n


def test_ten_thousand_nodes_refused_cheaply():
    g = graph()
    for i in range(10_000):
        g[f"x{i}"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    start = time.perf_counter()
    checked = validate(g, TYPES)
    assert time.perf_counter() - start < 0.5  # the count is checked before any node is (~1 ms)
    assert checked.error["type"] == "invalid_prompt" and str(MAX_NODES) in checked.error["message"]


def test_a_good_output_runs_beside_a_failed_one():
    g = graph()
    g["20"] = {"class_type": "PreviewImage", "inputs": {"images": ["21", 0]}}
    g["21"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0]}}  # no vae
    checked = validate(g, TYPES)
    assert checked.error is None and checked.good_outputs == ["9"]
    assert checked.node_errors["21"]["dependent_outputs"] == ["20"]


def test_object_info_describes_the_table():
    info = object_info(TYPES)
    assert set(info) == set(TYPES)
    k = info["KSampler"]
    assert k["input"]["required"]["seed"] == ["INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "step": 1}]
    assert k["input"]["required"]["model"] == ["MODEL"]
    assert k["input"]["required"]["sampler_name"][0][:2] == ["euler", "euler_ancestral"]
    assert k["output"] == ["LATENT"] and k["output_node"] is False
    assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"] == [["shapes-32px-demo"]]
    assert info["SaveImage"]["output_node"] is True


# ------------------------------------------------------------------------------------------- graph -> request

def planned(g, input_dir=None):
    checked = validate(g, TYPES)
    assert checked.error is None, checked.body()
    return plan(g, checked.good_outputs, input_dir or Path("/nonexistent"), 4096)


def test_the_default_graph_becomes_one_request():
    [run] = planned(txt2img("shapes-32px-demo", "a red circle", "blurry", seed=7, steps=3, cfg=6.5, size=32,
                            batch=2, sampler="dpmpp_2m", scheduler="karras"))
    assert (run.output, run.kind, run.prefix, run.model, run.sampler) == ("9", "output", "ComfyUI",
                                                                          "shapes-32px-demo", "3")
    assert run.layer == {"noise": "comfy", "cfg": 6.5, "model": "shapes-32px-demo", "prompt": "a red circle",
                         "negative_prompt": "blurry", "clip_skip": 1, "sampler": "dpmpp_2m", "schedule": "karras",
                         "seed": 7, "steps": 3, "width": 32, "height": 32, "num_images": 2, "batch_size": 2}
    assert run.nodes == ["5", "4", "7", "6", "3", "8", "9"]  # ComfyUI's depth-first order through the inputs


def test_lora_and_clip_skip_become_tags_and_clip_skip():
    g = txt2img("shapes-32px-demo", "a red circle", size=32)
    g["10"] = {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1],
                                                     "lora_name": "style.safetensors", "strength_model": 0.8,
                                                     "strength_clip": 0.5}}
    g["11"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["10", 1], "stop_at_clip_layer": -2}}
    g["3"]["inputs"]["model"] = ["10", 0]
    g["6"]["inputs"]["clip"] = g["7"]["inputs"]["clip"] = ["11", 0]
    [run] = planned(g)
    assert run.layer["prompt"] == "a red circle <lora:style:0.5:0.8>"  # A1111's <lora:name:te:unet>
    assert run.layer["clip_skip"] == 2


@pytest.mark.parametrize("steps,denoise,total", [(20, 0.5, 40), (7, 0.3, 23), (10, 1.0, 10), (3, 0.99, 3)])
def test_denoise_runs_the_last_steps_of_a_longer_schedule(tmp_path, steps, denoise, total):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "in.png")
    g = img2img("shapes-32px-demo", "a red circle", "in.png", denoise=denoise, steps=steps)
    [run] = planned(g, tmp_path)
    assert run.layer["steps"] == total  # ComfyUI: int(steps / denoise)
    assert steps_to_run(total, run.layer["strength"]) == steps  # and exactly `steps` of them run
    assert run.layer["init_image"].size == (32, 32) and "width" not in run.layer


def test_inpainting_mask_from_a_mask_image(tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "in.png")
    m = Image.new("RGB", (32, 32), "black")
    m.paste((255, 255, 255), (8, 8, 16, 16))
    m.save(tmp_path / "mask.png")
    [run] = planned(img2img("shapes-32px-demo", "a circle", "in.png", denoise=1.0, mask="mask.png"), tmp_path)
    assert run.layer["strength"] == 1.0
    assert np.array_equal(np.asarray(run.layer["mask"]) > 127, np.asarray(m.convert("L")) > 127)


def test_unsupported_shapes_are_node_errors(tmp_path):
    g = txt2img("shapes-32px-demo", "a red circle", size=32)
    g["3"]["inputs"]["denoise"] = 0.5  # an empty latent half-denoised
    with pytest.raises(GraphError, match="needs an image's latent"):
        planned(g)
    g = img2img("shapes-32px-demo", "a circle", "../../etc/passwd", denoise=0.5)
    with pytest.raises(GraphError, match="not an uploaded image"):
        plan(g, ["9"], tmp_path, 4096)  # (validation would refuse the name first; the plan checks again)


@pytest.mark.slow  # runs the demo model (~5 s on a shared core)
def test_comfy_noise_is_torch_manual_seed_for_the_whole_batch(demo_pipeline, monkeypatch):
    """The initial latents are exactly ComfyUI's prepare_noise: torch.manual_seed(seed); torch.randn(batch shape)
    on the CPU, times the scheduler's initial sigma (where diffusers' Euler starts)."""
    import ldm.pipeline.pipeline as pipeline_module

    seen = []
    real = pipeline_module.denoise

    def spy(unet, scheduler, latents, *args, **kw):
        seen.append((latents.clone(), float(scheduler.init_noise_sigma)))
        return real(unet, scheduler, latents, *args, **kw)

    monkeypatch.setattr(pipeline_module, "denoise", spy)
    [run] = planned(txt2img(NAME, "a red circle", seed=1234, steps=1, size=32, batch=3))
    demo_pipeline.generate(GenerationRequest.layered(run.layer), show_progress=False)
    latents, sigma = seen[0]
    f = demo_pipeline.vae_factor
    assert latents.shape == (3, demo_pipeline.vae.config.latent_channels, 32 // f, 32 // f)
    torch.manual_seed(1234)  # ComfyUI's call, on the global generator
    expected = torch.randn(latents.shape)
    assert torch.equal(latents, expected * sigma)


@pytest.mark.slow  # runs the demo model twice
def test_comfy_image_equals_ldm_generate(demo_pipeline):
    """One image: ComfyUI's noise for a batch of one is ldm-generate's for that seed (the request `ldm-generate
    --seed 3 --steps 2 --cfg 7 --sampler euler_a --negative blurry` builds), so the pixels are equal."""
    [run] = planned(txt2img(NAME, "a large red circle in the center", "blurry", seed=3, steps=2, cfg=7.0,
                            size=32, sampler="euler_ancestral"))
    comfy = demo_pipeline.generate(GenerationRequest.layered(run.layer), show_progress=False)
    cli = demo_pipeline.generate(GenerationRequest(prompt="a large red circle in the center", negative_prompt="blurry",
                                                   cfg=7.0, seed=3, steps=2, sampler="euler_a"), show_progress=False)
    assert np.array_equal(np.asarray(comfy.images[0]), np.asarray(cli.images[0]))  # pixel for pixel
    assert format_parameters(comfy.params[0]) == format_parameters(cli.params[0]).replace("Seed: 3,",
                                                                                          "Seed: 3, Noise: comfy,")
    assert parse_parameters(format_parameters(comfy.params[0]))["noise"] == "comfy"


def controlnet_graph(tmp_path):
    Image.new("RGB", (32, 32), "white").save(tmp_path / "in.png")
    g = txt2img("shapes-32px-demo", "a red circle", size=32)
    g["20"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "cn-a"}}
    g["21"] = {"class_type": "LoadImage", "inputs": {"image": "in.png"}}
    g["22"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": ["6", 0], "negative": ["7", 0], "control_net": ["20", 0], "image": ["21", 0], "strength": 0.7,
        "start_percent": 0.1, "end_percent": 0.9}}
    g["3"]["inputs"].update(positive=["22", 0], negative=["22", 1])
    return g


def test_controlnet_apply_becomes_a_unit(tmp_path):
    types = node_types(Catalog(checkpoints=["shapes-32px-demo"], controlnets=["cn-a"], images=["in.png"]))
    g = controlnet_graph(tmp_path)
    checked = validate(g, types)
    assert checked.error is None, checked.body()
    [run] = plan(g, checked.good_outputs, tmp_path, 4096)
    [unit] = run.layer["controlnets"]
    assert (unit.model, unit.weight, unit.start, unit.end, unit.preprocess) == ("cn-a", 0.7, 0.1, 0.9, "none")
    assert unit.image.size == (32, 32)
    assert (run.layer["prompt"], run.layer["negative_prompt"]) == ("a red circle", "")
    g["3"]["inputs"]["negative"] = ["7", 0]  # the ControlNet on one branch only
    with pytest.raises(GraphError, match="same ControlNetApplyAdvanced"):
        plan(g, ["9"], tmp_path, 4096)
    g = controlnet_graph(tmp_path)
    g["20"]["inputs"]["control_net_name"] = "../cn-a"
    assert only_error(validate(g, types), "20")["type"] == "value_not_in_list"


def hires_graph(by: bool = True):
    g = txt2img("shapes-32px-demo", "a red circle", seed=5, steps=6, size=32)
    g["30"] = ({"class_type": "LatentUpscaleBy", "inputs": {"samples": ["3", 0], "upscale_method": "bilinear",
                                                            "scale_by": 1.5}} if by else
               {"class_type": "LatentUpscale", "inputs": {"samples": ["3", 0], "upscale_method": "bilinear",
                                                          "width": 48, "height": 48, "crop": "disabled"}})
    g["31"] = {"class_type": "KSampler", "inputs": {**g["3"]["inputs"], "latent_image": ["30", 0], "steps": 4,
                                                    "denoise": 0.5}}
    g["8"]["inputs"]["samples"] = ["31", 0]
    return g


@pytest.mark.parametrize("by", [True, False])
def test_latent_upscale_between_two_samplers_is_the_hires_fix(by):
    [run] = planned(hires_graph(by))
    assert {k: run.layer[k] for k in ("steps", "seed", "width", "hires_scale", "hires_strength", "hires_steps",
                                      "hires_upscaler")} == {"steps": 6, "seed": 5, "width": 32, "hires_scale": 1.5,
                                                             "hires_strength": 0.5, "hires_steps": 4,
                                                             "hires_upscaler": "latent"}
    assert run.sampler == "31" and run.nodes == ["5", "4", "7", "6", "3", "30", "31", "8", "9"]
    r = GenerationRequest.layered(run.layer)
    second = r.hires().second_pass(r.steps, 32, 32, 8)
    assert (second.width, steps_to_run(second.steps, second.strength)) == (48, 4)  # ComfyUI: 4 of int(4 / 0.5)
    g = hires_graph(by)
    g["31"]["inputs"]["seed"] = 6
    with pytest.raises(GraphError, match="first one's seed"):
        planned(g)
    g = hires_graph(by)
    g["30"]["inputs"]["upscale_method"] = "nearest-exact"
    with pytest.raises(GraphError, match="use bilinear"):
        planned(g)
