"""Evaluation tools: reading shapes-domain attributes back from images and scoring them."""

from ldm.eval.reader import attribute_accuracy, read_attributes

__all__ = ["attribute_accuracy", "read_attributes"]
