"""Fast Weight Layers (Clark et al., "Meta-Learning Fast Weight Language Models", EMNLP 2022; SPEC 3).

The block sits on the base model's final hidden states x (dimension d); m = `size`:

    h1 = W1 x + b1 (d -> 4m)   a = relu(h1)^2   h2 = W2 a + b2 (4m -> m)   z = LayerNorm(h2; alpha, beta)
    logits = base_logits + U z          (U untied, m -> vocab; without base logits the block is the head)

Inner gradient. Position j's loss L_j = c * cross-entropy(logits_j, next token), c a fixed normaliser
(1 / train_seq_len, never the batch's token count). Its gradient at the logits is c * (softmax - onehot);
back-propagated by hand (`inner_grads`) it gives, at every position, the gradient at each dense layer's
output (g_j) and at the LayerNorm output (gz_j). The gradient of a dense weight is rank one,
dL_j/dW = g_j u~_j^T (u~_j the layer's input in the slow pass), and dL_j/dalpha = gz_j * xhat_j,
dL_j/dbeta = gz_j. U is not fast.

Fast pass. At position i every fast parameter theta is its value after one SGD step on sum_{j<i} L_j,
theta - eta_theta * sum_{j<i} dL_j/dtheta, with a learned scalar step size eta per parameter (init 0.01).
For a dense layer that is causal linear attention (query: the layer's fast input u_i, key: u~_j, value: g_j):

    out_i = W u_i + b - eta_W * sum_{j<i} (u_i . u~_j) g_j - eta_b * sum_{j<i} g_j

computed chunk by chunk: the sums over earlier chunks are a carried state, the accumulated gradient of
each fast parameter (`FWState`, so the weights at chunk k are literally W - eta_W * state.w1), and the
strictly causal part inside a chunk is a masked (chunk x chunk) product. Cost and memory are linear in
the length; the state can be carried across segments (`FWStream`: fast_state document).

The options are strategy objects the block picks from its config: its memory, how the earlier gradients
add up (`SummedMemory`, the paper's; `DecayedMemory` with `timescales`, in `decayed.py`: each earlier
position's gradient discounted by a learned gamma_s^(i-1-j), one step size and state slice per timescale),
and its gradients, at which weights they are taken (`SlowGradients`, the paper's; `RecurrentGradients`).

Chunk-recurrent fast weights (`recurrent`): the gradients of chunk k are taken at the fast weights the
earlier chunks left, theta_k = theta - eta * state_k, instead of at the slow weights: the chunk's "slow"
pass, output gradient and back-propagation all run at theta_k, and inside the chunk the fast pass is the
same linear attention over the chunk's earlier positions. state_{k+1} = state_k + sum_{j in chunk k}
dL_j/dtheta(theta_k), so a token the fast weights already predict adds (almost) nothing more. The chunks
of a stream are its segments' chunks. Training lives in `train.py`, the method classes in `method.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tta_bench.api.errors import TTABenchError

from .decayed import DecayedMemory

FAST = ("w1", "b1", "w2", "b2", "alpha", "beta")  # the fast parameters, each with its own step size


@dataclass(frozen=True)
class FWLConfig:
    d_in: int  # the base model's hidden size d
    size: int  # m: the block's width (the first dense layer has 4m units)
    vocab: int
    norm: float  # c: the fixed normaliser of every position's inner loss
    eps: float = 1e-5  # LayerNorm
    eta_init: float = 0.01
    fast: bool = True  # False: the control (SPEC 3), step sizes fixed at 0, so only the slow pass runs
    timescales: tuple = ()  # decayed fast weights (decayed.py), one per timescale tau: gamma starts at 1 - 1/tau
    recurrent: bool = False  # each chunk's gradients at the fast weights the earlier chunks left (module docstring)


class Acts(NamedTuple):
    """What the slow pass keeps for the inner gradient and the keys of the fast pass."""

    h1: torch.Tensor
    a: torch.Tensor
    xhat: torch.Tensor
    rstd: torch.Tensor
    z: torch.Tensor


class Grads(NamedTuple):
    """Per-position gradients of the position's own loss at each dense layer's output and at the LayerNorm output."""

    h1: torch.Tensor
    h2: torch.Tensor
    z: torch.Tensor


class FWState(NamedTuple):
    """The accumulated gradient sum_j dL_j/dtheta of every fast parameter over the positions seen so far
    (batch first): the fast weights are theta - eta_theta * state."""

    w1: torch.Tensor  # (B, 4m, d)
    b1: torch.Tensor  # (B, 4m)
    w2: torch.Tensor  # (B, m, 4m)
    b2: torch.Tensor  # (B, m)
    alpha: torch.Tensor  # (B, m)
    beta: torch.Tensor  # (B, m)


class _Scope(nn.Module):
    """Runs fn(*args) inside a named module, so fvcore's by_module() can attribute its flops."""

    def forward(self, fn, *args):
        return fn(*args)


def _dense(u: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """u W^T + b, with W (out, in) shared or (B, out, in) per batch element (fast weights)."""
    return F.linear(u, w, b) if w.dim() == 2 else torch.baddbmm(b.unsqueeze(1), u, w.transpose(1, 2))


def _exclusive_cumsum(g: torch.Tensor) -> torch.Tensor:
    """sum_{j<i} g_j along dim 1."""
    return torch.cat([torch.zeros_like(g[:, :1]), g[:, :-1]], 1).cumsum(1)


# -- memory: how the earlier positions' gradients add up (decayed.DecayedMemory is the other kind) ------
class SummedMemory:
    """The paper's memory: every earlier position's gradient summed undiscounted, one step size per fast
    parameter, one state slice."""

    slices: tuple = ()  # the state and the step sizes have no timescale axis

    def parameters(self) -> dict[str, torch.Tensor]:
        """Initial values of the memory's own learned parameters: none."""
        return {}

    def step(self, eta: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
        """The step a fast parameter has taken: its step size times its accumulated gradient."""
        return eta * acc

    def per_slice(self, grad_sum: torch.Tensor) -> torch.Tensor:
        """A sum of gradients as the state holds it."""
        return grad_sum

    def fast_dense(self, block, u, k, g, layer, wk, bk, acc_w, acc_b, chunk):
        """One fast dense layer over the sequence: query u (fast input), key k (slow input), value g;
        (its output, the state of its weight and bias after the sequence)."""
        eta_w, eta_b = block.eta[wk], block.eta[bk]
        bias = layer.bias - eta_b * (acc_b.unsqueeze(1) + _exclusive_cumsum(g))
        outs = []
        for s in range(0, u.shape[1], chunk):
            uc, kc, gc = u[:, s : s + chunk], k[:, s : s + chunk], g[:, s : s + chunk]
            w = layer.weight - eta_w * acc_w  # the weights after the step on every earlier chunk
            out = block.op_dense(torch.matmul, uc, w.transpose(1, 2))
            scores = block.op_attn(torch.matmul, uc, kc.transpose(1, 2)).tril(-1)  # strictly causal: j < i
            outs.append(out - eta_w * block.op_attn(torch.matmul, scores, gc))
            acc_w = acc_w + block.op_state(torch.matmul, gc.transpose(1, 2), kc)
        return torch.cat(outs, 1) + bias, acc_w, acc_b + g.sum(1)

    def fast_vector(self, block, slow, key, g, acc, chunk):
        """A fast LayerNorm gain or bias at every position, (B, T, m), from its per-position gradients g,
        and its state after the sequence."""
        return slow - block.eta[key] * (acc.unsqueeze(1) + _exclusive_cumsum(g)), acc + g.sum(1)

    def describe(self, block) -> str:
        """What the training log adds about the memory: nothing."""
        return ""


# -- gradients: at which weights each position's inner gradient is taken ------------------------------
class SlowGradients:
    """The paper's: every gradient at the slow weights, so a whole sequence is one span (fast() still
    chunks its attention)."""

    def span(self, chunk: int, length: int) -> int:
        return length

    def weights(self, block, state) -> dict | None:
        """The weights a span's pass and gradients run at: the slow ones."""
        return None


class RecurrentGradients:
    """Chunk-recurrent (`recurrent`): each chunk's pass and gradients at the fast weights the earlier
    chunks left (see the module docstring)."""

    def span(self, chunk: int, length: int) -> int:
        return chunk

    def weights(self, block, state) -> dict | None:
        return block.weights(state)


class FWBlock(nn.Module):
    """The fast weight block: slow pass, explicit inner gradient, fast pass (see the module docstring)."""

    def __init__(self, cfg: FWLConfig):
        super().__init__()
        self.cfg = cfg
        d, m, V = cfg.d_in, cfg.size, cfg.vocab
        self.dense1 = nn.Linear(d, 4 * m)
        self.dense2 = nn.Linear(4 * m, m)
        self.ln_alpha = nn.Parameter(torch.ones(m))
        self.ln_beta = nn.Parameter(torch.zeros(m))
        self.unembed = nn.Linear(m, V, bias=False)
        self.memory = DecayedMemory(cfg.timescales) if cfg.timescales else SummedMemory()
        self.gradients = RecurrentGradients() if cfg.recurrent else SlowGradients()
        eta = float(cfg.eta_init) if cfg.fast else 0.0
        shape = self.memory.slices  # decayed: a step size per timescale
        self.eta = nn.ParameterDict({k: nn.Parameter(torch.full(shape, eta), requires_grad=cfg.fast) for k in FAST})
        own = self.memory.parameters()  # decayed: the decays
        for name, value in own.items():
            self.register_parameter(name, nn.Parameter(value, requires_grad=cfg.fast))
        self._memory_parameters = tuple(own)
        # FLOP breakdown only: vocabulary projections, dense layers, linear attention inside a chunk, state updates.
        self.op_vocab, self.op_dense, self.op_attn, self.op_state = _Scope(), _Scope(), _Scope(), _Scope()

    def slow_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Every parameter except the step sizes and decays."""
        steps = {id(p) for p in self.step_parameters()}
        return [(n, p) for n, p in self.named_parameters() if id(p) not in steps]

    def step_parameters(self) -> list[nn.Parameter]:
        """The step sizes, and the memory's own parameters (the decays of decayed fast weights)."""
        return list(self.eta.parameters()) + [getattr(self, n) for n in self._memory_parameters]

    def gammas(self) -> torch.Tensor:
        """Decayed fast weights: each timescale's decay."""
        return torch.sigmoid(self.decay_logit)

    # -- slow pass and inner gradient -----------------------------------------------------------
    def _normalize(self, h2):
        mu = h2.mean(-1, keepdim=True)
        xc = h2 - mu
        rstd = torch.rsqrt(xc.square().mean(-1, keepdim=True) + self.cfg.eps)
        return xc * rstd, rstd

    def weights(self, state: FWState | None) -> dict:
        """The fast parameters after the step that `state` holds, theta - eta * state (batched; decayed:
        the sum over timescales); the slow ones when state is None."""
        slow = {
            "w1": self.dense1.weight,
            "b1": self.dense1.bias,
            "w2": self.dense2.weight,
            "b2": self.dense2.bias,
            "alpha": self.ln_alpha,
            "beta": self.ln_beta,
        }
        if state is None:
            return slow
        out = {k: slow[k] - self.memory.step(self.eta[k], acc) for k, acc in state._asdict().items()}
        out["alpha"], out["beta"] = out["alpha"].unsqueeze(1), out["beta"].unsqueeze(1)  # over positions
        return out

    def slow(self, x: torch.Tensor, w: dict | None = None) -> Acts:
        """The block's pass with its slow weights, or with the fast weights w (weights(): recurrent chunks)."""
        w = w or self.weights(None)
        h1 = self.op_dense(_dense, x, w["w1"], w["b1"])
        a = F.relu(h1).square()
        h2 = self.op_dense(_dense, a, w["w2"], w["b2"])
        xhat, rstd = self._normalize(h2)
        return Acts(h1, a, xhat, rstd, w["alpha"] * xhat + w["beta"])

    def logits(self, z: torch.Tensor, base_logits: torch.Tensor | None) -> torch.Tensor:
        if base_logits is None:
            return self.op_vocab(F.linear, z, self.unembed.weight)
        # base + U z in one GEMM (no extra pass over the vocabulary-sized output)
        V, m = self.unembed.weight.shape
        out = self.op_vocab(torch.addmm, base_logits.reshape(-1, V), z.reshape(-1, m), self.unembed.weight.t())
        return out.view(*z.shape[:-1], V)

    def output_grad(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """c * (softmax(logits) - onehot(target)) per position; zero where the target is -1 (unknown)."""
        scale = (targets >= 0).to(logits.dtype).unsqueeze(-1) * self.cfg.norm
        gl = torch.softmax(logits, -1) * scale
        return gl.scatter_add_(-1, targets.clamp(min=0).unsqueeze(-1), -scale)  # minus the one-hot, in place

    def inner_grads(self, acts: Acts, gl: torch.Tensor, w: dict | None = None) -> Grads:
        """Back-propagate each position's output gradient gl through U, LayerNorm, W2 and the squared ReLU
        (at the slow weights, or at the fast weights w the pass `acts` ran with)."""
        w = w or self.weights(None)
        gz = self.op_vocab(torch.matmul, gl, self.unembed.weight)
        gxhat = gz * w["alpha"]
        gh2 = acts.rstd * (
            gxhat - gxhat.mean(-1, keepdim=True) - acts.xhat * (gxhat * acts.xhat).mean(-1, keepdim=True)
        )
        ga = self.op_dense(torch.matmul, gh2, w["w2"])
        return Grads(ga * 2 * F.relu(acts.h1), gh2, gz)

    # -- fast pass --------------------------------------------------------------------------------
    def zero_state(self, batch: int, like: torch.Tensor) -> FWState:
        d, m = self.cfg.d_in, self.cfg.size
        per = self.memory.slices  # decayed: a slice per timescale
        z = lambda *s: torch.zeros((batch, *per, *s), dtype=like.dtype, device=like.device)  # noqa: E731
        return FWState(z(4 * m, d), z(4 * m), z(m, 4 * m), z(m), z(m), z(m))

    def fast(
        self, x: torch.Tensor, acts: Acts, grads: Grads, state: FWState | None = None, chunk: int = 128
    ) -> tuple[torch.Tensor, FWState]:
        """The LayerNorm output z at every position from the fast weights, and the state after the sequence."""
        if state is None:
            state = self.zero_state(x.shape[0], x)
        mem = self.memory
        h1, w1, b1 = mem.fast_dense(self, x, x, grads.h1, self.dense1, "w1", "b1", state.w1, state.b1, chunk)
        a = F.relu(h1).square()
        h2, w2, b2 = mem.fast_dense(self, a, acts.a, grads.h2, self.dense2, "w2", "b2", state.w2, state.b2, chunk)
        xhat, _ = self._normalize(h2)
        alpha, alpha_state = mem.fast_vector(self, self.ln_alpha, "alpha", grads.z * acts.xhat, state.alpha, chunk)
        beta, beta_state = mem.fast_vector(self, self.ln_beta, "beta", grads.z, state.beta, chunk)
        return alpha * xhat + beta, FWState(w1, b1, w2, b2, alpha_state, beta_state)

    def accumulate(self, state: FWState, x: torch.Tensor, acts: Acts, grads: Grads) -> FWState:
        """The state after adding the gradients of positions (x, acts, grads) (all batch first). Decayed
        fast weights: added to every timescale undecayed, as FWStream.commit needs (the pass that saw
        the position already decayed the state for it, with its gradient unknown)."""
        per = self.memory.per_slice
        mm = lambda g, k: per(self.op_state(torch.matmul, g.transpose(1, 2), k))  # noqa: E731
        return FWState(
            state.w1 + mm(grads.h1, x),
            state.b1 + per(grads.h1.sum(1)),
            state.w2 + mm(grads.h2, acts.a),
            state.b2 + per(grads.h2.sum(1)),
            state.alpha + per((grads.z * acts.xhat).sum(1)),
            state.beta + per(grads.z.sum(1)),
        )

    def run(
        self,
        x: torch.Tensor,
        targets: torch.Tensor,
        base_logits: torch.Tensor | None,
        state: FWState | None,
        chunk: int,
    ) -> tuple[torch.Tensor, "LastPosition"]:
        """(fast logits, the state after the sequence with what a later commit of the last position's
        gradient needs); the fast path only (cfg.fast). The sequence runs in spans (self.gradients), each
        with its pass and gradients at the weights the span starts from."""
        if state is None:
            state = self.zero_state(x.shape[0], x)
        span = self.gradients.span(chunk, x.shape[1])
        zs = []
        for s in range(0, x.shape[1], span):
            xc = x[:, s : s + span]
            w = self.gradients.weights(self, state)
            acts = self.slow(xc, w)
            slow_logits = self.logits(acts.z, None if base_logits is None else base_logits[:, s : s + span])
            grads = self.inner_grads(acts, self.output_grad(slow_logits, targets[:, s : s + span]), w)
            z, state = self.fast(xc, acts, grads, state, chunk)
            zs.append(z)
        last = LastPosition(state, x[:, -1:], Acts(*(t[:, -1:] for t in acts)), slow_logits[:, -1:], w)
        return self.logits(torch.cat(zs, 1), base_logits), last

    def forward(
        self,
        x: torch.Tensor,
        targets: torch.Tensor,
        base_logits: torch.Tensor | None = None,
        state: FWState | None = None,
        chunk: int = 128,
    ) -> tuple[torch.Tensor, FWState]:
        """x (B, T, d), targets (B, T) (-1: unknown, no gradient) -> fast logits (B, T, V) and the new state.

        The targets of positions j < i are used at i; position i's own target never is."""
        if not self.cfg.fast:  # every step size is 0: the fast weights are the slow ones
            return self.logits(self.slow(x).z, base_logits), state if state is not None else self.zero_state(
                x.shape[0], x
            )
        logits, last = self.run(x, targets, base_logits, state, chunk)
        return logits, last.state


@dataclass(frozen=True)
class LastPosition:
    """A segment scored with fast weights: the state after it, and what the gradient of its last position
    needs once that position's target is known (its input, slow-pass activations, slow logits, weights)."""

    state: FWState
    x: torch.Tensor
    acts: Acts
    slow_logits: torch.Tensor
    weights: dict | None

    def state_after(self, block: FWBlock, last_target: torch.Tensor) -> FWState:
        """The state with the last position's gradient added."""
        grads = block.inner_grads(self.acts, block.output_grad(self.slow_logits, last_target), self.weights)
        return block.accumulate(self.state, self.x, self.acts, grads)


@dataclass(frozen=True)
class StaticSegment:
    """A segment the control scored (no fast weights): the state stays as it was."""

    state: FWState | None

    def state_after(self, block: FWBlock, last_target: torch.Tensor) -> FWState | None:
        return self.state


class FWStream:
    """The fast-weight state carried from segment to segment (fast_state: document) until `reset`.

    `segment_logits` scores the new positions of a segment: their fast weights include every earlier
    committed position and the earlier positions of this segment (whose targets are the segment's own
    next inputs); `commit(last_target)` adds the segment's last position once its target is known."""

    def __init__(self, block: FWBlock, chunk: int = 128):
        self.block, self.chunk = block, chunk
        self.reset()

    def reset(self):
        self.state: FWState | None = None
        self._pending: LastPosition | StaticSegment | None = None  # the last scored segment, until commit

    def segment_logits(self, x: torch.Tensor, base_logits: torch.Tensor | None, next_ids: torch.Tensor) -> torch.Tensor:
        """x (1, n, d) and base logits (1, n, V) of the n new positions; next_ids (1, n-1): the targets of
        all but the last (known from the input). Returns the fast logits (1, n, V)."""
        b = self.block
        if not b.cfg.fast:  # the control: nothing to carry
            self._pending = StaticSegment(self.state)
            return b.logits(b.slow(x).z, base_logits)
        targets = torch.cat([next_ids, next_ids.new_full((x.shape[0], 1), -1)], 1)
        logits, self._pending = b.run(x, targets, base_logits, self.state, self.chunk)
        return logits

    def commit(self, last_target: torch.Tensor) -> None:
        """last_target (1, 1): the target of the segment's last position."""
        if self._pending is None:
            raise TTABenchError("FWStream.commit() without segment_logits(); score the segment first")
        self.state, self._pending = self._pending.state_after(self.block, last_target), None


class Pass(nn.Module):
    """One of the block's computations as a module with tensor inputs, for fvcore's tracer."""

    def __init__(self, block: FWBlock, fn):
        super().__init__()
        self.block, self.fn = block, fn

    def forward(self, *args):
        return self.fn(*args)


def score_pass(block: FWBlock, chunk: int, stream: bool) -> Pass:
    """What scoring a segment runs in the block: stream=True is FWStream.segment_logits with a carried
    state (inputs x, base, next_ids, *state); False is a whole window from an empty state (x, base, targets)."""
    # The new state is returned too: eager mode computes it, so the trace must not drop it as dead code.
    if stream:

        def fn(x, base, next_ids, *state):
            s = FWStream(block, chunk)
            s.state = FWState(*state)
            logits = s.segment_logits(x, base, next_ids)
            return (logits, *(s._pending.state if block.cfg.fast else ()))
    else:

        def fn(x, base, targets):
            logits, state = block(x, targets, base, None, chunk)
            return (logits, *state)

    return Pass(block, fn)


def commit_pass(block: FWBlock) -> Pass:
    """FWStream.commit: the last position's inner gradient and the state update (x, slow_logits, target, *state)."""

    def fn(x, slow_logits, target, *state):
        state = FWState(*state)
        w = block.gradients.weights(block, state)  # recurrent: at fast weights, as the last chunk was
        acts = block.slow(x, w)
        return tuple(
            block.accumulate(state, x, acts, block.inner_grads(acts, block.output_grad(slow_logits, target), w))
        )

    return Pass(block, fn)
