"""A1111's LoRA tags in prompts (`<lora:name:0.8>`), finding the named files in a LoRA directory, and their hashes.

A1111 (modules/extra_networks.py, extensions-builtin/Lora/extra_networks_lora.py) removes every `<lora:...>` (and
its alias `<lyco:...>`) from the prompt before encoding it and reads the tag's fields split on ':' as
`name[:te_multiplier[:unet_multiplier]]` (both default 1.0; the U-Net's defaults to the text encoder's; `te=` and
`unet=` name them). A name is a file's stem, looked up in the LoRA directory and below.

Its PNG infotext records `Lora hashes: "name: 0123456789ab, other: ..."`: per LoRA the first 12 hex digits of
the sha256 of the safetensors file *after its header* (kohya's "addnet" hash, so editing the metadata keeps it:
A1111 modules/hashes.py `addnet_hash_safetensors`, extensions-builtin/Lora/network.py `shorthash = hash[0:12]`).
On replay A1111 uses the hashes to find a LoRA that was renamed; so do we.
"""

from __future__ import annotations

import glob
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ldm.errors import UserError
from ldm.files import sha256_file
from ldm.weights import PICKLE_SUFFIXES, safetensors_data_offset

log = logging.getLogger(__name__)

TAG = re.compile(r"<(lora|lyco):([^>]*)>")
SHORT_HASH_LENGTH = 12
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class LoraTag:
    name: str
    scale: float  # the U-Net's multiplier
    text_scale: float  # the text encoder's
    text: str  # the tag as written


def split_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """'a cat <lora:ink:0.8>' -> ('a cat ', [LoraTag('ink', 0.8, 0.8, '<lora:ink:0.8>')]); bad tags are a UserError."""
    tags = [_parse_tag(m.group(0), m.group(2)) for m in TAG.finditer(prompt)]
    return TAG.sub("", prompt), tags


def _parse_tag(text: str, body: str) -> LoraTag:
    items = body.split(":")
    name, positional, named = items[0].strip(), [], {}
    for item in items[1:]:
        key, eq, value = item.partition("=")
        if eq:
            named[key.strip()] = value
        else:
            positional.append(item)
    if not name:
        raise UserError(f"LoRA tag {text} has no name: write <lora:NAME:WEIGHT>, e.g. <lora:ink:0.8>")
    unknown = set(named) - {"te", "unet"}
    if unknown or len(positional) > 2:
        extra = ", ".join(sorted(unknown)) or "a fourth field"
        raise UserError(f"LoRA tag {text}: {extra} is not supported; write <lora:NAME:WEIGHT> or "
                        "<lora:NAME:TE_WEIGHT:UNET_WEIGHT> (or te=/unet=)")
    text_scale = _weight(positional[0], text) if positional else 1.0
    text_scale = _weight(named["te"], text) if "te" in named else text_scale
    scale = _weight(positional[1], text) if len(positional) > 1 else text_scale
    scale = _weight(named["unet"], text) if "unet" in named else scale
    return LoraTag(name, scale, text_scale, text)


def _weight(value: str, where: str) -> float:
    try:
        w = float(value)
    except ValueError:
        w = math.nan
    if not math.isfinite(w):
        raise UserError(f"LoRA {where}: the weight '{value}' is not a number; write e.g. <lora:NAME:0.8>")
    return w


def parse_lora_option(value: str) -> tuple[Path, float]:
    """--lora FILE[:SCALE] -> (path, scale); the scale is what follows the last ':' (so C:\\x.safetensors works)."""
    path, sep, tail = value.rpartition(":")
    if not sep or "/" in tail or "\\" in tail or Path(value).expanduser().exists():
        return Path(value).expanduser(), 1.0
    try:
        scale = float(tail)
    except ValueError:
        scale = math.nan
    if not math.isfinite(scale) or not path:
        raise UserError(f"--lora '{value}': the scale after the last ':' must be a finite number, e.g. "
                        "--lora FILE.safetensors:0.8")
    return Path(path).expanduser(), scale


def tag_text(name: str, scale: float, text_scale: float) -> str:
    """The tag A1111 would write for a LoRA given outside the prompt (its 'Add network to prompt' option)."""
    weights = _num(scale) if scale == text_scale else f"{_num(text_scale)}:{_num(scale)}"
    return f"<lora:{name}:{weights}>"


def _num(x: float) -> str:
    return repr(int(x)) if float(x).is_integer() else repr(float(x))


# ------------------------------------------------------------------------------------------------- finding the files


def find_in_dir(name: str, lora_dir: str | Path | None, tag: str, expected_hash: str | None = None) -> Path:
    """The file `<lora:name>` means: `name.safetensors` (or a diffusers LoRA directory `name/`) in `lora_dir` or
    below; failing that, when a PNG recorded the hash, the file there with that hash (A1111 does the same)."""
    if lora_dir is None:
        raise UserError(f"the prompt names LoRA '{name}' ({tag}): pass --lora-dir DIR, the directory that holds "
                        f"{name}.safetensors")
    root = Path(lora_dir).expanduser()
    if not root.is_dir():
        raise UserError(f"--lora-dir '{root}' is not a directory")
    if "/" in name or "\\" in name or name.startswith("."):
        # a name is a file's stem, as in A1111; a path could reach outside the directory (ldm-serve takes prompts
        # from the network)
        raise UserError(f"LoRA name '{name}' ({tag}) is a path: name a file in --lora-dir by its stem, e.g. "
                        f"<lora:{Path(name).name or 'NAME'}:1>")
    pattern = glob.escape(name)
    # NAME.safetensors first; a diffusers LoRA directory NAME/ only if there is none (the training's output folder
    # holds both layouts of the same adapter)
    candidates = sorted(p for p in root.rglob(f"{pattern}.safetensors") if p.is_file()) or sorted(
        p.parent for p in root.rglob(f"{pattern}/{DIFFUSERS_FILE}"))
    if candidates:
        found = candidates[0]
        if len(candidates) > 1:
            _say_once(logging.WARNING, "LoRA '%s' is in --lora-dir %d times; using %s", name, len(candidates), found)
        if expected_hash and lora_hash(found) != expected_hash:
            _say_once(logging.WARNING, "LoRA '%s': %s has hash %s, but the image was made with %s; the result may "
                      "differ", name, found, lora_hash(found), expected_hash)
        return found
    if expected_hash:
        for path in sorted(root.rglob("*.safetensors")):
            if lora_hash(path) == expected_hash:
                _say_once(logging.INFO, "LoRA '%s' found by its hash %s: %s", name, expected_hash, path)
                return path
    pickles = [p for p in root.rglob(f"{pattern}.*") if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        raise UserError(f"LoRA '{name}' ({tag}) is only in --lora-dir as the pickle file '{pickles[0]}'; only "
                        ".safetensors LoRAs are loaded")
    hashed = f" or a file with hash {expected_hash}" if expected_hash else ""
    raise UserError(f"LoRA '{name}' ({tag}) is not in --lora-dir '{root}' (no {name}.safetensors there or "
                    f"below{hashed})")


_said: set[tuple] = set()


def _say_once(level: int, message: str, *args) -> None:
    """The CLI resolves tags before loading the model and the pipeline again: say each finding once."""
    if (message, args) not in _said:
        _said.add((message, args))
        log.log(level, message, *args)


# ------------------------------------------------------------------------------------------------------------ hashes

_hash_cache: dict[tuple[str, int, int], str] = {}


def lora_hash(path: str | Path) -> str:
    """A1111's short hash of a LoRA file: sha256 of a .safetensors file's bytes after its header, 12 hex digits."""
    from ldm.lora.load import find_lora_file

    path = find_lora_file(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _hash_cache:
        _hash_cache[key] = sha256_file(path, offset=safetensors_data_offset(path))[:SHORT_HASH_LENGTH]
    return _hash_cache[key]


def format_lora_hashes(named_hashes: list[tuple[str, str]]) -> str:
    """[('ink', '0123456789ab')] -> 'ink: 0123456789ab' (names without ':' and ',', as A1111 writes them)."""
    seen, parts = set(), []
    for name, short in named_hashes:
        alias = name.replace(":", "").replace(",", "")
        if alias not in seen:
            seen.add(alias)
            parts.append(f"{alias}: {short}")
    return ", ".join(parts)


def parse_lora_hashes(text: str) -> dict[str, str]:
    """'ink: 0123456789ab, b: ...' -> {'ink': '0123456789ab', ...}; entries without a ':' are dropped."""
    out = {}
    for item in text.split(","):
        name, sep, short = item.partition(":")
        if sep and name.strip():
            out[name.strip()] = short.strip()
    return out


def check_lora_inputs(options: list[str], prompt: str, lora_dir: str | Path | None,
                      expected_hashes: dict[str, str] | None = None) -> list[tuple[Path, float]]:
    """The CLI's checks before any model is loaded: every --lora FILE[:SCALE] and every tag in the prompt names
    a readable .safetensors file. Returns the --lora (path, scale) pairs."""
    from ldm.lora.load import find_lora_file
    from ldm.weights import check_safetensors_file

    loras = []
    for value in options:
        path, scale = parse_lora_option(value)
        check_safetensors_file(find_lora_file(path))
        loras.append((path, scale))
    for tag in split_tags(prompt)[1]:
        expected = (expected_hashes or {}).get(tag.name.replace(":", "").replace(",", ""))
        check_safetensors_file(find_lora_file(find_in_dir(tag.name, lora_dir, tag.text, expected)))
    return loras
