"""ComfyUI API-format graphs for the tests: ComfyUI's default text-to-image graph (its script_examples/
basic_api_example.py, node ids and all) and its img2img / inpainting variants."""

from __future__ import annotations

import copy


def txt2img(ckpt: str, prompt: str, negative: str = "", seed: int = 8566257, steps: int = 20, cfg: float = 8.0,
            size: int = 512, batch: int = 1, sampler: str = "euler", scheduler: str = "normal") -> dict:
    return copy.deepcopy({
        "3": {"class_type": "KSampler", "inputs": {
            "cfg": cfg, "denoise": 1, "latent_image": ["5", 0], "model": ["4", 0], "negative": ["7", 0],
            "positive": ["6", 0], "sampler_name": sampler, "scheduler": scheduler, "seed": seed, "steps": steps}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"batch_size": batch, "height": size, "width": size}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": prompt}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": negative}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    })


def img2img(ckpt: str, prompt: str, image: str, denoise: float = 0.6, mask: str | None = None, **kw) -> dict:
    """LoadImage -> VAEEncode (or VAEEncodeForInpaint with `mask`, a LoadImageMask file) -> KSampler(denoise)."""
    g = txt2img(ckpt, prompt, **kw)
    del g["5"]
    g["10"] = {"class_type": "LoadImage", "inputs": {"image": image}}
    if mask is None:
        g["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    else:
        g["12"] = {"class_type": "LoadImageMask", "inputs": {"image": mask, "channel": "red"}}
        g["11"] = {"class_type": "VAEEncodeForInpaint", "inputs": {"pixels": ["10", 0], "vae": ["4", 2],
                                                                   "mask": ["12", 0], "grow_mask_by": 0}}
    g["3"]["inputs"].update(latent_image=["11", 0], denoise=denoise)
    return g


def with_vae_loader(g: dict, vae_name: str, node_id: str = "20") -> dict:
    """`g` with a VAELoader (ComfyUI's models/vae file `vae_name`) decoding in place of the checkpoint's VAE."""
    g[node_id] = {"class_type": "VAELoader", "inputs": {"vae_name": vae_name}}
    g["8"]["inputs"]["vae"] = [node_id, 0]
    return g
