"""The continuous cache (Grave et al. 2017; SPEC 3) over the final hidden states of the stream."""

from __future__ import annotations

import torch

from .mix import masked_softmax, mix


class ContinuousCache:
    """Grave et al. 2017: p_cache(w) proportional to sum over the last `window` positions i before t
    with x_{i+1} = w of exp(theta * h_t . h_i). Positions of earlier segments come from `add`
    (called after their tokens were scored); earlier positions of the segment being scored are used
    too, since their next tokens are inputs of that segment and so already scored."""

    def __init__(self, window: int, theta: float):
        self.window, self.theta = window, theta
        self.reset()

    def reset(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def weights(self, h: torch.Tensor, seg_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(tokens (n, E), weights (n, E), flops) for the segment's hidden states h (n, d); seg_next
        (n,): the token after each position (the last one unknown yet, never used)."""
        n = h.shape[0]
        keys = h if self.keys is None else torch.cat([self.keys.to(h.device), h])
        values = seg_next if self.values is None else torch.cat([self.values.to(h.device), seg_next])
        m = keys.shape[0] - n
        e = torch.arange(m + n, device=h.device)
        t = torch.arange(n, device=h.device)[:, None] + m  # each query's index in the same numbering
        valid = (e < t) & (e >= t - self.window)
        # float64: theta * h.h_i can be large, and float32 rounding of it would move p_cache visibly
        w = masked_softmax(self.theta * (h.double() @ keys.double().T), valid).float()
        # every row shares the entries: sum the weights per distinct token once, so mixing touches
        # each (row, token) cell once
        tokens, inv = torch.unique(values, return_inverse=True)
        w = torch.zeros(n, len(tokens), dtype=w.dtype, device=w.device).index_add_(1, inv, w)
        return tokens.expand(n, -1), w, float(valid.sum().item() * h.shape[1])

    def add(self, h: torch.Tensor, next_tokens: torch.Tensor) -> None:
        h, next_tokens = h.detach(), next_tokens.detach().long()
        if self.keys is not None:
            h, next_tokens = torch.cat([self.keys, h]), torch.cat([self.values, next_tokens])
        self.keys, self.values = h[-self.window :], next_tokens[-self.window :]


def segment_next_tokens(seg) -> torch.Tensor:
    """The token after each of the segment's last n input positions; the last (the segment's final
    target, not an input) is unknown at scoring time and filled with 0 (no query may use it)."""
    nxt = seg.ids[0, seg.ids.shape[1] - seg.n + 1 :]
    return torch.cat([nxt, nxt.new_zeros(1)]).long()


def cache_problems(window: int, theta: float, lam: float, lam_name: str = "lam") -> list[str]:
    out = []
    if window < 1:
        out.append(f"window must be >= 1, got {window}")
    if theta < 0:
        out.append(f"theta must be >= 0, got {theta}")
    if not 0 <= lam < 1:
        out.append(f"{lam_name} must be in [0, 1), got {lam}")
    return out


class CachePart:
    """Continuous-cache state of a method over the final hidden states of the stream."""

    def __init__(self, method, window: int, theta: float, lam: float):
        self.method, self.lam = method, lam
        self.cache = ContinuousCache(window, theta)
        self._pending = None

    def reset(self) -> None:
        self.cache.reset()

    def apply(self, lp: torch.Tensor, h: torch.Tensor, seg) -> torch.Tensor:
        h = h.float()
        tokens, weights, flops = self.cache.weights(h, segment_next_tokens(seg).to(h.device))
        self.method.ledger.add("search.cache", flops)
        self._pending = h
        return mix(lp, self.lam, tokens, weights)

    def adapt(self, targets: torch.Tensor) -> None:
        self.cache.add(self._pending, targets)  # h_i with x_{i+1}, now that x_{i+1} has been scored
        self._pending = None
