"""`--from-png`: a PNG's `parameters` text chunk (ours, or one AUTOMATIC1111's webui wrote) -> option values.

A1111 writes (modules/processing.py, create_infotext):

    a red car, (masterpiece:1.2)
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x512,
    Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1        <- one line in the file

Its sampler names are mapped to ours (`ldm.pipeline.samplers.sampler_from_label`), `Schedule type: Karras` (newer
versions) and `... Karras` sampler names (older ones) both mean Karras sigmas, and the same for `SGM Uniform`; other
schedule types and an `Eta` of a sampler that takes none (A1111 writes one for its ancestral samplers) are named in
the warning. Fields we do not use (`Model hash`,
`Version`, `VAE`, ...) are named once, in one warning. Options given on the command line win over the PNG and its
fields for them are not even read: `--model DIR` replaces the PNG's `Model` (an A1111 model is named by a file name
the user may not have), `--sampler` replaces a sampler we do not have.
"""

from __future__ import annotations

import logging
from typing import Any

from ldm.errors import UserError
from ldm.pipeline.metadata import PNG_KEY, parameter_fields, parse_parameters, unread_fields
from ldm.pipeline.samplers import SCHEDULES, schedule_from_label

log = logging.getLogger(__name__)

# CLI option (dest) -> the PNG fields it replaces when given
OVERRIDES: dict[str, tuple[str, ...]] = {
    "sampler": ("Sampler", "Schedule type", "Eta"), "schedule": ("Schedule type",), "eta": ("Eta",),
    "model": ("Model",),
    "steps": ("Steps",), "cfg": ("CFG scale",), "seed": ("Seed",), "hires_upscaler": ("Hires upscaler",),
    "clip_skip": ("Clip skip",), "refiner": ("Refiner", "Refiner switch at"),
    "controlnets": ("ControlNet",),  # --controlnet MODEL replaces every 'ControlNet N' unit of the PNG
}


def read_png_text(path: str) -> str:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            text = image.info.get(PNG_KEY)
    except FileNotFoundError:
        raise UserError(f"--from-png '{path}' does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"cannot read --from-png '{path}': {e}") from None
    if not text:
        raise UserError(f"'{path}' has no '{PNG_KEY}' text chunk to replay")
    return text


def replay_values(path: str, given: set[str] = frozenset()) -> dict[str, Any]:
    """The PNG's settings as GenerationRequest field names (a layer), skipping the fields of the options in `given`."""
    text = read_png_text(path)
    skip = tuple(field for option in given for field in OVERRIDES.get(option, ()))
    fields = parameter_fields(text)
    try:
        values = parse_parameters(text, skip=skip)
    except UserError as e:  # a sampler we do not have
        raise UserError(f"'{path}' was made with sampler '{fields.get('Sampler')}', which ldm-generate does not "
                        f"have: pass --sampler NAME to replay it with another ({e})") from None
    except ValueError as e:
        raise UserError(f"cannot parse the parameters in '{path}': {e}") from None
    ignored = [k for k in unread_fields(text) if k not in skip]
    schedule = fields.get("Schedule type")
    if "Schedule type" not in skip and schedule is not None and not _known_schedule(schedule):
        known = " and ".join(s.label for s in SCHEDULES.values())
        ignored.append(f"Schedule type ({schedule}: only {known} are reproduced; the sampler's own spacing is used)")
    if "Eta" in fields and "Eta" not in skip and "eta" not in values:
        ignored.append(f"Eta (only the tcd sampler takes one; '{values.get('sampler', 'euler_a')}' does not)")
    if ignored:
        log.warning("'%s': ignoring fields ldm-generate does not use: %s", path, ", ".join(ignored))
    return values


def _known_schedule(label: str) -> bool:
    try:
        schedule_from_label(label)
        return True
    except UserError:
        return False


def model_hint(error: UserError, path: str, model: str) -> UserError:
    """A model named by the PNG that is not here: say where the name came from and how to replace it."""
    return UserError(f"{error}; the model '{model}' is named by --from-png '{path}': pass --model DIR to replay it "
                     "with a model you have")
