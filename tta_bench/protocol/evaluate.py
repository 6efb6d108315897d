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
    lanes: int = 1  # documents scored side by side (reset document only; SPEC 2, Lanes)

    @property
    def window(self) -> int:
        """Every input fills this many tokens where the scope has them."""
        return self.context_len + self.segment_len - 1


def segments(stream: Stream, protocol: Protocol, start_id: int) -> Iterator[tuple[Segment, torch.Tensor, bool]]:
    """(segment, targets, starts_a_document) in stream order, per SPEC 2.

    The scope is the document (reset=document) or the whole stream (never); a start token stands in
    for the missing beginning of the scope. Targets x[a:b] are predicted from x[max(0, b-1-W) : b-1]:
    the last b-a input positions predict them, the rest is context."""
    if protocol.reset != "never":
        for d, doc in enumerate(stream.docs):
            yield from document_segments(d, doc.ids, protocol, start_id)
        return
    scope = torch.tensor([start_id] + [t for d in stream.docs for t in d.ids], dtype=torch.long)
    offset = 1
    for d, doc in enumerate(stream.docs):
        yield from _cut(scope, offset, len(doc.ids), d, protocol)
        offset += len(doc.ids)


def document_segments(d: int, ids: list[int], protocol: Protocol, start_id: int):
    """Document d's segments when it is its own scope (reset=document)."""
    return _cut(torch.tensor([start_id] + ids, dtype=torch.long), 1, len(ids), d, protocol)


def _cut(x: torch.Tensor, first: int, length: int, d: int, protocol: Protocol):
    W, S = protocol.window, protocol.segment_len
    for a in range(first, first + length, S):
        b = min(a + S, first + length)
        seg = Segment(ids=x[max(0, b - 1 - W) : b - 1].unsqueeze(0), n=b - a, doc=d, start=a - first)
        yield seg, x[a:b], a == first


def lane_steps(stream: Stream, protocol: Protocol, start_id: int, lanes: int):
    """Lists of (segment, targets, starts_a_document), one per active lane: lane i takes document i,
    and each lane that finishes a document takes the next one not yet begun (reset=document)."""
    queue = iter(enumerate(stream.docs))
    active: list = [None] * lanes

    def take(lane: int) -> None:
        nxt = next(queue, None)
        active[lane] = None if nxt is None else document_segments(nxt[0], nxt[1].ids, protocol, start_id)

    for lane in range(lanes):
        take(lane)
    while True:
        step = []
        for lane in range(lanes):
            while active[lane] is not None:
                item = next(active[lane], None)
                if item is None:
                    take(lane)
                    continue
                item[0].lane = lane
                step.append(item)
                break
        if not step:
            return
        yield step


def lanes_run(method: Method, protocol: Protocol) -> tuple[int, str]:
    """(lanes the method runs in, why fewer than asked: '' when as many)."""
    if protocol.lanes <= 1:
        return 1, ""
    if protocol.reset != "document":
        raise TTABenchError(f"{protocol.lanes} lanes need reset: document; set lanes: 1 or reset: document")
    if not type(method).runs_in_lanes(method.params):
        return 1, f"method '{method.registry_name}' does not run in lanes with these settings: one lane"
    return protocol.lanes, ""


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
    seconds: list[float]  # per step (a segment per lane), in order
    seg_tokens: list[int]  # tokens scored per step
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
    seg_tokens: list[int] = []
    bar = _progress_bar(method, stream) if progress else None
    lanes, fewer = lanes_run(method, protocol)
    if lanes > 1:
        method.open_lanes(lanes)
        steps = lane_steps(stream, protocol, method.lm.start_id, lanes)
    else:
        steps = ([item] for item in segments(stream, protocol, method.lm.start_id))
    pending: list[tuple[int, torch.Tensor]] = []  # nll tensors read back in batches: no sync per segment
    for step in steps:
        # a document begins: its lane (the method, with one lane) back to the state prepare left
        for seg, _, doc_start in step:
            if lanes > 1 and doc_start:
                method.reset_lane(seg.lane)
            elif doc_start and (protocol.reset == "document" or seg.doc == 0):
                method.reset()
        segs = [seg for seg, _, _ in step]
        targets = [t.to(device) for _, t, _ in step]
        for seg in segs:
            seg.ids = seg.ids.to(device)
        method.lm.take_charged_seconds()  # only what this step reads counts for it
        t0 = timer.start()
        # score every lane's segment, and only then adapt on them
        scored = method.score_lanes(segs) if lanes > 1 else [method.score(segs[0])]
        pending += _nll(method, segs, scored, targets, observer)
        if lanes > 1:
            method.adapt_lanes(segs)
        else:
            method.adapt(segs[0])
        timer.stop(t0, method.lm.take_charged_seconds())
        seg_tokens.append(sum(seg.n for seg in segs))
        if len(pending) >= 32:
            _drain(pending, doc_nll, method, stream)
        if bar is not None:
            bar.update(seg_tokens[-1])
    _drain(pending, doc_nll, method, stream)
    if bar is not None:
        bar.close()
    extra = {"lanes": lanes, **({"lanes_note": fewer} if fewer else {})}
    return EvalResult(doc_nll, [len(d.ids) for d in stream.docs], timer.seconds(), seg_tokens, extra)


def _progress_bar(method: Method, stream: Stream):
    from tqdm.auto import tqdm

    desc = f"{method.registry_name} {stream.task}"
    return tqdm(total=stream.n_tokens, unit="tok", desc=desc, mininterval=1.0, leave=False)


def _nll(method: Method, segs: list[Segment], scored: list, targets: list, observer) -> list[tuple[int, torch.Tensor]]:
    """(document, NLL tensor) of each scored segment, its shape checked; the segments get their targets."""
    if len(scored) != len(segs):
        raise TTABenchError(
            f"method '{method.registry_name}' scored {len(scored)} segments of {len(segs)} lanes; fix its score_lanes()"
        )
    out = []
    for seg, logprobs, tgt in zip(segs, scored, targets):
        if logprobs.shape != (seg.n, method.lm.vocab_size):
            raise TTABenchError(
                f"method '{method.registry_name}' returned log-probabilities of shape {tuple(logprobs.shape)},"
                f" expected ({seg.n}, {method.lm.vocab_size}); fix its score()"
            )
        out.append((seg.doc, -logprobs.detach().gather(1, tgt[:, None]).double().sum()))
        if observer is not None:
            observer(seg, logprobs.detach(), tgt)
        seg.targets = tgt
    return out


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
