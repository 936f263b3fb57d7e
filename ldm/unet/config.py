"""The stage-2 config: `train/train_ldm.py --config configs/ldm/<preset>.yaml [key=value ...]`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ldm.config import check
from ldm.data.config import DataConfig
from ldm.latents.config import LatentCacheConfig
from ldm.lora.config import LoRAConfig
from ldm.quality.metrics import METRICS
from ldm.text.config import TextEncoderConfig
from ldm.text.prompt_syntax import check_prompt
from ldm.unet.losses import LossConfig
from ldm.unet.objective import NoiseConfig, check_objective
from ldm.unet.presets import UNET_PRESETS, is_sdxl_preset


@dataclass
class UNetModelConfig:
    preset: str = "tiny"  # a name from ldm.unet.presets.UNET_PRESETS; ignored when `pretrained` is set
    # fine-tuning: a diffusers-format model directory (its unet/ is loaded; with `pretrained_vae` also its vae/), or a
    # single .safetensors checkpoint in the original layout (its U-Net; ldm/singlefile)
    pretrained: str = ""
    pretrained_vae: bool = False
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        check(self.preset in UNET_PRESETS, "model.preset", f"'{self.preset}' is not one of {', '.join(UNET_PRESETS)}")
        check(not self.pretrained_vae or bool(self.pretrained), "model.pretrained_vae", "needs model.pretrained")
        check(not (self.pretrained_vae and Path(self.pretrained).is_file()), "model.pretrained_vae",
              "needs a model directory; convert the single file first (ldm-convert FILE DIR) and set "
              "model.pretrained=DIR")


@dataclass
class LDMOptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8
    schedule: Literal["constant", "cosine", "linear"] = "constant"  # after the warmup
    warmup_steps: int = 500
    max_grad_norm: float = 1.0  # 0 disables clipping

    def validate(self) -> None:
        check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        check(all(0 <= b < 1 for b in self.betas), "optim.betas", f"must be in [0, 1), got {self.betas}")
        check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        check(self.eps > 0, "optim.eps", "must be > 0")
        check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        check(self.max_grad_norm >= 0, "optim.max_grad_norm", "must be >= 0 (0 disables clipping)")


@dataclass
class LDMTrainLoopConfig:
    output_dir: str = "runs/ldm"
    max_steps: int = 10000  # optimizer steps
    batch_size: int = 32  # per process
    grad_accum: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 0
    ema_decay: float = 0.9999  # 0 disables the EMA (the exported model then holds the raw weights)
    caption_dropout: float = 0.1  # share of captions replaced by the empty prompt, for classifier-free guidance
    # share of captions replaced by random words that no training caption uses, also trained as unconditional, so
    # that unseen words in a negative prompt act like the empty prompt (ldm/unet/uncond_words.py); 0 = off. The words
    # come from `uncond_vocab`: "tokenizer" (the text encoder's vocabulary) or a text file with one word a line
    uncond_words: float = 0.0
    uncond_vocab: str = "tokenizer"
    log_every: int = 10
    # validation loss on data.num_val held-out images (none by default: set data.num_val to turn it on), every
    # val_every steps and at the end, per band of training timesteps (val_bands equal ranges; ldm/unet/val_loss.py)
    val_every: int = 1000
    val_bands: int = 4
    checkpoint_every: int = 1000
    keep_last: int = 3
    report_to: Literal["tensorboard", "none"] = "tensorboard"
    cpu: bool = False
    max_nonfinite_steps: int = 10

    def validate(self) -> None:
        for key in ("max_steps", "batch_size", "grad_accum", "log_every", "val_every", "val_bands", "checkpoint_every",
                    "keep_last"):
            check(getattr(self, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(self, key)}")
        check(0 <= self.ema_decay < 1, "train.ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        check(0 <= self.caption_dropout <= 1, "train.caption_dropout", f"must be in [0, 1], got {self.caption_dropout}")
        check(self.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be >= 1")
        check(0 <= self.uncond_words <= 1, "train.uncond_words", f"must be in [0, 1], got {self.uncond_words}")
        check(self.uncond_words == 0 or self.uncond_vocab == "tokenizer" or Path(self.uncond_vocab).is_file(),
              "train.uncond_vocab", f"'{self.uncond_vocab}' is neither 'tokenizer' nor a word file (one word a line)")


@dataclass
class SampleConfig:
    """Validation images: fixed prompts and seeds, sampled with guidance every `every` steps. With `metrics`, also
    sample quality on the EMA weights (docs/evaluation.md): image k of `metric_images` is prompt k % P of
    `metric_prompts` (P prompts; empty: `prompts`) at seed `seed + k`, measured against `reference`."""

    every: int = 1000  # 0 disables
    prompts: list[str] = field(default_factory=lambda: ["a red circle", "a photo of a cat"])
    seed: int = 0
    cfg: float = 7.5
    steps: int = 25
    sampler: str = "ddim"
    metrics: list[str] = field(default_factory=list)  # any of fid, kid, clip, cmmd (ldm-eval --metrics); none: off
    metric_prompts: list[str] = field(default_factory=list)
    metric_images: int = 64
    # the reference images: a directory (searched recursively), or empty for the held-out images (data.num_val)
    reference: str = ""
    # "standard": FID/KID on the FID Inception (`inception`: its weights file), CLIP score/CMMD on a local CLIPModel
    # directory (`clip_model`); "demo": the shapes demo's image tower for all four (offline, shapes only)
    features: Literal["standard", "demo"] = "standard"
    inception: str = ""
    clip_model: str = ""
    # a warning once a metric has been worse than its best for `worse_patience` evaluations in a row; with
    # `stop_when_worse` the run then saves a checkpoint and stops
    worse_patience: int = 3
    stop_when_worse: bool = False

    def validate(self) -> None:
        check(self.every >= 0, "sample.every", "must be >= 0 (0 disables)")
        check(self.steps >= 1, "sample.steps", "must be >= 1")
        check(self.cfg >= 0, "sample.cfg", "must be >= 0")
        for i, prompt in enumerate(self.prompts):  # sampled with A1111 prompt syntax: refuse a bad one now, not hours in
            check_prompt(prompt, f"config key 'sample.prompts[{i}]'")
        for i, prompt in enumerate(self.metric_prompts):
            check_prompt(prompt, f"config key 'sample.metric_prompts[{i}]'")
        unknown = [name for name in self.metrics if name not in METRICS]
        check(not unknown, "sample.metrics", f"unknown metric '{unknown[0] if unknown else ''}': choose from "
              f"{', '.join(METRICS)}")
        if not self.metrics:
            check(not self.stop_when_worse, "sample.stop_when_worse", "needs sample.metrics: name the metrics to watch")
            return
        check(self.every >= 1, "sample.metrics", "are measured every sample.every steps: set sample.every >= 1")
        check(bool(self.metric_prompts or self.prompts), "sample.metric_prompts", "is empty and so is sample.prompts: "
              "give the prompts to measure")
        check(self.metric_images >= 2, "sample.metric_images", f"must be >= 2 (the metrics compare sets), got "
              f"{self.metric_images}")
        check(self.worse_patience >= 1, "sample.worse_patience", f"must be >= 1, got {self.worse_patience}")
        check(self.features == "standard" or not (self.inception or self.clip_model), "sample.features",
              "demo measures with the shapes demo's own image tower: clear sample.inception and sample.clip_model, or "
              "set sample.features=standard")
        check(self.features == "demo" or bool(self.clip_model) or not {"clip", "cmmd"} & set(self.metrics),
              "sample.clip_model", "is needed for sample.metrics clip/cmmd with sample.features=standard: a local "
              "transformers CLIPModel directory, or sample.features=demo")


@dataclass
class LDMConfig:
    model: UNetModelConfig = field(default_factory=UNetModelConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    # no held-out images unless asked for: LoRA datasets are small, and stage 2 trains on every image by default
    data: DataConfig = field(default_factory=lambda: DataConfig(num_val=0))
    cache: LatentCacheConfig = field(default_factory=LatentCacheConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    loss: LossConfig = field(default_factory=LossConfig)  # the loss per element and its weighting (ldm/unet/losses.py)
    optim: LDMOptimConfig = field(default_factory=LDMOptimConfig)
    train: LDMTrainLoopConfig = field(default_factory=LDMTrainLoopConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # train adapters only (ldm/lora/); off by default

    def latent_cache(self) -> LatentCacheConfig:
        """The cache section, encoding with the fine-tuned model's own VAE when `model.pretrained_vae` is set."""
        if not self.model.pretrained_vae:
            return self.cache
        return dataclasses.replace(self.cache, vae=str(Path(self.model.pretrained) / "vae"))

    @property
    def family(self) -> str:
        """"sdxl" (SDXL's two text towers, pooled embedding and time ids) or "sd" (SD 1.x/2.x's one tower)."""
        return "sdxl" if self.text_encoder.kind == "sdxl" else "sd"

    def validate(self) -> None:
        check_objective(self.noise, self.loss)
        check(self.noise.prediction_type != "flow" or not self.sample.every or self.sample.sampler == "euler",
              "sample.sampler", "a flow-matching model samples with 'euler' (diffusers' FlowMatchEulerDiscreteScheduler): "
              "set sample.sampler=euler")
        check(self.data.caption_column is not None, "data.caption_column", "stage 2 needs captions: name the column")
        check(self.train.val_bands <= self.noise.num_train_timesteps, "train.val_bands",
              f"{self.train.val_bands} bands of {self.noise.num_train_timesteps} training timesteps would leave some "
              "empty: use at most noise.num_train_timesteps (4 is usual)")
        if not self.model.pretrained:
            check(is_sdxl_preset(self.model.preset) == (self.family == "sdxl"), "model.preset",
                  f"'{self.model.preset}' is {'' if is_sdxl_preset(self.model.preset) else 'not '}SDXL-shaped but "
                  f"text_encoder.kind is {self.text_encoder.kind}: pair SDXL presets (sdxl-tiny, sdxl-small, sdxl) "
                  "with text_encoder.kind=sdxl, the others with clip or open_clip")
            check(self.model.preset != "sdxl-refiner", "model.preset", "training an SDXL refiner is not supported "
                  "(its time ids hold an aesthetic score the latent cache does not record): use sdxl-small or sdxl")
        check(self.family != "sdxl" or bool(self.text_encoder.path or self.model.pretrained), "text_encoder.path",
              "is empty, which takes the towers of model.pretrained, but model.pretrained is empty too: name an SDXL "
              "model directory")
        check(not self.lora.enabled or bool(self.model.pretrained), "lora.enabled",
              "needs model.pretrained: the base model (directory or .safetensors file) the adapter is trained for")
        if self.lora.enabled and self.lora.text_encoder_targets:
            # LoRA files name the text encoder's modules as transformers' CLIPTextModel does (kohya's
            # lora_te_text_model_*, diffusers' text_encoder.*; A1111's SD 2 files too): an adapter on open_clip's
            # modules would load nowhere
            check(self.text_encoder.kind in ("clip", "sdxl"), "lora.text_encoder_targets",
                  "needs text_encoder.kind=clip (or sdxl): LoRA files name transformers CLIP modules, so an adapter "
                  "on an open_clip encoder would load nowhere; convert the encoder to a CLIPTextModel or set "
                  "lora.text_encoder_targets=[]")
            check(not self.cache.text_embeddings, "cache.text_embeddings",
                  "cannot be used with lora.text_encoder_targets: the text encoder trains, so captions are encoded at "
                  "every step; set cache.text_embeddings=false")
        check(not (self.cache.text_embeddings and (self.data.shuffle_tags or self.data.tag_dropout > 0)),
              "cache.text_embeddings", "cannot be used with data.shuffle_tags or data.tag_dropout: it stores one "
              "embedding per caption as written, and those rewrite the caption every step; set one of them off")
        check(not (self.train.uncond_words and self.cache.text_embeddings), "train.uncond_words",
              "needs the text encoder at every step (its random words are not in the text-embedding cache): set "
              "cache.text_embeddings=false")
        check(self.data.center_crop, "data.center_crop", "the latent cache stores centre crops only (a cached random "
              "crop would be the same crop every epoch): set it to true")
        held_out = self.data.num_val > 0 or bool(self.data.val_path)
        check(not self.sample.metrics or bool(self.sample.reference) or held_out, "sample.reference",
              "is empty, which measures sample.metrics against the held-out images, but there are none: set "
              "data.num_val or data.val_path, or name a directory of reference images")
        check(not self.data.random_flip or "left" not in " ".join(self.sample.prompts), "data.random_flip",
              "flips contradict 'left'/'right' in captions; set data.random_flip=false")
