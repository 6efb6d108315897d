"""Meta-training a Fast Weight Layer block (Clark et al. 2022; SPEC 3), and its checkpoints.

Training (`train_block`): the LM loss of the fast logits on the prepare split, back-propagated through
the inner gradient (it is built from differentiable ops, so second-order terms are included). The base
is frozen (its final hidden states come from the harness's shared pass over the prepare split) or its
top blocks are fine-tuned. A checkpoint is a safetensors file: the block, the fine-tuned base
parameters and the training record; the method keeps it in the harness's cache of prepared state,
keyed by the base model, the training configuration and the training data.
"""
from __future__ import annotations

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

from tta_bench.errors import TTABenchError

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
        return FWLConfig(lm.hidden_size, self.size, lm.vocab_size, self.norm or 1.0 / self.train_seq_len, fast=self.fast,
                         timescales=tuple(self.timescales), recurrent=self.recurrent)


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
    """`train_runs`: run hashes of the training tokens (tta_bench.separation.stream_runs), kept so
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
        raise TTABenchError(f"FWL checkpoint {path} does not exist; fix `checkpoint`, or leave it empty to train one in prepare")
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise TTABenchError(f"{path} is not a tta-bench FWL checkpoint (format {meta.get('format')!r}); leave `checkpoint` empty to train one")
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
        raise TTABenchError(f"FWL checkpoint {path} does not exist; fix `checkpoint`, or leave it empty to train one in prepare")
    try:
        f = safe_open(str(path), framework="pt")
    except Exception:  # safetensors' own error types
        raise TTABenchError(f"{path} is not a tta-bench FWL checkpoint (not a safetensors file); leave `checkpoint` empty to train one") from None
    with f:
        if TRAIN_RUNS not in f.keys():
            raise TTABenchError(f"FWL checkpoint {path} has no record of its training data, so its separation from the"
                                " evaluated text cannot be checked; retrain it (leave `checkpoint` empty)")
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


def _doc_inputs(stream, start_id):
    for doc in stream.docs:
        ids = torch.tensor(doc.ids, dtype=torch.long)
        yield torch.cat([torch.tensor([start_id]), ids[:-1]]), ids


def _pieces(lm, tc: TrainConfig, stream, data) -> tuple[list[_Piece], list[_Piece]]:
    """Training and validation sequences: each document cut into train_seq_len pieces; the trailing
    pieces that hold val_tokens tokens are the validation set. With a frozen base, the hidden states
    come from the harness's shared pass: each document read in non-overlapping windows of
    train_window tokens (protocol segment train_window, context 1), the last window on its own."""
    hidden = None
    if tc.top_blocks == 0:
        from tta_bench.evaluate import Protocol

        feats = data.features(stream, Protocol(tc.train_window, 1, "document"), tail="short")
        hidden = [f["hidden"].to(lm.device) for f in feats]
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
    from tta_bench_methods.dynamic_eval.update import select_parameters

    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(tc.train_seed)
    torch.manual_seed(tc.train_seed)
    train, val = _pieces(lm, tc, stream, data)
    t_hidden = time.perf_counter() - t0
    block = init_block(lm, tc)
    base_named = select_parameters(lm.model, f"last {tc.top_blocks}") if tc.top_blocks else []
    flags = [p.requires_grad for _, p in base_named]
    originals = [p.detach().clone() for _, p in base_named]
    for _, p in base_named:
        p.requires_grad_(True)
    slow = [p for _, p in block.slow_parameters()] + [p for _, p in base_named]
    groups = [{"params": slow, "lr": tc.lr}] + ([{"params": block.step_parameters(), "lr": tc.eta_lr}] if tc.fast else [])
    opt = torch.optim.Adam(groups)
    chunk = training_chunk(tc)
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
    ema, best, states, stale = None, None, {}, 0  # states: the carried state of each lane

    def validate(step):
        nonlocal best, stale
        v, vb = _validate(lm, block, val, tc, chunk)
        history.append({"step": step, "val_nll": v, "val_nll_base": vb, "train_nll_ema": ema,
                        "seconds": time.perf_counter() - t0})
        etas = " ".join(f"{k}=" + "/".join(f"{v:.3g}" for v in block.eta[k].reshape(-1).tolist()) for k in FAST)
        if tc.timescales:
            etas += "; gamma " + "/".join(f"{v:.5f}" for v in block.gammas().tolist())
        say(f"step {step}: val nll {v:.4f} (base {vb:.4f}), train {ema if ema is None else round(ema, 4)}; eta {etas}")
        stale += 1
        if best is None or v < best[1]:  # early stopping: keep the weights of the best validation loss
            best, stale = (step, v, {k: t.detach().clone() for k, t in block.state_dict().items()},
                           {n: q.detach().clone() for n, q in base_named}), 0

    try:
        if val and tc.eval_every:
            validate(0)  # the untrained block: U starts small, so about the base model's loss
        for step in range(1, tc.train_steps + 1):
            if not order:
                order = _in_order(train, train_fields(tc)["train_fast_state"], gen, tc.train_lanes)[::-1]
            piece, fresh, lane = order.pop()
            with torch.enable_grad():  # also when called under no_grad
                loss, _, states[lane] = _fwl_loss(lm, block, piece, tc, chunk, None if fresh else states[lane])
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
                if tc.patience and stale >= tc.patience:
                    say(f"FWL training: stopped at step {step}, {stale} validations without improvement")
                    break
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
            "steps": step, "best_step": best[0] if best else tc.train_steps, "val_nll": best[1] if best else None,
            "val_tokens": sum(len(p.targets) for p in val), "history": history, "model": lm.fingerprint,
            "model_name": lm.name, "data": [stream.task, stream.split, stream.fingerprint], "train": train_fields(tc),
            "threads": torch.get_num_threads(), "device": str(lm.device)}
    return block.eval(), base_params, info
