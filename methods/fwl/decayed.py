"""Decayed, multi-timescale fast weights (`timescales:`), the fast pass of block.py generalised.

With timescales s = 1..S, learned decays gamma_s = sigmoid(a_s) (initialised at 1 - 1/tau_s) and a
step size eta_{theta,s} per fast parameter and timescale, every fast parameter at position i is

    theta_i = theta - sum_s eta_{theta,s} sum_{j<i} gamma_s^(i-1-j) dL_j/dtheta

that is one explicit SGD step on the discounted loss sum_j gamma^(i-1-j) L_j per timescale, every
gradient taken at the slow weights. A dense layer is then decayed linear attention:

    out_i = W u_i + b - sum_s [ eta_{W,s} sum_{j<i} gamma_s^(i-1-j) (u_i . u~_j) g_j + eta_{b,s} sum_{j<i} gamma_s^(i-1-j) g_j ]

Chunked: inside a chunk the causal mask carries gamma^(r-1-r') for r' < r; the state carried from
earlier chunks enters as gamma^r (u_i . S_k), and S_{k+1} = gamma^C S_k + sum_r' gamma^(C-1-r') g_r' u~_r'^T.
The state has one slice per timescale: (B, S, ...). A term of the past decays instead of growing with
the document, so a state carried through a whole document keeps steps of the size training saw.
`DecayedMemory` is this memory for the block (block.py's SummedMemory is the paper's undecayed one).
"""

from __future__ import annotations

import torch


def _powers(gamma: torch.Tensor, n: int):
    """(gamma^r for r < n: (S, n); the causal decay mask gamma^(r-1-r') for r' < r, else 0: (S, n, n);
    gamma^(n-1-r): (S, n); gamma^n: (S,)), all differentiable in gamma."""
    r = torch.arange(n, device=gamma.device, dtype=gamma.dtype)
    g = gamma[:, None]
    diff = r[:, None] - 1 - r[None, :]
    mask = torch.where(
        diff >= 0, g[:, :, None] ** diff.clamp(min=0), torch.zeros((), dtype=gamma.dtype, device=gamma.device)
    )
    return g**r, mask, g ** (n - 1 - r), gamma**n


class DecayedMemory:
    """The block's memory with `timescales` (see the module docstring): a state slice and a step size per
    timescale, and the learned decays (`decay_logit`, gamma = sigmoid of it) shared by every fast parameter."""

    def __init__(self, timescales):
        self.timescales = tuple(timescales)
        self.slices = (len(self.timescales),)  # the state's and the step sizes' timescale axis

    def parameters(self) -> dict[str, torch.Tensor]:
        """Initial values of the memory's own learned parameters: the decays, at gamma = 1 - 1/tau."""
        gamma = torch.tensor([1 - 1 / float(t) for t in self.timescales])
        return {"decay_logit": torch.log(gamma / (1 - gamma))}

    def step(self, eta: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
        """The step a fast parameter has taken: from (B, S, ...) accumulated gradients, one step size per
        timescale, summed."""
        return (eta.view(1, -1, *[1] * (acc.dim() - 2)) * acc).sum(1)

    def per_slice(self, grad_sum: torch.Tensor) -> torch.Tensor:
        """A sum of gradients added to every timescale's slice, undecayed."""
        return grad_sum.unsqueeze(1)

    def fast_dense(self, block, u, k, g, layer, wk, bk, acc_w, acc_b, chunk):
        """One decayed fast dense layer: query u (fast input), key k (slow input), value g; acc_w
        (B, S, out, in) and acc_b (B, S, out) the decayed state from before the sequence."""
        eta_w, eta_b, gamma = block.eta[wk], block.eta[bk], block.gammas()
        outs = []
        for s in range(0, u.shape[1], chunk):
            uc, kc, gc = u[:, s : s + chunk], k[:, s : s + chunk], g[:, s : s + chunk]
            pow_r, mask, tail, full = _powers(gamma, uc.shape[1])
            out = block.op_dense(torch.matmul, uc, layer.weight.t())
            carried = block.op_state(torch.einsum, "bci,bsoi->bsco", uc, acc_w)  # u_i . S_k per timescale
            scores = block.op_attn(torch.matmul, uc, kc.transpose(1, 2))  # (B, C, C)
            inside = block.op_attn(torch.einsum, "scr,bcr,bro->bsco", mask, scores, gc)
            bias = pow_r[None, :, :, None] * acc_b[:, :, None] + torch.einsum("scr,bro->bsco", mask, gc)
            step = (
                eta_w[None, :, None, None] * (pow_r[None, :, :, None] * carried + inside)
                + eta_b[None, :, None, None] * bias
            )
            outs.append(out + layer.bias - step.sum(1))
            acc_w = full[None, :, None, None] * acc_w + block.op_state(torch.einsum, "sr,bro,bri->bsoi", tail, gc, kc)
            acc_b = full[None, :, None] * acc_b + torch.einsum("sr,bro->bso", tail, gc)
        return torch.cat(outs, 1), acc_w, acc_b

    def fast_vector(self, block, slow, key, g, acc, chunk):
        """A fast LayerNorm gain or bias at every position from its per-position gradients g, and its
        state after the sequence."""
        sums, acc = self._decayed_sums(block, g, acc, chunk)
        return slow - (block.eta[key][None, :, None, None] * sums).sum(1), acc

    def describe(self, block) -> str:
        """What the training log adds about the memory: the learned decays."""
        return "; gamma " + "/".join(f"{v:.5f}" for v in block.gammas().tolist())

    @staticmethod
    def _decayed_sums(block, g, acc, chunk):
        """(the decayed exclusive sums without step sizes, per timescale: (B, S, T, n); the state after),
        for LayerNorm's alpha and beta."""
        gamma, outs = block.gammas(), []
        for s in range(0, g.shape[1], chunk):
            gc = g[:, s : s + chunk]
            pow_r, mask, tail, full = _powers(gamma, gc.shape[1])
            outs.append(pow_r[None, :, :, None] * acc[:, :, None] + torch.einsum("scr,brn->bscn", mask, gc))
            acc = full[None, :, None] * acc + torch.einsum("sr,brn->bsn", tail, gc)
        return torch.cat(outs, 2), acc
