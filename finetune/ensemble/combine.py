"""Combination rules: pure functions of the members' stacked outputs (see the package docstring)."""

from __future__ import annotations

import torch

METHODS = ("mean", "weighted", "vote")


def average(outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean over members: (M, N, C) probabilities or (M, N) scores -> (N, C) or (N,)."""
    return torch.tensordot(weights.to(outputs.dtype), outputs, dims=1)


def vote_shares(outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N, C): the summed weight of the members whose argmax is each label (float64, so equal shares
    summed in another order still compare equal)."""
    picks = torch.nn.functional.one_hot(outputs.argmax(-1), outputs.shape[-1]).double()  # (M, N, C)
    return average(picks, weights.double())


def vote(outputs: torch.Tensor, weights: torch.Tensor, tolerance: float = 1e-9) -> torch.Tensor:
    """Majority (weighted) vote, (N,) label ids. Ties go to the tied label with the largest summed
    probability, then to the lowest label id, so the result never depends on member order."""
    shares, mean = vote_shares(outputs, weights), average(outputs.double(), weights.double())
    tied = shares >= shares.max(-1, keepdim=True).values - tolerance
    mean = torch.where(tied, mean, torch.full_like(mean, -1.0))
    best = mean >= mean.max(-1, keepdim=True).values - tolerance
    return best.to(torch.int8).argmax(-1)  # argmax returns the first (lowest) id among equal maxima


def predict_ids(outputs: torch.Tensor, weights: torch.Tensor, method: str) -> torch.Tensor:
    return vote(outputs, weights) if method == "vote" else average(outputs, weights).argmax(-1)
