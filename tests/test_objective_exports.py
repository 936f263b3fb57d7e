"""Models trained with the new objectives (ldm/unet/objective.py), exported (ldm/unet/export.py): diffusers loads and
samples a zero-terminal-SNR and a flow-matching export as our pipeline does."""

from __future__ import annotations

import pytest
import torch

from ldm.unet.objective import NoiseConfig, build_noise_scheduler

# --------------------------------------------------- exports: diffusers samples them as our pipeline does

PROMPT, NEGATIVE, SIZE = "a red car", "blurry", 32


@pytest.fixture(scope="module")
def tiny_pipe(tiny_model):
    from ldm.pipeline.pipeline import Pipeline

    return Pipeline.from_pretrained(tiny_model, device="cpu", dtype="fp32")


def _export(tiny_pipe, directory, noise: NoiseConfig):
    from ldm.text.config import TextEncoderConfig
    from ldm.unet.export import export_model

    return export_model(directory, unet=tiny_pipe.unet, vae=tiny_pipe.vae, noise_scheduler=build_noise_scheduler(noise),
                        text_encoder=tiny_pipe.text_encoder, text_cfg=TextEncoderConfig())


@pytest.mark.slow
def test_a_zero_terminal_snr_export_samples_the_same_in_diffusers(tiny_pipe, tmp_path, one_torch_thread):
    """diffusers' StableDiffusionPipeline with the scheduler the export ships (DDIM, rescaled betas, trailing
    spacing), guidance rescale 0.7, against `ldm-generate`'s pipeline with the default (the model's own) schedule."""
    from diffusers import StableDiffusionPipeline

    from ldm.pipeline.pipeline import Pipeline

    directory = _export(tiny_pipe, tmp_path / "ztsnr", NoiseConfig(prediction_type="v_prediction",
                                                                  zero_terminal_snr=True))
    ref = StableDiffusionPipeline.from_pretrained(directory, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    config = ref.scheduler.config
    assert type(ref.scheduler).__name__ == "DDIMScheduler" and config.rescale_betas_zero_snr
    assert config.timestep_spacing == "trailing" and config.prediction_type == "v_prediction"
    ref.scheduler.set_timesteps(3)
    assert ref.scheduler.timesteps.tolist() == [999, 666, 332]  # starts at the pure-noise timestep
    ours = Pipeline.from_pretrained(directory, device="cpu", dtype="fp32")
    result = ours(PROMPT, NEGATIVE, steps=3, cfg=7.5, guidance_rescale=0.7, sampler="ddim", seed=2, height=SIZE,
                  width=SIZE, show_progress=False)
    theirs = ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=7.5, guidance_rescale=0.7,
                 height=SIZE, width=SIZE, generator=[torch.Generator().manual_seed(2)], output_type="np").images
    # the same float32 operations in the same order up to the U-Net batch layout: 1e-4 as tests/test_pipeline.py
    assert abs(result.decoded - theirs).max() <= 1e-4
    from ldm.errors import UserError

    with pytest.raises(UserError, match="zero-terminal-SNR model and sampler 'heun'"):
        ours(PROMPT, steps=2, sampler="heun", seed=0, height=SIZE, width=SIZE, show_progress=False)


@pytest.mark.slow
def test_a_flow_matching_export_samples_the_same_with_diffusers_flow_match_euler(tiny_pipe, tmp_path,
                                                                                 one_torch_thread):
    """The export's parts loaded by diffusers, sampled by its FlowMatchEulerDiscreteScheduler in the loop its flow
    pipelines run (StableDiffusionPipeline itself cannot: the scheduler has no init_noise_sigma), against ours."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusionPipeline

    from ldm.errors import UserError
    from ldm.models.spec import inspect_model
    from ldm.pipeline.pipeline import Pipeline

    directory = _export(tiny_pipe, tmp_path / "flow", NoiseConfig(prediction_type="flow"))
    assert inspect_model(directory).prediction_type == "flow"
    ours = Pipeline.from_pretrained(directory, device="cpu", dtype="fp32")
    result = ours(PROMPT, NEGATIVE, steps=4, cfg=7.5, sampler="euler", seed=3, height=SIZE, width=SIZE,
                  show_progress=False)
    with pytest.raises(UserError, match="flow-matching model: it samples with --sampler euler"):
        ours(PROMPT, steps=2, sampler="euler_a", seed=0, height=SIZE, width=SIZE, show_progress=False)

    ref = StableDiffusionPipeline.from_pretrained(directory, safety_checker=None, requires_safety_checker=False)
    scheduler = ref.scheduler
    assert type(scheduler) is FlowMatchEulerDiscreteScheduler
    with torch.no_grad():
        cond, uncond = ref.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)
        latents = torch.randn((1, 4, SIZE // 2, SIZE // 2), generator=torch.Generator().manual_seed(3))
        scheduler.set_timesteps(4)
        for t in scheduler.timesteps:
            pred_u, pred_c = ref.unet(torch.cat([latents] * 2), t, encoder_hidden_states=torch.cat([uncond, cond])
                                      ).sample.chunk(2)
            latents = scheduler.step(pred_u + 7.5 * (pred_c - pred_u), t, latents).prev_sample
        image = ref.vae.decode(latents / ref.vae.config.scaling_factor).sample
    theirs = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(result.decoded - theirs).max() <= 1e-4  # as above
    # and img2img re-noises on the straight line: (1 - sigma) x0 + sigma eps
    img2img = ours(PROMPT, steps=4, sampler="euler", seed=3, init_image=result.images[0], strength=0.5,
                   show_progress=False)
    assert img2img.steps_run == 2
