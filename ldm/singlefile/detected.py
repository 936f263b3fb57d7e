"""What a single file was recognised as (`Detected`) and the configs read from its shapes: shared by the SD 1.x/2.x
reader (ldm/singlefile/detect.py) and the SDXL one (ldm/singlefile/sdxl.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldm.errors import UserError
from ldm.singlefile.keys import UNET_PREFIX

META_KEY = "ldm"  # our entry in the safetensors header's __metadata__
FORMAT = 1
FORMAT_SDXL = 2  # SDXL files: two text encoders and the pipeline's flags (a format-1 reader refuses them)
SD_SCALING_FACTOR = 0.18215  # SD 1.x/2.x kl-f8 VAE
Shapes = dict[str, tuple[int, ...]]


@dataclass
class Detected:
    """A single file's contents: which parts it has, their configs, and how it was recognised."""

    path: Path
    family: str  # "sd1" | "sd2" | "sdxl" | "sdxl-refiner" | "ldm" (our own SD file, configs from its metadata)
    shapes: Shapes
    unet_config: dict[str, Any] | None = None
    vae_config: dict[str, Any] | None = None
    text_config: dict[str, Any] | None = None  # a transformers CLIPTextConfig as a dict (SDXL: CLIP ViT-L)
    text_layout: str | None = None  # "clip" (cond_stage_model.transformer) | "open_clip" (cond_stage_model.model)
    tokenizer: dict[str, Any] = field(default_factory=dict)  # {"pad_token": ...} or {"pad_id": 0}
    scheduler_config: dict[str, Any] | None = None
    text_info: dict[str, Any] | None = None  # ldm_model.json's text_encoder entry (layer)
    ema_keys: int = 0  # model_ema.* tensors (not used: A1111, ComfyUI and diffusers load model.diffusion_model)
    # SDXL: the second text encoder (OpenCLIP ViT-bigG as a CLIPTextModelWithProjection config), its tokenizer's
    # settings, and model_index.json's flags (_class_name, force_zeros_for_empty_prompt, requires_aesthetics_score)
    text_config_2: dict[str, Any] | None = None
    tokenizer_2: dict[str, Any] = field(default_factory=dict)
    pipeline: dict[str, Any] = field(default_factory=dict)
    from_metadata: bool = False  # configs from our `ldm` metadata entry (an ldm-convert file)

    @property
    def inpainting(self) -> bool:
        return bool(self.unet_config) and self.unet_config["in_channels"] == 9

    @property
    def sdxl(self) -> bool:
        return self.family in ("sdxl", "sdxl-refiner")

    def describe(self) -> str:
        """One line: what was detected and what the file holds."""
        name = {"sd1": "Stable Diffusion 1.x (CLIP ViT-L text encoder)", "sd2": "Stable Diffusion 2.x (OpenCLIP "
                "ViT-H text encoder)", "sdxl": "Stable Diffusion XL (CLIP ViT-L + OpenCLIP ViT-bigG text encoders)",
                "sdxl-refiner": "Stable Diffusion XL refiner (OpenCLIP ViT-bigG text encoder, aesthetic-score "
                "conditioning)", "ldm": "an ldm-convert file (configs in its metadata)"}[self.family]
        if self.sdxl and self.from_metadata:
            name += ", an ldm-convert file (configs in its metadata)"
        texts = [c for c in (self.text_config, self.text_config_2) if c]
        parts = [p for p, c in (("U-Net", self.unet_config), ("VAE", self.vae_config),
                                ("2 text encoders" if len(texts) == 2 else "text encoder", texts)) if c]
        unet = self.unet_config or {}
        extra = []
        if unet:
            extra.append(f"{unet['in_channels']}-channel{' inpainting' if self.inpainting else ''} U-Net, "
                         f"channels {list(unet['block_out_channels'])}")
        if self.ema_keys:
            extra.append(f"{self.ema_keys} model_ema.* tensors not used")
        return f"'{self.path.name}': {name}; holds {', '.join(parts) or 'nothing loadable'}" + (
            f" ({'; '.join(extra)})" if extra else "")



# ------------------------------------------------------------------------------------------- configs from shapes
def blocks(shapes: Shapes, pattern: str) -> list[int]:
    return sorted({int(m[1]) for k in shapes if (m := re.match(pattern, k))})


def unet_config_from_shapes(unet: Shapes, family: str, path: Path) -> dict[str, Any]:
    """The family's preset with the sizes of this file: levels, channels, blocks per level, attention per level."""
    from ldm.unet.presets import UNET_PRESETS

    conv_in = unet["input_blocks.0.0.weight"]  # (C0, in_channels, 3, 3)
    inputs = blocks(unet, r"input_blocks\.(\d+)\.")[1:]
    downs = [i for i in inputs if f"input_blocks.{i}.0.op.weight" in unet]
    if not inputs or "out.2.weight" not in unet:
        raise UserError(f"'{path}': the U-Net (model.diffusion_model.*) is incomplete (no input blocks or no "
                        "out.2); the file is damaged or of another architecture")
    lpb = (downs[0] - 1) if downs else len(inputs)
    levels = len(downs) + 1
    channels, attention = [], []
    for level in range(levels):
        first = 1 + level * (lpb + 1)
        key = f"input_blocks.{first}.0.out_layers.3.weight"
        if key not in unet:
            raise UserError(f"'{path}': the U-Net has no '{UNET_PREFIX}{key}'; the file is damaged or of another "
                            "architecture")
        channels.append(unet[key][0])
        attention.append(f"input_blocks.{first}.1.proj_in.weight" in unet)
    context = next((s[1] for k, s in unet.items() if k.endswith("attn2.to_k.weight")), None)
    if context is None:
        raise UserError(f"'{path}': the U-Net has no cross-attention (attn2) layers; not a text-to-image SD model")
    depth = len(blocks(unet, r"input_blocks\.1\.1\.transformer_blocks\.(\d+)\.")) or 1
    preset = dict(UNET_PRESETS["sd15" if family == "sd1" else "sd21"])
    preset.update(
        block_out_channels=tuple(channels), layers_per_block=lpb,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        in_channels=conv_in[1], out_channels=unet["out.2.weight"][0], cross_attention_dim=context,
        transformer_layers_per_block=depth, sample_size=64,
    )
    if family == "sd2":  # SD 2.x: 64 channels per head (num_head_channels: 64 in its config)
        preset["attention_head_dim"] = tuple(max(1, c // 64) for c in channels)
    return preset


def vae_config_from_shapes(vae: Shapes, path: Path) -> dict[str, Any]:
    """SD's kl-f8 preset (`sd-f8`) with this file's levels, channels and blocks per level."""
    from ldm.vae.presets import preset_kwargs

    levels = blocks(vae, r"encoder\.down\.(\d+)\.")
    if not levels or "encoder.conv_in.weight" not in vae or "decoder.conv_out.weight" not in vae:
        raise UserError(f"'{path}': the VAE weights are incomplete (no encoder.down.*, encoder.conv_in or "
                        "decoder.conv_out); the file is damaged or not an SD VAE")
    config = preset_kwargs("sd-f8")
    channels = tuple(vae[f"encoder.down.{i}.block.0.conv2.weight"][0] for i in levels)
    latent = vae["decoder.conv_in.weight"][1]
    config.update(
        block_out_channels=channels, layers_per_block=len(blocks(vae, r"encoder\.down\.0\.block\.(\d+)\.")),
        down_block_types=("DownEncoderBlock2D",) * len(levels), up_block_types=("UpDecoderBlock2D",) * len(levels),
        latent_channels=latent, in_channels=vae["encoder.conv_in.weight"][1],
        out_channels=vae["decoder.conv_out.weight"][0], use_quant_conv="quant_conv.weight" in vae,
        use_post_quant_conv="post_quant_conv.weight" in vae, mid_block_add_attention="encoder.mid.attn_1.q.weight" in vae,
        scaling_factor=SD_SCALING_FACTOR, sample_size=512,
    )
    return config


def text_config_from_shapes(text: Shapes, layout: str, path: Path) -> dict[str, Any]:
    """CLIP ViT-L (SD 1.x) or OpenCLIP ViT-H's text tower as a transformers CLIPTextConfig (as a dict)."""
    from ldm.text.tiny import BOS_ID, EOS_ID

    if layout == "clip":
        text = {k.removeprefix("text_model."): s for k, s in text.items()}
        token, position = "embeddings.token_embedding.weight", "embeddings.position_embedding.weight"
        layers, fc1, act = len(blocks(text, r"encoder\.layers\.(\d+)\.")), "encoder.layers.0.mlp.fc1.weight", \
            "quick_gelu"
    else:
        token, position, fc1, act = "token_embedding.weight", "positional_embedding", \
            "transformer.resblocks.0.mlp.c_fc.weight", "gelu"
        # SD 2.x conditions on the penultimate block's output (then ln_final): the model is one block shorter,
        # as diffusers' SD 2 text encoder is (23 of OpenCLIP ViT-H's 24)
        layers = len(blocks(text, r"transformer\.resblocks\.(\d+)\.")) - 1
    if token not in text or position not in text or fc1 not in text or layers < 1:
        raise UserError(f"'{path}': the text encoder weights are incomplete (no {token}, {position} or layers); "
                        "the file is damaged")
    vocab, hidden = text[token]
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=text[fc1][0], num_hidden_layers=layers,
                num_attention_heads=max(1, hidden // 64), max_position_embeddings=text[position][0],
                hidden_act=act, projection_dim=hidden, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID)
