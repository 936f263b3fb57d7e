"""Stage 2: train a text-conditioned cross-attention U-Net on cached VAE latents.

    accelerate launch train/train_ldm.py --config configs/ldm/tiny.yaml [--resume latest] [key=value ...]

First the dataset is encoded once with the stage-1 VAE into a latent cache (reused while it matches the VAE, the
data and the transforms). Each step then draws a fresh latent from every cached posterior, noises it at a random
timestep and regresses the U-Net's eps (or v) prediction, conditioned on the frozen text encoder's per-token states
(SDXL, `text_encoder.kind: sdxl`: two towers' context, the pooled embedding and each image's time ids from the latent
cache); `train.caption_dropout` of the captions are replaced by the unconditional branch (the empty prompt, or an SDXL
model's zeros) so classifier-free guidance works. With `lora.enabled` only adapters train (ldm/lora/), on the U-Net
and, with `lora.text_encoder_targets`, the text encoder(s). With `data.num_val` held-out images, every
`train.val_every` steps the validation loss (ldm/unet/val_loss.py: the objective at fixed noise and timesteps, per
timestep band, on the raw and the EMA weights) goes to the trackers and `checkpoints/val_loss.jsonl`; with
`sample.metrics`, every `sample.every` steps so do FID, KID, CLIP score and CMMD of fixed samples of the EMA weights
(ldm/training/sample_metrics.py), a warning when they keep getting worse, and with `sample.stop_when_worse` a stop.
Outputs in `train.output_dir`: `config.yaml`, `latents/` (with `data.val_path`, `latents-val/` too),
`checkpoints/step-*/`, TensorBoard logs in `logs/`, and `model/`: a diffusers model directory (EMA weights) that
`StableDiffusionPipeline.from_pretrained` (SDXL: `StableDiffusionXLPipeline`) loads.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler

from ldm.checkpoint import latest_checkpoint, load_checkpoint, resolve_resume, save_checkpoint
from ldm.data.buckets import check_unet_takes_buckets
from ldm.data.caption_tags import TagOptions
from ldm.data.dataset import split_train_val
from ldm.data.loader import train_loader
from ldm.errors import UserError, exit_on_user_error
from ldm.latents.build import check_cache_family, ensure_latent_cache
from ldm.latents.shard_reader import open_latent_shards_for_run
from ldm.latents.cache import collate_latents, sample_latents
from ldm.latents.text_cache import ensure_text_cache
from ldm.models.load import load_unet
from ldm.models.spec import inspect_model
from ldm.parallel.collective import all_processes, replicas_identical
from ldm.parallel.setup import backend_for
from ldm.progress import progress_bar
from ldm.training.args import parse_train_args
from ldm.training.run import NonFiniteSteps, apply_optimizer_settings, start_run
from ldm.training.sample_metrics import SampleMetrics, held_out_images, reference_files
from ldm.training.tracking import log_image
from ldm.training.validation import ValidationLog, timestep_bands
from ldm.unet.conditioning import batch_conditioning, check_unet_takes, load_run_text_encoder
from ldm.unet.config import LDMConfig
from ldm.unet.objective import build_noise_scheduler, diffusion_loss
from ldm.unet.presets import build_unet
from ldm.unet.trained_weights import trained_weights
from ldm.unet.uncond_words import uncond_words
from ldm.unet.val_loss import unet_val_loss
from ldm.unet.validation_grid import sample_grid, sample_images
from ldm.vae.load_vae import load_vae

log = logging.getLogger("train_ldm")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    cfg, resume = parse_train_args(LDMConfig, argv, description=__doc__.splitlines()[0])
    out = Path(cfg.train.output_dir)
    cache_dir = Path(cfg.cache.dir).expanduser() if cfg.cache.dir else out / "latents"
    if not cfg.cache.rebuild:  # caches built for the other family (SD vs SDXL) are refused before anything is written
        check_cache_family(cache_dir, cfg.family)
    vae = load_vae(cfg.latent_cache().vae, cfg.data.resolution)  # stage 1's VAE, or the fine-tuned model's
    accelerator = start_run(cfg, cfg.train, sharding=True)  # DDP, FSDP2 or DeepSpeed ZeRO-1/2 (configs/accelerate/)
    backend = backend_for(accelerator)  # all that differs between them, chosen once
    # what trains: the whole U-Net, or LoRA adapters (ldm/unet/trained_weights.py); LoRA's settings checked before any
    # latent is cached
    # model.pretrained, checked as every model is (ldm/models/spec.py): a diffusers directory, a single file, a hub id
    base = inspect_model(cfg.model.pretrained) if cfg.model.pretrained else None
    trained = trained_weights(cfg, accelerator, backend, base)
    backend.configure(micro_batch=cfg.train.batch_size, grad_accum=cfg.train.grad_accum,  # DeepSpeed: before `prepare`
                      max_grad_norm=cfg.optim.max_grad_norm, mixed_precision=cfg.train.mixed_precision)
    vae.to(accelerator.device)  # decodes the validation samples

    # ---- frozen text encoder and the latent cache (encoded once, by all processes, each its share)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.train.mixed_precision]
    # SD's one tower (text_encoder.*), or SDXL's two (kind sdxl: from text_encoder.path or model.pretrained)
    text_encoder = load_run_text_encoder(cfg, base, weight_dtype, accelerator.device)
    trained.check_text_encoder(text_encoder)  # LoRA: its adapter targets, with lora.text_encoder_targets
    if cfg.latent_cache().shards:  # ldm-latent-shards output, local or remote: no cache directory, no encoding
        cache = open_latent_shards_for_run(cfg.data, cfg.latent_cache(), cfg.family)
    else:
        cache = ensure_latent_cache(accelerator, cfg.data, cfg.latent_cache(), default_dir=cache_dir, family=cfg.family)
    log.info("%d cached latents of shape %s, scaling factor %.5f", len(cache), cache.latent_shape, cache.scaling_factor)
    # the held-out split, by dataset index as stage 1 makes it (none with data.num_val=0, the default); the cache holds
    # every image, so changing data.num_val never re-encodes. With data.val_path: all of that dataset, cached apart.
    train_idx, val_idx = split_train_val(cache.dataset_size, cfg.data.num_val, seed=0)
    val_cache = cache
    if cfg.data.val_path:
        val_dir = cache_dir.with_name(cache_dir.name + "-val")
        val_cache = ensure_latent_cache(accelerator, dataclasses.replace(cfg.data, path=cfg.data.val_path),
                                        dataclasses.replace(cfg.latent_cache(), dir=str(val_dir)), default_dir=val_dir,
                                        family=cfg.family)
        val_idx = list(range(val_cache.dataset_size))
    val_positions = val_cache.positions_of(val_idx)  # rows of the decodable held-out images
    if val_idx and not val_positions:
        raise UserError(f"none of the {len(val_idx)} held-out images (data.num_val or data.val_path) could be "
                        "decoded: raise data.num_val or fix the dataset")
    if val_idx:
        log.info("%d latents held out for the validation loss", len(val_positions))
    sample_metrics = None  # sample quality on the EMA weights every sample.every steps (ldm/training/sample_metrics.py)
    if cfg.sample.metrics:  # its extractors opened and the reference set's features extracted once, now
        s = cfg.sample
        reference = reference_files(s.reference) if s.reference else held_out_images(cfg.data, accelerator, val_idx)
        sample_metrics = SampleMetrics(accelerator, s.metrics, s.features, s.inception, s.clip_model, reference,
                                       s.metric_prompts or s.prompts, s.metric_images, s.seed, s.worse_patience,
                                       s.stop_when_worse)
    # captions -> Conditioning (context (B, 77, D), SDXL's pooled (B, P)); `empty`: the unconditional branch (batch 1)
    if cfg.latent_cache().text_embeddings:  # every caption encoded once: the steps look their embeddings up
        text_cache = ensure_text_cache(accelerator, text_encoder, cache.captions, cache.directory, cfg.cache.rebuild)
        zeros = getattr(text_encoder, "force_zeros_for_empty_prompt", False)
        encode_text, empty = text_cache.encode_conditioning, text_cache.empty_conditioning(zeros)
        encode_val = encode_text if val_cache is cache else ensure_text_cache(
            accelerator, text_encoder, val_cache.captions, val_cache.directory, cfg.cache.rebuild).encode_conditioning
    else:
        encode_text, empty = text_encoder.encode_conditioning, text_encoder.empty_conditioning()
        encode_val = encode_text
    # train.uncond_words: some captions become words the captions never use, trained as unconditional
    trained.uncond = uncond_words(cfg.train.uncond_words, cfg.train.uncond_vocab, text_encoder, cache.captions)

    # ---- the U-Net (identical on every process), its EMA, optimizer and schedule
    set_seed(cfg.train.seed)
    if base is not None:
        unet = load_unet(base)
    else:
        unet = build_unet(
            cfg.model.preset, sample_size=cache.latent_shape[-1], latent_channels=cache.latent_shape[0],
            cross_attention_dim=text_encoder.hidden_size, pooled_size=getattr(text_encoder, "pooled_size", None),
        )
    check_unet_takes(unet.config, text_encoder)  # context width; SDXL: pooled width and 6 time ids
    if cache.buckets is not None:
        check_unet_takes_buckets(cache.buckets, cfg.data.resolution // cache.latent_shape[-1], unet)
    if cfg.model.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    # LoRA: a frozen base (in the run's dtype) with fp32 adapters (U-Net, text encoder), the only parameters trained
    params = trained.parameters_to_train(unet, text_encoder, base_dtype=weight_dtype)
    set_seed(cfg.train.seed + accelerator.process_index)  # per-process noise, timesteps and caption dropout
    noise_scheduler = build_noise_scheduler(cfg.noise)
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas,
                                  weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps)
    # counts optimizer steps and is stepped by hand (accelerate would step it once per process)
    lr_schedule = get_scheduler(cfg.optim.schedule, optimizer, num_warmup_steps=cfg.optim.warmup_steps,
                                num_training_steps=cfg.train.max_steps)
    unet, optimizer = trained.prepare(unet, optimizer)  # accelerate's wrappers (a trained text encoder's too)
    raw = accelerator.unwrap_model(unet)
    # made after `prepare`, so under FSDP it holds (and updates) each process's shard only
    ema = trained.make_ema(cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    if (setup := backend.describe("the U-Net")) is not None:
        log.info(setup)

    # ---- resume
    ckpt_root = out / "checkpoints"
    step, batches_done = 0, 0
    # "unet", or LoRA's adapters only ("lora", "lora_text_encoder"): its frozen base comes from model.pretrained again
    ckpt = dict(trained.checkpoint(optimizer, ema), schedulers={"lr": lr_schedule})
    resume_path = resolve_resume(resume, ckpt_root)
    if resume_path is not None:
        # a LoRA checkpoint trained with another base, rank, alpha, dropout or targets is refused before loading
        state = load_checkpoint(accelerator, resume_path, check_state=trained.resume_check(resume_path), **ckpt)
        step, batches_done = state["step"], state["batches_consumed"][accelerator.process_index]
        changed = apply_optimizer_settings(optimizer, lr_schedule, cfg.optim.lr, betas=cfg.optim.betas,
                                           weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps)
        for name in changed:
            log.warning("optim.%s differs from the checkpoint's: the config's value is used from here on", name)
        log.info("resumed from %s at step %d", resume_path, step)

    val_log = ValidationLog(ckpt_root, accelerator, start_step=step) if val_positions or sample_metrics else None
    if sample_metrics is not None:
        sample_metrics.replay(val_log.rows)  # a resumed run's streaks of worse evaluations go on
    bands = timestep_bands(cfg.noise.num_train_timesteps, cfg.train.val_bands)
    # captions as written, or their tags shuffled/dropped per item (data.shuffle_tags, data.tag_dropout)
    dataset = cache.dataset(seed=cfg.train.seed, indices=train_idx, tags=TagOptions.from_data(cfg.data))
    loader = train_loader(dataset, cfg.train.batch_size, cfg.data.num_workers, cfg.train.seed, accelerator,
                          start_batch=batches_done, collate=collate_latents, bucket_ids=dataset.bucket_ids())
    batches = iter(loader)

    def next_batch() -> tuple[torch.Tensor, dict]:
        nonlocal batches_done
        batch = next(batches)
        batches_done += 1
        # a fresh latent from each cached posterior, every epoch: z = (mean + std * eps) * scaling_factor
        mean, std = batch["mean"].to(accelerator.device), batch["std"].to(accelerator.device)
        if "mask" in batch:  # loss weights (B, 1, h, w) at latent resolution (data.masks; ldm/data/masks.py)
            batch["mask"] = batch["mask"].to(accelerator.device)
        return sample_latents(mean, std, cache.scaling_factor, cache.shift_factor), batch

    def save(step: int) -> Path:
        if backend.replicated and not replicas_identical(accelerator, trained.modules):
            raise RuntimeError(f"the trained replicas differ across processes at step {step}")
        consumed = accelerator.gather(torch.tensor([batches_done], device=accelerator.device)).tolist()
        state = {"step": step, "batches_consumed": consumed, **trained.state()}  # LoRA: its settings
        return save_checkpoint(accelerator, ckpt_root, step, keep_last=cfg.train.keep_last, state=state, **ckpt)

    def sample(step: int) -> tuple[dict, bool]:
        """The grid, and with sample.metrics their numbers ({"metrics": ...}) and whether to stop."""
        text_encoder.eval()  # an adapted text encoder trains (adapter dropout); the samples use it as inference will
        with trained.ema_weights(ema):
            grid = sample_grid(accelerator, raw, vae, text_encoder, noise_scheduler, cfg.sample)
            if sample_metrics is not None:
                images = sample_images(accelerator, raw, vae, text_encoder, noise_scheduler, cfg.sample,
                                       sample_metrics.items)
        text_encoder.train()
        if grid is not None:
            log_image(accelerator, "samples", grid, step)
        if sample_metrics is None:
            return {}, False
        numbers, stop = sample_metrics.evaluate(step, images)
        return {"metrics": numbers}, stop

    def validate(step: int) -> dict:
        def val_loss() -> dict:
            return unet_val_loss(accelerator, raw, noise_scheduler, val_cache, val_positions, encode_val, cfg.noise,
                                 bands, cfg.train.batch_size, cfg.loss)

        text_encoder.eval()  # as in `sample`
        results = {"raw": val_loss()}  # the training weights
        if ema is not None:
            with trained.ema_weights(ema):
                results["ema"] = val_loss()  # the weights the run exports
        text_encoder.train()
        return results

    # ---- the loop: one iteration = one optimizer step over `grad_accum` micro-batches
    accum = cfg.train.grad_accum
    nonfinite = NonFiniteSteps(cfg.train.max_nonfinite_steps)
    progress = progress_bar(total=cfg.train.max_steps, initial=step, disable=not accelerator.is_main_process,
                            desc="unet")
    while step < cfg.train.max_steps:
        finite, losses = True, []
        for micro in range(accum):
            x0, batch = next_batch()  # (B, C, h, w) scaled latents, and the batch's captions and crop geometry
            last = micro == accum - 1  # gradients are reduced after the last
            with backend.micro_step(unet, last=last), trained.text_sync(last=last):
                # context (B, 77, D) [SDXL: pooled (B, P)], `train.caption_dropout` of them the unconditional branch's;
                # through a trained text encoder's adapters with gradients, else the frozen encoder's (or the text
                # cache's) without; SDXL: with the batch's time ids (B, 6) (original size, crop top-left, target size)
                text = batch_conditioning(trained.condition(batch["captions"], encode_text, empty), batch)
                # autocast by accelerate; with loss masks each latent pixel weighted by its mask (None: the plain mean)
                loss = diffusion_loss(unet, noise_scheduler, x0, text, cfg.noise, cfg.loss, mask=batch.get("mask"))
                finite &= bool(torch.isfinite(loss))
                backend.backward(unet, loss)  # of the mean over the `accum` micro-batches
            losses.append(loss.detach())

        # clipped and applied unless a loss (on any process) or the gradient norm is not finite
        finite, grad_norm = backend.step(trained.modules, optimizer, all_processes(accelerator, finite))
        if not finite:
            if nonfinite.skip(step, (optimizer,)):
                saved = save(step)
                raise nonfinite.error(step, saved, latest_checkpoint(ckpt_root, before=step))
            continue
        nonfinite.ok()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(trained.ema_source())
        step += 1
        progress.update(1)

        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            loss_value = float(accelerator.reduce(torch.stack(losses).mean(), "mean"))
            accelerator.log({"train/loss": loss_value, "train/grad_norm": float(grad_norm),
                             "train/lr": lr_schedule.get_last_lr()[0], "train/nonfinite_steps": nonfinite.total},
                            step=step)
            progress.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
        results, stop = {}, False  # one row of val_loss.jsonl: what was measured at this step
        if cfg.sample.every and (step % cfg.sample.every == 0 or step == cfg.train.max_steps):
            results, stop = sample(step)
        if val_positions and (step % cfg.train.val_every == 0 or step == cfg.train.max_steps):
            results.update(validate(step))
        if results:  # before this step's checkpoint: a run resumed from it never measures the step again
            val_log.write(step, results)
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.max_steps or stop:
            save(step)
        if stop:  # sample.stop_when_worse: the warning above says which metric and since when
            log.warning("stopping at step %d (sample.stop_when_worse): sample quality got worse for "
                        "sample.worse_patience=%d evaluations in a row; checkpoint saved", step,
                        cfg.sample.worse_patience)
            break
    progress.close()
    if accelerator.num_processes > 1 and backend.replicated:
        log.info("replicas identical across %d processes (checked at every checkpoint)", accelerator.num_processes)

    # ---- the EMA weights: model/, a complete diffusers model directory (whole fp32 tensors, gathered when sharded);
    # LoRA: lora/, the adapter in diffusers' and kohya's formats (and with lora.export_merged, model/ fused)
    trained.export(out, ema, vae=vae, noise_scheduler=noise_scheduler)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
