"""ComfyUI graphs checked whole before they are queued, answered in ComfyUI's error shapes (ldm/serve/comfy/graph.py).

The shapes are ComfyUI's `execution.validate_prompt` (comfyanonymous/ComfyUI execution.py): `error` with type,
message, details, extra_info and `node_errors` {id: {errors, dependent_outputs, class_type}}.
"""

from __future__ import annotations

import time

import pytest

from comfy_graphs import txt2img
from ldm.serve.comfy.graph import MAX_NODES, validate
from ldm.serve.comfy.nodes import Catalog, node_types, object_info

TYPES = node_types(Catalog(checkpoints=["shapes-32px-demo"], loras=["style.safetensors"], images=["in.png"]))


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
    assert time.perf_counter() - start < 0.05  # the count is checked before any node is
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
