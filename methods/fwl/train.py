"""Meta-training a Fast Weight Layer block (Clark et al. 2022; SPEC 3), and its checkpoints.

Training (`train_block`): the LM loss of the fast logits on the prepare split, back-propagated through
the inner gradient (it is built from differentiable ops, so second-order terms are included). The base
is frozen (its final hidden states come from the harness's shared pass over the prepare split) or its
top blocks are fine-tuned; the loop, with its early stopping, is the one finetune uses too
(tta_bench_methods._common.trainer). A checkpoint is a safetensors file: the block, the fine-tuned base
parameters and the training record; the method keeps it in the harness's cache of prepared state,
keyed by the base model, the training configuration and the training data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from tta_bench.api.errors import TTABenchError
from tta_bench_methods._common.selection import select_parameters
from tta_bench_methods._common.trainer import TrainingJob, document_pairs, ema_text, hold_out, snapshot_of, train

from .block import FAST, FWBlock, FWLConfig, FWState

FORMAT = "tta_bench.fwl/1"
TRAIN_RUNS = "train.runs"  # the checkpoint's record of its training data (run hashes, int64 bits)


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
    # document: a document's pieces are read in order, the fast state carried from one to the next
    # (detached: truncated back-propagation), so the block meets the long sums that fast_state=document
    # evaluation builds; window: the state starts empty in every piece; auto: as the method's `fast_state`.
    train_fast_state: Literal["auto", "document", "window"] = "auto"
    # document order: this many documents are open at once, one piece of each in turn, each with its own
    # carried state, so consecutive steps see different documents (1: one document after another)
    train_lanes: int = 1
    train_steps: int = 150  # optimizer steps, one sequence each; the best validation loss's weights are kept
    lr: float = 1e-3  # Adam
    eta_lr: float = 1e-2  # Adam learning rate of the step sizes
    train_seed: int = 0
    eval_every: int = 25  # steps between validation losses (0: only at the end)
    patience: int = 0  # stop after this many validations without a better loss (0: run every step)
    fast: bool = True  # False: the control (SPEC 3), the same block trained with its step sizes fixed at 0
    # decayed, multi-timescale fast weights (decayed.py): one timescale tau per entry, gamma from 1 - 1/tau;
    # empty: the paper's undecayed sum over every earlier position
    timescales: list[float] = dataclasses.field(default_factory=list)
    # chunk-recurrent fast weights (block.py): each chunk's gradients at the fast weights the earlier chunks
    # left; the chunk (the method's `chunk`) is then part of the definition, in training as in evaluation
    recurrent: bool = False

    def problems(self) -> list[str]:
        out = []
        for k in ("size", "train_tokens", "train_window", "train_seq_len", "train_steps", "train_lanes"):
            if getattr(self, k) < 1:
                out.append(f"{k} must be >= 1, got {getattr(self, k)}")
        for k in ("top_blocks", "val_tokens", "eval_every", "patience"):
            if getattr(self, k) < 0:
                out.append(f"{k} must be >= 0, got {getattr(self, k)}")
        for k in ("lr", "eta_lr"):
            if not getattr(self, k) > 0:
                out.append(f"{k} must be > 0, got {getattr(self, k)}")
        if self.norm < 0:
            out.append(f"norm must be >= 0 (0: 1/train_seq_len), got {self.norm}")
        if any(not t > 1 for t in self.timescales):
            out.append(f"timescales must each be > 1 (tokens; gamma starts at 1 - 1/tau), got {self.timescales}")
        if self.val_tokens >= self.train_tokens:
            out.append(f"val_tokens ({self.val_tokens}) must be smaller than train_tokens ({self.train_tokens})")
        return out

    def block_config(self, lm) -> FWLConfig:
        return FWLConfig(
            lm.hidden_size,
            self.size,
            lm.vocab_size,
            self.norm or 1.0 / self.train_seq_len,
            fast=self.fast,
            timescales=tuple(self.timescales),
            recurrent=self.recurrent,
        )


def train_fields(obj) -> dict:
    """The TrainConfig fields of obj (a TrainConfig or a method's Params that extends it), `auto` resolved."""
    out = {f.name: getattr(obj, f.name) for f in dataclasses.fields(TrainConfig)}
    if out["train_fast_state"] == "auto":
        out["train_fast_state"] = getattr(obj, "fast_state", "window")
    return out


def training_chunk(tc) -> int:
    """The linear-attention chunk of training: the method's `chunk` (it defines a recurrent block's
    updates; otherwise it only trades memory for speed), at most a training sequence."""
    return min(tc.train_seq_len, getattr(tc, "chunk", 128))


def save_checkpoint(path: Path, block: FWBlock, base_params: dict[str, torch.Tensor], info: dict, train_runs) -> None:
    """`train_runs`: run hashes of the training tokens (tta_bench.checks.separation.stream_runs), kept so
    that a cell given this checkpoint can be refused when they overlap its evaluated stream."""
    from safetensors.torch import save_file

    tensors = {f"block.{k}": v.detach().cpu().contiguous() for k, v in block.state_dict().items()}
    tensors.update({f"base.{k}": v.detach().cpu().contiguous() for k, v in base_params.items()})
    tensors[TRAIN_RUNS] = torch.from_numpy(np.ascontiguousarray(train_runs).view(np.int64))
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
        raise TTABenchError(
            f"FWL checkpoint {path} does not exist; fix `checkpoint`, or leave it empty to train one in prepare"
        )
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise TTABenchError(
                f"{path} is not a tta-bench FWL checkpoint (format {meta.get('format')!r}); leave `checkpoint` empty to train one"
            )
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta["config"])
    block = FWBlock(FWLConfig(**{**cfg, "timescales": tuple(cfg.get("timescales", ()))}))
    block.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("block.")})
    info = json.loads(meta["info"])
    base = {k[5:]: v for k, v in tensors.items() if k.startswith("base.")}
    return block.to(device), base, info


def recorded_training_runs(path) -> "np.ndarray":
    """The run hashes of a checkpoint's training tokens; refuses a checkpoint that has no record."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise TTABenchError(
            f"FWL checkpoint {path} does not exist; fix `checkpoint`, or leave it empty to train one in prepare"
        )
    try:
        f = safe_open(str(path), framework="pt")
    except Exception:  # safetensors' own error types
        raise TTABenchError(
            f"{path} is not a tta-bench FWL checkpoint (not a safetensors file); leave `checkpoint` empty to train one"
        ) from None
    with f:
        if TRAIN_RUNS not in f.keys():
            raise TTABenchError(
                f"FWL checkpoint {path} has no record of its training data, so its separation from the"
                " evaluated text cannot be checked; retrain it (leave `checkpoint` empty)"
            )
        return f.get_tensor(TRAIN_RUNS).numpy().view(np.uint64)


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


def _pieces(lm, tc: TrainConfig, stream, data) -> tuple[list[_Piece], list[_Piece]]:
    """Training and validation sequences: each document cut into train_seq_len pieces; the trailing
    pieces that hold val_tokens tokens are the validation set. With a frozen base, the hidden states
    come from the harness's shared pass: each document read in non-overlapping windows of
    train_window tokens (protocol segment train_window, context 1), the last window on its own."""
    hidden = None
    if tc.top_blocks == 0:
        from tta_bench.protocol.evaluate import Protocol

        feats = data.features(stream, Protocol(tc.train_window, 1, "document"), tail="short")
        hidden = [f["hidden"].to(lm.device) for f in feats]
    pieces = []
    for d, (inputs, targets) in enumerate(document_pairs(stream, lm.start_id)):
        for s in range(0, len(inputs), tc.train_seq_len):
            e = min(s + tc.train_seq_len, len(inputs))
            # base windows start at multiples of train_window within the document
            starts = [w - s for w in range((s // tc.train_window) * tc.train_window, e, tc.train_window)]
            pieces.append(
                _Piece(
                    inputs[s:e],
                    targets[s:e],
                    None if hidden is None else hidden[d][s:e],
                    starts,
                    None if hidden is not None else inputs,
                    s,
                    d,
                )
            )
    return hold_out(pieces, tc.val_tokens, lambda piece: len(piece.targets), "train the FWL block on")


def _piece_hidden(lm, piece: _Piece, tc: TrainConfig) -> torch.Tensor:
    """(1, T, d) hidden states of a piece: cached, or (top blocks fine-tuned) recomputed window by window."""
    if piece.hidden is not None:
        return piece.hidden[None].to(lm.device)
    out = []
    T = len(piece.targets)
    for ws in piece.window_starts:
        a, b = piece.offset + ws, min(piece.offset + ws + tc.train_window, len(piece.doc_ids))
        h = lm.hidden(piece.doc_ids[a:b][None].to(lm.device))[0]
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


def _in_order(pieces, fast_state: str, gen=None, lanes: int = 1):
    """(piece, starts with an empty state, lane) in reading order: with fast_state=document each document's
    pieces in order, `lanes` documents open at once and read one piece each in turn (documents shuffled
    when gen is given); else every piece stands alone (shuffled), in lane 0."""
    if fast_state == "window":
        order = torch.randperm(len(pieces), generator=gen).tolist() if gen is not None else range(len(pieces))
        return [(pieces[i], True, 0) for i in order]
    runs: list[list] = []
    for p in pieces:
        if runs and runs[-1][-1].doc == p.doc:
            runs[-1].append(p)
        else:
            runs.append([p])
    order = torch.randperm(len(runs), generator=gen).tolist() if gen is not None else range(len(runs))
    waiting = [runs[r] for r in order][::-1]
    open_docs: list = [None] * lanes  # per lane: (the document's pieces, the next one's index)
    out = []
    while waiting or any(open_docs):
        for lane in range(lanes):
            if open_docs[lane] is None and waiting:
                open_docs[lane] = (waiting.pop(), 0)
            if open_docs[lane] is not None:
                doc, i = open_docs[lane]
                out.append((doc[i], i == 0, lane))
                open_docs[lane] = (doc, i + 1) if i + 1 < len(doc) else None
    return out


def _validate(lm, block, val, tc, chunk) -> tuple[float, float]:
    tot, base_tot, n, state = 0.0, 0.0, 0, None
    with torch.no_grad():
        for piece, fresh, _ in _in_order(val, train_fields(tc)["train_fast_state"]):
            loss, base, state = _fwl_loss(lm, block, piece, tc, chunk, None if fresh else state)
            k = len(piece.targets)
            tot, base_tot, n = tot + loss.item() * k, base_tot + base.item() * k, n + k
    return tot / max(n, 1), base_tot / max(n, 1)


def train_block(lm, tc: TrainConfig, stream, data, progress: bool = True, log=print) -> tuple[FWBlock, dict, dict]:
    """Meta-train a block on `stream` (the prepare split; `data` its PrepareData); returns (block,
    fine-tuned base parameters by name, info)."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(tc.train_seed)
    torch.manual_seed(tc.train_seed)
    train_set, val = _pieces(lm, tc, stream, data)
    t_hidden = time.perf_counter() - t0
    block = init_block(lm, tc)
    n_train_tokens = sum(len(p.targets) for p in train_set)
    with _tuned_base(lm, tc.top_blocks) as base_named, _progress_bar(tc.train_steps, progress) as bar:
        job = _training_job(lm, block, base_named, (train_set, val), tc, gen, _say(bar, log), t0)
        job.on_step = _bar_step(bar)
        n_val_tokens = sum(len(p.targets) for p in val)
        job.say(
            f"FWL training: {n_train_tokens} tokens in {len(train_set)} sequences, {n_val_tokens} validation"
            f" tokens; base hidden states {t_hidden:.0f}s"
        )
        run = train(job, tc)
        base_params = snapshot_of(base_named)  # the last step's, before the shared model is given back
    if run.best is not None:
        block.load_state_dict(run.best.weights[0])
        base_params = run.best.weights[1]
    for p in block.parameters():
        p.requires_grad_(False)
    info = {
        "train_seconds": time.perf_counter() - t0,
        "hidden_seconds": t_hidden,
        "train_tokens": n_train_tokens,
        "steps": run.steps,
        "stopped_by": run.stopped_by,
        "best_step": run.best_step,
        "val_nll": run.val_nll,
        "val_tokens": sum(len(p.targets) for p in val),
        "history": run.history,
        "model": lm.fingerprint,
        "model_name": lm.name,
        "data": [stream.task, stream.split, stream.fingerprint],
        "train": train_fields(tc),
        "threads": torch.get_num_threads(),
        "device": str(lm.device),
    }
    return block.eval(), base_params, info


def _training_job(lm, block, base_named, pieces, tc: TrainConfig, gen, say, t0) -> TrainingJob:
    """The block's training for the shared trainer: Adam on the slow weights (and the fine-tuned base's)
    at lr, on the step sizes and decays at eta_lr; validation on the fast logits beside the base's."""
    train_set, val = pieces
    slow = [p for _, p in block.slow_parameters()] + [p for _, p in base_named]
    groups = [{"params": slow, "lr": tc.lr}]
    if tc.fast:  # the control's step sizes stay at 0
        groups.append({"params": block.step_parameters(), "lr": tc.eta_lr})
    chunk = training_chunk(tc)

    def validate():
        v, vb = _validate(lm, block, val, tc, chunk)
        # the learned step sizes at each validation: the report draws how they moved
        return {"val_nll": v, "val_nll_base": vb, "eta": {k: block.eta[k].reshape(-1).tolist() for k in FAST}}

    def describe(entry):
        return (
            f"step {entry['step']}: val nll {entry['val_nll']:.4f} (base {entry['val_nll_base']:.4f}),"
            f" train {ema_text(entry['train_nll_ema'])}; eta {_step_sizes(block)}"
        )

    def snapshot():
        return {k: t.detach().clone() for k, t in block.state_dict().items()}, snapshot_of(base_named)

    return TrainingJob(
        slow,
        torch.optim.Adam(groups),
        _losses(lm, block, train_set, tc, chunk, gen),
        validate if val else None,
        snapshot,
        describe,
        name="FWL training",
        say=say,
        started=t0,
    )


def _losses(lm, block, pieces, tc: TrainConfig, chunk: int, gen):
    """The trainer's next_loss: the pieces in training order (drawn again once all were used), each
    lane's fast state carried from its previous piece."""
    order: list = []
    states: dict = {}  # the carried state of each lane

    def next_loss():
        if not order:
            order.extend(_in_order(pieces, train_fields(tc)["train_fast_state"], gen, tc.train_lanes)[::-1])
        piece, fresh, lane = order.pop()
        loss, _, states[lane] = _fwl_loss(lm, block, piece, tc, chunk, None if fresh else states[lane])
        return loss

    return next_loss


def _step_sizes(block: FWBlock) -> str:
    """The block's learned step sizes (and its memory's decays) for the training log."""
    etas = " ".join(f"{k}=" + "/".join(f"{v:.3g}" for v in block.eta[k].reshape(-1).tolist()) for k in FAST)
    return etas + block.memory.describe(block)


@contextlib.contextmanager
def _tuned_base(lm, top_blocks: int):
    """The base model's last `top_blocks` blocks' (name, parameter) pairs with gradients on (none for 0);
    their values and requires_grad flags given back afterwards: the loaded model is shared."""
    named = select_parameters(lm.model, f"last {top_blocks}") if top_blocks else []
    flags = [p.requires_grad for _, p in named]
    originals = [p.detach().clone() for _, p in named]
    for _, p in named:
        p.requires_grad_(True)
    try:
        yield named
    finally:
        with torch.no_grad():
            for (_, p), orig, flag in zip(named, originals, flags):
                p.copy_(orig)
                p.requires_grad_(flag)


@contextlib.contextmanager
def _progress_bar(total: int, progress: bool):
    """A tqdm bar over the training steps, or None."""
    if not progress:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="step", desc="FWL training", mininterval=1.0, leave=False)
    try:
        yield bar
    finally:
        bar.close()


def _bar_step(bar):
    """The trainer's on_step for the bar (None without one): a step done, the loss average shown."""
    if bar is None:
        return None

    def on_step(ema):
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}")

    return on_step


def _say(bar, log):
    """Where the training log goes: above the bar when there is one, else `log` (None: nowhere)."""
    if not log:
        return lambda s: None
    return bar.write if bar is not None else log
