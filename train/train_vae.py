"""Stage 1: train a KL-regularised autoencoder with LPIPS and patch-GAN losses.

    accelerate launch train/train_vae.py --config configs/vae/tiny.yaml [--resume latest] [key=value ...]

Each optimizer step: (1) the autoencoder minimises NLL (L1/L2 + LPIPS, optional learned log-variance) + KL + an
adaptively weighted GAN term; (2) from `loss.disc_start` on, the PatchGAN discriminator learns to tell the images from
their reconstructions. Both optimizers are stepped here, in plain sight. Every `train.val_every` steps the held-out
images are measured (ldm/vae/validation.py: the loss terms at fixed posterior samples, PSNR, SSIM, LPIPS, the latent
scale; raw and EMA weights) into the trackers and `checkpoints/val_loss.jsonl`. Outputs in `train.output_dir`:
`config.yaml`, `checkpoints/step-*/` (safetensors, atomic), TensorBoard logs, and `vae/` in the diffusers format.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from accelerate.utils import set_seed
from diffusers.optimization import get_constant_schedule_with_warmup
from diffusers.training_utils import EMAModel

from ldm.checkpoint import latest_checkpoint, load_checkpoint, resolve_resume, save_checkpoint
from ldm.data.loader import build_datasets, train_loader
from ldm.errors import exit_on_user_error
from ldm.parallel.backend import clip_gradients
from ldm.parallel.collective import all_processes, replicas_identical
from ldm.progress import progress_bar
from ldm.training.args import parse_train_args
from ldm.training.run import apply_optimizer_settings, NonFiniteSteps, start_run, SkippedImages, ema_weights
from ldm.training.tracking import log_image
from ldm.training.validation import ValidationLog
from ldm.vae.autoencoder import PosteriorAutoencoder
from ldm.vae.config import VAEConfig
from ldm.vae.discriminator import PatchDiscriminator
from ldm.vae.export import export_vae
from ldm.vae.finetune import DecoderAnchor, LatentAnchor, load_anchor_latents, load_trainable_vae
from ldm.vae.losses import (
    LogVariance, adaptive_gan_weight, discriminator_loss, generator_gan_loss, kl_loss, reconstruction_nll,
)
from ldm.vae.perceptual import build_lpips
from ldm.vae.presets import build_vae
from ldm.vae.validation import evaluate_reconstructions

log = logging.getLogger("train_vae")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    cfg, resume = parse_train_args(VAEConfig, argv, description=__doc__.splitlines()[0])
    out = Path(cfg.train.output_dir)
    accelerator = start_run(cfg, cfg.train)

    # ---- models, identical on every process (same seed), then per-process RNG for the posterior samples
    set_seed(cfg.train.seed)
    anchor, decoder_anchor, pretrained_scale = None, None, None
    if cfg.model.pretrained:  # fine-tuning: its latent space (and scale) stays the one a U-Net was trained on
        vae = load_trainable_vae(cfg.model.pretrained, cfg.data.resolution, cfg.model.freeze_encoder)
        pretrained_scale = vae.config.scaling_factor
        if cfg.loss.latent_anchor_weight > 0:
            anchor = LatentAnchor(vae).to(accelerator.device)
        if cfg.loss.decoder_anchor_weight > 0:
            held = load_anchor_latents(cfg.loss.decoder_anchor_latents, vae)
            decoder_anchor = DecoderAnchor(vae, held, cfg.train.seed).to(accelerator.device)
            log.info("decoder anchor %g on %d latents from %s", cfg.loss.decoder_anchor_weight, len(held),
                     cfg.loss.decoder_anchor_latents)
        log.info("fine-tuning the VAE from %s (%s)", cfg.model.pretrained,
                 "decoder only" if cfg.model.freeze_encoder else f"latent anchor {cfg.loss.latent_anchor_weight:g}"
                 if anchor is not None else "encoder and decoder, latents free to move")
    else:
        vae = build_vae(cfg.model.preset, cfg.data.resolution)
    disc = PatchDiscriminator(base_channels=cfg.disc.base_channels, num_layers=cfg.disc.num_layers, norm=cfg.disc.norm)
    logvar = LogVariance(cfg.loss.logvar_init, learn=cfg.loss.learn_logvar)
    perceptual = None
    if cfg.loss.perceptual_weight > 0:
        perceptual = build_lpips(cfg.loss.lpips_net, cfg.loss.lpips_pretrained_backbone).to(accelerator.device)
    trained = [p for p in vae.parameters() if p.requires_grad]  # all but a frozen encoder
    ema = EMAModel(trained, decay=cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    set_seed(cfg.train.seed + accelerator.process_index)

    vae_params = trained + ([logvar.logvar] if cfg.loss.learn_logvar else [])
    opt_vae = torch.optim.Adam(vae_params, lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    opt_disc = torch.optim.Adam(
        disc.parameters(), lr=cfg.optim.disc_lr or cfg.optim.lr, betas=cfg.optim.betas,
        weight_decay=cfg.optim.weight_decay,
    )
    # Schedules count optimizer steps; they are stepped by hand (accelerate would step them once per process).
    sched_vae = get_constant_schedule_with_warmup(opt_vae, cfg.optim.warmup_steps)
    sched_disc = get_constant_schedule_with_warmup(opt_disc, cfg.optim.warmup_steps)
    model, disc, opt_vae, opt_disc = accelerator.prepare(PosteriorAutoencoder(vae), disc, opt_vae, opt_disc)
    logvar.to(accelerator.device)
    if ema is not None:
        ema.to(accelerator.device)

    # ---- data
    train_ds, val_ds = build_datasets(cfg.data, accelerator, cfg.train.seed, caption_column=None)
    log.info("%d training images, %d held out for validation", len(train_ds), len(val_ds))

    # ---- resume
    ckpt_root = out / "checkpoints"
    step, batches_done, scaling_factor = 0, 0, None
    skipped = SkippedImages()
    ckpt_models = {"vae": model, "discriminator": disc, "logvar": logvar}
    ckpt_optimizers = {"vae": opt_vae, "discriminator": opt_disc}
    ckpt_schedulers = {"vae": sched_vae, "discriminator": sched_disc}
    ckpt_emas = {"vae": ema} if ema is not None else {}
    resume_path = resolve_resume(resume, ckpt_root)
    if resume_path is not None:
        state = load_checkpoint(
            accelerator, resume_path, models=ckpt_models, optimizers=ckpt_optimizers, schedulers=ckpt_schedulers,
            emas=ckpt_emas,
        )
        step, scaling_factor = state["step"], state["scaling_factor"]
        hyper = dict(betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
        changed = apply_optimizer_settings(opt_vae, sched_vae, cfg.optim.lr, **hyper)
        changed += apply_optimizer_settings(opt_disc, sched_disc, cfg.optim.disc_lr or cfg.optim.lr, **hyper)
        for name in sorted(set(changed)):
            log.warning("optim.%s differs from the checkpoint's: the config's value is used from here on", name)
        skipped = SkippedImages(state["skipped_images"])
        batches_done = state["batches_consumed"][accelerator.process_index]
        log.info("resumed from %s at step %d", resume_path, step)

    val_log = ValidationLog(ckpt_root, accelerator, start_step=step)  # drops rows after the resumed step
    loader = train_loader(
        train_ds, cfg.train.batch_size, cfg.data.num_workers, cfg.train.seed, accelerator, start_batch=batches_done
    )
    batches = iter(loader)

    def next_batch() -> torch.Tensor:
        """The next non-empty batch; undecodable images are skipped, named in the log and counted."""
        nonlocal batches_done
        while True:
            batch = next(batches)
            batches_done += 1
            skipped.note(batch["skipped"])
            if batch["pixel_values"].shape[0] > 0:
                return batch["pixel_values"].to(accelerator.device)

    def save(step: int) -> Path:
        for name in ("vae", "discriminator"):
            if not replicas_identical(accelerator, ckpt_models[name]):
                raise RuntimeError(f"the {name} replicas differ across processes at step {step}")
        consumed = accelerator.gather(torch.tensor([batches_done], device=accelerator.device)).tolist()
        return save_checkpoint(
            accelerator, ckpt_root, step, models=ckpt_models, optimizers=ckpt_optimizers, schedulers=ckpt_schedulers,
            emas=ckpt_emas, keep_last=cfg.train.keep_last,
            state={"step": step, "batches_consumed": consumed, "skipped_images": skipped.gather(accelerator),
                   "scaling_factor": scaling_factor},
        )

    def validate(step: int) -> None:
        nonlocal scaling_factor
        unwrapped = accelerator.unwrap_model(model).vae
        results = {}
        if ema is not None:  # the training weights, beside the EMA's
            results["raw"], _, _ = evaluate_reconstructions(unwrapped, val_ds, accelerator, perceptual,
                                                            cfg.loss.recon, grid_images=0)
        with ema_weights(ema, trained):  # the weights the run exports
            metrics, grid, val_skipped = evaluate_reconstructions(unwrapped, val_ds, accelerator, perceptual,
                                                                  cfg.loss.recon)
        results["ema" if ema is not None else "raw"] = metrics
        skipped.note(val_skipped)
        scaling_factor = metrics["scaling_factor"]
        val_log.write(step, results)
        if grid is not None:
            log_image(accelerator, "val/reconstructions", grid, step)

    # ---- the loop: one iteration = one optimizer step of each network over `grad_accum` micro-batches
    last_layer = accelerator.unwrap_model(model).last_layer
    raw_disc = accelerator.unwrap_model(disc)
    accum = cfg.train.grad_accum
    nonfinite = NonFiniteSteps(cfg.train.max_nonfinite_steps)
    progress = progress_bar(total=cfg.train.max_steps, initial=step, disable=not accelerator.is_main_process,
                            desc="vae")
    while step < cfg.train.max_steps:
        gan_on = step >= cfg.loss.disc_start
        logs: dict[str, torch.Tensor] = {}
        finite = True
        for micro in range(accum):
            x = next_batch()  # (B, 3, H, W) in [-1, 1]
            last = micro == accum - 1
            # (1) autoencoder: gradients of the micro-batches add up locally, and are averaged across processes once
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                held = None if decoder_anchor is None else decoder_anchor.draw(
                    step * accum + micro, accelerator.process_index, len(x))
                x_hat, posterior, held_decoded = model(x, held)
                nll, logs = reconstruction_nll(
                    x, x_hat, logvar.logvar, perceptual, cfg.loss.perceptual_weight, cfg.loss.recon
                )
                kl = kl_loss(posterior)
                loss = nll + cfg.loss.kl_weight * kl
                logs.update(nll_loss=nll.detach(), kl_loss=kl.detach())
                if anchor is not None:  # how far the latents moved from the pretrained encoder's
                    moved = anchor(x, posterior)
                    loss = loss + cfg.loss.latent_anchor_weight * moved
                    logs.update(anchor_loss=moved.detach())
                if decoder_anchor is not None:  # how far the decoder's images of sampled latents moved
                    drawn_apart = decoder_anchor(held, held_decoded)
                    loss = loss + cfg.loss.decoder_anchor_weight * drawn_apart
                    logs.update(decoder_anchor_loss=drawn_apart.detach())
                if gan_on:
                    # the discriminator judges but does not learn here: no gradient into its parameters
                    raw_disc.requires_grad_(False)
                    g_loss = generator_gan_loss(raw_disc(x_hat))
                    d_weight = cfg.loss.disc_weight * adaptive_gan_weight(
                        nll, g_loss, last_layer, cfg.loss.adaptive_weight_max
                    )
                    loss = loss + d_weight * g_loss
                    logs.update(g_loss=g_loss.detach(), d_weight=d_weight)
                finite &= bool(torch.isfinite(loss))
                accelerator.backward(loss / accum)
            # (2) discriminator on the same images and their (detached) reconstructions, in one forward pass
            if gan_on:
                raw_disc.requires_grad_(True)
                with contextlib.nullcontext() if last else accelerator.no_sync(disc):
                    logits_real, logits_fake = disc(torch.cat([x, x_hat.detach()])).chunk(2)  # (B, 1, h, w) each
                    d_loss = discriminator_loss(logits_real, logits_fake, cfg.loss.gan)
                    finite &= bool(torch.isfinite(d_loss))
                    accelerator.backward(d_loss / accum)
                logs.update(d_loss=d_loss.detach(), logits_real=logits_real.detach().mean(),
                            logits_fake=logits_fake.detach().mean())

        # every process must take the same decision, or the replicas drift apart
        finite = all_processes(accelerator, finite)
        if finite:
            if logvar.logvar.grad is not None:  # not inside DDP: average its gradient across processes by hand
                logvar.logvar.grad = accelerator.reduce(logvar.logvar.grad, "mean")
            norms = [clip_gradients(accelerator, opt_vae, vae_params, cfg.optim.max_grad_norm)]
            if gan_on:
                norms.append(clip_gradients(accelerator, opt_disc, list(disc.parameters()), cfg.optim.max_grad_norm))
            logs.update(grad_norm=norms[0], disc_grad_norm=norms[-1])
            # with fp16 the gradient scaler skips steps with overflowing gradients (and lowers its scale) itself;
            # otherwise the gradients (already averaged, so equal on every process) decide
            if cfg.train.mixed_precision != "fp16":
                finite = all(bool(torch.isfinite(n)) for n in norms)
        if not finite:
            if nonfinite.skip(step, (opt_vae, opt_disc)):
                saved = save(step)
                raise nonfinite.error(step, saved, latest_checkpoint(ckpt_root, before=step))
            continue
        nonfinite.ok()
        opt_vae.step()
        sched_vae.step()
        opt_vae.zero_grad(set_to_none=True)
        if gan_on:  # the discriminator's schedule (warmup) counts from its first step, at `disc_start`
            opt_disc.step()
            sched_disc.step()
            opt_disc.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(trained)
        step += 1
        progress.update(1)

        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            values = {f"train/{k}": float(v) for k, v in logs.items()}
            values.update({"train/lr": sched_vae.get_last_lr()[0],
                           "train/gan_on": float(gan_on), "train/nonfinite_steps": nonfinite.total})
            accelerator.log(values, step=step)
            progress.set_postfix(rec=f"{values['train/rec_loss']:.4f}", refresh=False)
        if step % cfg.train.val_every == 0 or step == cfg.train.max_steps:
            validate(step)
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.max_steps:
            save(step)
    progress.close()
    if accelerator.num_processes > 1:
        log.info("replicas identical across %d processes (checked at every checkpoint)", accelerator.num_processes)

    # ---- the trained autoencoder in the diffusers format, EMA weights if kept, with its measured latent scale
    if scaling_factor is None:
        validate(step)
    skipped_names = skipped.gather(accelerator)
    if pretrained_scale is not None:  # a U-Net trained on the pretrained VAE's latents expects its scale
        log.info("keeping the pretrained VAE's scaling_factor %.5f (this VAE's latents measure %.5f)",
                 pretrained_scale, scaling_factor)
        scaling_factor = pretrained_scale
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model).vae
        with ema_weights(ema, trained):
            export_vae(unwrapped, out / "vae", scaling_factor)
        log.info("saved the VAE (scaling_factor %.5f) to %s", scaling_factor, out / "vae")
        log.info(SkippedImages.summary(skipped_names))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
