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
the length; the state can be carried across segments (`FWStream`).

Training (`train_block`): the LM loss of the fast logits on the prepare split, back-propagated through
the inner gradient (it is built from differentiable ops, so second-order terms are included). The base
is frozen (its final hidden states are computed once and cached) or its top blocks are fine-tuned.
Checkpoints are safetensors files under cache_dir()/fwl/, keyed by the base model's fingerprint and a
hash of the block and training configuration and of the training data.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .errors import TTABenchError

FAST = ("w1", "b1", "w2", "b2", "alpha", "beta")  # the fast parameters, each with its own step size
FORMAT = "tta_bench.fwl/1"


@dataclass(frozen=True)
class FWLConfig:
    d_in: int  # the base model's hidden size d
    size: int  # m: the block's width (the first dense layer has 4m units)
    vocab: int
    norm: float  # c: the fixed normaliser of every position's inner loss
    eps: float = 1e-5  # LayerNorm
    eta_init: float = 0.01


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


def _exclusive_cumsum(g: torch.Tensor) -> torch.Tensor:
    """sum_{j<i} g_j along dim 1."""
    return torch.cat([torch.zeros_like(g[:, :1]), g[:, :-1]], 1).cumsum(1)


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
        self.eta = nn.ParameterDict({k: nn.Parameter(torch.tensor(float(cfg.eta_init))) for k in FAST})
        # FLOP breakdown only: vocabulary projections, dense layers, linear attention inside a chunk, state updates.
        self.op_vocab, self.op_dense, self.op_attn, self.op_state = _Scope(), _Scope(), _Scope(), _Scope()

    def slow_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Every parameter except the step sizes."""
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("eta.")]

    # -- slow pass and inner gradient -----------------------------------------------------------
    def _normalize(self, h2):
        mu = h2.mean(-1, keepdim=True)
        xc = h2 - mu
        rstd = torch.rsqrt(xc.square().mean(-1, keepdim=True) + self.cfg.eps)
        return xc * rstd, rstd

    def slow(self, x: torch.Tensor) -> Acts:
        h1 = self.op_dense(F.linear, x, self.dense1.weight, self.dense1.bias)
        a = F.relu(h1).square()
        h2 = self.op_dense(F.linear, a, self.dense2.weight, self.dense2.bias)
        xhat, rstd = self._normalize(h2)
        return Acts(h1, a, xhat, rstd, self.ln_alpha * xhat + self.ln_beta)

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

    def inner_grads(self, acts: Acts, gl: torch.Tensor) -> Grads:
        """Back-propagate each position's output gradient gl through U, LayerNorm, W2 and the squared ReLU."""
        gz = self.op_vocab(torch.matmul, gl, self.unembed.weight)
        gxhat = gz * self.ln_alpha
        gh2 = acts.rstd * (gxhat - gxhat.mean(-1, keepdim=True) - acts.xhat * (gxhat * acts.xhat).mean(-1, keepdim=True))
        ga = self.op_dense(torch.matmul, gh2, self.dense2.weight)
        return Grads(ga * 2 * F.relu(acts.h1), gh2, gz)

    # -- fast pass --------------------------------------------------------------------------------
    def zero_state(self, batch: int, like: torch.Tensor) -> FWState:
        d, m = self.cfg.d_in, self.cfg.size
        z = lambda *s: torch.zeros((batch, *s), dtype=like.dtype, device=like.device)  # noqa: E731
        return FWState(z(4 * m, d), z(4 * m), z(m, 4 * m), z(m), z(m), z(m))

    def _fast_dense(self, u, k, g, layer, wk, bk, acc_w, acc_b, chunk):
        """One fast dense layer over the sequence: query u (fast input), key k (slow input), value g."""
        eta_w, eta_b = self.eta[wk], self.eta[bk]
        bias = layer.bias - eta_b * (acc_b.unsqueeze(1) + _exclusive_cumsum(g))
        outs = []
        for s in range(0, u.shape[1], chunk):
            uc, kc, gc = u[:, s:s + chunk], k[:, s:s + chunk], g[:, s:s + chunk]
            w = layer.weight - eta_w * acc_w  # the weights after the step on every earlier chunk
            out = self.op_dense(torch.matmul, uc, w.transpose(1, 2))
            scores = self.op_attn(torch.matmul, uc, kc.transpose(1, 2)).tril(-1)  # strictly causal: j < i
            outs.append(out - eta_w * self.op_attn(torch.matmul, scores, gc))
            acc_w = acc_w + self.op_state(torch.matmul, gc.transpose(1, 2), kc)
        return torch.cat(outs, 1) + bias, acc_w, acc_b + g.sum(1)

    def fast(self, x: torch.Tensor, acts: Acts, grads: Grads, state: FWState | None = None,
             chunk: int = 128) -> tuple[torch.Tensor, FWState]:
        """The LayerNorm output z at every position from the fast weights, and the state after the sequence."""
        if state is None:
            state = self.zero_state(x.shape[0], x)
        h1, w1, b1 = self._fast_dense(x, x, grads.h1, self.dense1, "w1", "b1", state.w1, state.b1, chunk)
        a = F.relu(h1).square()
        h2, w2, b2 = self._fast_dense(a, acts.a, grads.h2, self.dense2, "w2", "b2", state.w2, state.b2, chunk)
        xhat, _ = self._normalize(h2)
        g_alpha, g_beta = grads.z * acts.xhat, grads.z
        alpha = self.ln_alpha - self.eta["alpha"] * (state.alpha.unsqueeze(1) + _exclusive_cumsum(g_alpha))
        beta = self.ln_beta - self.eta["beta"] * (state.beta.unsqueeze(1) + _exclusive_cumsum(g_beta))
        new = FWState(w1, b1, w2, b2, state.alpha + g_alpha.sum(1), state.beta + g_beta.sum(1))
        return alpha * xhat + beta, new

    def accumulate(self, state: FWState, x: torch.Tensor, acts: Acts, grads: Grads) -> FWState:
        """The state after adding the gradients of positions (x, acts, grads) (all batch first)."""
        mm = lambda g, k: self.op_state(torch.matmul, g.transpose(1, 2), k)  # noqa: E731
        return FWState(state.w1 + mm(grads.h1, x), state.b1 + grads.h1.sum(1),
                       state.w2 + mm(grads.h2, acts.a), state.b2 + grads.h2.sum(1),
                       state.alpha + (grads.z * acts.xhat).sum(1), state.beta + grads.z.sum(1))

    def forward(self, x: torch.Tensor, targets: torch.Tensor, base_logits: torch.Tensor | None = None,
                state: FWState | None = None, chunk: int = 128) -> tuple[torch.Tensor, FWState]:
        """x (B, T, d), targets (B, T) (-1: unknown, no gradient) -> fast logits (B, T, V) and the new state.

        The targets of positions j < i are used at i; position i's own target never is."""
        acts = self.slow(x)
        gl = self.output_grad(self.logits(acts.z, base_logits), targets)
        z, state = self.fast(x, acts, self.inner_grads(acts, gl), state, chunk)
        return self.logits(z, base_logits), state


class FWStream:
    """The state carried from segment to segment (memory: document) until `reset`.

    `segment_logits` scores the new positions of a segment: their fast weights include every earlier
    committed position and the earlier positions of this segment (whose targets are the segment's own
    next inputs); `commit(last_target)` adds the segment's last position once its target is known."""

    def __init__(self, block: FWBlock, chunk: int = 128):
        self.block, self.chunk = block, chunk
        self.reset()

    def reset(self):
        self.state: FWState | None = None
        self._pending = None

    def segment_logits(self, x: torch.Tensor, base_logits: torch.Tensor | None, next_ids: torch.Tensor) -> torch.Tensor:
        """x (1, n, d) and base logits (1, n, V) of the n new positions; next_ids (1, n-1): the targets of
        all but the last (known from the input). Returns the fast logits (1, n, V)."""
        b = self.block
        targets = torch.cat([next_ids, next_ids.new_full((x.shape[0], 1), -1)], 1)
        acts = b.slow(x)
        slow_logits = b.logits(acts.z, base_logits)
        z, state = b.fast(x, acts, b.inner_grads(acts, b.output_grad(slow_logits, targets)), self.state, self.chunk)
        self._pending = (state, x[:, -1:], Acts(*(t[:, -1:] for t in acts)), slow_logits[:, -1:])
        return b.logits(z, base_logits)

    def commit(self, last_target: torch.Tensor) -> None:
        """last_target (1, 1): the target of the segment's last position."""
        if self._pending is None:
            raise TTABenchError("FWStream.commit() without segment_logits(); score the segment first")
        state, x, acts, slow_logits = self._pending
        b = self.block
        self.state = b.accumulate(state, x, acts, b.inner_grads(acts, b.output_grad(slow_logits, last_target)))
        self._pending = None


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
            return (s.segment_logits(x, base, next_ids), *s._pending[0])
    else:
        def fn(x, base, targets):
            logits, state = block(x, targets, base, None, chunk)
            return (logits, *state)
    return Pass(block, fn)


def commit_pass(block: FWBlock) -> Pass:
    """FWStream.commit: the last position's inner gradient and the state update (x, slow_logits, target, *state)."""
    def fn(x, slow_logits, target, *state):
        acts = block.slow(x)
        return tuple(block.accumulate(FWState(*state), x, acts, block.inner_grads(acts, block.output_grad(slow_logits, target))))
    return Pass(block, fn)


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """The block and its training; a checkpoint is keyed by these (and the base model and data)."""

    size: int = 256  # m: width of the block (4m hidden units); the vocabulary projections cost V*m each
    norm: float = 0.0  # c, the inner loss normaliser; 0: 1 / train_seq_len
    u_init: Literal["head", "random"] = "head"  # U from the base head (best rank-m part) or random, times u_scale
    u_scale: float = 0.1
    top_blocks: int = 0  # fine-tune the base model's last N blocks too (0: base frozen)
    train_tokens: int = 60000  # tokens of the prepare split read (validation included)
    val_tokens: int = 4096  # held out from the end of those, for the periodic validation loss
    train_window: int = 128  # the base model sees the prepare split in windows of this many tokens
    train_seq_len: int = 512  # the block's training sequences (pieces of a document)
    # document: a document's pieces are read in order, the state carried from one to the next (detached:
    # truncated back-propagation), so the block meets the long sums that memory=document evaluation builds;
    # window: the state starts empty in every piece; auto: as the method's `memory` (window without one).
    train_memory: Literal["auto", "document", "window"] = "auto"
    train_steps: int = 150  # optimizer steps, one sequence each; the best validation loss's weights are kept
    lr: float = 1e-3  # Adam
    eta_lr: float = 1e-2  # Adam learning rate of the step sizes
    train_seed: int = 0
    eval_every: int = 25  # steps between validation losses (0: only at the end)

    def problems(self) -> list[str]:
        out = []
        for k in ("size", "train_tokens", "train_window", "train_seq_len", "train_steps"):
            if getattr(self, k) < 1:
                out.append(f"{k} must be >= 1, got {getattr(self, k)}")
        for k in ("top_blocks", "val_tokens", "eval_every"):
            if getattr(self, k) < 0:
                out.append(f"{k} must be >= 0, got {getattr(self, k)}")
        for k in ("lr", "eta_lr"):
            if not getattr(self, k) > 0:
                out.append(f"{k} must be > 0, got {getattr(self, k)}")
        if self.norm < 0:
            out.append(f"norm must be >= 0 (0: 1/train_seq_len), got {self.norm}")
        if self.val_tokens >= self.train_tokens:
            out.append(f"val_tokens ({self.val_tokens}) must be smaller than train_tokens ({self.train_tokens})")
        return out

    def block_config(self, lm) -> FWLConfig:
        return FWLConfig(lm.hidden_size, self.size, lm.vocab_size, self.norm or 1.0 / self.train_seq_len)


def train_fields(obj) -> dict:
    """The TrainConfig fields of obj (a TrainConfig or a method's Params that extends it), `auto` resolved."""
    out = {f.name: getattr(obj, f.name) for f in dataclasses.fields(TrainConfig)}
    if out["train_memory"] == "auto":
        out["train_memory"] = getattr(obj, "memory", "window")
    return out


def fwl_dir() -> Path:
    from .models import cache_dir

    return cache_dir() / "fwl"


def checkpoint_key(lm, tc: TrainConfig, stream) -> str:
    blob = json.dumps({"format": FORMAT, "model": lm.fingerprint, "train": train_fields(tc),
                       "data": [stream.task, stream.split, stream.fingerprint]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def checkpoint_path(lm, tc: TrainConfig, stream) -> Path:
    return fwl_dir() / f"{lm.name}-{lm.fingerprint}-{checkpoint_key(lm, tc, stream)}.safetensors"


def save_checkpoint(path: Path, block: FWBlock, base_params: dict[str, torch.Tensor], info: dict) -> None:
    from safetensors.torch import save_file

    tensors = {f"block.{k}": v.detach().cpu().contiguous() for k, v in block.state_dict().items()}
    tensors.update({f"base.{k}": v.detach().cpu().contiguous() for k, v in base_params.items()})
    meta = {"format": FORMAT, "config": json.dumps(dataclasses.asdict(block.cfg)), "info": json.dumps(info)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_checkpoint(path, device="cpu") -> tuple[FWBlock, dict[str, torch.Tensor], dict]:
    """(block, fine-tuned base parameters by name, training info)."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise TTABenchError(f"FWL checkpoint {path} does not exist; fix `checkpoint` or train one with `tta-bench train-fwl`")
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise TTABenchError(f"{path} is not a tta-bench FWL checkpoint (format {meta.get('format')!r}); train one with `tta-bench train-fwl`")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    block = FWBlock(FWLConfig(**json.loads(meta["config"])))
    block.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("block.")})
    base = {k[5:]: v for k, v in tensors.items() if k.startswith("base.")}
    return block.to(device), base, json.loads(meta["info"])


def init_block(lm, tc: TrainConfig) -> FWBlock:
    """A fresh block; U is small: u_scale times the base head's best rank-m part (or a random matrix
    with the head's scale), so the untrained block barely changes the base model."""
    block = FWBlock(tc.block_config(lm)).to(lm.device)
    head = lm.head.weight.detach().float()
    with torch.no_grad():
        if tc.u_init == "head":
            # right singular vectors of the head from the small d x d Gram matrix, largest first
            evals, evecs = torch.linalg.eigh(head.T @ head)
            basis = evecs[:, evals.argsort(descending=True)]
            m = min(tc.size, head.shape[1])
            block.unembed.weight.zero_()
            block.unembed.weight[:, :m] = head @ basis[:, :m]
        else:
            block.unembed.weight.normal_(0, head.norm(dim=1).mean().item() / math.sqrt(tc.size))
        block.unembed.weight.mul_(tc.u_scale)
    return block


@dataclass
class _Piece:
    """One training sequence: base inputs (windows of token ids), targets, cached hidden states."""

    ids: torch.Tensor  # (T,) the base model's inputs at these positions
    targets: torch.Tensor  # (T,)
    hidden: torch.Tensor | None  # (T, d) with a frozen base
    window_starts: list[int]  # where each base window starts, relative to the piece (top_blocks > 0)
    doc_ids: torch.Tensor | None = None  # the whole document's inputs (top_blocks > 0)
    offset: int = 0  # the piece's position in its document
    doc: int = 0


def _doc_inputs(stream, start_id):
    for doc in stream.docs:
        ids = torch.tensor(doc.ids, dtype=torch.long)
        yield torch.cat([torch.tensor([start_id]), ids[:-1]]), ids


@torch.no_grad()
def _hidden_states(lm, stream, window: int, progress: bool) -> list[torch.Tensor]:
    """Final hidden states of every input position, the base model reading each document in
    non-overlapping windows of `window` tokens (the protocol's context_len 1 view); cached on disk."""
    from safetensors.torch import load_file, save_file

    path = fwl_dir() / f"hidden-{lm.fingerprint}-{stream.fingerprint}-w{window}.safetensors"
    if path.is_file():
        t = load_file(str(path))
        return [t[f"doc{i}"].to(lm.device) for i in range(len(stream.docs))]
    out = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=stream.n_tokens, unit="tok", desc="FWL: base hidden states", mininterval=2.0, leave=False)
    for inputs, _ in _doc_inputs(stream, lm.start_id):
        hs = []
        full = len(inputs) // window * window
        for s in range(0, full, 8 * window):  # full windows, 8 per forward
            e = min(s + 8 * window, full)
            hs.append(lm.hidden(inputs[s:e].view(-1, window).to(lm.device)).reshape(-1, lm.hidden_size))
        if full < len(inputs):
            hs.append(lm.hidden(inputs[full:][None].to(lm.device))[0])
        out.append(torch.cat(hs).float())
        if bar is not None:
            bar.update(len(inputs))
    if bar is not None:
        bar.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({f"doc{i}": h.cpu().contiguous() for i, h in enumerate(out)}, str(tmp))
    os.replace(tmp, path)
    return out


def _pieces(lm, tc: TrainConfig, stream, progress) -> tuple[list[_Piece], list[_Piece]]:
    """Training and validation sequences: each document cut into train_seq_len pieces; the trailing
    pieces that hold val_tokens tokens are the validation set."""
    hidden = _hidden_states(lm, stream, tc.train_window, progress) if tc.top_blocks == 0 else None
    pieces = []
    for d, (inputs, targets) in enumerate(_doc_inputs(stream, lm.start_id)):
        for s in range(0, len(inputs), tc.train_seq_len):
            e = min(s + tc.train_seq_len, len(inputs))
            # base windows start at multiples of train_window within the document
            starts = [w - s for w in range((s // tc.train_window) * tc.train_window, e, tc.train_window)]
            pieces.append(_Piece(inputs[s:e], targets[s:e], None if hidden is None else hidden[d][s:e], starts,
                                 None if hidden is not None else inputs, s, d))
    val, n = [], 0
    while pieces and n < tc.val_tokens and len(pieces) > 1:
        val.insert(0, pieces.pop())
        n += len(val[0].targets)
    if not pieces:
        raise TTABenchError("the prepare split has no tokens to train the FWL block on; give it text")
    return pieces, val


def _piece_hidden(lm, piece: _Piece, tc: TrainConfig) -> torch.Tensor:
    """(1, T, d) hidden states of a piece: cached, or (top blocks fine-tuned) recomputed window by window."""
    if piece.hidden is not None:
        return piece.hidden[None].to(lm.device)
    out = []
    T = len(piece.targets)
    for ws in piece.window_starts:
        a, b = piece.offset + ws, min(piece.offset + ws + tc.train_window, len(piece.doc_ids))
        h = lm.body(input_ids=piece.doc_ids[a:b][None].to(lm.device), use_cache=False).last_hidden_state[0]
        lo, hi = max(0, -ws), min(b - a, T - ws)
        out.append(h[lo:hi])
    return torch.cat(out)[None].float()


def _fwl_loss(lm, block, piece, tc, chunk, state=None):
    """(mean NLL of the fast logits, mean NLL of the base alone, the state after the piece, detached)
    over one piece, the block starting from `state` (None: empty)."""
    x = _piece_hidden(lm, piece, tc)
    y = piece.targets[None].to(lm.device)
    base = lm.logits(x.to(lm.dtype))
    logits, state = block(x, y, base, state, chunk)
    with torch.no_grad():
        base_nll = F.cross_entropy(base[0], y[0])
    return F.cross_entropy(logits[0], y[0]), base_nll, FWState(*(t.detach() for t in state))


def _in_order(pieces, memory: str, gen=None):
    """(piece, starts with an empty state) in reading order: with memory=document a document's pieces
    follow each other (documents shuffled when gen is given), else every piece stands alone (shuffled)."""
    if memory == "window":
        order = torch.randperm(len(pieces), generator=gen).tolist() if gen is not None else range(len(pieces))
        return [(pieces[i], True) for i in order]
    runs: list[list] = []
    for p in pieces:
        if runs and runs[-1][-1].doc == p.doc:
            runs[-1].append(p)
        else:
            runs.append([p])
    order = torch.randperm(len(runs), generator=gen).tolist() if gen is not None else range(len(runs))
    return [(p, i == 0) for r in order for i, p in enumerate(runs[r])]


def _validate(lm, block, val, tc, chunk) -> tuple[float, float]:
    tot, base_tot, n, state = 0.0, 0.0, 0, None
    with torch.no_grad():
        for piece, fresh in _in_order(val, train_fields(tc)["train_memory"]):
            loss, base, state = _fwl_loss(lm, block, piece, tc, chunk, None if fresh else state)
            k = len(piece.targets)
            tot, base_tot, n = tot + loss.item() * k, base_tot + base.item() * k, n + k
    return tot / max(n, 1), base_tot / max(n, 1)


def train_block(lm, tc: TrainConfig, stream, progress: bool = True, log=print) -> tuple[FWBlock, dict, dict]:
    """Meta-train a block on `stream`; returns (block, fine-tuned base parameters by name, info)."""
    from .dyneval import select_parameters

    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(tc.train_seed)
    torch.manual_seed(tc.train_seed)
    train, val = _pieces(lm, tc, stream, progress)
    t_hidden = time.perf_counter() - t0
    block = init_block(lm, tc)
    base_named = select_parameters(lm.model, f"last {tc.top_blocks}") if tc.top_blocks else []
    flags = [p.requires_grad for _, p in base_named]
    originals = [p.detach().clone() for _, p in base_named]
    for _, p in base_named:
        p.requires_grad_(True)
    slow = [p for _, p in block.slow_parameters()] + [p for _, p in base_named]
    opt = torch.optim.Adam([{"params": slow, "lr": tc.lr}, {"params": list(block.eta.parameters()), "lr": tc.eta_lr}])
    chunk = min(tc.train_seq_len, 128)
    history = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=tc.train_steps, unit="step", desc="FWL training", mininterval=1.0, leave=False)
    say = (bar.write if bar is not None else log) if log else (lambda s: None)
    n_train_tokens = sum(len(p.targets) for p in train)
    say(f"FWL training: {n_train_tokens} tokens in {len(train)} sequences, {sum(len(p.targets) for p in val)} validation"
        f" tokens; base hidden states {t_hidden:.0f}s")
    order: list = []
    ema, best, state = None, None, None

    def validate(step):
        nonlocal best
        v, vb = _validate(lm, block, val, tc, chunk)
        history.append({"step": step, "val_nll": v, "val_nll_base": vb, "train_nll_ema": ema,
                        "seconds": time.perf_counter() - t0})
        etas = " ".join(f"{k}={block.eta[k].item():.3g}" for k in FAST)
        say(f"step {step}: val nll {v:.4f} (base {vb:.4f}), train {ema if ema is None else round(ema, 4)}; eta {etas}")
        if best is None or v < best[1]:  # early stopping: keep the weights of the best validation loss
            best = (step, v, {k: t.detach().clone() for k, t in block.state_dict().items()},
                    {n: q.detach().clone() for n, q in base_named})

    try:
        if val and tc.eval_every:
            validate(0)  # the untrained block: U starts small, so about the base model's loss
        for step in range(1, tc.train_steps + 1):
            if not order:
                order = _in_order(train, train_fields(tc)["train_memory"], gen)[::-1]
            piece, fresh = order.pop()
            with torch.enable_grad():  # also when called under no_grad
                loss, _, state = _fwl_loss(lm, block, piece, tc, chunk, None if fresh else state)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(slow, 1.0)
            opt.step()
            ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{ema:.3f}")
            if val and ((tc.eval_every and step % tc.eval_every == 0) or step == tc.train_steps):
                validate(step)
    finally:
        if bar is not None:
            bar.close()
        base_params = {n: q.detach().clone() for n, q in base_named}
        with torch.no_grad():  # the shared model goes back as it was
            for (_, p), orig, flag in zip(base_named, originals, flags):
                p.copy_(orig)
                p.requires_grad_(flag)
    if best is not None:
        block.load_state_dict(best[2])
        base_params = best[3]
    for p in block.parameters():
        p.requires_grad_(False)
    info = {"train_seconds": time.perf_counter() - t0, "hidden_seconds": t_hidden, "train_tokens": n_train_tokens,
            "best_step": best[0] if best else tc.train_steps, "val_nll": best[1] if best else None,
            "val_tokens": sum(len(p.targets) for p in val), "history": history, "model": lm.fingerprint,
            "model_name": lm.name, "data": [stream.task, stream.split, stream.fingerprint], "train": train_fields(tc),
            "threads": torch.get_num_threads(), "device": str(lm.device)}
    return block.eval(), base_params, info


def train_or_load(lm, tc: TrainConfig, stream, force: bool = False, progress: bool = True, log=print):
    """The cached checkpoint for (model, config, data), training and saving it first if there is none.
    Returns (block, base parameters, info, path)."""
    path = checkpoint_path(lm, tc, stream)
    if path.is_file() and not force:
        block, base, info = load_checkpoint(path, lm.device)
        return block, base, info, path
    block, base, info = train_block(lm, tc, stream, progress=progress, log=log)
    save_checkpoint(path, block, base, info)
    return block, base, info, path


def train_command(args) -> int:
    """`tta-bench train-fwl`: train (or find) the checkpoint that the fwl method will load for these settings."""
    import shutil

    import yaml

    from .data import tokenize
    from .method import method_class
    from .models import load_model
    from .registry import get

    def pairs(items, flag):
        out = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep:
                raise TTABenchError(f"{flag} {item!r}: expected KEY=VALUE, e.g. {flag} train_steps=300")
            out[key.strip()] = yaml.safe_load(value)
        return out

    params, problems = method_class("fwl").make_params(pairs(args.set, "--set"), where="--set")
    if problems:
        raise TTABenchError(problems[0])
    task_cls = get("task", args.task)
    task = task_cls(**pairs(args.task_param, "--task-param"))
    problem = task.problem(args.split)
    if problem:
        raise TTABenchError(problem)
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    stream = tokenize(task.documents(args.split), lm.tokenizer, task_cls.registry_name, args.split,
                      limit_tokens=params.train_tokens)
    progress = not args.no_progress
    t0 = time.perf_counter()
    block, _, info, path = train_or_load(lm, params, stream, force=args.force, progress=progress)
    fresh = time.perf_counter() - t0 > 0.9 * info["train_seconds"]
    print(f"{'trained' if fresh else 'found'} {path}")
    print(f"  {info['train_tokens']} training tokens of {args.task}:{args.split}, {info['train']['train_steps']} steps,"
          f" {info['train_seconds']:.0f}s ({info['hidden_seconds']:.0f}s of base hidden states) on {info['device']}"
          f" with {info['threads']} threads")
    if info["history"]:
        h = info["history"][-1]
        print(f"  validation nll {info['val_nll']:.4f} at step {info['best_step']} (kept), base alone {h['val_nll_base']:.4f}")
    if args.out:
        shutil.copyfile(path, args.out)
        print(f"  copied to {args.out}")
    return 0
