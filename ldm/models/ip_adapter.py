"""Opening IP-Adapters (ldm/ip_adapter) as models are opened: a spec from headers and configs alone, with every check
that needs no weight (the file, its kind, the model family it was made for, its image encoder and whether that
fits), then `load_ip_adapters` on the opened U-Net (-> `IPAdapters`, which requests name by the names given here).
`switch_ip_adapters` is the one way a pipeline changes them (`Pipeline.open(ip_adapters=...)`, and
`Pipeline.use_ip_adapters` for the server, whose requests name their own): kept when they are the same, else the old
ones taken off and the new ones loaded."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.errors import UserError
from ldm.files import sha256_file
from ldm.ip_adapter.adapters import IPAdapters, LoadedAdapter
from ldm.ip_adapter.format import AdapterFacts, find_adapter_file, inspect_adapter, read_adapter
from ldm.ip_adapter.image_encoder import (
    EncoderFacts,
    ImageEncoder,
    find_image_encoder,
    inspect_image_encoder,
    load_vision_model,
)
from ldm.models.spec import ModelSpec

__all__ = ["IPAdapterSpec", "IPAdapters", "inspect_ip_adapter", "inspect_ip_adapters", "load_ip_adapters",
           "switch_ip_adapters"]
HASH_LENGTH = 10  # A1111's short checkpoint hash: the first 10 hex digits of the file's sha256
# the text-context widths of the full-size families, for messages
_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL", 1280: "the SDXL refiner"}


@dataclass(frozen=True)
class IPAdapterSpec:
    name: str  # as the user named it (--ip-adapter): what requests and PNGs call it
    adapter: AdapterFacts
    encoder: EncoderFacts


def inspect_ip_adapter(name: str | Path, model: ModelSpec, image_encoder: str | None = None,
                       label: str | None = None) -> IPAdapterSpec:
    """The spec of the adapter `name` (a .safetensors file, or a directory holding one) for `model`, with its image
    encoder (`image_encoder`, else found next to it or in the model's directory); anything that does not fit is a
    one-line `UserError`. `label`: what requests, PNGs and messages call it (default: `name`)."""
    path = find_adapter_file(name)
    name = str(name) if label is None else label
    facts = inspect_adapter(path)
    width = model.unet_config.get("cross_attention_dim")
    if facts.cross_attention_dim != width:
        raise UserError(f"IP-Adapter '{name}' is for {_family(facts.cross_attention_dim)} but '{model.name}' is "
                        f"{model.kind} ({width}-dim text context): use an IP-Adapter made for this model's family")
    root = model.root if model.root.is_dir() else None
    encoder = inspect_image_encoder(find_image_encoder(image_encoder, path, root))
    if encoder.output_dim(facts.hidden_states) != facts.image_embed_dim:
        gives = f"{encoder.output_dim(facts.hidden_states)}-dim " + (
            "hidden states" if facts.hidden_states else "image embeddings")
        raise UserError(f"the image encoder '{encoder.path}' gives {gives} but IP-Adapter '{name}' ({facts.variant}) "
                        f"takes {facts.encoder_output}: pass --ip-image-encoder DIR with the encoder it was trained "
                        "with")
    return IPAdapterSpec(name, facts, encoder)


def inspect_ip_adapters(names: Sequence[str], model: ModelSpec, image_encoders: Sequence[str] = ()
                        ) -> tuple[IPAdapterSpec, ...]:
    """Specs for several adapters; `image_encoders` holds none (each found), one (for all) or one per adapter."""
    if len(image_encoders) not in (0, 1, len(names)):
        raise UserError(f"--ip-image-encoder was given {len(image_encoders)} times for {len(names)} --ip-adapter: "
                        "give it once (for all) or once per adapter")
    encoders = list(image_encoders) * len(names) if len(image_encoders) == 1 else list(image_encoders)
    return tuple(inspect_ip_adapter(n, model, encoders[i] if encoders else None) for i, n in enumerate(names))


def load_ip_adapters(specs: Sequence[IPAdapterSpec], unet, device: torch.device, dtype: torch.dtype) -> IPAdapters:
    """Read the adapters and their image encoders (one load per encoder directory) and put them on `unet`."""
    models: dict[Path, object] = {}
    loaded, state_dicts = [], []
    for spec in specs:
        key = spec.encoder.path.resolve()
        if key not in models:
            models[key] = load_vision_model(spec.encoder, device, dtype)
        encoder = ImageEncoder(models[key], spec.encoder, spec.adapter.path.parent)
        digest = sha256_file(spec.adapter.path)[:HASH_LENGTH]
        loaded.append(LoadedAdapter(spec.name, digest, spec.adapter, encoder))
        state_dicts.append(read_adapter(spec.adapter.path))
    adapters = IPAdapters.attach(unet, loaded, state_dicts)
    adapters.specs = tuple(specs)
    return adapters


def switch_ip_adapters(current: IPAdapters, specs: Sequence[IPAdapterSpec], unet, device: torch.device,
                       dtype: torch.dtype) -> IPAdapters:
    """The adapters `specs` on `unet` in place of `current` (those on it): `current` itself when they are the same
    (names, files and encoders, in order), else `current` taken off (`IPAdapters.detach`: the U-Net as it was) and
    `specs` loaded. Should loading fail, the U-Net is left with none, as `current` (now empty) says."""
    if current.specs == tuple(specs):
        return current
    current.detach(unet)
    return load_ip_adapters(specs, unet, device, dtype)


def _family(width: int) -> str:
    known = _FAMILIES.get(width)
    return f"{known} models ({width}-dim text context)" if known else f"models with a {width}-dim text context"
