"""IP-Adapters on a U-Net, through diffusers' own machinery, and a request's image prompts -> the conditioning.

Attaching is diffusers' `UNet2DConditionModel._load_ip_adapter_weights`, the code its `load_ip_adapter` runs: every
cross-attention processor becomes an `IPAdapterAttnProcessor2_0` holding each adapter's to_k_ip/to_v_ip, and
`unet.encoder_hid_proj` a `MultiIPAdapterImageProjection`, which the U-Net's forward runs on
`added_cond_kwargs["image_embeds"]` (one tensor per adapter) and hands, with the text context, to the processors:

    out = attn(q, K_text, V_text) + sum_i scale_i * attn(q, to_k_ip_i(tokens_i), to_v_ip_i(tokens_i))

What this module adds:
- the image embeds travel in `Conditioning.image_embeds` (cond: the image's, uncond: zeros or a zero image's, as
  diffusers' `encode_image` makes them), so the one loop batches and guides them like the text;
- the scales are set from each request (diffusers' `set_ip_adapter_scale` with one float per adapter);
- the projection is kept out of the U-Net's module tree (a plain attribute, where its forward finds it): LoRA
  merging names the U-Net's Linear layers by the original single-file layout (ldm/lora/targets.py), which has no
  name for it. LoRAs merge into the U-Net's own weights (ldm/lora/apply.py); the processors' separate to_k_ip/to_v_ip
  and the projection are not LoRA targets, so the two compose.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from ldm.errors import UserError
from ldm.ip_adapter.format import AdapterFacts
from ldm.ip_adapter.image_encoder import ImageEncoder
from ldm.ip_adapter.unit import IPAdapterUnit
from ldm.text.conditioning import Conditioning

log = logging.getLogger(__name__)


@dataclass(eq=False)
class LoadedAdapter:
    name: str  # as requests and PNGs name it (what the user passed to --ip-adapter)
    hash: str  # the file's short sha256
    facts: AdapterFacts
    encoder: ImageEncoder  # shared by the adapters that read the same encoder


class IPAdapters:
    """The IP-Adapters on one U-Net (none: the U-Net is untouched), in the order requests name them."""

    def __init__(self, adapters: list[LoadedAdapter] | None = None, processors: list | None = None,
                 before: tuple[dict, object] | None = None) -> None:
        self.adapters = adapters or []
        self._processors = processors or []  # the U-Net's IPAdapterAttnProcessor2_0s
        self._before = before  # (attention processors, config.encoder_hid_dim_type) of the U-Net before `attach`
        self.specs: tuple = ()  # what they were opened from (ldm.models.ip_adapter), to tell a request's from them

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.adapters]

    @classmethod
    def attach(cls, unet, adapters: list[LoadedAdapter], state_dicts: list[dict]) -> IPAdapters:
        """Put `adapters` (with their `format.read_adapter` tensors) on `unet`, checked against its layers."""
        if not adapters:
            return cls()
        for adapter in adapters:
            check_fits(unet, adapter.facts, adapter.name)
        before = (unet.attn_processors, unet.config.encoder_hid_dim_type)
        from diffusers.models.attention_processor import IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0
        from diffusers.utils import logging as diffusers_logging

        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # its `to()` warns about fp32-kept modules the U-Net does not have
        try:
            unet._load_ip_adapter_weights(state_dicts)
        finally:
            diffusers_logging.set_verbosity(verbosity)
        projection = unet._modules.pop("encoder_hid_proj")  # (see the module docstring)
        object.__setattr__(unet, "encoder_hid_proj", projection)
        processors = [p for p in unet.attn_processors.values()
                      if isinstance(p, (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0))]
        return cls(adapters, processors, before)

    def detach(self, unet) -> None:
        """Take the adapters off `unet`, as diffusers' `unload_ip_adapter` does: its attention processors (the very
        objects it had before `attach`) and `encoder_hid_dim_type` restored, the projection removed; the image
        encoders are let go. This object is then empty (no adapters), as the U-Net is."""
        if self._before is not None:
            processors, hid_dim_type = self._before
            unet.set_attn_processor(processors)
            object.__setattr__(unet, "encoder_hid_proj", None)  # the plain attribute `attach` made (or None)
            unet.config.encoder_hid_dim_type = hid_dim_type
        self.adapters, self._processors, self._before, self.specs = [], [], None, ()

    def condition(self, cond: Conditioning, uncond: Conditioning | None, units: tuple[IPAdapterUnit, ...]
                  ) -> tuple[Conditioning, Conditioning | None]:
        """(cond, uncond) with the image embeds of `units`' images (uncond None: guidance off); the request's units
        must name the opened adapters, in order. Sets each adapter's scale for the calls that follow."""
        names = [u.model for u in units]
        if names != self.names:
            raise UserError(self._mismatch(names))
        if not units:
            return cond, uncond
        for unit, adapter in zip(units, self.adapters):
            if unit.hash and unit.hash != adapter.hash:
                log.warning("IP-Adapter '%s' is not the file the image was made with (hash %s, now %s)",
                            unit.model, unit.hash, adapter.hash)
        for processor in self._processors:
            processor.scale = [float(u.scale) for u in units]
        positive, negative = [], []
        for unit, adapter in zip(units, self.adapters):
            c, u = adapter.encoder.embeds(unit.image, adapter.facts.hidden_states, uncond is not None)
            positive.append(c[None])  # (1, 1, ...): diffusers' (batch, images per adapter, ...)
            negative.append(None if u is None else u[None])
        return cond.with_image_embeds(positive), None if uncond is None else uncond.with_image_embeds(negative)

    def recorded(self, units: tuple[IPAdapterUnit, ...]) -> tuple[IPAdapterUnit, ...]:
        """`units` as a PNG records them: each with its adapter's hash, without the image."""
        return tuple(replace(u, image=None, hash=a.hash) for u, a in zip(units, self.adapters))

    def _mismatch(self, names: list[str]) -> str:
        if not self.adapters:
            return (f"the request names the IP-Adapter '{names[0]}' but it was not opened with this model: pass "
                    "--ip-adapter MODEL (Pipeline.open(ip_adapters=...) or use_ip_adapters)")
        opened = ", ".join(f"'{n}'" for n in self.names)
        if not names:
            return (f"this model was opened with the IP-Adapter(s) {opened}: the request needs an image prompt for "
                    "each (--ip-image FILE)")
        return (f"the request names the IP-Adapter(s) {', '.join(repr(n) for n in names)} but the model was opened "
                f"with {opened}: open it with the ones the request names")


def check_fits(unet, facts: AdapterFacts, name: str) -> None:
    """An adapter whose to_k_ip/to_v_ip do not match the U-Net's cross-attention layers (another model's) is a
    `UserError`, before diffusers would fail on a missing key or a shape. Its layer keys are the processors' indices
    as diffusers numbers them: 1 + 2j for the j-th cross-attention processor."""
    expected = {}
    for j, path in enumerate(p for p in unet.attn_processors if not p.endswith("attn1.processor")):
        attention = unet.get_submodule(path.removesuffix(".processor"))
        expected[1 + 2 * j] = (attention.to_q.in_features, unet.config.cross_attention_dim)  # (C, D)
    if set(facts.layers) != set(expected):
        raise UserError(f"IP-Adapter '{name}' does not fit this U-Net: it has weights for {len(facts.layers)} "
                        f"cross-attention layers, the U-Net has {len(expected)}; it was made for another model")
    for key, shape in expected.items():
        if tuple(facts.layers[key]) != shape:
            raise UserError(f"IP-Adapter '{name}' does not fit this U-Net: its layer {key} is "
                            f"{tuple(facts.layers[key])}, the U-Net's is {shape}; it was made for another model")
