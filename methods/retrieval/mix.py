"""Mixing a retrieved distribution into the model's, in log space:

    log p = logsumexp(log(1 - lambda) + log p_lm, log(lambda) + log p_ret),

where p_ret is exactly 0 (log -inf) for tokens nothing retrieved holds."""

from __future__ import annotations

import math

import torch


def mix(lp: torch.Tensor, lam: float, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """log((1 - lam) p_lm + lam p_ret) with p_ret(y) = sum of `weights` whose token is y.

    lp: (n, V) log-probabilities; tokens, weights: (n, E), each row of weights summing to 1, or to
    0 where retrieval has nothing for that position (the row keeps p_lm). p_ret is 0 (log -inf)
    off retrieval's tokens, so only the (row, token) cells it holds need the logsumexp; the rest
    of the row is log(1 - lam) + log p_lm."""
    n, V = lp.shape
    has = weights.sum(1) > 0
    out = lp + torch.where(has, math.log1p(-lam), 0.0).to(lp.dtype)[:, None]
    if lam == 0:
        return out
    q = torch.zeros_like(lp).scatter_add_(1, tokens, weights.to(lp.dtype))
    keep = weights > 0
    rows = torch.arange(n, device=lp.device)[:, None].expand_as(tokens)[keep]
    cols = tokens[keep]
    # a token held by several entries of a row is written several times, always with the same value
    out[rows, cols] = torch.logaddexp(out[rows, cols], math.log(lam) + torch.log(q[rows, cols]))
    return out


def masked_softmax(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax over the valid entries of each row; all-zero rows where none is valid."""
    scores = scores.masked_fill(~valid, float("-inf"))
    w = torch.softmax(scores, dim=-1)
    return torch.where(valid.any(-1, keepdim=True), w, torch.zeros_like(w))
