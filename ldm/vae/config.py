"""The stage-1 config: `train/train_vae.py --config configs/vae/<preset>.yaml [key=value ...]`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ldm.config import check
from ldm.data.config import DataConfig
from ldm.vae.load_vae import check_vae, vae_directory
from ldm.vae.presets import VAE_PRESETS, downsampling_factor


@dataclass
class VAEModelConfig:
    preset: str = "tiny"  # a name from ldm.vae.presets.VAE_PRESETS (ignored with `pretrained`)
    # fine-tuning (ldm/vae/finetune.py): start from a trained VAE, a diffusers AutoencoderKL directory or a model
    # directory with vae/, instead of the preset's random weights; the export keeps its latent scaling factor
    pretrained: str = ""
    freeze_encoder: bool = False  # with `pretrained`: train the decoder only, so the latents stay exactly the same

    def validate(self) -> None:
        check(self.preset in VAE_PRESETS, "model.preset", f"'{self.preset}' is not one of {', '.join(VAE_PRESETS)}")
        check(not self.freeze_encoder or bool(self.pretrained), "model.freeze_encoder",
              "needs model.pretrained (a randomly initialised encoder must learn)")


@dataclass
class DiscriminatorConfig:
    num_layers: int = 3
    base_channels: int = 64
    norm: Literal["group", "batch", "none"] = "group"

    def validate(self) -> None:
        check(self.num_layers >= 1, "disc.num_layers", f"must be >= 1, got {self.num_layers}")
        check(self.base_channels >= 4, "disc.base_channels", f"must be >= 4, got {self.base_channels}")


@dataclass
class VAELossConfig:
    recon: Literal["l1", "l2"] = "l1"
    perceptual_weight: float = 1.0  # 0 disables LPIPS
    lpips_net: Literal["vgg", "alex"] = "vgg"
    # torchvision downloads the backbone's ImageNet weights; false = random backbone (tests, offline), said in the logs
    lpips_pretrained_backbone: bool = True
    kl_weight: float = 1e-6
    gan: Literal["hinge", "vanilla"] = "hinge"
    disc_start: int = 50001  # optimizer step at which the GAN terms switch on
    disc_weight: float = 0.5  # multiplies the adaptive weight
    adaptive_weight_max: float = 1e4
    learn_logvar: bool = False
    logvar_init: float = 0.0
    # with model.pretrained: weight of the squared distance of the posterior means from the pretrained encoder's
    # (summed over latent elements, per image), which keeps the latent space a U-Net was trained on
    latent_anchor_weight: float = 0.0
    # with model.pretrained: weight of the squared difference (summed per image, pixels in [-1, 1]) between the
    # decoder's images and the pretrained decoder's on latents a U-Net generated (`decoder_anchor_latents`, a file from
    # `python -m ldm.pipeline.anchor_latents`), a batch of them each step
    decoder_anchor_weight: float = 0.0
    decoder_anchor_latents: str = ""

    def validate(self) -> None:
        for key in ("perceptual_weight", "kl_weight", "disc_weight", "adaptive_weight_max", "latent_anchor_weight",
                    "decoder_anchor_weight"):
            check(getattr(self, key) >= 0, f"loss.{key}", f"must be >= 0, got {getattr(self, key)}")
        check(self.disc_start >= 0, "loss.disc_start", f"must be >= 0, got {self.disc_start}")


@dataclass
class OptimConfig:
    lr: float = 4.5e-6 * 8  # LDM's 4.5e-6 per sample, at its per-GPU batch of 8
    disc_lr: float | None = None  # None: same as lr
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # 0 disables clipping

    def validate(self) -> None:
        check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        check(self.disc_lr is None or self.disc_lr > 0, "optim.disc_lr", f"must be > 0, got {self.disc_lr}")
        check(all(0 <= b < 1 for b in self.betas), "optim.betas", f"must be in [0, 1), got {self.betas}")
        check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        check(self.max_grad_norm >= 0, "optim.max_grad_norm", "must be >= 0 (0 disables clipping)")


@dataclass
class VAETrainLoopConfig:
    output_dir: str = "runs/vae"
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 8  # per process
    grad_accum: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 0
    ema_decay: float = 0.0  # 0 disables the EMA of the VAE weights
    log_every: int = 10
    val_every: int = 250
    checkpoint_every: int = 250
    keep_last: int = 3
    report_to: Literal["tensorboard", "none"] = "tensorboard"
    cpu: bool = False  # force the CPU even when a GPU is present
    max_nonfinite_steps: int = 10  # consecutive non-finite losses before training stops

    def validate(self) -> None:
        for key in ("max_steps", "batch_size", "grad_accum", "log_every", "val_every", "checkpoint_every"):
            check(getattr(self, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(self, key)}")
        check(self.keep_last >= 1, "train.keep_last", f"must be >= 1, got {self.keep_last}")
        check(0 <= self.ema_decay < 1, "train.ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        check(self.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be >= 1")


@dataclass
class VAEConfig:
    model: VAEModelConfig = field(default_factory=VAEModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(caption_column=None))
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: VAETrainLoopConfig = field(default_factory=VAETrainLoopConfig)

    def validate(self) -> None:
        check(not self.data.buckets, "data.buckets", "aspect-ratio buckets are for stage 2 (train_ldm.py): the VAE "
              "trains on square crops; set data.buckets=false")
        check(self.data.num_val >= 1, "data.num_val", "the VAE needs held-out images to validate and measure its "
              "latent scale: set data.num_val >= 1")
        anchored = self.loss.latent_anchor_weight > 0
        check(not anchored or bool(self.model.pretrained), "loss.latent_anchor_weight",
              "anchors the latents to model.pretrained's encoder: set model.pretrained, or the weight to 0")
        check(not (anchored and self.model.freeze_encoder), "loss.latent_anchor_weight",
              "has nothing to anchor with model.freeze_encoder=true (the latents cannot move): choose one")
        if self.loss.decoder_anchor_weight > 0:
            check(bool(self.model.pretrained), "loss.decoder_anchor_weight",
                  "holds the decoder to model.pretrained's: set model.pretrained, or the weight to 0")
            check(bool(self.loss.decoder_anchor_latents), "loss.decoder_anchor_latents",
                  "is needed with loss.decoder_anchor_weight: write one with python -m ldm.pipeline.anchor_latents")
        else:
            check(not self.loss.decoder_anchor_latents, "loss.decoder_anchor_latents",
                  "is only used with loss.decoder_anchor_weight > 0: set the weight, or drop the file")
        if self.model.pretrained:  # its own layout, not the preset's: config.json is read, no weights
            check_vae(vae_directory(self.model.pretrained), self.data.resolution,
                      hint="set model.pretrained to a VAE directory or a model directory with vae/")
            return
        f = downsampling_factor(self.model.preset)
        check(
            self.data.resolution % f == 0,
            "data.resolution",
            f"{self.data.resolution} is not divisible by the VAE's downsampling factor {f} (preset '{self.model.preset}')",
        )
