"""The ComfyUI nodes this server runs: a table of their inputs and outputs, as ComfyUI's `nodes.py` declares them.

A node's widget inputs are `(TYPE, options)` with TYPE one of INT, FLOAT, STRING, BOOLEAN, or a list of choices (a
combo); its link inputs name the type of the output they take (MODEL, CLIP, VAE, CONDITIONING, LATENT, IMAGE, MASK,
CONTROL_NET). Names, defaults and limits follow ComfyUI's (comfyanonymous/ComfyUI nodes.py, INPUT_TYPES), so that
`GET /object_info` describes exactly these nodes in ComfyUI's format and graphs made for ComfyUI validate here.

The combos that name files (checkpoints, VAEs, LoRAs, ControlNets, input images) list what this server was started with
(`Catalog`), never paths: a value not in the list is ComfyUI's `value_not_in_list` error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MAX_RESOLUTION = 16384  # ComfyUI's nodes.MAX_RESOLUTION
MAX_SEED = 0xFFFFFFFFFFFFFFFF  # ComfyUI's seed widget limit; torch.manual_seed takes the whole range

# ComfyUI's names (comfy/samplers.py KSAMPLER_NAMES, SCHEDULER_NAMES) for the samplers and schedules we have; the
# request maps them to ours (ldm.pipeline.samplers.sampler_from_label / COMFY_SCHEDULES)
SAMPLER_NAMES = ["euler", "euler_ancestral", "heun", "lms", "dpmpp_2m", "ddpm", "lcm", "ddim", "uni_pc"]
SCHEDULER_NAMES = ["normal", "karras", "sgm_uniform"]
UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]  # ImageScale's
CROP_METHODS = ["disabled", "center"]
LATENT_UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"]  # ComfyUI's; bilinear runs here


@dataclass(frozen=True)
class Catalog:
    """What the file-naming combos offer: the names clients send, each list sorted."""

    checkpoints: list[str] = field(default_factory=list)
    loras: list[str] = field(default_factory=list)
    controlnets: list[str] = field(default_factory=list)
    vaes: list[str] = field(default_factory=list)  # --vae-dir's VAE files and directories
    images: list[str] = field(default_factory=list)  # files in the input folder (POST /upload/image)


@dataclass(frozen=True)
class NodeType:
    required: dict[str, tuple]  # input name -> (TYPE or [choices], {default, min, max, step, ...})
    outputs: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    output_node: bool = False  # SaveImage/PreviewImage: what a graph is run for
    category: str = ""
    description: str = ""
    optional: dict[str, tuple] = field(default_factory=dict)

    def input(self, name: str) -> tuple | None:
        return self.required.get(name) or self.optional.get(name)


def _int(default: int, lo: int, hi: int, step: int = 1) -> tuple:
    return ("INT", {"default": default, "min": lo, "max": hi, "step": step})


def _float(default: float, lo: float, hi: float, step: float = 0.01) -> tuple:
    return ("FLOAT", {"default": default, "min": lo, "max": hi, "step": step})


def node_types(c: Catalog) -> dict[str, NodeType]:
    """Every node this server runs, the combos filled from `c`."""
    size = _int(512, 16, MAX_RESOLUTION, 8)
    seed = _int(0, 0, MAX_SEED)
    sampling = {"steps": _int(20, 1, 10000), "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0,
                                                               "step": 0.1, "round": 0.01}),
                "sampler_name": (SAMPLER_NAMES, {}), "scheduler": (SCHEDULER_NAMES, {})}
    conditioning = {"positive": ("CONDITIONING", {}), "negative": ("CONDITIONING", {}),
                    "latent_image": ("LATENT", {})}
    return {
        "CheckpointLoaderSimple": NodeType({"ckpt_name": (c.checkpoints, {})}, ("MODEL", "CLIP", "VAE"),
                                           ("MODEL", "CLIP", "VAE"), category="loaders"),
        "VAELoader": NodeType({"vae_name": (c.vaes, {})}, ("VAE",), ("VAE",), category="loaders"),
        "LoraLoader": NodeType({"model": ("MODEL", {}), "clip": ("CLIP", {}), "lora_name": (c.loras, {}),
                                "strength_model": _float(1.0, -100.0, 100.0), "strength_clip": _float(1.0, -100.0, 100.0)},
                               ("MODEL", "CLIP"), ("MODEL", "CLIP"), category="loaders"),
        "CLIPTextEncode": NodeType({"text": ("STRING", {"multiline": True, "dynamicPrompts": True}),
                                    "clip": ("CLIP", {})}, ("CONDITIONING",), ("CONDITIONING",),
                                   category="conditioning"),
        "CLIPSetLastLayer": NodeType({"clip": ("CLIP", {}), "stop_at_clip_layer": _int(-1, -24, -1)}, ("CLIP",),
                                     ("CLIP",), category="conditioning"),
        "EmptyLatentImage": NodeType({"width": size, "height": size, "batch_size": _int(1, 1, 4096)}, ("LATENT",),
                                     ("LATENT",), category="latent"),
        "KSampler": NodeType({"model": ("MODEL", {}), "seed": seed, **sampling, **conditioning,
                              "denoise": _float(1.0, 0.0, 1.0)}, ("LATENT",), ("LATENT",), category="sampling"),
        "KSamplerAdvanced": NodeType({"model": ("MODEL", {}), "add_noise": (["enable", "disable"], {}),
                                      "noise_seed": seed, **sampling, **conditioning,
                                      "start_at_step": _int(0, 0, 10000), "end_at_step": _int(10000, 0, 10000),
                                      "return_with_leftover_noise": (["disable", "enable"], {})},
                                     ("LATENT",), ("LATENT",), category="sampling"),
        "VAEDecode": NodeType({"samples": ("LATENT", {}), "vae": ("VAE", {})}, ("IMAGE",), ("IMAGE",),
                              category="latent"),
        "VAEEncode": NodeType({"pixels": ("IMAGE", {}), "vae": ("VAE", {})}, ("LATENT",), ("LATENT",),
                              category="latent"),
        "VAEEncodeForInpaint": NodeType({"pixels": ("IMAGE", {}), "vae": ("VAE", {}), "mask": ("MASK", {}),
                                         "grow_mask_by": _int(6, 0, 64)}, ("LATENT",), ("LATENT",),
                                        category="latent/inpaint"),
        "SetLatentNoiseMask": NodeType({"samples": ("LATENT", {}), "mask": ("MASK", {})}, ("LATENT",), ("LATENT",),
                                       category="latent/inpaint"),
        "LoadImage": NodeType({"image": (c.images, {"image_upload": True})}, ("IMAGE", "MASK"), ("IMAGE", "MASK"),
                              category="image"),
        "LoadImageMask": NodeType({"image": (c.images, {"image_upload": True}),
                                   "channel": (["alpha", "red", "green", "blue"], {})}, ("MASK",), ("MASK",),
                                  category="mask"),
        "LatentUpscale": NodeType({"samples": ("LATENT", {}), "upscale_method": (LATENT_UPSCALE_METHODS, {}),
                                   "width": _int(512, 0, MAX_RESOLUTION, 8), "height": _int(512, 0, MAX_RESOLUTION, 8),
                                   "crop": (CROP_METHODS, {})}, ("LATENT",), ("LATENT",), category="latent"),
        "LatentUpscaleBy": NodeType({"samples": ("LATENT", {}), "upscale_method": (LATENT_UPSCALE_METHODS, {}),
                                     "scale_by": _float(1.5, 0.01, 8.0)}, ("LATENT",), ("LATENT",),
                                    category="latent"),
        "ImageScale": NodeType({"image": ("IMAGE", {}), "upscale_method": (UPSCALE_METHODS, {}),
                                "width": _int(512, 0, MAX_RESOLUTION), "height": _int(512, 0, MAX_RESOLUTION),
                                "crop": (CROP_METHODS, {})}, ("IMAGE",), ("IMAGE",), category="image/upscaling"),
        "ControlNetLoader": NodeType({"control_net_name": (c.controlnets, {})}, ("CONTROL_NET",), ("CONTROL_NET",),
                                     category="loaders"),
        "ControlNetApplyAdvanced": NodeType({"positive": ("CONDITIONING", {}), "negative": ("CONDITIONING", {}),
                                             "control_net": ("CONTROL_NET", {}), "image": ("IMAGE", {}),
                                             "strength": _float(1.0, 0.0, 10.0),
                                             "start_percent": _float(0.0, 0.0, 1.0, 0.001),
                                             "end_percent": _float(1.0, 0.0, 1.0, 0.001)},
                                            ("CONDITIONING", "CONDITIONING"), ("positive", "negative"),
                                            category="conditioning/controlnet"),
        "SaveImage": NodeType({"images": ("IMAGE", {}), "filename_prefix": ("STRING", {"default": "ComfyUI"})},
                              output_node=True, category="image",
                              description="Saves the input images to the output folder."),
        "PreviewImage": NodeType({"images": ("IMAGE", {})}, output_node=True, category="image"),
    }


def object_info(types: dict[str, NodeType]) -> dict[str, dict[str, Any]]:
    """ComfyUI's `GET /object_info` body (server.py node_info): one entry per node class."""
    out = {}
    for name, t in types.items():
        def listed(inputs: dict[str, tuple]) -> dict[str, list]:
            return {k: [v[0], v[1]] if v[1] else [v[0]] for k, v in inputs.items()}

        inputs = {"required": listed(t.required)}
        if t.optional:
            inputs["optional"] = listed(t.optional)
        if name == "SaveImage" or name == "PreviewImage":
            inputs["hidden"] = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
        out[name] = {
            "input": inputs, "input_order": {k: list(v) for k, v in inputs.items() if k != "hidden"},
            "output": list(t.outputs), "output_is_list": [False] * len(t.outputs),
            "output_name": list(t.output_names), "name": name, "display_name": name, "description": t.description,
            "python_module": "nodes", "category": t.category, "output_node": t.output_node,
        }
    return out
