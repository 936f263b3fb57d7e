"""LyCORIS's adapters beyond plain LoRA, as kohya-layout files hold them (LoHa, LoKr), and DoRA's weight
decomposition (on any of them, plain LoRA included): the weight update each gives one Linear or Conv2d layer.

Keys after a module's kohya name (`lora_unet_<module>.`, `lora_te_...`), as KohakuBlueleaf/LyCORIS writes them
(lycoris/modules/loha.py, lokr.py; A1111's extensions-builtin/Lora/network_hada.py, network_lokr.py and ComfyUI's
comfy/weight_adapter/loha.py, lokr.py read them the same way). Shapes: out, in, kernel kh x kw of the layer, rank r.

- LoHa (a Hadamard product of two low-rank products): `hada_w1_a` (out, r), `hada_w1_b` (r, in*kh*kw), `hada_w2_a`,
  `hada_w2_b` alike; delta W = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r with r = `hada_w1_b`'s rows. A conv in the
  CP (Tucker) form adds `hada_t1`, `hada_t2` (r, r, kh, kw) and holds `hada_w*_a` as (r, out), `hada_w*_b` as
  (r, in); each product is then einsum('i j h w, i o, j c -> o c h w', t, w_a, w_b).
- LoKr (a Kronecker product): delta W = kron(w1, w2) * scale, w1 (a, c) = `lokr_w1` or `lokr_w1_a` (a, r) @
  `lokr_w1_b` (r, c); w2 (b, d[, kh, kw]) = `lokr_w2`, or `lokr_w2_a` (b, r) @ `lokr_w2_b` (r, d*kh*kw), or with
  `lokr_t2` (r, r, kh, kw) the CP form of `lokr_w2_a` (r, b) and `lokr_w2_b` (r, d); out = a*b, in = c*d. The scale
  is alpha / r, r the rank of the factorised half (w1's if both are; in the CP form `lokr_t2`'s, as peft and ComfyUI
  take it, where LyCORIS's loader reads `lokr_w2_a`'s b); when both halves are full matrices LyCORIS
  trains with scale 1 and the stored alpha is not used (`LokrModule.__init__`: `if use_w1 and use_w2: alpha =
  lora_dim`).
- alpha: a scalar; missing or 0 means alpha = r (LyCORIS replaces 0 by the rank). A file LyCORIS writes with rs-LoRA
  stores alpha * r / sqrt(r), so alpha / r is the scale in every case.
- DoRA (weight decomposition, Liu et al. 2024, arXiv:2402.09353): `dora_scale`, the magnitude m, next to any of the
  above. With W = W0 + delta W (the alpha scale in, the multiplier not), the merged weight is m * W / (||W|| + eps):
  the norm is of the merged weight, eps float32's (LyCORIS `apply_weight_decompose`). m's shape says the norm's axis:
  (out, 1[, 1, 1]) one norm per output channel over (in, kh, kw) (LyCORIS's `wd_on_out`, its default, and the
  paper's); (1, in[, 1, 1]) one per input channel over (out, kh, kw) (older LyCORIS and A1111's reading). A
  multiplier s gives W0 + s * (m * W / ||W|| - W0), as A1111 (network.py `finalize_updown`), ComfyUI
  (`weight_decompose`) and LyCORIS's functional `apply_dora_scale` merge; LyCORIS's module classes instead scale
  (W0 + delta W) by s * (m / ||W|| - 1) + 1, which differs from them at s != 1 only. ComfyUI takes the
  per-output-channel norm of W0 instead of W; we follow LyCORIS. At s = 1 all of them agree.
- peft's DoRA (`lora_magnitude_vector`, in diffusers/peft files; peft/tuners/lora/dora.py): m is (out,) for a
  Linear, (1, out, 1, 1) for a conv, always per output channel, no eps, and the multiplier goes into the update:
  m * (W0 + s * delta W) / ||W0 + s * delta W|| (what diffusers' `set_adapters` weights do).

Several adapters on one layer add their updates, each taken against the original weight W0 (A1111's rule; the
stack is ldm/lora/apply.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOHA_KEYS = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"})
LOKR_KEYS = frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"})
_EPS = torch.finfo(torch.float32).eps


@dataclass(eq=False)
class Dora:
    """DoRA's magnitude for one layer."""

    magnitude: torch.Tensor  # kohya/LyCORIS: (out, 1[, 1, 1]) or (1, in[, 1, 1]); peft: (out,) or (1, out, 1, 1)
    peft: bool = False  # peft's `lora_magnitude_vector`: per output channel, no eps, the multiplier in the update

    def per_output(self, weight_shape: tuple[int, ...]) -> bool | None:
        """Whether the norm is per output channel for a weight of `weight_shape`; None if m fits neither axis."""
        m, (out, inn) = self.magnitude, weight_shape[:2]
        if self.peft or m.dim() == 1:
            return True if m.numel() == out else (False if m.numel() == inn and not self.peft else None)
        if m.shape[0] == out and m[0].numel() == 1:
            return True
        if m.shape[0] == 1 and m.shape[1] == inn and m.numel() == inn:
            return False
        return None

    def problem(self, weight_shape: tuple[int, ...]) -> str | None:
        if self.per_output(weight_shape) is None:
            return f"its DoRA magnitude has shape {tuple(self.magnitude.shape)}, one value per output or input channel"
        return None

    def update(self, w0: torch.Tensor, delta: torch.Tensor, multiplier: float) -> torch.Tensor:
        """W' - W0 for original weight `w0` and adapter update `delta` (alpha scale in, multiplier not), both fp32
        of the weight's shape (out, in[, kh, kw])."""
        per_output = self.per_output(tuple(w0.shape))
        axis_shape = (-1,) + (1,) * (w0.dim() - 1) if per_output else (1, -1) + (1,) * (w0.dim() - 2)
        m = self.magnitude.to(w0.device, torch.float32).reshape(axis_shape)
        if self.peft:
            w = w0 + multiplier * delta
            return m * w / _norm(w, per_output) - w0
        w = w0 + delta
        return multiplier * (m * w / (_norm(w, per_output) + _EPS) - w0)


def _norm(w: torch.Tensor, per_output: bool) -> torch.Tensor:
    """L2 norm of each output channel's (in, kh, kw) slice -> (out, 1[, 1, 1]), or of each input channel's
    (out, kh, kw) slice -> (1, in[, 1, 1])."""
    if per_output:
        return w.flatten(1).norm(dim=1).reshape((-1,) + (1,) * (w.dim() - 1))
    return w.transpose(0, 1).flatten(1).norm(dim=1).reshape((1, -1) + (1,) * (w.dim() - 2))


def alpha_scale(alpha: float | None, rank: int) -> float:
    """LyCORIS's alpha / rank, a missing or zero alpha meaning alpha = rank."""
    return (rank if alpha is None or alpha == 0 else alpha) / rank


class Adapter:
    """What every module entry of a LoRA file gives: `part`, `name`, `dora` (a Dora or None), `kind` ("LoRA",
    "LoHa", "LoKr"), `update_shape` (out, in*kh*kw), `delta(weight_shape, device)` (the update at multiplier 1,
    alpha scale in, fp32) and `fit_problem(weight_shape)` (why the update cannot have that shape, or None)."""

    kind = "adapter"

    @property
    def label(self) -> str:
        return f"{self.kind}+DoRA" if self.dora is not None else self.kind

    def update(self, original: torch.Tensor, multiplier: float, device: torch.device | str) -> torch.Tensor:
        """W' - W0 in fp32 on `device`, for the layer's original weight `original` (any device and dtype; read only
        for DoRA)."""
        delta = self.delta(original.shape, device)
        if self.dora is None:
            return delta * multiplier
        return self.dora.update(original.to(device, torch.float32), delta, multiplier)

    def problem(self, weight_shape: tuple[int, ...]) -> str | None:
        """Why this entry does not fit a layer whose weight has `weight_shape`, or None."""
        problem = self.fit_problem(weight_shape)
        if problem is None and self.dora is not None:
            problem = self.dora.problem(weight_shape)
        return problem

    def fit_problem(self, weight_shape: tuple[int, ...]) -> str | None:
        out, inn = self.update_shape
        if (out, inn) != (weight_shape[0], math.prod(weight_shape[1:])):
            return f"the {self.kind}'s update is ({out}, {inn})"
        return None


def _f32(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    return t.to(device, torch.float32)


def _cp(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The CP (Tucker) form: core t (r, r, kh, kw), a (r, out), b (r, in) -> (out, in, kh, kw)."""
    return torch.einsum("i j ..., i o, j c -> o c ...", t, a, b)


@dataclass(eq=False)
class LohaModule(Adapter):
    part: str
    name: str
    w1_a: torch.Tensor  # (out, r), or (r, out) with t1
    w1_b: torch.Tensor  # (r, in*kh*kw) or (r, in, kh, kw), or (r, in) with t1
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    t1: torch.Tensor | None = None  # (r, r, kh, kw): CP form
    t2: torch.Tensor | None = None
    alpha: float | None = None
    dora: Dora | None = None
    kind = "LoHa"

    @property
    def rank(self) -> int:
        return self.w1_b.shape[0]

    @property
    def scale(self) -> float:
        return alpha_scale(self.alpha, self.rank)

    def _shape(self, a, b, t) -> tuple[int, int]:
        return (a.shape[1], b.shape[1] * t[0, 0].numel()) if t is not None else (a.shape[0], b[0].numel())

    @property
    def update_shape(self) -> tuple[int, int]:
        return self._shape(self.w1_a, self.w1_b, self.t1)

    def fit_problem(self, weight_shape: tuple[int, ...]) -> str | None:
        if self._shape(self.w2_a, self.w2_b, self.t2) != self.update_shape:
            return (f"its hada_w1 and hada_w2 products differ in shape ({self.update_shape} and "
                    f"{self._shape(self.w2_a, self.w2_b, self.t2)})")
        return super().fit_problem(weight_shape)

    def delta(self, weight_shape: torch.Size, device: torch.device | str = "cpu") -> torch.Tensor:
        def product(a, b, t):  # (out, in*kh*kw) or (out, in, kh, kw)
            if t is None:
                return _f32(a, device).flatten(1) @ _f32(b, device).flatten(1)
            return _cp(_f32(t, device), _f32(a, device), _f32(b, device))

        h1, h2 = product(self.w1_a, self.w1_b, self.t1), product(self.w2_a, self.w2_b, self.t2)
        return (h1 * h2 * self.scale).reshape(weight_shape)


@dataclass(eq=False)
class LokrModule(Adapter):
    part: str
    name: str
    w1: torch.Tensor | None = None  # (a, c)
    w1_a: torch.Tensor | None = None  # (a, r)
    w1_b: torch.Tensor | None = None  # (r, c)
    w2: torch.Tensor | None = None  # (b, d) or (b, d, kh, kw)
    w2_a: torch.Tensor | None = None  # (b, r), or (r, b) with t2
    w2_b: torch.Tensor | None = None  # (r, d*kh*kw) or (r, d, kh, kw), or (r, d) with t2
    t2: torch.Tensor | None = None  # (r, r, kh, kw): CP form of w2
    alpha: float | None = None
    dora: Dora | None = None
    kind = "LoKr"

    @property
    def rank(self) -> int | None:
        """The rank of the factorised half (w1's if both are); None when both halves are full matrices."""
        if self.w1 is None:
            return self.w1_b.shape[0]
        return None if self.w2 is not None else self.w2_b.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.rank is None else alpha_scale(self.alpha, self.rank)

    def _halves_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(a, c) and (b, d*kh*kw)."""
        w1 = tuple(self.w1.shape) if self.w1 is not None else (self.w1_a.shape[0], self.w1_b.shape[1])
        if self.w2 is not None:
            w2 = (self.w2.shape[0], self.w2[0].numel())
        elif self.t2 is not None:
            w2 = (self.w2_a.shape[1], self.w2_b.shape[1] * self.t2[0, 0].numel())
        else:
            w2 = (self.w2_a.shape[0], self.w2_b[0].numel())
        return w1, w2

    @property
    def update_shape(self) -> tuple[int, int]:
        (a, c), (b, dk) = self._halves_shapes()
        return a * b, c * dk

    def delta(self, weight_shape: torch.Size, device: torch.device | str = "cpu") -> torch.Tensor:
        if self.w1 is not None:
            w1 = _f32(self.w1, device)
        else:
            w1 = _f32(self.w1_a, device) @ _f32(self.w1_b, device)
        if self.w2 is not None:
            w2 = _f32(self.w2, device)
        elif self.t2 is not None:
            w2 = _cp(_f32(self.t2, device), _f32(self.w2_a, device), _f32(self.w2_b, device))
        else:
            w2 = _f32(self.w2_a, device) @ _f32(self.w2_b, device).flatten(1)
        # kron of (a, c) with (b, d, kh, kw) needs w1 as (a, c, 1, 1); with a flattened (b, d*kh*kw) the 2-D kron
        # reshaped to (a*b, c*d, kh, kw) is the same tensor
        w1 = w1.reshape(w1.shape + (1,) * (w2.dim() - 2))
        return (torch.kron(w1, w2.contiguous()) * self.scale).reshape(weight_shape)  # kron fails on a strided w2


def lycoris_module(part: str, name: str, tensors: dict[str, torch.Tensor], alpha: float | None,
                   dora: Dora | None) -> Adapter | None:
    """A LoHa or LoKr entry from one module's tensors (key suffix -> tensor; `alpha`/`dora_scale` taken out), None if
    they are not exactly one of those kinds. A ValueError names what an incomplete one lacks."""
    keys = set(tensors)
    if keys and keys <= LOHA_KEYS:
        missing = sorted({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} - keys)
        if ("hada_t1" in keys) != ("hada_t2" in keys):
            missing.append("hada_t1" if "hada_t2" in keys else "hada_t2")
        if missing:
            raise ValueError(f"a LoHa module without {', '.join(missing)}")
        return LohaModule(part, name, tensors["hada_w1_a"], tensors["hada_w1_b"], tensors["hada_w2_a"],
                          tensors["hada_w2_b"], tensors.get("hada_t1"), tensors.get("hada_t2"), alpha, dora)
    if keys and keys <= LOKR_KEYS:
        missing = []
        for half in ("lokr_w1", "lokr_w2"):
            if half not in keys and not {f"{half}_a", f"{half}_b"} <= keys:
                missing.append(f"{half} (or {half}_a and {half}_b)")
        if "lokr_t2" in keys and "lokr_w2" in keys:
            missing.append("lokr_w2_a/_b beside lokr_t2 (it has lokr_w2)")
        if missing:
            raise ValueError(f"a LoKr module without {', '.join(missing)}")
        full1, full2 = "lokr_w1" in keys, "lokr_w2" in keys
        return LokrModule(part, name, tensors.get("lokr_w1"), None if full1 else tensors["lokr_w1_a"],
                          None if full1 else tensors["lokr_w1_b"], tensors.get("lokr_w2"),
                          None if full2 else tensors["lokr_w2_a"], None if full2 else tensors["lokr_w2_b"],
                          tensors.get("lokr_t2"), alpha, dora)
    return None
