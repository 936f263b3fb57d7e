"""`ldm-eval`: the command and its reports. The shapes-domain judges it runs (attribute reader, prompt sets, prompt
adherence, VAE reconstructions) live with the demo, in `ldm.demo`; the sample-quality metrics (`--metrics`) are
`quality` (generate, extract, gather, measure) over `ldm.quality` (the estimators, extractors and `measure`, which
training runs use too)."""

from ldm.demo.adherence import Settings, img2img_test, inpaint_test, negative_prompt_test, prompt_adherence
from ldm.demo.prompts import prompt_sets
from ldm.demo.reader import attribute_accuracy, read_attributes

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
