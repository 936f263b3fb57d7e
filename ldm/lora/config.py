"""The `lora:` section of the stage-2 config: train low-rank adapters instead of the whole U-Net (off by default)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ldm.config import check

# The U-Net's attention projections, as diffusers' LoRA scripts (and kohya's defaults for SD 1.x attention) train.
ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# Feed-forward layers of every transformer block (GEGLU projection and output): add them for more capacity.
FEED_FORWARD_TARGETS = ["ff.net.0.proj", "ff.net.2"]
# A transformers CLIP text encoder's attention projections (kohya's and diffusers' text-encoder targets); its MLP
# layers are fc1 and fc2.
CLIP_TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
CLIP_MLP_TARGETS = ["fc1", "fc2"]


@dataclass
class LoRAConfig:
    enabled: bool = False
    rank: int = 4  # r: the adapters' inner width
    alpha: float = 4.0  # the update is B @ A * alpha / rank (alpha = rank: scale 1, diffusers' default)
    # module names, matched as peft does: a module whose name is the target or ends with ".<target>"
    targets: list[str] = field(default_factory=lambda: list(ATTENTION_TARGETS))
    # modules of the text encoder (transformers CLIP only) that get adapters too, with the same rank, alpha and
    # dropout; empty: the text encoder stays frozen. E.g. CLIP_TEXT_TARGETS (q_proj, k_proj, v_proj, out_proj).
    text_encoder_targets: list[str] = field(default_factory=list)
    dropout: float = 0.0  # on the adapters' input, training only
    name: str = "lora"  # the kohya file is lora/<name>.safetensors (A1111 calls it <lora:<name>:1>)
    export_merged: bool = False  # also write model/: the base with the adapter fused into its weights

    def validate(self) -> None:
        if not self.enabled:
            check(not self.text_encoder_targets, "lora.text_encoder_targets", "needs lora.enabled=true")
            return
        check(self.rank >= 1, "lora.rank", f"must be >= 1, got {self.rank}")
        check(self.alpha > 0, "lora.alpha", f"must be > 0, got {self.alpha} (alpha = rank gives scale 1)")
        check(0 <= self.dropout < 1, "lora.dropout", f"must be in [0, 1), got {self.dropout}")
        check(bool(self.targets), "lora.targets", f"is empty: name modules, e.g. {ATTENTION_TARGETS}")
        check(len(set(self.targets)) == len(self.targets), "lora.targets", f"names a module twice: {self.targets}")
        check(len(set(self.text_encoder_targets)) == len(self.text_encoder_targets), "lora.text_encoder_targets",
              f"names a module twice: {self.text_encoder_targets}")
        check(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name) is not None, "lora.name",
              f"'{self.name}' is not a plain file name (letters, digits, '_', '.', '-')")
        check(self.name != "pytorch_lora_weights" and not self.name.endswith(".safetensors"), "lora.name",
              f"'{self.name}' would clash with the diffusers file or double the suffix: name it without "
              "'.safetensors', other than 'pytorch_lora_weights'")
