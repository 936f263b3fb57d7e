"""The one denoising loop, shared by txt2img, img2img and inpainting.

The modes differ only in where the loop starts (pure noise, or the init image's latents re-noised to the first
timestep) and in what happens to the known region of an inpainting job; that state arrives in `Inpaint`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ldm.pipeline.guidance import classifier_free_guidance, rescale_guidance
from ldm.text.conditioning import Conditioning

UNetFn = Callable[..., tuple[torch.Tensor, ...]]  # unet(x, t, encoder_hidden_states=..., [added_cond_kwargs=...],
#                                                     return_dict=False)


@dataclass
class Inpaint:
    """What an inpainting job adds to the loop. Latent shapes (B, C, h, w) with h = H / vae factor."""

    blend_mask: torch.Tensor  # (B, 1, h, w) 1 = repaint; a latent pixel is repainted if any pixel under it is
    known_latents: torch.Tensor | None  # (B, C, h, w) the init image's clean latents (x0 of the known region);
    #                                     None for a 9-channel U-Net repainting from noise (it never blends)
    noise: torch.Tensor  # (B, C, h, w) the noise the starting latents were made with, reused to re-noise x0
    # 9-channel inpainting U-Nets only: their extra input, concatenated after the (scaled) latents
    unet_mask: torch.Tensor | None = None  # (B, 1, h, w) nearest-downsampled mask, the U-Net's training convention
    masked_image_latents: torch.Tensor | None = None  # (B, C, h, w) latents of the image with the mask blanked


def denoise(
    unet: UNetFn,
    scheduler: SchedulerMixin,
    latents: torch.Tensor,  # (B, C, h, w) at timesteps[0]'s noise level
    timesteps: torch.Tensor,  # (S,) the part of the schedule to run
    cond: Conditioning,  # the prompt's: context (B, 77 * n, D) [, SDXL's pooled and time ids]
    uncond: Conditioning | None,  # the negative (or empty) prompt's; None = no guidance
    guidance_scale: float,
    guidance_rescale: float = 0.0,
    generators: list[torch.Generator] | None = None,
    inpaint: Inpaint | None = None,
    on_step: Callable[[], None] | None = None,
    extra_kwargs: Callable[[torch.Tensor, torch.Tensor, int, int, dict], dict] | None = None,
) -> torch.Tensor:
    """Run the sampler over `timesteps` and return the final latents (B, C, h, w).

    `extra_kwargs(x, t, i, n, unet_kwargs)`: more U-Net keyword arguments for step i of the n here, from the scaled
    input x (copies * B, C, h, w) before a 9-channel U-Net's extra channels (ControlNet residuals,
    ldm/controlnet/residuals.py)."""
    # w = 1 is the conditional prediction and w = 0 the unconditional one: either needs one branch, not two
    if uncond is None or guidance_scale == 1.0:
        branches, context = "cond", cond
    elif guidance_scale == 0.0:
        branches, context = "uncond", uncond
    else:
        branches, context = "both", Conditioning.cat([uncond, cond])  # (2B, ...), one batched U-Net call per step
    copies = 2 if branches == "both" else 1
    unet_kwargs = context.unet_kwargs()
    step_kwargs = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    if inpaint is not None and inpaint.masked_image_latents is not None:
        extra = torch.cat([inpaint.unet_mask, inpaint.masked_image_latents], dim=1)  # (B, 1 + C, h, w)
        extra = torch.cat([extra] * copies)  # (copies * B, 1 + C, h, w)
    else:
        extra = None

    for i, t in enumerate(timesteps):
        x = torch.cat([latents] * copies)  # (copies * B, C, h, w)
        x = scheduler.scale_model_input(x, t)  # sigma-parameterised samplers divide by sqrt(sigma^2 + 1)
        added = {} if extra_kwargs is None else extra_kwargs(x, t, i, len(timesteps), unet_kwargs)
        if extra is not None:
            x = torch.cat([x, extra], dim=1)  # (copies * B, 2C + 1, h, w) for a 9-channel inpainting U-Net
        pred = unet(x, t, **unet_kwargs, **added, return_dict=False)[0]  # eps or v, (copies * B, C, h, w)
        if branches == "both":
            pred_uncond, pred_cond = pred.chunk(2)
            pred = classifier_free_guidance(pred_uncond, pred_cond, guidance_scale)
            pred = rescale_guidance(pred, pred_cond, guidance_rescale)
        latents = scheduler.step(pred, t, latents, **step_kwargs, return_dict=False)[0]

        if inpaint is not None and inpaint.masked_image_latents is None:
            # ordinary U-Net: overwrite the known region with the init image re-noised to the level the latents are
            # at now (the next timestep), so the repainted region is denoised in context (RePaint-style blending)
            known = inpaint.known_latents
            if i + 1 < len(timesteps):
                known = scheduler.add_noise(known, inpaint.noise, timesteps[i + 1 : i + 2])
            latents = (1 - inpaint.blend_mask) * known + inpaint.blend_mask * latents
        if on_step is not None:
            on_step()
    return latents
