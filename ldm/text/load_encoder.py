"""`load_text_encoder(cfg)`: a local directory, the Hugging Face cache, or (when reachable) the hub.

Without a network the hub libraries retry for half a minute before failing. Here the local cache is tried first;
only when that misses is the hub asked, and only after `ldm.hub.reachable()` says it can be reached at all. So an
offline machine gets a one-line `UserError` in seconds, naming the model and the fix.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from ldm import hub
from ldm.errors import UserError
from ldm.text.config import HUB_SCHEMAS, TextEncoderConfig
from ldm.text.encoder import CLIPTextEncoder, FrozenTextEncoder

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def load_text_encoder(
    cfg: TextEncoderConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> FrozenTextEncoder:
    """The frozen text encoder `cfg` names, in `dtype` on `device`."""
    cfg.validate()
    if cfg.kind == "sdxl":  # two towers of an SDXL model: ldm.models.load.load_sdxl_text_encoder
        raise ValueError("text_encoder.kind=sdxl names an SDXL model's towers: load them with load_sdxl_text_encoder")
    if cfg.kind == "clip":
        tokenizer, model = _load_clip(cfg.path)
        encoder: FrozenTextEncoder = CLIPTextEncoder(tokenizer, model, cfg.layer)
    else:
        encoder = _load_open_clip(cfg.path, cfg.pretrained or None, cfg.layer)
    return encoder.to(device=device, dtype=dtype)


def _offline_error(name: str) -> UserError:
    return UserError(
        f"cannot load text encoder '{name}' from the Hugging Face hub (offline?): "
        "download it once or point text_encoder.path at a local directory"
    )


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# ---------------------------------------------------------------------------------------------- transformers CLIP


def _load_clip(path: str) -> tuple[CLIPTokenizer, CLIPTextModel]:
    local = Path(path).expanduser()
    if local.is_dir():
        return _load_clip_dir(local)
    if not hub.is_hub_id(path):
        raise UserError(f"text encoder directory '{path}' does not exist: fix text_encoder.path")
    try:  # the local cache: no network, so it works offline for anything downloaded before
        return _load_clip_hub(path, local_files_only=True)
    except (OSError, ValueError):
        pass
    if not hub.reachable():
        raise _offline_error(path)
    try:
        return _load_clip_hub(path, local_files_only=False)
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load text encoder '{path}' from the Hugging Face hub ({_first_line(e)}): "
            "check the id in text_encoder.path"
        ) from None


def _load_clip_hub(name: str, local_files_only: bool) -> tuple[CLIPTokenizer, CLIPTextModel]:
    # a CLIP repository holds model and tokenizer at its top; a diffusers repository in subfolders
    error: Exception | None = None
    for model_folder, tokenizer_folder in (("", ""), ("text_encoder", "tokenizer")):
        try:
            model = CLIPTextModel.from_pretrained(
                name, subfolder=model_folder, local_files_only=local_files_only, use_safetensors=True
            )
            tokenizer = CLIPTokenizer.from_pretrained(
                name, subfolder=tokenizer_folder, local_files_only=local_files_only
            )
            return tokenizer, model
        except (OSError, ValueError) as e:
            error = e
    assert error is not None
    raise error


def _load_clip_dir(root: Path) -> tuple[CLIPTokenizer, CLIPTextModel]:
    if (root / "text_encoder" / "config.json").is_file():  # a diffusers model directory
        model_dir, tokenizer_dir = root / "text_encoder", root / "tokenizer"
    elif (root / "config.json").is_file():
        model_dir = root
        tokenizer_dir = root if any((root / f).is_file() for f in _TOKENIZER_FILES) else root / "tokenizer"
    else:
        raise UserError(
            f"'{root}' holds no text encoder (no config.json, no text_encoder/config.json): point text_encoder.path "
            "at a transformers CLIPTextModel directory or a diffusers model directory"
        )
    if not any((tokenizer_dir / f).is_file() for f in _TOKENIZER_FILES):
        raise UserError(
            f"no tokenizer files (vocab.json + merges.txt, or tokenizer.json) in '{tokenizer_dir}': "
            "save the tokenizer next to the text encoder with tokenizer.save_pretrained(...)"
        )
    try:
        model = CLIPTextModel.from_pretrained(model_dir, local_files_only=True, use_safetensors=True)
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load a CLIP text encoder from '{root}' ({_first_line(e)}): fix text_encoder.path"
        ) from None
    return tokenizer, model


# ---------------------------------------------------------------------------------------------- open_clip


def _load_open_clip(name: str, pretrained: str | None, layer: str) -> FrozenTextEncoder:
    import open_clip  # lazy: takes seconds to import

    from ldm.text.openclip import OpenCLIPTextEncoder, check_open_clip_tokenizer

    if name.startswith("hf-hub:") and not open_clip_hub_cached(name) and not hub.reachable():
        raise _offline_error(name)
    checkpoint = _open_clip_checkpoint(name, pretrained) if pretrained else None
    if not pretrained and not name.startswith(HUB_SCHEMAS):
        log.warning("open_clip model %s has random weights (text_encoder.pretrained is empty)", name)
    try:
        model = open_clip.create_model(name, pretrained=checkpoint)
        check_open_clip_tokenizer(open_clip.get_tokenizer(name), name)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - open_clip raises RuntimeError, ValueError, OSError, AssertionError...
        raise UserError(f"cannot build open_clip model '{name}' ({_first_line(e)}): fix text_encoder.path") from None
    return OpenCLIPTextEncoder(model, layer)  # type: ignore[arg-type]


def open_clip_hub_cached(name: str) -> bool:
    """Whether an 'hf-hub:org/name' open_clip model's config is in the local cache (then its weights likely are)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name.removeprefix("hf-hub:"), "open_clip_config.json"), str)


def _open_clip_checkpoint(name: str, pretrained: str) -> str:
    """A local weights file for `pretrained`: the file itself, or the cached/downloaded file of a pretrained tag."""
    import open_clip

    if Path(pretrained).expanduser().is_file():
        return str(Path(pretrained).expanduser())
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise UserError(
            f"open_clip model '{name}' has no pretrained tag or file '{pretrained}' (tags: {tags}): "
            "fix text_encoder.pretrained"
        )
    if hub.reachable():
        try:
            return open_clip.download_pretrained(cfg)
        except Exception as e:  # noqa: BLE001 - urllib, hub and checksum errors alike
            raise UserError(f"cannot download open_clip weights '{name}' '{pretrained}' ({_first_line(e)})") from None
    cached = _cached_open_clip_weights(cfg)
    if cached is None:
        raise UserError(
            f"cannot load text encoder '{name}' weights '{pretrained}' from the hub (offline?): download them once "
            "or point text_encoder.pretrained at a local weights file"
        )
    return cached


def _cached_open_clip_weights(cfg: dict) -> str | None:
    """The file open_clip would download for a pretrained tag, if it is already in the cache; no network."""
    from huggingface_hub import try_to_load_from_cache
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])
        filename = filename or HF_WEIGHTS_NAME
        # open_clip prefers a safetensors twin of the weights file when the repository has one
        safe = HF_SAFE_WEIGHTS_NAME if filename == HF_WEIGHTS_NAME else os.path.splitext(filename)[0] + ".safetensors"
        for candidate in (safe, filename):
            found = try_to_load_from_cache(repo, candidate)
            if isinstance(found, str):
                return found
    if cfg.get("url"):  # open_clip's URL downloads land in ~/.cache/clip
        file = Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])
        if file.is_file():
            return str(file)
    return None
