"""The evaluation protocol (SPEC 2): one pass, score each segment, then adapt on it."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from tta_bench.protocol.stream import Stream
from tta_bench.api.errors import TTABenchError
from tta_bench.api.method import Method, Segment


@dataclass
class Protocol:
    segment_len: int = 128
    context_len: int = 1
    reset: str = "document"  # document | never

    @property
    def window(self) -> int:
        """Every input fills this many tokens where the scope has them."""
        return self.context_len + self.segment_len - 1


def segments(stream: Stream, protocol: Protocol, start_id: int) -> Iterator[tuple[Segment, torch.Tensor, bool]]:
    """(segment, targets, starts_a_document) in stream order, per SPEC 2.

    The scope is the document (reset=document) or the whole stream (never); a start token stands in
    for the missing beginning of the scope. Targets x[a:b] are predicted from x[max(0, b-1-W) : b-1]:
    the last b-a input positions predict them, the rest is context."""
    W, S = protocol.window, protocol.segment_len
    if protocol.reset == "never":
        flat = [start_id] + [t for d in stream.docs for t in d.ids]
        scope_all = torch.tensor(flat, dtype=torch.long)
    offset = 1
    for d, doc in enumerate(stream.docs):
        if protocol.reset == "never":
            x, first = scope_all, offset
        else:
            x, first = torch.tensor([start_id] + doc.ids, dtype=torch.long), 1
        for a in range(first, first + len(doc.ids), S):
            b = min(a + S, first + len(doc.ids))
            seg = Segment(ids=x[max(0, b - 1 - W) : b - 1].unsqueeze(0), n=b - a, doc=d, start=a - first)
            yield seg, x[a:b], a == first
        offset += len(doc.ids)


class _Timer:
    """Per-segment wall-clock: CUDA events on GPU (synchronised once at the end), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list = []
        self.charged: list[float] = []  # per segment: seconds of shared base passes it read (shared_pass.py)

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, t0, charged: float = 0.0):
        self.charged.append(charged)
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.spans.append((t0, ev))
        else:
            self.spans.append(time.perf_counter() - t0)

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000 + c for (a, b), c in zip(self.spans, self.charged)]
        return [s + c for s, c in zip(self.spans, self.charged)]


@dataclass
class EvalResult:
    doc_nll: list[float]
    doc_tokens: list[int]
    seconds: list[float]  # per segment, in order
    seg_tokens: list[int]
    extra: dict = field(default_factory=dict)


def evaluate(
    method: Method,
    stream: Stream,
    protocol: Protocol,
    progress: bool = True,
    observer: Callable[[Segment, torch.Tensor, torch.Tensor], None] | None = None,
) -> EvalResult:
    """Run the protocol; `observer(segment, logprobs, targets)` sees every scored segment (checks use it)."""
    device = method.lm.device
    timer = _Timer(device)
    doc_nll = [0.0] * len(stream.docs)
    doc_tokens = [len(d.ids) for d in stream.docs]
    seg_tokens: list[int] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=stream.n_tokens,
            unit="tok",
            desc=f"{method.registry_name} {stream.task}",
            mininterval=1.0,
            leave=False,
        )
    pending: list[tuple[int, torch.Tensor]] = []  # nll tensors read back in batches: no sync per segment
    for seg, targets, doc_start in segments(stream, protocol, method.lm.start_id):
        if doc_start and (protocol.reset == "document" or seg.doc == 0):
            method.reset()
        seg.ids = seg.ids.to(device)
        targets = targets.to(device)
        method.lm.take_charged_seconds()  # only what this segment reads counts for it
        t0 = timer.start()
        logprobs = method.score(seg)
        if logprobs.shape != (seg.n, method.lm.vocab_size):
            raise TTABenchError(
                f"method '{method.registry_name}' returned log-probabilities of shape {tuple(logprobs.shape)},"
                f" expected ({seg.n}, {method.lm.vocab_size}); fix its score()"
            )
        nll = -logprobs.detach().gather(1, targets[:, None]).double().sum()
        if observer is not None:
            observer(seg, logprobs.detach(), targets)
        seg.targets = targets
        method.adapt(seg)
        timer.stop(t0, method.lm.take_charged_seconds())
        pending.append((seg.doc, nll))
        seg_tokens.append(seg.n)
        if len(pending) >= 32:
            _drain(pending, doc_nll, method, stream)
        if bar is not None:
            bar.update(seg.n)
    _drain(pending, doc_nll, method, stream)
    if bar is not None:
        bar.close()
    return EvalResult(doc_nll, doc_tokens, timer.seconds(), seg_tokens)


def _drain(pending, doc_nll, method, stream):
    if not pending:
        return
    values = torch.stack([v for _, v in pending]).cpu().tolist()
    for (d, _), v in zip(pending, values):
        if not math.isfinite(v):
            raise TTABenchError(
                f"method '{method.registry_name}' gave a non-finite log-probability in document {d}"
                f" ('{stream.docs[d].title}'); lower its learning rate or check its score()"
            )
        doc_nll[d] += v
    pending.clear()
