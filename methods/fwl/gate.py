"""The `gate` option of the fwl methods: how the block's distribution meets the base model's.

- `none` (NoGate): the block's distribution as it is;
- `bayes` (BayesGate): the two mixed by their posterior weights on the document's earlier tokens, with a
  fixed share (`gate_share`) so the weights can move back (fixed_share).

A gate is reset at document boundaries with the fast weights, mixes a scored segment's distributions,
and takes the segment's last target in adapt()."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def fixed_share(log_odds: float, gains, share: float) -> list[float]:
    """The block's log-odds against the base model before each token and after the last, from `log_odds`
    before the first; gains[i] = log p_block(y_i) - log p_base(y_i). Each token moves them to the posterior
    (log-odds + gain), then fixed share (Herbster & Warmuth 1998) returns a fraction `share` of the weight
    to an even split: w <- (1 - share) w + share / 2."""
    out = [log_odds]
    for g in gains:
        odds = out[-1] + g
        if share:
            w = 1 / (1 + math.exp(-odds)) if odds >= 0 else math.exp(odds) / (1 + math.exp(odds))
            w = (1 - share) * w + share / 2
            odds = math.log(w) - math.log1p(-w)
        out.append(odds)
    return out


class NoGate:
    """gate none: the block's distribution, the base model's unused."""

    def reset(self):
        """Nothing to forget."""

    def mix(self, lp_block: torch.Tensor, base_logits: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        return lp_block

    def commit(self, last_target: int):
        """Nothing to learn."""


class BayesGate:
    """The block mixed with the base model, p_i = w_i p_block + (1 - w_i) p_base, w_i from the document's
    earlier tokens (fixed_share; w_0 = 1/2). With share 0 it is the Bayesian mixture: a document's total NLL
    is -log(1/2 prod p_block + 1/2 prod p_base), at most log 2 nats above the better model on that document.
    A share > 0 lets the weight come back when the better model changes within a document (the block's
    fast weights can unlearn a misfit), at about log(1/share) nats per change and -log(1 - share) per token."""

    def __init__(self, share: float):
        self.share = share
        self.reset()

    def reset(self):
        self.log_odds, self._pending = 0.0, None

    def mix(self, lp_block: torch.Tensor, base_logits: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """lp_block (n, V) log-probabilities, base_logits (n, V) the base model's logits, next_ids (n-1,)
        the targets of all but the last position."""
        lp_base = F.log_softmax(base_logits.float(), -1)
        gains = (lp_block[:-1] - lp_base[:-1]).gather(1, next_ids[:, None])[:, 0].tolist()
        odds = fixed_share(self.log_odds, gains, self.share)  # before each of the n positions
        self._pending = (odds[-1], (lp_block[-1] - lp_base[-1]).detach())
        o = torch.tensor(odds, dtype=lp_block.dtype, device=lp_block.device)[:, None]
        return torch.logaddexp(F.logsigmoid(o) + lp_block, F.logsigmoid(-o) + lp_base)

    def commit(self, last_target: int):
        odds, last_gain = self._pending
        self.log_odds, self._pending = fixed_share(odds, [last_gain[last_target].item()], self.share)[-1], None


def make_gate(params) -> NoGate | BayesGate:
    """The gate a setting names (`gate`, `gate_share`)."""
    return BayesGate(params.gate_share) if params.gate == "bayes" else NoGate()
