"""The language model every method works with: a Hugging Face causal LM split into its body
(the transformer, giving final hidden states) and its head (the vocabulary projection), so methods
can reuse hidden states and every forward is counted by the cell's FLOP ledger."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tta_bench.api.errors import TTABenchError
from tta_bench.protocol.flops import Ledger, fvcore_count
from tta_bench.protocol.shared_pass import SharedPasses, Stopwatch

FFN_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")


class _Body(torch.nn.Module):
    """Traceable wrapper: input ids -> final hidden states."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, ids):
        return self.body(input_ids=ids, use_cache=False).last_hidden_state


class TokenizerAdapter:
    """encode(text) -> (token ids, end character offset of each token)."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer

    def encode(self, text: str) -> tuple[list[int], list[int]]:
        enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [end for _, end in enc["offset_mapping"]]

    @property
    def bos_id(self):
        return self.hf.bos_token_id

    @property
    def eos_id(self):
        return self.hf.eos_token_id


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0-255), BOS 256, EOS 257: for the tiny test model."""

    vocab_size = 258
    bos_id, eos_id = 256, 257

    def encode(self, text: str) -> tuple[list[int], list[int]]:
        ids, ends = [], []
        for i, ch in enumerate(text):
            b = ch.encode("utf-8")
            ids.extend(b)
            ends.extend([i + 1] * len(b))
        return ids, ends


@dataclass
class LM:
    model: torch.nn.Module  # the whole causal LM
    tokenizer: object  # TokenizerAdapter or ByteTokenizer
    name: str
    fingerprint: str
    window: int  # longest input the model takes
    device: torch.device
    dtype: torch.dtype
    source: str = ""  # where the weights came from, for provenance
    ledger: Ledger = field(default_factory=Ledger)
    # passes of the frozen base model shared across cells (shared_pass.py); None: every call computes
    passes: SharedPasses | None = None
    charged_seconds: float = 0.0  # seconds of shared passes served since the last take_charged_seconds()

    def __post_init__(self):
        self.model.eval()
        self.body = self.model.base_model
        self.head = self.model.get_output_embeddings()
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None)
        self._traceable_body = _Body(self.body)
        self.vocab_size = self.head.weight.shape[0]

    @property
    def start_id(self) -> int:
        """SPEC 1: the token that stands in for a missing beginning: BOS, else EOS."""
        bos = self.tokenizer.bos_id
        return bos if bos is not None else self.tokenizer.eos_id

    @property
    def hidden_size(self) -> int:
        return self.head.weight.shape[1]

    def forward(self, ids: torch.Tensor, model: torch.nn.Module | None = None, **kwargs):
        """The body's output (a transformers model output) for (B, L) ids, counted in the ledger as one
        forward of the body. `model`: a private copy of this LM's model that a method adapts (the same
        architecture, so the same flops); kwargs go to the body (use_cache, past_key_values...)."""
        shape = tuple(ids.shape)
        self.ledger.record_forward("body", shape, lambda: self._count_body(shape))
        body = self.body if model is None else model.base_model
        return body(input_ids=ids, **{"use_cache": False, **kwargs})

    def hidden(self, ids: torch.Tensor, model: torch.nn.Module | None = None) -> torch.Tensor:
        """(B, L) ids -> (B, L, d) final hidden states (after the final norm)."""
        if model is not None or self.passes is None:
            return self.forward(ids, model).last_hidden_state
        return self._shared(ids, need_ffn=False)[0]

    def hidden_lanes(self, inputs: list[torch.Tensor], model: torch.nn.Module | None = None) -> list[torch.Tensor]:
        """Each (1, L_i) input's (L_i, d) final hidden states, from one batched forward. Shorter inputs
        are padded on the right; a causal model's real positions never attend to later ones, so each
        row is its own forward's (up to the rounding of a batched product). The ledger counts each
        input as its own forward would, and the padding apart (`forward.padding.body`)."""
        return self._lanes(inputs, lambda ids: (self.hidden(ids, model),))

    def hidden_and_ffn_input_lanes(self, inputs: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """hidden_and_ffn_input for several lanes' inputs, batched as hidden_lanes batches."""
        return self._lanes(inputs, self.hidden_and_ffn_input)

    def _lanes(self, inputs: list[torch.Tensor], forward) -> list:
        if len(inputs) == 1:
            out = forward(inputs[0])
            return [out[0][0] if len(out) == 1 else tuple(t[0] for t in out)]
        lengths = [x.shape[1] for x in inputs]
        batch = torch.full((len(inputs), max(lengths)), self.start_id, dtype=torch.long, device=self.device)
        for i, x in enumerate(inputs):
            batch[i, : x.shape[1]] = x[0]
        with self.ledger.paused():
            out = forward(batch)
        for n in lengths:
            self.ledger.record_forward("body", (1, n), lambda n=n: self._count_body((1, n)))
        if min(lengths) < max(lengths):
            shape = tuple(batch.shape)
            self.ledger.record_forward("padding.body", (*shape, *lengths), lambda: self._padding_count(shape, lengths))
        rows = [tuple(t[i, :n] for t in out) for i, n in enumerate(lengths)]
        return [r[0] if len(r) == 1 else r for r in rows]

    def logprobs_lanes(
        self, inputs: list[torch.Tensor], ns: list[int], model: torch.nn.Module | None = None
    ) -> list[torch.Tensor]:
        """Log-probabilities (n_i, V) of the tokens following each input's last n_i positions;
        `model`: a method's private copy (as for hidden)."""
        hs = [h[-n:] for h, n in zip(self.hidden_lanes(inputs, model), ns)]
        return list(F.log_softmax(self.logits_rows(hs, model), dim=-1).split(ns))

    def logits_rows(self, hs: list[torch.Tensor], model: torch.nn.Module | None = None) -> torch.Tensor:
        """The logits of several lanes' hidden states (each (n_i, d)) in one product, rows in order."""
        return self.logits(torch.cat(hs), model)

    def _padding_count(self, shape: tuple, lengths: list[int]) -> tuple[float, dict]:
        padded = self._count_body(shape)[0]
        return padded - sum(self._count_body((1, n))[0] for n in lengths), {}

    def take_charged_seconds(self) -> float:
        """The seconds of the shared passes served since the last call: the evaluation adds them to the
        segment's time, so a cell is timed for the pass it read as if it had run it."""
        seconds, self.charged_seconds = self.charged_seconds, 0.0
        return seconds

    def _shared(self, ids: torch.Tensor, need_ffn: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden, ffn input or None) from a shared pass of the frozen model, computed when none fits."""
        key = self.passes.key(self.model, ids)
        found = self.passes.get(key, need_ffn)
        if found is not None:
            shape = tuple(ids.shape)
            self.ledger.record_forward("body", shape, lambda: self._count_body(shape))
            self.charged_seconds += found.seconds
            # copies: what a method does to its tensors never reaches the shared pass
            ffn = None if found.ffn_input is None else found.ffn_input.to(self.device, copy=True)
            return found.hidden.to(self.device, copy=True), ffn
        if key is None:  # not shareable: no stopwatch, whose CUDA synchronisations it would pay for nothing
            return self._hidden_and_ffn_input(ids) if need_ffn else (self.forward(ids).last_hidden_state, None)
        with Stopwatch(self.device) as watch:
            h, f = self._hidden_and_ffn_input(ids) if need_ffn else (self.forward(ids).last_hidden_state, None)
        self.passes.put(key, h, f, watch.seconds)
        return h, f

    def last_ffn(self) -> tuple[str, torch.nn.Module]:
        """(name, module) of the feed-forward layer of the last transformer block: the blocks are the
        ModuleList with one entry per layer (model.layers in Llama, transformer.h in GPT-2), the
        feed-forward its last entry's mlp / feed_forward / ffn."""
        cfg = getattr(self.model, "config", None)
        n_layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
        for name, mod in self.model.named_modules():
            if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0 and (n_layers is None or len(mod) == n_layers):
                for attr in FFN_NAMES:
                    sub = getattr(mod[len(mod) - 1], attr, None)
                    if isinstance(sub, torch.nn.Module):
                        return f"{name}.{len(mod) - 1}.{attr}", sub
        raise TTABenchError(
            f"cannot find the feed-forward layer of the last block of {type(self.model).__name__} (looked for a list"
            f" of {n_layers} blocks with one of {', '.join(FFN_NAMES)}); use the final hidden state instead"
        )

    def hidden_and_ffn_input(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One counted forward: (final hidden states, input of the last block's feed-forward layer), each (B, L, d)."""
        return self._shared(ids, need_ffn=True) if self.passes is not None else self._hidden_and_ffn_input(ids)

    def _hidden_and_ffn_input(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        name, module = self.last_ffn()
        seen = []
        handle = module.register_forward_hook(
            lambda m, args, kwargs, out: seen.append(args[0] if args else next(iter(kwargs.values()))), with_kwargs=True
        )
        try:
            h = self.forward(ids).last_hidden_state
        finally:
            handle.remove()
        if len(seen) != 1:
            raise TTABenchError(
                f"{name} ran {len(seen)} times in one forward, expected once; use the final hidden state instead"
            )
        return h, seen[0]

    def logits(self, h: torch.Tensor, model: torch.nn.Module | None = None) -> torch.Tensor:
        """(..., d) hidden states -> (..., V) float32 logits; `model`: a method's private copy (its own head)."""
        shape = tuple(h.shape)
        self.ledger.record_forward(
            "head", shape, lambda: fvcore_count(self.head, (torch.zeros(shape, dtype=h.dtype, device=h.device),))
        )
        out = (self.head if model is None else model.get_output_embeddings())(h).float()
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

    def logprobs(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        """Log-probabilities (n, V) of the tokens following the last n input positions (batch of 1)."""
        h = self.hidden(ids)[0, -n:]
        return F.log_softmax(self.logits(h), dim=-1)

    def _count_body(self, shape):
        ids = torch.zeros(shape, dtype=torch.long, device=self.device)
        return fvcore_count(self._traceable_body, (ids,))
