"""A tiny random IP-Adapter and image encoder for a model's U-Net, for tests and CPU benchmarks.

Written as the real ones are laid out (ldm/ip_adapter/format.py): `ip-adapter.safetensors` (flat `image_proj.*` and
`ip_adapter.N.to_{k,v}_ip.weight` keys) and an `image_encoder/` CLIPVisionModelWithProjection beside it, so the
directory loads in both our pipeline and diffusers' `load_ip_adapter(directory, subfolder="",
weight_name="ip-adapter.safetensors", image_encoder_folder="image_encoder")`. The Plus resampler uses diffusers'
assumptions on the file: 4 layers and heads of width 64.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ldm.ip_adapter.format import DIFFUSERS_FILE, FULL, PLAIN, PLUS

ENCODER = {"hidden_size": 32, "projection_dim": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
           "intermediate_size": 37, "image_size": 32, "patch_size": 8}


def save_tiny_image_encoder(directory: str | Path, seed: int = 0, **overrides) -> Path:
    """A random CLIPVisionModelWithProjection (hidden 32, projection 24, 32-px images in 8-px patches)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**{**ENCODER, **overrides})).save_pretrained(directory)
    return Path(directory)


def save_tiny_ip_adapter(directory: str | Path, unet, variant: str = PLAIN, seed: int = 0, tokens: int = 4,
                         encoder: bool = True, name: str = DIFFUSERS_FILE) -> Path:
    """Write a random adapter for `unet` (a diffusers UNet2DConditionModel) to `directory/name` (and, with `encoder`,
    a tiny image encoder to `directory/image_encoder`). Returns the adapter file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    d = unet.config.cross_attention_dim
    e, h = ENCODER["projection_dim"], ENCODER["hidden_size"]
    tensors: dict[str, torch.Tensor] = {}
    cross = [p for p in unet.attn_processors if not p.endswith("attn1.processor")]
    for j, path in enumerate(cross):  # keys 1, 3, 5, ...: the cross-attention processors' indices
        width = unet.get_submodule(path.removesuffix(".processor")).to_q.in_features
        tensors[f"ip_adapter.{1 + 2 * j}.to_k_ip.weight"] = rand(width, d)
        tensors[f"ip_adapter.{1 + 2 * j}.to_v_ip.weight"] = rand(width, d)
    if variant == PLAIN:  # 4 tokens from the projected embedding (diffusers fixes the count at 4)
        proj = {"proj.weight": rand(4 * d, e), "proj.bias": rand(4 * d, scale=0.1)}
        proj.update({"norm.weight": 1 + rand(d, scale=0.1), "norm.bias": rand(d, scale=0.1)})
    elif variant == FULL:  # one token per hidden state
        proj = {"proj.0.weight": rand(h, h), "proj.0.bias": rand(h, scale=0.1), "proj.2.weight": rand(d, h),
                "proj.2.bias": rand(d, scale=0.1), "proj.3.weight": 1 + rand(d, scale=0.1),
                "proj.3.bias": rand(d, scale=0.1)}
    elif variant == PLUS:  # the Perceiver resampler: `tokens` latents of width w attend to the hidden states
        w, inner = 64, 64  # one head of width 64
        proj = {"latents": rand(1, tokens, w, scale=1.0), "proj_in.weight": rand(w, h), "proj_in.bias": rand(w),
                "proj_out.weight": rand(d, w), "proj_out.bias": rand(d), "norm_out.weight": 1 + rand(d, scale=0.1),
                "norm_out.bias": rand(d, scale=0.1)}
        for i in range(4):
            a, f = f"layers.{i}.0.", f"layers.{i}.1."
            for norm in ("norm1", "norm2"):
                proj.update({f"{a}{norm}.weight": 1 + rand(w, scale=0.1), f"{a}{norm}.bias": rand(w, scale=0.1)})
            proj.update({f"{a}to_q.weight": rand(inner, w), f"{a}to_kv.weight": rand(2 * inner, w),
                         f"{a}to_out.weight": rand(w, inner)})
            proj.update({f"{f}0.weight": 1 + rand(w, scale=0.1), f"{f}0.bias": rand(w, scale=0.1),
                         f"{f}1.weight": rand(4 * w, w), f"{f}3.weight": rand(w, 4 * w)})
    else:
        raise ValueError(f"variant must be one of {PLAIN}, {PLUS}, {FULL}; got {variant!r}")
    tensors.update({f"image_proj.{k}": v for k, v in proj.items()})
    path = directory / name
    save_file(tensors, str(path))
    if encoder:
        save_tiny_image_encoder(directory / "image_encoder", seed=seed)
    return path
