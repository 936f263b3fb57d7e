"""Frozen text encoders (CLIP via transformers, OpenCLIP via open_clip) behind one interface: prompts -> (B, 77, D)."""

from ldm.text.config import TextEncoderConfig
from ldm.text.encoder import CLIPTextEncoder, FrozenTextEncoder
from ldm.text.load_encoder import load_text_encoder
from ldm.text.tiny import tiny_clip_text_config, tiny_clip_text_encoder, tiny_clip_text_model
from ldm.text.tokenizer import PromptTruncatedWarning, offline_clip_tokenizer

__all__ = [
    "CLIPTextEncoder",
    "FrozenTextEncoder",
    "PromptTruncatedWarning",
    "TextEncoderConfig",
    "load_text_encoder",
    "offline_clip_tokenizer",
    "tiny_clip_text_config",
    "tiny_clip_text_encoder",
    "tiny_clip_text_model",
]
