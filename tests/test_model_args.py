"""Model arguments as from_pretrained takes them (protocol/models.py): dtype (auto or named; a model's
own over the bench's), device_map, and trust_remote_code (off unless the bench says so, warned about
once, recorded in the cell). Local Hugging Face folders written with save_pretrained: no hub."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from tests.conftest import write_bench
from tta_bench.api.errors import TTABenchError
from tta_bench.protocol import models
from tta_bench.protocol.models import load_model
from tta_bench.run import runner
from tta_bench.run.config import read_yaml, validate
from tta_bench.run.worker import ModelCache

pytestmark = pytest.mark.usefixtures("one_thread")

CUSTOM_CODE = textwrap.dedent('''
    """A model class shipped with its checkpoint: what trust_remote_code lets run."""
    from transformers import LlamaConfig, LlamaForCausalLM


    class ShippedConfig(LlamaConfig):
        model_type = "shipped-llama"


    class ShippedLM(LlamaForCausalLM):
        config_class = ShippedConfig
''')


def _save(folder, dtype=torch.bfloat16, shipped=False):
    """A 1-layer Llama with a character-level fast tokenizer, saved as a Hugging Face folder."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {chr(i): i - 32 for i in range(32, 127)} | {"\n": 95, "<s>": 96, "</s>": 97, "<unk>": 98}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    cfg = LlamaConfig(vocab_size=99, num_key_value_heads=1, max_position_embeddings=128, bos_token_id=96, **sizes)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    if shipped:  # the same weights, loaded through a class that only the folder's own code defines
        (folder / "shipped.py").write_text(CUSTOM_CODE)
        config = json.loads((folder / "config.json").read_text())
        config.update(
            model_type="shipped-llama",
            auto_map={"AutoConfig": "shipped.ShippedConfig", "AutoModelForCausalLM": "shipped.ShippedLM"},
        )
        (folder / "config.json").write_text(json.dumps(config))
    return model


@pytest.fixture()
def hf_folder(tmp_path):
    folder = tmp_path / "hf-model"
    return folder, _save(folder)


@pytest.fixture()
def modules_cache(tmp_path, monkeypatch):
    """transformers copies remote code into its modules cache: a temporary one, not the user's."""
    import sys

    from transformers import dynamic_module_utils

    cache = str(tmp_path / "hf_modules")
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", cache)
    monkeypatch.setattr(sys, "path", [*sys.path])
    models._TRUST_WARNED.clear()
    return cache


def test_dtype_auto_keeps_the_checkpoints_and_a_named_one_casts(hf_folder):
    folder, saved = hf_folder
    auto = load_model(str(folder), device="cpu", dtype="auto")
    assert auto.dtype == torch.bfloat16 and next(auto.model.parameters()).dtype == torch.bfloat16
    named = load_model(str(folder), device="cpu", dtype="float32")
    assert named.dtype == torch.float32
    for (name, want), got in zip(saved.state_dict().items(), named.model.state_dict().values()):
        assert torch.equal(got, want.float()), name  # bfloat16 to float32 is exact


def test_a_models_own_dtype_wins_over_the_benchs(hf_folder):
    folder, _ = hf_folder
    cache = ModelCache(torch.device("cpu"), "float32", log=lambda *a: None)
    assert cache.get({"name": str(folder)}).dtype == torch.float32  # the bench's
    assert cache.get({"name": str(folder), "dtype": "bfloat16"}).dtype == torch.bfloat16
    assert cache.get({"name": "tiny", "dtype": "auto"}).dtype == torch.float32  # tiny is built in float32


def test_a_models_dtype_in_the_bench_reaches_its_cell(tmp_path, corpus, hf_folder):
    folder, _ = hf_folder
    bench = write_bench(tmp_path, corpus, models=[{"name": str(folder), "dtype": "auto"}], dtype="float32")
    bench.write_text(bench.read_text() + "limits: {tokens: 48}\n")
    run_dir = runner.run(str(bench), log=lambda *a: None)
    (cell,) = [json.loads(f.read_text()) for f in (run_dir / "cells").glob("*.json")]
    assert cell["config"]["model"] == {"name": str(folder), "dtype": "auto"} and cell["config"]["dtype"] == "float32"
    assert cell["resolved"]["model_dtype"] == "bfloat16"  # auto: the checkpoint's, over the bench's float32


def test_device_map_goes_to_from_pretrained_and_changes_no_logit(hf_folder, monkeypatch):
    from transformers import AutoModelForCausalLM

    folder, _ = hf_folder
    ids = torch.tensor([[96, 40, 41, 0, 72, 73]])
    plain = load_model(str(folder), device="cpu", dtype="float32")
    real, given = AutoModelForCausalLM.from_pretrained, []

    def spy(*args, **kw):
        given.append(kw.get("device_map", "not given"))
        return real(*args, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    for device_map in ("cpu", {"": "cpu"}):
        placed = load_model(str(folder), device="cpu", dtype="float32", device_map=device_map)
        assert given[-1] == device_map and placed.device == torch.device("cpu")
        assert all(p.device.type == "cpu" for p in placed.model.parameters())
        assert torch.equal(placed.model(ids).logits, plain.model(ids).logits)
    load_model(str(folder), device="cpu")
    assert given[-1] == "not given"  # without the setting, placement is the bench's device


def test_the_settings_are_checked_as_every_model_setting(tmp_path, corpus, hf_folder):
    folder, _ = hf_folder

    def problems(entry):
        return validate(read_yaml(str(write_bench(tmp_path, corpus, models=[entry]))), "b.yaml")[1]

    good = {"name": str(folder), "dtype": "auto", "device_map": {"": "cpu"}, "trust_remote_code": False}
    assert problems(good) == []
    hub = {"name": "org/model", "dtype": "bfloat16", "revision": "main", "device_map": "auto"}
    assert problems(hub) == [] and problems({"name": "tiny", "dtype": "auto"}) == []
    assert problems({"name": str(folder), "dtype": "float64"}) == [
        "models[0].dtype: expected one of 'auto', 'float32', 'bfloat16', 'float16', got 'float64'"
    ]
    assert problems({"name": str(folder), "trust_remote_code": "yes"}) == [
        "models[0].trust_remote_code: expected bool, got 'yes'"
    ]
    (wrong,) = problems({"name": "tiny", "trust_remote_code": True})
    assert "model 'tiny' has no setting 'trust_remote_code'" in wrong  # a built-in model runs no checkpoint code
    (wrong,) = problems({"name": str(folder), "revision": "main"})
    assert "has no setting 'revision'" in wrong  # a local folder has no revisions


def test_remote_code_runs_only_when_the_bench_says_so(tmp_path, corpus, modules_cache, capsys):
    folder = tmp_path / "shipped"
    _save(folder, dtype=torch.float32, shipped=True)
    with pytest.raises(TTABenchError, match="set `trust_remote_code: true` in its model entry"):
        load_model(str(folder), device="cpu")
    assert "warning: trust_remote_code" not in capsys.readouterr().err  # refused: nothing ran, no warning

    bench = write_bench(tmp_path, corpus, models=[{"name": str(folder), "trust_remote_code": True}])
    bench.write_text(bench.read_text() + "limits: {tokens: 48}\n")
    run_dir = runner.run(str(bench), log=lambda *a: None)
    runner.run(str(bench), force=True, log=lambda *a: None)  # loads it again: no second warning
    err = capsys.readouterr().err
    assert err.count("warning: trust_remote_code: true") == 1 and str(folder) in err
    (cell,) = [json.loads(f.read_text()) for f in (run_dir / "cells").glob("*.json")]
    assert cell["config"]["model"] == {"name": str(folder), "trust_remote_code": True}
    assert cell["resolved"]["model_source"] == f"hf:{folder} (remote code)"
    assert cell["resolved"]["model_dtype"] == "float32"
    lm = load_model(str(folder), device="cpu", trust_remote_code=True)
    assert type(lm.model).__name__ == "ShippedLM"  # the folder's own class, not transformers' Llama
