"""Request and response bodies of the A1111-compatible API (field names and shapes as AUTOMATIC1111's
`modules/api/models.py`: StableDiffusionTxt2ImgProcessingAPI, TextToImageResponse, ProgressResponse, SamplerItem,
SchedulerItem, SDModelItem, EmbeddingsResponse).

Fields A1111 accepts that this package has no use for (restore_faces, scripts, hires fix, ...) are ignored, as
A1111 ignores fields it does not know, so a client that sends them works unchanged. A field left out takes the
value `ldm-generate` would use, so the same request and the same CLI command give the same image; the exceptions
to A1111's defaults (steps 25 instead of 50, cfg 7.5 instead of 7, the model's native size instead of 512 px) are
said in docs/serving.md.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Txt2ImgRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    prompt: str = ""
    negative_prompt: str = ""
    steps: int | None = None  # None: the CLI's default (25)
    cfg_scale: float | None = None  # None: the CLI's default (7.5)
    sampler_name: str | None = None  # A1111 name ("Euler a", "DPM++ 2M Karras", "LCM") or ours ("euler_a")
    sampler_index: str | None = None  # A1111's older spelling of sampler_name
    scheduler: str | None = None  # A1111 >= 1.9: "Automatic", "Karras", "SGM Uniform" (GET /sdapi/v1/schedulers)
    eta: float | None = None  # the TCD sampler's gamma (None: 0.3); other samplers ignore it
    seed: int = -1  # -1: random
    width: int | None = None  # None: the model's native size
    height: int | None = None
    batch_size: int = 1  # images per U-Net batch
    n_iter: int = 1  # batches; batch_size * n_iter images in all, image i with seed + i
    send_images: bool = True
    override_settings: dict[str, Any] = Field(default_factory=dict)  # sd_model_checkpoint, CLIP_stop_at_last_layers
    refiner_checkpoint: str | None = None  # an SDXL refiner among the listed models (A1111 >= 1.6)
    refiner_switch_at: float | None = None  # share of the steps the base runs (default 0.8)
    # scripts run with every request; of these, the A1111 ControlNet extension's units (ldm/serve/controlnet.py)
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] | None = None  # base64 images (a "data:image/png;base64," prefix is allowed); the first is used
    mask: str | None = None  # base64 image, white = repaint
    mask_blur: int | None = None  # None: the CLI's default (4)
    denoising_strength: float | None = None  # None: the CLI's default (0.75 img2img, 1.0 inpainting)
    inpainting_mask_invert: int = 0  # 1: black = repaint
    include_init_images: bool = False


class ImagesResponse(BaseModel):
    images: list[str] | None = None  # base64 PNGs carrying the 'parameters' text chunk
    parameters: dict[str, Any]  # the request as understood (A1111 echoes its request model)
    info: str  # JSON: seed, all_seeds, infotexts, ...


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict[str, Any]
    current_image: str | None = None
    textinfo: str | None = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class EmbeddingItem(BaseModel):
    step: int | None = None  # training steps, when the file says
    sd_checkpoint: str | None = None  # the hash of the checkpoint it was trained on, when the file says
    sd_checkpoint_name: str | None = None
    shape: int  # the width of one vector (SDXL: both towers' together, 2048)
    vectors: int


class EmbeddingsResponse(BaseModel):
    loaded: dict[str, EmbeddingItem]  # those that fit the selected model
    skipped: dict[str, EmbeddingItem]  # made for another model family


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float | None = None
    need_inner_model: bool | None = None


class SDModelItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None
