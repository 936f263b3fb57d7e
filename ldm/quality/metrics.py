"""Sample-quality estimators over features already extracted (`ldm.quality.features`): rows of (N, D) tensors, one row
per image, reference ("real") against generated ("fake").

- FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) are torchmetrics' own `FrechetInceptionDistance` and
  `KernelInceptionDistance`, fed the features through an identity module (`_Given`), so the arithmetic is exactly
  theirs (float64 states for FID; KID's subsets drawn with `torch.randperm`, here from a fixed seed).
- CLIP score is torchmetrics' definition, max(100 * mean cos(image, caption), 0), computed here from embeddings
  because torchmetrics' `CLIPScore` calls `get_image_features` as a tensor, which transformers 5 returns wrapped
  (tests/test_quality_metrics.py checks the two agree through an adapter).
- CMMD (Jayasumana et al., CVPR 2024, "Rethinking FID") has no library: written here, in float64, blockwise, with
  the constants and the estimator of the paper's reference code (google-research `cmmd/distance.py`): a Gaussian
  RBF kernel k(a, b) = exp(-|a - b|^2 / (2 sigma^2)) with sigma = 10 on L2-normalised CLIP embeddings, and
  1000 * (mean k(x, x') + mean k(y, y') - 2 mean k(x, y)) with every pair counted, the diagonal too (the biased,
  minimum-variance estimator, Gretton et al. 2012 eq. 5). `unbiased=True` drops the diagonal pairs (the
  U-statistic): the two differ by about 1000 * (1/n + 1/m) * (1 - mean off-diagonal k), which matters below a few
  hundred images.

Every function returns plain floats, so a training loop can log them as they are.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ldm.errors import UserError

METRICS = ("fid", "kid", "clip", "cmmd")
# each metric's one headline number in `ldm.quality.measure.measure`'s output, and which way is better
HEADLINE = {"fid": "fid", "kid": "kid", "clip": "clip_score", "cmmd": "cmmd"}
HIGHER_IS_BETTER = {"clip_score"}  # FID, KID and CMMD are distances: lower is better
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # torchmetrics' defaults (and the KID paper's)
CMMD_SIGMA, CMMD_SCALE = 10.0, 1000.0  # google-research cmmd/distance.py: _SIGMA, _SCALE
_BLOCK = 4096  # rows of a kernel matrix held at once: 4096 x 30k float64 = 1 GB


class _Given(nn.Module):
    """Features in, features out: how torchmetrics' metric classes take features that were extracted elsewhere."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim  # read by FrechetInceptionDistance instead of running a dummy image through

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def parse_metrics(text: str) -> tuple[str, ...]:
    """'fid,kid' -> ('fid', 'kid'), in the order given, each once; an unknown name is a one-line `UserError`."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise UserError(f"--metrics: unknown metric '{unknown[0] if unknown else text}'; choose from "
                        f"{','.join(METRICS)} (comma-separated)")
    return tuple(dict.fromkeys(names))


def fid_warning(n_real: int, n_fake: int, dim: int) -> str | None:
    """One line when a set has fewer images than the features have dimensions: its covariance (D x D) then has rank
    at most N - 1, and FID is biased upwards, strongly so (it also falls as N grows, for any model)."""
    n = min(n_real, n_fake)
    if n > dim:
        return None
    return (f"FID on {n_real} reference and {n_fake} generated images with {dim}-d features: the covariance of a "
            f"set of {n} images has rank at most {n - 1} < {dim}, so this FID is biased upwards and not comparable "
            f"with FIDs on other numbers of images (use at least {dim + 1}, 10000+ for published numbers)")


def check_kid_subset(subset_size: int, n_real: int, n_fake: int) -> None:
    """KID draws subsets of `subset_size` rows from each set without replacement: refuse one larger than a set."""
    if subset_size < 2:
        raise UserError(f"--kid-subset-size must be at least 2 (an MMD needs pairs), got {subset_size}")
    if subset_size > min(n_real, n_fake):
        raise UserError(f"--kid-subset-size {subset_size} is larger than the {min(n_real, n_fake)} images of the "
                        f"smaller set ({n_real} reference, {n_fake} generated): choose at most {min(n_real, n_fake)}")


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """torchmetrics' FID between two sets of features (N, D) and (M, D), N, M >= 2. In float64 (torchmetrics
    accumulates its sums in float64 whatever it is fed; float64 features keep the result float64 too)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_Given(real.shape[1]), sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def kid(real: torch.Tensor, fake: torch.Tensor, *, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE,
        seed: int = 0) -> tuple[float, float]:
    """torchmetrics' KID: (mean, std) over `subsets` random subsets of `subset_size` rows of each set (polynomial
    kernel (x.y / D + 1)^3, the unbiased MMD^2 estimator). The subsets come from `torch.randperm` after
    `torch.manual_seed(seed)`, inside `fork_rng`: the caller's random stream is untouched and the same seed draws
    the same subsets. In float64."""
    from torchmetrics.image.kid import KernelInceptionDistance

    check_kid_subset(subset_size, len(real), len(fake))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=_Given(real.shape[1]), subsets=subsets, subset_size=subset_size,
                                         sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def clip_score(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> float:
    """torchmetrics' CLIP score: max(100 * mean_i cos(image_i, caption_i), 0), rows paired (N, D) and (N, D)."""
    a = image_embeddings.double()
    b = text_embeddings.double()
    cos = (a / a.norm(dim=-1, keepdim=True) * (b / b.norm(dim=-1, keepdim=True))).sum(-1)  # (N,)
    return max(float(100 * cos.mean()), 0.0)


def _mean_kernel(a: torch.Tensor, b: torch.Tensor, gamma: float, skip_diagonal: bool) -> float:
    """Mean of exp(-gamma |a_i - b_j|^2) over all (i, j), or over i != j (`a` is `b`); float64, `_BLOCK` rows at a
    time. Distances by |a|^2 + |b|^2 - 2 a.b, as the reference code computes them."""
    a_sq, b_sq = (a * a).sum(1), (b * b).sum(1)  # (n,), (m,)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for start in range(0, len(a), _BLOCK):
        rows = slice(start, start + _BLOCK)
        d2 = a_sq[rows, None] + b_sq[None, :] - 2 * a[rows] @ b.T  # (block, m)
        k = torch.exp(-gamma * d2)
        if skip_diagonal:
            i = torch.arange(k.shape[0], device=k.device)
            k[i, start + i] = 0
        total += k.sum()
    pairs = len(a) * (len(b) - 1) if skip_diagonal else len(a) * len(b)
    return float(total / pairs)


def cmmd(x: torch.Tensor, y: torch.Tensor, *, unbiased: bool = False, sigma: float = CMMD_SIGMA,
         scale: float = CMMD_SCALE) -> float:
    """CMMD between embeddings x (n, D) and y (m, D), e.g. L2-normalised CLIP image embeddings of reference and
    generated images (see the module docstring; `unbiased=False` is the paper's number). n, m >= 2."""
    x, y = x.double(), y.double()
    gamma = 1.0 / (2.0 * sigma**2)
    k_xx = _mean_kernel(x, x, gamma, unbiased)
    k_yy = _mean_kernel(y, y, gamma, unbiased)
    k_xy = _mean_kernel(x, y, gamma, False)
    return scale * (k_xx + k_yy - 2.0 * k_xy)
