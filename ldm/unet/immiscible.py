"""Immiscible diffusion (Li et al. 2024, https://arxiv.org/abs/2406.12303): pair each latent of a batch with the
batch's noise sample nearest to it, by a linear assignment, so that the noise a latent is diffused into is not
random across the whole space. It draws nothing (the noise is the same B samples, permuted), so resume is unaffected.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment


def assign_noise(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """`eps` (B, C, h, w) permuted along the batch to minimise sum_i ||x0_i - eps_perm(i)||^2 (x0: (B, C, h, w)).

    The cost is computed in float64 on the CPU (B x B distances), the assignment by scipy's Hungarian solver, which
    is deterministic for a given cost matrix.
    """
    cost = torch.cdist(x0.detach().flatten(1).double().cpu(), eps.detach().flatten(1).double().cpu()) ** 2  # (B, B)
    rows, cols = linear_sum_assignment(cost.numpy())  # rows = 0..B-1 in order
    return eps[torch.as_tensor(cols, device=eps.device)]
