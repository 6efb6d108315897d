"""Fine-tuning on the prepare split: the control of a method that trains the base model there (SPEC 3,
Controls), and dynamic evaluation on top of it.

`finetune` fine-tunes the base model's last `blocks` blocks (0: every parameter) on the prepare split
with the LM loss, Adam, one `train_seq_len` piece per step, keeping the weights of the best loss on
held-out pieces (the last `val_tokens` of the tokens read), and then scores statically: whatever it
gains over `none` is domain adaptation, none of it test-time adaptation. Its budget fields carry the
FWL block's names (train_tokens, val_tokens, train_seq_len, train_steps, eval_every, patience), so a
bench gives both the same budget. The fine-tuned weights are prepared state in the harness's cache
(keyed by model, prepare data and these settings), and live in a private copy of the model.

`finetune-dynamic-eval` is dynamic evaluation whose starting weights are the fine-tuned ones: its
control is `finetune` with the same settings, so its gain over that control is test-time adaptation.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tta_bench.api.method import Method
from tta_bench.api.registry import register_method
from tta_bench_methods._common.dyneval import DynamicEvalBase
from tta_bench_methods._common.selection import select_parameters
from tta_bench_methods._common.trainer import TrainingJob, document_pairs, ema_text, hold_out, snapshot_of, train

FORMAT = "tta_bench.finetune/1"
QUICK = {"blocks": 1, "train_tokens": 600, "val_tokens": 100, "train_seq_len": 64, "train_steps": 4, "eval_every": 2}


@dataclass
class FinetuneConfig:
    blocks: int = 2  # the base model's last N blocks are fine-tuned (0: every parameter, the head included)
    train_tokens: int = 60000  # tokens of the prepare split read (validation included)
    val_tokens: int = 4096  # held out from the end of those, for the validation loss
    train_seq_len: int = 512  # one piece of a document per step
    train_steps: int = 150  # optimizer steps; the best validation loss's weights are kept
    train_lr: float = 3e-5  # Adam
    train_seed: int = 0
    eval_every: int = 25  # steps between validation losses (0: only at the end)
    patience: int = 0  # stop after this many validations without a better loss (0: run every step)

    def problems(self) -> list[str]:
        out = [
            f"{k} must be >= 1, got {getattr(self, k)}"
            for k in ("train_tokens", "train_seq_len", "train_steps")
            if getattr(self, k) < 1
        ]
        out += [
            f"{k} must be >= 0, got {getattr(self, k)}"
            for k in ("blocks", "val_tokens", "eval_every", "patience")
            if getattr(self, k) < 0
        ]
        if not self.train_lr > 0:
            out.append(f"train_lr must be > 0, got {self.train_lr}")
        if self.val_tokens >= self.train_tokens:
            out.append(f"val_tokens ({self.val_tokens}) must be smaller than train_tokens ({self.train_tokens})")
        return out


def finetune_fields(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(FinetuneConfig)}


def _pieces(stream, start_id: int, seq_len: int, val_tokens: int):
    """(train, validation) lists of (inputs, targets): each document cut into seq_len pieces, its first
    input the start token; the trailing pieces that hold val_tokens tokens are validation."""
    pieces = []
    for inputs, ids in document_pairs(stream, start_id):
        pieces += [(inputs[s : s + seq_len], ids[s : s + seq_len]) for s in range(0, len(ids), seq_len)]
    return hold_out(pieces, val_tokens, lambda piece: len(piece[1]), "fine-tune on")


def train_finetune(lm, cfg: FinetuneConfig, stream, log=print) -> tuple[dict[str, torch.Tensor], dict]:
    """Fine-tune a private copy of the base model on `stream`; (the fine-tuned parameters by name, info)."""
    t0 = time.perf_counter()
    model = copy.deepcopy(lm.model)
    for q in model.parameters():
        q.requires_grad_(False)
    named = select_parameters(model, "all" if cfg.blocks == 0 else f"last {cfg.blocks}")
    for _, q in named:
        q.requires_grad_(True)
    params = [q for _, q in named]
    opt = torch.optim.Adam(params, lr=cfg.train_lr)
    train_set, val = _pieces(stream, lm.start_id, cfg.train_seq_len, cfg.val_tokens)

    def loss_of(inputs, targets):
        h = lm.hidden(inputs[None].to(lm.device), model=model)[0]
        return F.cross_entropy(lm.logits(h, model=model), targets.to(lm.device))

    def validate():
        with torch.no_grad():
            return {"val_nll": sum(loss_of(i, t).item() * len(t) for i, t in val) / sum(len(t) for _, t in val)}

    def describe(entry):
        ema = ema_text(entry["train_nll_ema"])
        return f"finetune step {entry['step']}: val nll {entry['val_nll']:.4f}, train {ema}"

    job = TrainingJob(
        params,
        opt,
        _losses(train_set, loss_of, cfg.train_seed),
        validate if val else None,
        lambda: snapshot_of(named),
        describe,
        name="finetune",
        say=log,
        started=t0,
    )
    run = train(job, cfg)
    tensors = run.best.weights if run.best else snapshot_of(named)
    info = {
        "train_seconds": time.perf_counter() - t0,
        "steps": run.steps,
        "stopped_by": run.stopped_by,
        "best_step": run.best_step,
        "val_nll": run.val_nll,
        "history": run.history,
        "train": finetune_fields(cfg),
        "train_tokens": sum(len(t) for _, t in train_set),
        "val_tokens": sum(len(t) for _, t in val),
    }
    return tensors, info


def _losses(pieces, loss_of, seed: int):
    """The trainer's next_loss: the pieces in a random order, drawn again once all were used."""
    gen = torch.Generator().manual_seed(seed)
    order: list = []

    def next_loss():
        if not order:
            order.extend(torch.randperm(len(pieces), generator=gen).tolist())
        return loss_of(*pieces[order.pop()])

    return next_loss


def finetuned(lm, cfg, data) -> tuple[dict[str, torch.Tensor], dict]:
    """The fine-tuned parameters for this model, prepare data and settings: from the harness's cache, else trained."""
    from safetensors.torch import load_file, save_file

    stream = data.load(limit_tokens=cfg.train_tokens)

    def build(folder):
        tensors, info = train_finetune(lm, cfg, stream, log=data.log)
        save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(folder / "params.safetensors"))
        return info

    folder = data.cached("finetune", stream, {"format": FORMAT, "train": finetune_fields(cfg)}, build)
    info = json.loads((folder / "meta.json").read_text())["info"]
    return {k: v.to(lm.device) for k, v in load_file(str(folder / "params.safetensors")).items()}, info


@register_method("finetune")
class Finetune(Method):
    """Control (SPEC 3): the base model's last blocks fine-tuned on the prepare split, then scored statically."""

    @dataclass
    class Params(FinetuneConfig):
        pass

    quick_params = QUICK

    @classmethod
    def adapts_at_test_time(cls, params) -> bool:
        return False

    def prepare(self, data):
        tensors, self.info = finetuned(self.lm, self.params, data)
        self.model = copy.deepcopy(self.lm.model)  # the loaded model is shared by later cells
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for k, v in tensors.items():
                named[k].copy_(v)

    @classmethod
    def runs_in_lanes(cls, params) -> bool:
        return True  # static after prepare: lanes only batch the forward

    def open_lanes(self, n):
        pass

    def reset_lane(self, lane):
        pass

    def score(self, seg):
        return self.score_lanes([seg])[0]

    @torch.no_grad()
    def score_lanes(self, segs):
        return self.lm.logprobs_lanes([s.ids for s in segs], [s.n for s in segs], model=self.model)

    def close(self):
        self.model = None


@register_method("finetune-dynamic-eval")
class FinetuneDynamicEval(DynamicEvalBase):
    """Dynamic evaluation starting from the fine-tuned weights of `finetune` (its control)."""

    @dataclass
    class Params(FinetuneConfig, DynamicEvalBase.Params):
        def problems(self) -> list[str]:
            return DynamicEvalBase.Params.problems(self) + FinetuneConfig.problems(self)

    quick_params = {**QUICK, **DynamicEvalBase.quick_params}

    @classmethod
    def control(cls, params):
        return {"method": "finetune", "params": finetune_fields(params)}

    def prepare(self, data):
        tensors, self.info = finetuned(self.lm, self.params, data)
        named = dict(self.lm.model.named_parameters())
        self._base = {k: named[k].detach().clone() for k in tensors}  # given back in close()
        with torch.no_grad():
            for k, v in tensors.items():
                named[k].copy_(v)
        if self.adapter is None:  # the adapted weights start, and reset, at the fine-tuned values (lora: B = 0)
            self.dyn.set_originals([named[n] for n in self.names])
        super().prepare(data)

    def _stats_key(self) -> dict:
        return {**super()._stats_key(), "finetune": finetune_fields(self.params)}

    def close(self):
        super().close()
        named = dict(self.lm.model.named_parameters())
        with torch.no_grad():
            for k, v in getattr(self, "_base", {}).items():
                named[k].copy_(v)
        self._base = {}
