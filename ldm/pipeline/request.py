"""The generation request: every setting one generation takes, each default defined here and nowhere else.

    request = GenerationRequest.layered(typed, from_png)     # the first layer that sets a field wins
    resolved = request.resolve(model)                        # sizes, seed, strength filled in; checked, once
    pipe.generate(resolved)                                  # -> images, each with its own resolved request

Four sources build one, each with its own key names, all mapped here (a fifth, ComfyUI's API graphs, in
`ldm.serve.comfy.plan`, which also sets `noise="comfy"`, ComfyUI's seed convention):
- the command line: `ldm-generate`'s option dests are the field names (`ldm.generate`);
- a PNG's `parameters` text: A1111's field names (`ldm.pipeline.metadata.parse_parameters`), written back by
  `format_parameters`, the one writer;
- a prompts-file line: `PROMPTS_FILE_KEYS` (negative, count, cfg_scale, ...), typed by `ldm.prompts_file`;
- an A1111 API payload: `from_a1111` (cfg_scale, sampler_name, batch_size x n_iter, denoising_strength, ...).

Precedence is the order of the layers given to `layered` (typed > PNG > prompts-file line > default). A layer that
names a sampler also decides its schedule and eta (A1111's 'DPM++ 2M Karras', or the layer's own `schedule`), so a
sampler given on top of a PNG never inherits the PNG's schedule.

`check()` refuses what is wrong whatever the model; `resolve(model)` fills in what depends on the model and the
inputs (size from the init image or the model, img2img/inpainting strength, mask blur, hires defaults, a random
seed for -1) and checks the result against the model (`ModelFacts`: a `ModelSpec` before any weight is read, or
the loaded `Pipeline`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol

from PIL import Image

from ldm.controlnet.unit import ControlUnit, check_units, units_from_a1111
from ldm.errors import UserError
from ldm.ip_adapter.unit import IPAdapterUnit
from ldm.ip_adapter.unit import units_from_a1111 as ip_adapter_units_from_a1111
from ldm.pipeline.hires import HIRES_STRENGTH, HIRES_UPSCALER, UPSCALERS, HiresFix
from ldm.pipeline.samplers import SAMPLERS, SCHEDULES, check_sampler, sampler_from_label, schedule_from_label
from ldm.pipeline.seeds import random_seed
from ldm.pipeline.validation import check_request, pick_size
from ldm.text.embeddings import escape_references
from ldm.text.prompt_syntax import check_prompt

IMG2IMG_STRENGTH = 0.75  # diffusers' and A1111's img2img default
INPAINT_STRENGTH = 1.0  # inpainting repaints the masked region from noise
MASK_BLUR = 4  # px, A1111's default


class ModelFacts(Protocol):
    """What a request is checked against: read from configs (`ModelSpec`) or from the loaded parts (`Pipeline`)."""

    vae_factor: int  # pixels per latent pixel
    default_size: int  # the model's native side in pixels
    train_timesteps: int  # the most steps a schedule may have
    inpainting_unet: bool  # a 9-channel U-Net: needs an init image and a mask
    arch: str  # "sd" (1.x/2.x) | "sdxl" | "sdxl-refiner" (ldm.models.spec.ARCHS)


@dataclass(frozen=True)
class GenerationRequest:
    """One generation. Unresolved, a field may hold 'decide for me' (seed -1, size 0, strength/mask blur None);
    resolved (`resolve`), every field is what the images are made with, and what their PNGs record."""

    prompt: str = ""
    negative_prompt: str = ""  # the unconditional branch of guidance
    steps: int = 25
    sampler: str = "euler_a"  # ldm.pipeline.samplers.SAMPLERS
    schedule: str = ""  # where the steps fall: '' = the sampler's own (A1111's "Automatic"), 'karras', 'sgm_uniform'
    eta: float | None = None  # TCD's gamma (diffusers' `eta`), in [0, 1]; None: 0.3. Only the tcd sampler takes it
    cfg: float = 7.5  # classifier-free guidance scale; 1 = one U-Net branch
    seed: int = -1  # of the first image; image i uses seed + i. -1: a random one
    # how the initial noise is drawn: "" = each image from its own CPU generator seeded seed + i (a function of its
    # seed alone); "comfy" = ComfyUI's (comfy/sample.py prepare_noise): one CPU draw of the whole batch's latents
    # from torch.manual_seed(seed), every image recording `seed`. Either way image 0 alone gets the same noise
    noise: str = ""
    width: int = 0  # 0: the init image's size rounded down to the VAE factor, else the model's native size
    height: int = 0
    model: str = ""  # the model as the user named it: what PNGs record
    # the VAE replacing the model's, as the user named it (ldm-generate --vae; a ComfyUI VAELoader's name); "": the
    # pipeline's own. A pipeline runs only a request naming the VAE it has on (`Pipeline.use_vae`)
    vae: str = ""
    strength: float | None = None  # img2img/inpainting share of the schedule re-noised; None: 0.75 / 1.0
    guidance_rescale: float = 0.0  # phi of Lin et al. 2023
    mask_blur: int | None = None  # inpainting paste-back feathering in px; None: 4. Recorded for inpainting only
    # hires fix (txt2img only): width x height is the first pass, then an img2img pass at the scaled size
    hires_scale: float | None = None
    hires_strength: float | None = None  # the second pass's strength; None: 0.7
    hires_steps: int = 0  # the second pass's steps; 0 = `steps` (A1111's convention)
    hires_upscaler: str | None = None  # 'latent' | 'lanczos'; None: latent
    lora_hashes: str = ""  # A1111's 'Lora hashes' of the LoRAs the prompt's tags name: "name: hash, ..."
    ti_hashes: str = ""  # A1111's 'TI hashes' of the textual-inversion embeddings the prompts use: "name: hash, ..."
    clip_skip: int = 1  # A1111's "Clip skip"; 1 = the text encoder's own layer
    # SDXL micro-conditioning, (height, width) and (top, left) in pixels as diffusers takes them. None: the
    # generation's size (each pass's, with a hires fix) and (0, 0); negative_* None: the positive branch's sizes and
    # a (0, 0) crop, as diffusers (ldm/pipeline/micro_conditioning.py has its exact rules)
    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crop_top_left: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    # the SDXL refiner's conditioning (in place of the target size); None: 6.0 / 2.5, diffusers' and A1111's defaults
    aesthetic_score: float | None = None
    negative_aesthetic_score: float | None = None
    refiner: str = ""  # the refiner model as the user named it (what PNGs record); "": none
    refiner_switch: float | None = None  # share of the schedule the base runs before the refiner; None: 0.8
    # IP-Adapter image prompts (ldm/ip_adapter): adapters as named (the pipeline must have them on: `open` or
    # `use_ip_adapters`), each with its image (not compared, not in the PNG) and scale
    ip_adapters: tuple[IPAdapterUnit, ...] = ()
    controlnets: tuple[ControlUnit, ...] = ()  # ControlNet units (ldm/controlnet/unit.py), their residuals summed
    num_images: int = 1
    batch_size: int = 1  # images per U-Net batch: memory vs speed, same pixels
    init_image: Image.Image | None = field(default=None, compare=False, repr=False)  # RGB; img2img / inpainting
    mask: Image.Image | None = field(default=None, compare=False, repr=False)  # 'L', white = repaint
    resolved: bool = field(default=False, compare=False, repr=False)

    @classmethod
    def layered(cls, *layers: Mapping[str, Any]) -> GenerationRequest:
        """A request from layers of field values, the first layer that sets a field winning."""
        merged: dict[str, Any] = {}
        for layer in reversed(layers):
            merged.update(_sampler_layer(layer))
        unknown = set(merged) - FIELDS
        if unknown:
            raise TypeError(f"not GenerationRequest fields: {sorted(unknown)}")
        return cls(**merged)

    def with_seed(self, seed: int) -> GenerationRequest:
        return replace(self, seed=seed)

    @property
    def inpainting(self) -> bool:
        return self.mask is not None

    def hires(self) -> HiresFix | None:
        """The hires-fix plan, or None for a single pass."""
        if self.hires_scale is None:
            return None
        upscaler = self.hires_upscaler or HIRES_UPSCALER
        return HiresFix(
            scale=float(self.hires_scale),
            strength=HIRES_STRENGTH if self.hires_strength is None else float(self.hires_strength),
            steps=int(self.hires_steps or 0),
            upscaler=upscaler.lower() if upscaler.lower() in UPSCALERS else upscaler,  # A1111 writes "Latent"
        )

    def check(self) -> None:
        """Refuse what is wrong whatever the model, naming the option (one line each)."""
        check_sampler(self.sampler, self.schedule, self.eta)
        if self.noise not in NOISE_MODES:
            raise UserError(f"unknown noise mode '{self.noise}'; known: {', '.join(repr(m) for m in NOISE_MODES)}")
        check_prompt(escape_references(self.prompt), "prompt")  # ComfyUI's embedding:NAME is text to the syntax
        check_prompt(escape_references(self.negative_prompt), "negative prompt")
        if self.clip_skip < 1:
            raise UserError(f"--clip-skip must be at least 1 (1 = the text encoder's usual layer), got {self.clip_skip}")
        if self.mask is not None and self.init_image is None:
            raise UserError("--mask needs --init-image (the image to inpaint)")
        if self.strength is not None and self.init_image is None:
            raise UserError("--strength only applies with --init-image")
        if self.mask_blur is not None and self.mask_blur < 0:
            raise UserError(f"mask blur must be >= 0 px, got {self.mask_blur}")
        if self.hires_scale is None:
            given = [f"--{k.replace('_', '-')}" for k in ("hires_strength", "hires_steps", "hires_upscaler")
                     if getattr(self, k) not in (None, 0)]
            if given:
                raise UserError(f"{', '.join(given)} only apply with --hires-scale (e.g. --hires-scale 2)")
        elif self.init_image is not None:
            raise UserError("the hires fix is for txt2img: drop --hires-scale or --init-image")
        for name in MICRO_CONDITIONING[:6]:
            value = getattr(self, name)
            if value is not None and (len(value) != 2 or any(int(v) != v or v < 0 for v in value)):
                raise UserError(f"--{name.replace('_', '-')} takes two whole numbers >= 0 (height width, or top "
                                f"left), got {value}")
        if self.refiner_switch is not None and not self.refiner:
            raise UserError("--refiner-switch only applies with --refiner MODEL")
        if self.refiner_switch is not None and not 0.0 < self.refiner_switch < 1.0:
            raise UserError(f"--refiner-switch must be in (0, 1) (the share of the steps the base model runs), "
                            f"got {self.refiner_switch}")
        if self.refiner and self.hires_scale is not None:
            raise UserError("a refiner with the hires fix is not supported: drop --refiner or --hires-scale")
        if self.refiner and self.mask is not None:
            raise UserError("a refiner with inpainting is not supported: drop --refiner or --mask")
        for unit in self.ip_adapters:
            if not isinstance(unit, IPAdapterUnit):
                raise TypeError(f"ip_adapters holds IPAdapterUnit items, got {type(unit).__name__}")
            unit.check()
        check_units(self.controlnets)
        if self.refiner and self.controlnets:
            raise UserError("a refiner with ControlNet is not supported (the refiner would run without control): "
                            "drop --refiner or --controlnet")

    def resolve(self, model: ModelFacts) -> GenerationRequest:
        """Every 'decide for me' value decided, and the whole request checked against `model`."""
        if self.resolved:
            return self
        self.check()
        if model.inpainting_unet and self.mask is None:
            raise UserError("this model has an inpainting U-Net (9 input channels): pass --init-image and --mask")
        self._check_arch(model.arch)
        init_size = self.init_image.size if self.init_image is not None else None
        height, width = pick_size(init_size, self.height or None, self.width or None, model.vae_factor,
                                  model.default_size)
        strength = self.strength
        if self.init_image is not None and strength is None:
            strength = INPAINT_STRENGTH if self.mask is not None else IMG2IMG_STRENGTH
        mask_blur = (MASK_BLUR if self.mask_blur is None else self.mask_blur) if self.mask is not None else None
        seed = random_seed() if self.seed == -1 else self.seed
        check_request(steps=self.steps, cfg=self.cfg, height=height, width=width, vae_factor=model.vae_factor,
                      strength=strength, sampler=self.sampler, schedule=self.schedule, num_images=self.num_images,
                      batch_size=self.batch_size, seed=seed, guidance_rescale=self.guidance_rescale,
                      mask_blur=mask_blur or 0, max_steps=model.train_timesteps)
        refiner_switch = (REFINER_SWITCH if self.refiner_switch is None else self.refiner_switch) if self.refiner \
            else None
        eta = SAMPLERS[self.sampler].eta if self.eta is None else self.eta  # TCD's default gamma; None for others
        resolved = replace(self, height=height, width=width, strength=strength, mask_blur=mask_blur, seed=seed,
                           refiner_switch=refiner_switch, eta=eta, resolved=True,
                           controlnets=tuple(u.resolved() for u in self.controlnets))
        hires = self.hires()
        if hires is not None:
            hires.check(self.steps, height, width, model.vae_factor)
            resolved = replace(resolved, hires_strength=hires.strength, hires_steps=hires.steps,
                               hires_upscaler=hires.upscaler)
        return resolved

    def _check_arch(self, arch: str) -> None:
        """Settings of one model family given to another, named."""
        if arch == "sdxl-refiner":
            raise UserError("this is an SDXL refiner, which only finishes a base model's images: pass the base as "
                            "--model and this one as --refiner")
        if arch == "sd":
            given = [f"--{k.replace('_', '-')}" for k in MICRO_CONDITIONING if getattr(self, k) is not None]
            given += ["--refiner"] if self.refiner else []
            if given:
                verb = "applies" if len(given) == 1 else "apply"
                raise UserError(f"{', '.join(given)} only {verb} to SDXL models; this is an SD 1.x/2.x model")
        elif not self.refiner:
            given = [f"--{k.replace('_', '-')}" for k in ("aesthetic_score", "negative_aesthetic_score")
                     if getattr(self, k) is not None]
            if given:
                raise UserError(f"{given[0]} conditions an SDXL refiner: add --refiner MODEL or drop it")


NOISE_MODES = ("", "comfy")
REFINER_SWITCH = 0.8  # A1111's and diffusers' examples' usual hand-over point
MICRO_CONDITIONING = ("original_size", "crop_top_left", "target_size", "negative_original_size",
                      "negative_crop_top_left", "negative_target_size", "aesthetic_score", "negative_aesthetic_score")

FIELDS = {f.name for f in fields(GenerationRequest)}
# what a PNG's parameters can carry (ldm.pipeline.metadata reads and writes exactly these)
RECORDED = FIELDS - {"num_images", "batch_size", "init_image", "mask", "resolved"}


def _sampler_layer(layer: Mapping[str, Any]) -> dict[str, Any]:
    """A layer with its sampler and schedule as we name them: A1111's 'DPM++ 2M Karras' -> dpmpp_2m + 'karras',
    'SGM Uniform' -> 'sgm_uniform'. A layer that names a sampler decides the schedule (its label's, as A1111 lets a
    name's suffix win, else its own `schedule`, else the sampler's own) and eta (its own, else the default)."""
    out = dict(layer)
    if out.get("schedule") is not None:
        out["schedule"] = schedule_from_label(out["schedule"])
    if out.get("sampler") is not None:
        out["sampler"], schedule = sampler_from_label(out["sampler"])
        out["schedule"] = schedule or out.get("schedule") or ""
        out.setdefault("eta", None)
    return out


# ---------------------------------------------------------------------------------------------- prompts files

# a prompts file's JSON key -> (field, JSON type); see ldm.prompts_file for the file format
PROMPTS_FILE_KEYS: dict[str, tuple[str, type | tuple[type, ...]]] = {
    "prompt": ("prompt", str), "negative": ("negative_prompt", str), "seed": ("seed", int),
    "cfg": ("cfg", (int, float)), "steps": ("steps", int), "sampler": ("sampler", str), "width": ("width", int),
    "height": ("height", int), "count": ("num_images", int), "schedule": ("schedule", str),
    "eta": ("eta", (int, float)),
}
PROMPTS_FILE_ALIASES = {"negative_prompt": "negative", "num_images": "count", "cfg_scale": "cfg"}


# -------------------------------------------------------------------------------------------- A1111 API payload

def from_a1111(payload: Mapping[str, Any], *, clip_skip: int = 1, known_samplers: str = "") -> dict[str, Any]:
    """An A1111 `/sdapi/v1/txt2img` or `/img2img` body (a dict, images already decoded into `init_image`/`mask`)
    -> a layer of request fields. `clip_skip` is the server-wide option, replaced by the payload's
    override_settings.CLIP_stop_at_last_layers."""
    layer: dict[str, Any] = {"prompt": payload.get("prompt", ""), "negative_prompt": payload.get("negative_prompt", "")}
    name = payload.get("sampler_name") or payload.get("sampler_index")
    try:
        layer["schedule"] = schedule_from_label(payload.get("scheduler") or "")
    except UserError:
        known = ", ".join(["Automatic", *(s.label for s in SCHEDULES.values())])
        raise UserError(f"unknown scheduler '{payload.get('scheduler')}'; known schedulers: {known} "
                        "(GET /sdapi/v1/schedulers)") from None
    if name:
        try:
            layer["sampler"], schedule = sampler_from_label(name)
        except UserError:
            raise UserError(f"unknown sampler '{name}'; known samplers: {known_samplers} "
                            "(GET /sdapi/v1/samplers)") from None
        layer["schedule"] = schedule or layer["schedule"]  # 'DPM++ 2M Karras': the name's schedule wins, as in A1111
        # A1111's `eta` is every sampler's; of ours only TCD takes one (its gamma): others ignore it, as A1111's do
        if SAMPLERS[layer["sampler"]].eta is not None and payload.get("eta") is not None:
            layer["eta"] = payload["eta"]
    for key in ("batch_size", "n_iter"):
        if payload.get(key, 1) < 1:
            raise UserError(f"{key} must be at least 1, got {payload.get(key)}")
    for key, name in (("steps", "steps"), ("cfg_scale", "cfg"), ("seed", "seed"), ("width", "width"),
                      ("height", "height"), ("denoising_strength", "strength"), ("mask_blur", "mask_blur")):
        if payload.get(key) is not None:
            layer[name] = payload[key]
    layer["num_images"] = payload.get("batch_size", 1) * payload.get("n_iter", 1)
    layer["batch_size"] = payload.get("batch_size", 1)
    layer["clip_skip"] = (payload.get("override_settings") or {}).get("CLIP_stop_at_last_layers", clip_skip)
    if payload.get("refiner_checkpoint"):  # A1111 sends "None" for no refiner
        if str(payload["refiner_checkpoint"]).lower() != "none":
            layer["refiner"] = payload["refiner_checkpoint"]
            if payload.get("refiner_switch_at") is not None:
                layer["refiner_switch"] = payload["refiner_switch_at"]
    for key in ("init_image", "mask"):
        if payload.get(key) is not None:
            layer[key] = payload[key]
    scripts = {str(k).lower(): v for k, v in (payload.get("alwayson_scripts") or {}).items()}
    if scripts.get("controlnet"):  # the A1111 ControlNet extension's units, their images decoded
        args = scripts["controlnet"].get("args", []) if isinstance(scripts["controlnet"], dict) else None
        layer["controlnets"] = units_from_a1111(args, payload.get("init_image"))
        layer["ip_adapters"] = ip_adapter_units_from_a1111(args, payload.get("init_image"))  # units of that list
    if layer.get("init_image") is None:  # txt2img: an img2img-only field sent anyway does not apply
        layer.pop("strength", None)
        layer.pop("mask_blur", None)
    return layer

