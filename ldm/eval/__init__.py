"""Evaluation tools: reading shapes-domain attributes back from images and scoring a model's prompt adherence."""

from ldm.eval.adherence import Settings, img2img_test, inpaint_test, negative_prompt_test, prompt_adherence
from ldm.eval.prompts import prompt_sets
from ldm.eval.reader import attribute_accuracy, read_attributes

__all__ = [
    "Settings",
    "attribute_accuracy",
    "img2img_test",
    "inpaint_test",
    "negative_prompt_test",
    "prompt_adherence",
    "prompt_sets",
    "read_attributes",
]
