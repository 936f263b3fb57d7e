"""Single-file Stable Diffusion checkpoints (the original CompVis layout that A1111, ComfyUI and model-sharing sites
use): detect what a file holds (`detect.py`), build the models from it offline (`load.py`), and convert a diffusers
directory to one file and back (`save.py`, the `ldm-convert` command). The key mapping is in `keys.py`.

A file written by `ldm-convert` is an ordinary original-layout file (`model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.transformer.text_model.*` or `cond_stage_model.model.*`) that diffusers,
A1111 and ComfyUI read; its safetensors header's `__metadata__` also holds one entry, `ldm`: a JSON object

    {"format": 1, "unet": {...}, "vae": {...}, "text_encoder": {...},   # each component's diffusers/transformers config
     "text_layout": "clip" | "open_clip", "tokenizer": {"pad_token": ..., "model_max_length": 77},
     "scheduler": {...}, "ldm_model": {...} | null}                      # scheduler config; ldm_model.json's entry

which other tools ignore and which lets this package rebuild any model exactly, including small ones whose layout
no SD preset describes. Files without it are recognised by their keys and shapes (detect.py). SDXL files
(`conditioner.embedders.*`, sdxl.py) carry format 2 of the entry (save_sdxl.py), with both text encoders.

An SD 2.x-layout file holds OpenCLIP's whole text tower: the last block, `text_projection` and `logit_scale` that
diffusers' text encoder drops are kept in `text_encoder/open_clip_extra.safetensors` when a file becomes a
directory and written back from there, or filled neutrally (open_clip_extra.py).
"""
