"""The SFT -> DPO -> RLVR families (issue 19): the registry's pairs, their chat templates and stop
tokens, tiny random checkpoints of each family's architecture and config through the registry's
validation and the engine's conformance check, generation stopping at the family's stop token, and
a family's runs listed together (eapcore.views.query.family_siblings)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import string
from pathlib import Path

import pytest

from conftest import random_model
from eapcore.answers import data
from eapcore.answers.generation import make_backend
from eapcore.runs import registry, runner, sweeps
from eapcore.runs.registry import RegistryError
from eapcore.specs import (DatasetSpec, GenerationSettings, ModelSpec, PairSpec, RunSpec, SelectionSettings,
                           AttributionSettings, spec_key, to_dict)
from eapcore.views import query

# The checkpoints as their model cards name them: {family: (SFT, DPO, RLVR), template, architecture}.
FAMILIES = {
    "Tulu 3 8B": (("allenai/Llama-3.1-Tulu-3-8B-SFT", "allenai/Llama-3.1-Tulu-3-8B-DPO", "allenai/Llama-3.1-Tulu-3-8B"),
                  "tulu3", "llama"),
    "OLMo 2 7B": (("allenai/OLMo-2-1124-7B-SFT", "allenai/OLMo-2-1124-7B-DPO", "allenai/OLMo-2-1124-7B-Instruct"),
                  "olmo2", "olmo2"),
    "OLMo 2 13B": (("allenai/OLMo-2-1124-13B-SFT", "allenai/OLMo-2-1124-13B-DPO", "allenai/OLMo-2-1124-13B-Instruct"),
                   "olmo2", "olmo2"),
    "OLMo 2 1B": (("allenai/OLMo-2-0425-1B-SFT", "allenai/OLMo-2-0425-1B-DPO", "allenai/OLMo-2-0425-1B-Instruct"),
                  "olmo2-1b", "olmo2"),
}

# The chat templates in the families' tokenizers (open-instruct's "tulu" template; OLMo 2 1124
# writes its BOS first, the 0425 1B model does not, as its model card says), and their EOS tokens.
_TULU_JINJA = ("{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] "
               "+ '\n' }}{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
               "{% elif message['role'] == 'assistant' %}{% if not loop.last %}{{ '<|assistant|>\n'  + "
               "message['content'] + eos_token + '\n' }}{% else %}{{ '<|assistant|>\n'  + message['content'] + "
               "eos_token }}{% endif %}{% endif %}{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}"
               "{% endif %}{% endfor %}")
TOKENIZERS = {  # template: (bos, eos, chat template, the tokenizer adds its BOS itself)
    "tulu3": ("<|begin_of_text|>", "<|end_of_text|>", _TULU_JINJA, True),  # Llama 3.1's tokenizer
    "olmo2": ("<|endoftext|>", "<|endoftext|>", "{{ bos_token }}" + _TULU_JINJA, False),
    "olmo2-1b": ("<|endoftext|>", "<|endoftext|>", _TULU_JINJA, False),
}


def family_tokenizer(template: str, folder: Path | None = None):
    """A character-level tokenizer with the family's special tokens and chat template (saved to `folder`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    bos, eos, chat, adds_bos = TOKENIZERS[template]
    specials = list(dict.fromkeys(["<pad>", bos, eos, "<|user|>", "<|assistant|>", "<|system|>", "<unk>"]))
    vocab = {t: i for i, t in enumerate(specials + list(string.printable))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=specials[3:6])
    fast.chat_template = chat
    if folder is not None:
        fast.save_pretrained(folder)
    return fast


def test_every_family_is_three_pairs_from_one_base():
    fams = registry.families()
    assert list(fams) == list(FAMILIES)
    for family, ((sft, dpo, rlvr), template, arch) in FAMILIES.items():
        got = {p.name: p for p in fams[family]}
        want = {f"{family}: SFT vs DPO": (sft, dpo, "DPO"), f"{family}: SFT vs RLVR": (sft, rlvr, "DPO, then RLVR"),
                f"{family}: DPO vs RLVR": (dpo, rlvr, "RLVR")}
        assert {n: (p.base.name_or_path, p.tuned.name_or_path, p.algorithm) for n, p in got.items()} == want
        assert {(p.template, p.architecture, p.family) for p in got.values()} == {(template, arch, family)}
        assert all(p.max_new_tokens == (4096 if arch == "llama" else 2048) for p in got.values())  # OLMo 2: 4096 context
        assert all(registry.validate_pair(p) == p for p in got.values())  # hub ids: name, template, tokens
    assert sweeps.PRESETS["families"]["pairs"] == [p.name for p in registry.FAMILY_PAIRS]
    assert len(sweeps.sweep_specs(**sweeps.PRESETS["families"])) == 12 * 2 * 2


def test_family_is_keyed_only_when_set():
    """Runs of pairs without a family keep the keys they had (the spec hashed without the field);
    a family makes another key."""
    pair = registry.get_pair("DeepSeek-Math")
    spec = RunSpec(pair, DatasetSpec("math"))
    old = {"__type__": "RunSpec", **to_dict(spec)}
    del old["pair"]["family"], old["answers"], old["quick"]
    blob = json.dumps(old, sort_keys=True, separators=(",", ":"), default=str)
    assert spec_key(spec) == hashlib.sha256(blob.encode()).hexdigest()[:16]
    assert spec_key(dataclasses.replace(spec, pair=dataclasses.replace(pair, family="x"))) != spec_key(spec)


@pytest.mark.parametrize("template", list(TOKENIZERS))
def test_templates_are_the_families_chat_templates(template):
    """One user turn (question + instruction) under the registered template gives the text and the
    token ids of the family's own chat template (plus the BOS Llama's tokenizer adds), and the
    template stops at the family's EOS."""
    tok = family_tokenizer(template)
    question = "What is 3 + 4?"
    turn = [{"role": "user", "content": f"{question}\n{data._INSTRUCTION}"}]
    text = data.format_prompt(question, template)
    assert text == tok.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    ids = tok.apply_chat_template(turn, tokenize=True, add_generation_prompt=True, return_dict=False)
    bos = [tok.bos_token_id] if TOKENIZERS[template][3] else []
    assert data.encode_prompt(tok, text) == bos + list(ids)
    assert data.encode_prompt(tok, text).count(tok.bos_token_id) == (1 if template != "olmo2-1b" else 0)
    assert data.stop_ids(tok, template) == {tok.eos_token_id}
    other = "olmo2" if template == "tulu3" else "tulu3"
    if TOKENIZERS[other][1] != TOKENIZERS[template][1]:
        with pytest.raises(ValueError, match="does not have as a token"):
            data.stop_ids(tok, other)


def _family_config_overrides(arch: str) -> dict:
    """Each family's config features at tiny size: Tulu 3 (Llama 3.1) with llama3 RoPE scaling over
    an original context shorter than the probes, theta 5e5; OLMo 2 with theta 5e5."""
    rope = {"rope_type": "default", "rope_theta": 5e5}
    if arch == "llama":
        rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
    return {"rope_parameters": rope, "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def family_checkpoints(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """{template: {"SFT"|"DPO"|"RLVR": folder}}: tiny random checkpoints of each family's
    architecture and config, with the family's tokenizer."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for template, arch in (("tulu3", "llama"), ("olmo2", "olmo2")):
        out[template] = {}
        for seed, stage in enumerate(("SFT", "DPO", "RLVR")):
            folder = root / f"{template}-{stage.lower()}"
            tok = family_tokenizer(template, folder)
            model = random_model(arch, len(tok), seed=seed, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                 **_family_config_overrides(arch))
            model.save_pretrained(folder)
            out[template][stage] = folder
    return out


def _local(pair: PairSpec, folders: dict[str, Path]) -> PairSpec:
    """The family pair with its stages' tiny local checkpoints in place of the hub ids."""
    stage = dict(zip(FAMILIES[pair.family][0], ("SFT", "DPO", "RLVR")))
    return dataclasses.replace(pair, base=ModelSpec(str(folders[stage[pair.base.name_or_path]])),
                               tuned=ModelSpec(str(folders[stage[pair.tuned.name_or_path]])), architecture="")


def test_tiny_family_checkpoints_pass_validation_and_conformance(family_checkpoints):
    """The registry's validation finds each family's declared architecture in tiny random
    checkpoints of it and the family's stop token in their tokenizers; the engine accepts their
    configs (its forward equals transformers' at load); a model of another family is refused."""
    from eapcore.engine.models import check_conformance, load_model

    for family, (_, template, arch) in FAMILIES.items():
        folders = family_checkpoints["tulu3" if template == "tulu3" else "olmo2"]
        for pair in registry.families()[family]:
            assert registry.validate_pair(_local(pair, folders)).architecture == arch == pair.architecture
    for template, folders in family_checkpoints.items():
        model = load_model(str(folders["RLVR"]), device="cpu")  # refused if the adapter differs from transformers
        rope = model.hf.config.rope_parameters
        assert rope["rope_type"] == ("llama3" if template == "tulu3" else "default") and rope["rope_theta"] == 5e5
        assert check_conformance(model)["short"] < 1e-5  # 12 probe tokens: past llama3's original context of 8
    wrong = _local(registry.get_pair("Tulu 3 8B: SFT vs DPO"), family_checkpoints["tulu3"])
    wrong = dataclasses.replace(wrong, template="olmo2")  # Llama's tokenizer has no <|endoftext|>
    with pytest.raises(RegistryError, match=r"base model .*<\|endoftext\|>"):
        registry.validate_pair(wrong)


@pytest.mark.parametrize("backend", ["transformers", "continuous"])
def test_generation_stops_at_the_templates_stop_token(tmp_path, backend):
    """A model whose config and tokenizer EOS is another token stops at the template's stop token
    (`<|end_of_text|>` of tulu3); the same prompt under a custom template without stops runs on."""
    import torch

    folder = tmp_path / "model"
    tok = family_tokenizer("tulu3")
    tok.eos_token = "<pad>"  # the tokenizer's and the model's own EOS: not the stop token
    stop, eos = tok.convert_tokens_to_ids("<|end_of_text|>"), tok.eos_token_id
    model = random_model("llama", len(tok), seed=3, bos_token_id=tok.bos_token_id, eos_token_id=eos, pad_token_id=eos)
    prompt = data.encode_prompt(tok, data.format_prompt("What is 3 + 4?", "tulu3"))
    with torch.no_grad():
        first = model(torch.tensor([prompt])).logits[0, -1].argmax().item()
        model.lm_head.weight[stop] = 2 * model.lm_head.weight[first]  # the stop token wins the first step
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    settings = GenerationSettings(backend=backend, dtype="float32", batch_size=2)
    stopped, _ = make_backend(ModelSpec(str(folder)), settings, "tulu3")
    plain, _ = make_backend(ModelSpec(str(folder)), settings, data.TEMPLATES["tulu3"])  # same text, no stops
    assert stopped([prompt], 6) == [[stop]]
    runs_on = plain([prompt], 6)[0]
    assert len(runs_on) == 6 and runs_on[0] == stop


QUESTIONS = [("What is 3 + 4?", "7"), ("What is 9 - 5?", "4"), ("What is 2 * 6?", "12"), ("What is 8 + 8?", "16"),
             ("What is 7 - 2?", "5"), ("What is 3 * 3?", "9")]


def test_a_familys_runs_are_listed_together(family_checkpoints, tmp_path, monkeypatch):
    """The three pairs of a (tiny) family run on the same questions and settings; each finished
    run lists the other two (registry order) with the model they share and the side to compare;
    runs of other settings or of pairs without a family are not siblings."""
    monkeypatch.setenv("EAP_REGISTRY", str(tmp_path / "registry.json"))
    monkeypatch.setenv("EAP_CACHE_DIR", str(tmp_path / "cache"))
    ds = tmp_path / "q.jsonl"
    ds.write_text("".join(json.dumps({"idx": i, "question": q, "answer": a}) + "\n" for i, (q, a) in enumerate(QUESTIONS)))
    dataset = registry.add_dataset(DatasetSpec("tiny-q", str(ds)))
    folders = family_checkpoints["olmo2"]
    pairs = [registry.add_pair(dataclasses.replace(_local(p, folders), name=f"tiny {p.name}", family="tiny OLMo 2",
                                                   max_new_tokens=6))
             for p in registry.families()["OLMo 2 1B"]]
    template = RunSpec(pairs[0], dataset, GenerationSettings(batch_size=6, dtype="float32"),
                       SelectionSettings(n=0, group="both_wrong"), AttributionSettings(device="cpu"))
    specs = sweeps.sweep_specs([p.name for p in pairs], ["tiny-q"], [0.5], template)
    lone = dataclasses.replace(specs[0], pair=dataclasses.replace(pairs[0], name="no family", family=""))
    other_alpha = dataclasses.replace(specs[2], selection=dataclasses.replace(specs[2].selection, alpha=0.25))
    same_base = dataclasses.replace(specs[1], pair=dataclasses.replace(pairs[1], name="no family either", family=""))
    for spec in (*specs, lone, other_alpha):
        runner.run(spec)
    runs = query.finished_runs()
    assert len(runs) == 5
    info = {r.key: r for r in runs}
    sft_dpo, sft_rlvr, dpo_rlvr = (info[spec_key(s)] for s in specs)
    assert [r.key for r in query.family_siblings(sft_dpo, runs)] == [sft_rlvr.key, dpo_rlvr.key]
    assert [r.key for r in query.family_siblings(dpo_rlvr, runs)] == [sft_dpo.key, sft_rlvr.key]
    assert query.family_siblings(info[spec_key(lone)], runs) == []
    table = query.family_comparisons(sft_rlvr, runs)  # SFT vs RLVR: shares SFT with one, RLVR with the other
    sft, dpo, rlvr = (str(folders[s]) for s in ("SFT", "DPO", "RLVR"))
    assert table.to_dict("records") == [
        {"pair": pairs[0].name, "algorithm": "DPO", "base": sft, "tuned": dpo, "shared": f"base: {sft}",
         "side": "tuned", "key": sft_dpo.key},
        {"pair": pairs[2].name, "algorithm": "RLVR", "base": dpo, "tuned": rlvr, "shared": f"tuned: {rlvr}",
         "side": "base", "key": dpo_rlvr.key}]
    # pairs with no family are siblings when they share the base model (GRPO and DPO from one SFT model)
    runner.run(same_base)
    runs = query.finished_runs()
    assert [r.pair for r in query.family_siblings(info[spec_key(lone)], runs)] == ["no family either"]
    assert query.kin(info[spec_key(lone)]) == ("base model", sft)
    assert query.kin(sft_dpo) == ("family", "tiny OLMo 2")
    assert [r.pair for r in query.family_siblings(sft_dpo, runs)] == [pairs[1].name, pairs[2].name]


def test_pairs_command_adds_and_lists_a_family(family_checkpoints, tmp_path, monkeypatch, capsys):
    from eapcore import cli

    monkeypatch.setenv("EAP_REGISTRY", str(tmp_path / "registry.json"))
    folders = family_checkpoints["olmo2"]
    rc = cli.main(["pairs", "add", "mine: SFT vs DPO", "--base", str(folders["SFT"]), "--tuned", str(folders["DPO"]),
                   "--template", "olmo2", "--family", "mine", "--json"])
    saved = json.loads(capsys.readouterr().out)
    assert rc == 0 and (saved["family"], saved["architecture"]) == ("mine", "olmo2")
    assert [p.name for p in registry.families()["mine"]] == ["mine: SFT vs DPO"]
    assert cli.main(["pairs", "list"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("mine: SFT vs DPO"))
    assert line.split()[-2:] == ["mine", "user"]
    rc = cli.main(["pairs", "add", "bad", "--base", str(folders["SFT"]), "--tuned", str(folders["DPO"]),
                   "--template", "tulu3"])
    assert rc == 1 and "<|end_of_text|>" in capsys.readouterr().err
