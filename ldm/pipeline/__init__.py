"""Inference: one request, one pipeline for txt2img, img2img and inpainting over diffusers' models and schedulers."""

from ldm.pipeline.metadata import format_parameters, parse_parameters
from ldm.pipeline.pipeline import GenerationResult, Pipeline
from ldm.pipeline.request import GenerationRequest
from ldm.pipeline.samplers import SAMPLERS

__all__ = ["SAMPLERS", "GenerationRequest", "GenerationResult", "Pipeline", "format_parameters", "parse_parameters"]
