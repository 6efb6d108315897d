"""Which parameters a method adapts: every one, those of the last N transformer blocks, or those whose
names match a pattern (`params: all | last N | <regex>`)."""

from __future__ import annotations

import re

import torch

from tta_bench.api.errors import TTABenchError

_LAST = re.compile(r"^last[\s_:-]*(\d+)(\s*blocks?)?$", re.IGNORECASE)


def parse_selection(spec: str) -> tuple[str, object]:
    """("all", None) | ("last", N) | ("pattern", compiled regex); raises on a bad spec."""
    spec = spec.strip()
    if spec.lower() == "all":
        return "all", None
    m = _LAST.match(spec)
    if m:
        n = int(m.group(1))
        if n < 1:
            raise TTABenchError(f"params '{spec}': the number of blocks must be at least 1")
        return "last", n
    try:
        return "pattern", re.compile(spec)
    except re.error as e:
        raise TTABenchError(
            f"params '{spec}' is neither all, 'last N' nor a valid regular expression ({e}); fix it"
        ) from None


def find_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The transformer's stack of blocks: the ModuleList holding the most parameters
    (model.layers in Llama, transformer.h in GPT-2, gpt_neox.layers ...)."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0:
            n = sum(p.numel() for p in mod.parameters())
            if n > 0 and (best is None or n > best[2]):
                best = (name, mod, n)
    if best is None:
        raise TTABenchError(
            f"{type(model).__name__} has no list of blocks; select parameters with 'all' or a name pattern"
        )
    return best[0], best[1]


def select_parameters(model: torch.nn.Module, spec: str) -> list[tuple[str, torch.nn.Parameter]]:
    """Named parameters chosen by `spec`:
    - "all": every parameter (shared ones, e.g. tied embeddings, once);
    - "last N" (also "last:N", "last N blocks"): the parameters of the last N transformer blocks only
      (not the final norm or the head; add them with a pattern if wanted);
    - anything else: a regular expression searched in each parameter name (e.g. "mlp", r"layers\\.2[89]\\.").
    Raises if nothing is selected."""
    kind, arg = parse_selection(spec)
    named = list(model.named_parameters(remove_duplicate=True))
    if kind == "all":
        chosen = named
    elif kind == "last":
        prefix, blocks = find_blocks(model)
        if arg > len(blocks):
            raise TTABenchError(f"params '{spec}': the model has only {len(blocks)} blocks; choose N <= {len(blocks)}")
        keep = {f"{prefix}.{i}." if prefix else f"{i}." for i in range(len(blocks) - arg, len(blocks))}
        chosen = [(n, p) for n, p in named if any(n.startswith(k) for k in keep)]
    else:
        chosen = [(n, p) for n, p in named if arg.search(n)]
    if not chosen:
        example = ", ".join(n for n, _ in named[:3])
        raise TTABenchError(
            f"params '{spec}' selects no parameter of {type(model).__name__} (names look like {example}); fix the pattern"
        )
    return chosen
