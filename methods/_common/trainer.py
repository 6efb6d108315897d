"""One optimizer loop with early stopping, for every method that trains on the prepare split (FWL's
block, finetune's top blocks):

    job = TrainingJob(params, optimizer, next_loss, validate, snapshot, describe, name="finetune", say=log,
                      started=time.perf_counter())
    run = train(job, cfg)  # cfg: train_steps, eval_every, patience
    run.best               # Best(step, val_nll, weights) of the best validation loss, None without validation
    run.history            # the curve: {"step", "val_nll", <more from validate>, "train_nll_ema", "seconds"}

Every step: the next training item's loss, its backward, the gradient norm of `params` clipped to 1,
an optimizer step, and the training loss's exponential moving average (0.95). With a validation set,
validation runs before the first step (when eval_every > 0), every `eval_every` steps and after the
last; `snapshot()` keeps the weights of the best validation loss, and `patience` validations in a row
without a better one (patience > 0) stop training early.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from tta_bench.api.errors import TTABenchError


@dataclass
class TrainingJob:
    """What `train` needs from a method's training: its parameters, optimizer and callbacks."""

    params: list  # their gradient norm is clipped to 1 at every step
    optimizer: torch.optim.Optimizer
    next_loss: Callable[[], torch.Tensor]  # the loss of the next training item, graph attached
    validate: Callable[[], dict] | None  # {"val_nll": ..., more}; None: no validation set
    snapshot: Callable[[], object]  # the weights to keep when the validation loss improves
    describe: Callable[[dict], str]  # a log line for a history entry
    name: str  # who trains, for the line that says training stopped early
    say: Callable[[str], None]
    started: float  # time.perf_counter() when training began: the curve's seconds count from it
    on_step: Callable[[float], None] | None = None  # after every step, with the loss average (a progress bar)


@dataclass
class Best:
    step: int
    val_nll: float
    weights: object  # what TrainingJob.snapshot returned


@dataclass
class TrainingRun:
    """What `train` returns."""

    steps: int  # optimizer steps taken
    history: list[dict] = field(default_factory=list)
    best: Best | None = None
    stopped_by: str = "step cap"  # or "patience": validation stopped improving (a plateau)

    @property
    def best_step(self) -> int:
        return self.best.step if self.best else self.steps

    @property
    def val_nll(self) -> float | None:
        return self.best.val_nll if self.best else None


def document_pairs(stream, start_id: int):
    """(inputs, targets) of every document of `stream`: the targets its token ids, the inputs the same
    shifted right by one behind the start token."""
    for doc in stream.docs:
        ids = torch.tensor(doc.ids, dtype=torch.long)
        yield torch.cat([torch.tensor([start_id]), ids[:-1]]), ids


def hold_out(pieces: list, val_tokens: int, n_targets: Callable, what: str) -> tuple[list, list]:
    """(train, validation): the trailing pieces that hold `val_tokens` targets (n_targets(piece) each)
    are validation, at least one piece is kept for training; refuses a split with none (`what` it trains)."""
    val, n = [], 0
    while len(pieces) > 1 and n < val_tokens:
        val.insert(0, pieces.pop())
        n += n_targets(val[0])
    if not pieces:
        raise TTABenchError(f"the prepare split has no tokens to {what}; give it text")
    return pieces, val


def snapshot_of(named) -> dict[str, torch.Tensor]:
    """Detached copies of (name, parameter) pairs, by name."""
    return {n: q.detach().clone() for n, q in named}


def ema_text(ema: float | None) -> str:
    """The training loss average as the log lines show it."""
    return f"{ema if ema is None else round(ema, 4)}"


class _Validation:
    """The curve, the best validation so far, and how many validations since it improved."""

    def __init__(self, job: TrainingJob):
        self.job, self.history, self.best, self.stale = job, [], None, 0

    def run(self, step: int, ema: float | None) -> None:
        job = self.job
        entry = {"step": step, **job.validate(), "train_nll_ema": ema, "seconds": time.perf_counter() - job.started}
        self.history.append(entry)
        job.say(job.describe(entry))
        self.stale += 1
        if self.best is None or entry["val_nll"] < self.best.val_nll:
            self.best, self.stale = Best(step, entry["val_nll"], job.snapshot()), 0


def _step(job: TrainingJob, ema: float | None) -> float:
    """One optimizer step on the next item; the training loss's new average."""
    with torch.enable_grad():  # also when called under no_grad
        loss = job.next_loss()
        job.optimizer.zero_grad(set_to_none=True)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(job.params, 1.0)
    job.optimizer.step()
    return loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()


def train(job: TrainingJob, cfg) -> TrainingRun:
    """Train for cfg.train_steps steps, validating every cfg.eval_every (0: only after the last) and
    stopping after cfg.patience validations without improvement (0: never early); see the module docstring."""
    validation, ema = _Validation(job), None
    if job.validate and cfg.eval_every:
        validation.run(0, ema)  # before training: where it starts from
    for step in range(1, cfg.train_steps + 1):
        ema = _step(job, ema)
        if job.on_step is not None:
            job.on_step(ema)
        if job.validate and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.train_steps):
            validation.run(step, ema)
            if cfg.patience and validation.stale >= cfg.patience:
                job.say(f"{job.name}: stopped at step {step}, {validation.stale} validations without improvement")
                return TrainingRun(step, validation.history, validation.best, "patience")
    return TrainingRun(step, validation.history, validation.best)
