"""Per-lane adapted weights (SPEC 2, lanes), for methods that take gradient steps at test time:

    lanes = LaneWeights(dyn, n, model, names, adapter)  # dyn: the method's update.DynamicEvaluation
    for group, lanes_of_group, ids, n in by_shape(lanes_of, inputs, ns):  # one shape runs together
        leaves = lanes.take(lanes_of_group)
        logprobs = lanes.logprobs(leaves, ids, n, logprobs_of)  # each lane's forward, its own tensors
        lanes.step(lanes_of_group, leaves, torch.autograd.grad(loss, leaves))
    lanes.reset(lane)                              # one lane back to the originals

Each adapted tensor is kept stacked, (n_lanes, *shape), every lane starting at the originals. A group of
lanes runs as one forward under torch.func.vmap (functional_call over the stacked tensors, or the adapter's
hooks reading them), so each lane is its own batch-1 forward, batched: no padding, and no lane reads
another's weights. The loss is the sum of the lanes' mean NLLs, so the gradient for a lane's slice is that
lane's own. The update rule is DynamicEvaluation.apply_rule with the originals and statistics broadcast.

Memory: one copy of the adapted tensors per lane (full dynamic evaluation: the whole model per lane), in
float32 when the weights are bfloat16 or float16 (update.py), cast for each forward.

Cost: a lane charges what the one-lane path charges for an input of its shape (`charge_lanes`: that path
run once per shape on a scratch ledger, whose records each lane then absorbs), so FLOPs per scored token do
not depend on the lane count.
"""

from __future__ import annotations

import torch

from tta_bench.protocol.flops import Ledger, charging


def by_shape(lanes: list[int], inputs: list[torch.Tensor], ns: list[int]):
    """(indices, their lanes, their inputs stacked (k, 1, L), n) for each group of (1, L) inputs that
    share a shape and a number of targets n, in order of first appearance."""
    groups: dict = {}
    for i, (x, n) in enumerate(zip(inputs, ns)):
        groups.setdefault((tuple(x.shape), n), []).append(i)
    for (_, n), group in groups.items():
        yield group, [lanes[i] for i in group], torch.stack([inputs[i] for i in group]), n


class LaneWeights:
    """n lanes' copies of the tensors a DynamicEvaluation adapts, stacked (see the module docstring):
    `model`'s parameters `names`, or with `adapter` (lora.LoraAdapter) its A and B."""

    def __init__(self, dyn, n: int, model: torch.nn.Module, names: list[str], adapter=None):
        self.dyn, self.n, self.model, self.names, self.adapter = dyn, n, model, names, adapter
        self.stacked = [o.detach().unsqueeze(0).repeat(n, *([1] * o.dim())) for o in dyn.originals]

    @torch.no_grad()
    def reset(self, lane: int) -> None:
        for s, o in zip(self.stacked, self.dyn.originals):
            s[lane].copy_(o)

    def take(self, lanes: list[int]) -> list[torch.Tensor]:
        """The lanes' tensors as leaves requiring grad: the stacks themselves when every lane runs, in
        order (no copy), else a copy of the rows taken (written back by `step`)."""
        if lanes == list(range(self.n)):
            return [s.requires_grad_() for s in self.stacked]
        idx = torch.tensor(lanes, device=self.stacked[0].device)
        return [s.detach()[idx].requires_grad_() for s in self.stacked]

    def logprobs(self, leaves: list[torch.Tensor], ids: torch.Tensor, n: int, logprobs_of) -> torch.Tensor:
        """(k, n, V): `logprobs_of(ids[j], n)` of each lane taken, with that lane's tensors, as one
        vmapped forward; `ids` (k, 1, L), the lanes' inputs of one shape."""

        with self.dyn.dense_embedding_grad():
            return torch.func.vmap(lambda tensors, x: self.call(tensors, logprobs_of, x, n))(leaves, ids)

    def call(self, tensors: list[torch.Tensor], fn, *args):
        """`fn(*args)` with one lane's `tensors` in place of the adapted ones (the model untouched;
        float32 copies of low-precision weights cast to the weights' dtype, the cast differentiated)."""
        tensors = [t.to(p.dtype) for t, p in zip(tensors, self.dyn.params)]
        if self.adapter is not None:
            with self.adapter.using(tensors):
                return fn(*args)
        params = {f"model.{name}": t for name, t in zip(self.names, tensors)}
        return torch.func.functional_call(_Calling(self.model, fn), params, args)

    @torch.no_grad()
    def step(self, lanes: list[int], leaves: list[torch.Tensor], grads, ledger=None) -> None:
        """The update rule on the lanes taken, each from its own gradient; `ledger`: each lane's update."""
        k, dyn = len(lanes), self.dyn

        def wide(ts):
            return None if ts is None else [t.expand(k, *t.shape) for t in ts]

        dyn.apply_rule(leaves, grads, wide(dyn.originals), wide(dyn.denom), wide(dyn.rms))
        if leaves[0] is not self.stacked[0]:
            idx = torch.tensor(lanes, device=leaves[0].device)
            for s, leaf in zip(self.stacked, leaves):
                s[idx] = leaf
        if ledger is not None:
            ledger.add("adapt.update", k * dyn.update_flops())


def charge_lanes(memo: dict, key, lm, k: int, run) -> None:
    """Charge lm.ledger, for each of k lanes, what the one-lane path charges for inputs of this `key`
    (kind and shape): `run()` performs that path (charging lm.ledger) once, on a scratch ledger kept
    in `memo`; a count depends on shapes only, so any weights serve."""
    if key not in memo:
        scratch = Ledger(lm.ledger.fingerprint)
        with charging(lm, scratch):
            run()
        memo[key] = scratch
    for _ in range(k):
        lm.ledger.absorb(memo[key])


class _Calling(torch.nn.Module):
    """`fn(*args)` as the forward of a module holding `model`: functional_call swaps the model's
    parameters for one lane's while fn runs (their names prefixed `model.`)."""

    def __init__(self, model, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *args):
        return self.fn(*args)
