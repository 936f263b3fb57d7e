"""The IP-Adapter file: tencent-ailab/IP-Adapter's layout, as h94/IP-Adapter ships it and diffusers' `load_ip_adapter`
reads it. A `.safetensors` file, or a PyTorch `.bin`/`.pt` read only as tensors and plain values
(`ldm.weights.read_weights_only_pickle`, `torch.load(weights_only=True)`: never code), as diffusers reads one.

Flat keys in two groups (shapes for cross-attention width D and image-encoder widths E, H):
- `image_proj.*`, the image projection, whose keys tell the variant:
  - plain: `proj.weight` (4 * D, E), `proj.bias`, `norm.weight`/`norm.bias` (D): the encoder's projected
    `image_embeds` (B, E) -> 4 tokens of width D;
  - Plus: a Perceiver resampler, `latents` (1, T, W), `proj_in.weight` (W, H), `proj_out.weight` (D, W), `norm_out.*`,
    `layers.N.0.*` (attention), `layers.N.1.*` (feed-forward): the encoder's penultimate hidden states
    (B, 1 + patches, H) -> T tokens;
  - Full ("full face": `proj.0`, `proj.2`, `proj.3`): the penultimate hidden states through an MLP, a token each;
  - FaceID (`perceiver_resampler.*`, or `norm` and `proj.0` without `proj.weight`): insightface face embeddings,
    not a CLIP image: refused.
- `ip_adapter.N.to_k_ip.weight`, `ip_adapter.N.to_v_ip.weight` (C, D): key and value of the decoupled cross-attention
  added to the U-Net's N-th attention processor, numbered over `unet.attn_processors` (self- and cross-attention
  alternate, so the cross-attention ones are N = 1, 3, 5, ...); C is that layer's width.
A `.safetensors` file holds the two groups as flat keys with those prefixes; a `.bin` as a dict of two dicts,
{"image_proj": {...}, "ip_adapter": {...}}, keys without the prefixes.

A directory given as the adapter holds one such file (diffusers' default name is `ip-adapter.safetensors`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm.errors import UserError
from ldm.ip_adapter.image_encoder import FOLDER
from ldm.weights import check_safetensors_file, read_safetensors, read_weights_only_pickle

PLAIN, PLUS, FULL = "plain", "plus", "full"
_LAYER_KEY = re.compile(r"(\d+)\.to_([kv])_ip\.weight")
DIFFUSERS_FILE = "ip-adapter.safetensors"  # diffusers' load_ip_adapter default weight_name
TORCH_SUFFIXES = (".bin", ".pt", ".pth")  # read with torch.load(weights_only=True)


@dataclass(frozen=True)
class AdapterFacts:
    """What an adapter file is, from its header alone."""

    path: Path
    variant: str  # PLAIN | PLUS | FULL
    cross_attention_dim: int  # D: the text-context width of the U-Net it was made for
    image_embed_dim: int  # what it takes from the encoder: E (plain) or the hidden size H (Plus, Full)
    layers: dict[int, tuple[int, int]] = field(repr=False)  # processor index N -> to_k_ip shape (C, D)

    @property
    def hidden_states(self) -> bool:
        """Whether it reads the encoder's penultimate hidden states (Plus, Full) rather than its image_embeds."""
        return self.variant != PLAIN

    @property
    def encoder_output(self) -> str:
        """What the encoder must give, in words (for messages)."""
        return f"{self.image_embed_dim}-dim " + ("hidden states" if self.hidden_states else "image embeddings")


def find_adapter_file(name: str | Path) -> Path:
    """The adapter's file: `name` itself, or the one adapter file in the directory `name` (its .safetensors file;
    diffusers' `ip-adapter.safetensors` first; a .bin where there is none)."""
    p = Path(name).expanduser()
    if p.is_dir():
        found = sorted(p.glob("*.safetensors")) or sorted(f for f in p.iterdir() if f.suffix in TORCH_SUFFIXES)
        preferred = [f for f in found if f.name == DIFFUSERS_FILE]
        if len(found) > 1 and not preferred:
            raise UserError(f"IP-Adapter directory '{p}' has {len(found)} weight files "
                            f"({', '.join(f.name for f in found[:3])}): pass the file itself as --ip-adapter")
        if not found:
            raise UserError(f"IP-Adapter directory '{p}' has no .safetensors file ({DIFFUSERS_FILE}) or .bin")
        return (preferred or found)[0]
    if not p.is_file():
        raise UserError(f"IP-Adapter '{p}' does not exist (--ip-adapter takes a .safetensors or .bin file, or a "
                        "directory holding one)")
    if p.suffix.lower() not in (".safetensors", *TORCH_SUFFIXES):
        raise UserError(f"IP-Adapter '{p}' is neither a .safetensors nor a .bin file")
    return p


def list_ip_adapters(directory: str | Path) -> dict[str, Path]:
    """Name (the stem) -> file of every IP-Adapter in `directory` and below (`ldm-serve --ip-adapter-dir`): the
    .safetensors files whose header holds the adapter's two key groups, and the .bin/.pt/.pth files (read only when
    used); `image_encoder/` folders are skipped. On a clash of names a .safetensors file wins, else the first in
    sorted order."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise UserError(f"--ip-adapter-dir '{directory}' is not a directory")
    found: dict[str, Path] = {}
    files = [p for p in root.rglob("*") if p.suffix.lower() in (".safetensors", *TORCH_SUFFIXES) and p.is_file()
             and FOLDER not in p.relative_to(root).parts[:-1]]
    for path in sorted(files, key=lambda p: (p.suffix.lower() != ".safetensors", str(p))):
        if path.stem in found:
            continue
        if path.suffix.lower() == ".safetensors":
            try:
                keys = check_safetensors_file(path)
            except UserError:
                continue  # not a file this server can read; it is no adapter it lists
            if not any(k.startswith("image_proj.") for k in keys) or not any(k.startswith("ip_adapter.")
                                                                             for k in keys):
                continue
        found[path.stem] = path
    return found


def inspect_adapter(path: Path) -> AdapterFacts:
    """The facts of the adapter file at `path` (a file `find_adapter_file` found), from its header (a .bin file is
    read whole); a file that is not an IP-Adapter, or a FaceID one, is a `UserError`."""
    if path.suffix.lower() in TORCH_SUFFIXES:
        shapes = {f"{group}.{k}": tuple(v.shape) for group, tensors in _read_torch(path).items()
                  for k, v in tensors.items()}
    else:
        header = check_safetensors_file(path)
        shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    proj = {k.removeprefix("image_proj."): s for k, s in shapes.items() if k.startswith("image_proj.")}
    layers: dict[int, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        m = _LAYER_KEY.fullmatch(key.removeprefix("ip_adapter.")) if key.startswith("ip_adapter.") else None
        if m:
            layers.setdefault(int(m[1]), {})[m[2]] = shape
    if not proj or not layers:
        example = next(iter(shapes), "nothing")
        raise UserError(f"'{path}' is not an IP-Adapter: it has no image_proj.* and ip_adapter.N.to_k_ip weights "
                        f"(its first tensor is '{example}'); --ip-adapter takes an IP-Adapter .safetensors file")
    if any(k.startswith("perceiver_resampler.") for k in proj) or ("norm.weight" in proj and "proj.0.weight" in proj
                                                                  and "proj.3.weight" not in proj):
        raise UserError(f"IP-Adapter '{path}' is a FaceID adapter (it takes insightface face embeddings, not a CLIP "
                        "image); FaceID adapters are not supported: use a plain or Plus IP-Adapter")
    try:
        if "proj.weight" in proj:
            variant, embed_dim = PLAIN, proj["proj.weight"][1]
        elif "proj.3.weight" in proj:
            variant, embed_dim = FULL, proj["proj.0.weight"][1]
        else:
            variant, embed_dim = PLUS, proj["proj_in.weight"][1]
        cross = next(iter(layers.values()))["k"][1]
    except (KeyError, IndexError):
        raise UserError(f"IP-Adapter '{path}' has an image projection of no known kind (image_proj keys: "
                        f"{', '.join(sorted(proj)[:4])}, ...); known: IP-Adapter, Plus and Full") from None
    bad = [n for n, kv in layers.items() if set(kv) != {"k", "v"} or kv["k"] != kv["v"] or len(kv["k"]) != 2
           or kv["k"][1] != cross]
    if bad:
        raise UserError(f"IP-Adapter '{path}' is damaged: its layer {bad[0]} has no matching to_k_ip/to_v_ip pair of "
                        f"width {cross}; download it again")
    return AdapterFacts(path, variant, cross, embed_dim, {n: kv["k"] for n, kv in sorted(layers.items())})


def read_adapter(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors as diffusers' `_load_ip_adapter_weights` takes them: {"image_proj": {...}, "ip_adapter": {...}}
    with the group prefixes taken off (what its `load_ip_adapter` makes of a .safetensors file)."""
    if path.suffix.lower() in TORCH_SUFFIXES:
        return _read_torch(path)
    tensors, _ = read_safetensors(path, lambda k: k.startswith(("image_proj.", "ip_adapter.")))
    groups: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in tensors.items():
        group, _, rest = key.partition(".")
        groups[group][rest] = value
    return groups


def _read_torch(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """A .bin adapter's two groups (weights-only read); other entries are dropped, as diffusers does."""
    data = read_weights_only_pickle(path)
    if not isinstance(data, dict):
        raise UserError(f"'{path}' is not an IP-Adapter: it holds a {type(data).__name__}, not the image_proj and "
                        "ip_adapter weights")
    groups = {g: data.get(g) for g in ("image_proj", "ip_adapter")}
    if not all(isinstance(v, dict) for v in groups.values()):  # flat keys, as in the .safetensors layout
        groups = {g: {k.removeprefix(f"{g}."): v for k, v in data.items() if str(k).startswith(f"{g}.")}
                  for g in groups}
    return {g: {str(k): v for k, v in tensors.items() if isinstance(v, torch.Tensor)} for g, tensors in groups.items()}
