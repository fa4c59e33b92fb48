"""Registry: built-in pairs and datasets as docs/METHOD.md gives them; user pairs/datasets in registry.json."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from eapcore import files
from eapcore.runs import registry
from eapcore.runs.registry import RegistryError
from eapcore.specs import DatasetSpec, ModelSpec, PairSpec

METHOD_TABLE = {  # pair: (base, tuned, algorithm, template, max new tokens, architecture)
    "DeepSeek-Math": ("deepseek-ai/deepseek-math-7b-instruct", "deepseek-ai/deepseek-math-7b-rl", "GRPO",
                      "deepseek-math", 4096, "llama"),
    "Mistral": ("peiyi9979/mistral-7b-sft", "peiyi9979/math-shepherd-mistral-7b-rl", "PPO", "mistral", 4096, "mistral"),
    "Distilled-Qwen": ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "nvidia/AceReason-Nemotron-7B", "GRPO",
                       "deepseek-math", 32768, "qwen2"),
    "Qwen2.5": ("RLHFlow/Qwen2.5-7B-SFT", "RLHFlow/Qwen2.5-7B-DPO", "DPO (online iterative)", "qwen25-math-cot",
                8192, "qwen2"),
}


@pytest.fixture(autouse=True)
def user_registry(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "registry.json"
    monkeypatch.setenv("EAP_REGISTRY", str(path))
    return path


def test_builtin_pairs_and_datasets():
    pairs = registry.pairs()
    for name, (base, tuned, algo, template, max_new, arch) in METHOD_TABLE.items():
        p = pairs[name]
        assert (p.base.name_or_path, p.tuned.name_or_path, p.algorithm, p.template, p.max_new_tokens,
                p.architecture) == (base, tuned, algo, template, max_new, arch)
    small = pairs["Distilled-Qwen-1.5B"]
    assert (small.base.name_or_path, small.tuned.name_or_path, small.template) == \
        ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "agentica-org/DeepScaleR-1.5B-Preview", "chat")
    grpo, dpo = pairs["demo: SFT vs GRPO"], pairs["demo: SFT vs DPO"]
    assert (grpo.base.name_or_path, grpo.tuned.name_or_path, dpo.tuned.name_or_path) == ("demo/sft", "demo/grpo", "demo/dpo")
    from eapcore.lab.problems import TEMPLATE_NAME
    from eapcore.lab.run import MAX_NEW_TOKENS

    assert grpo.template == dpo.template == TEMPLATE_NAME and grpo.max_new_tokens == MAX_NEW_TOKENS
    from eapcore.answers.data import BUILTIN_SOURCES, resolve_template

    for p in pairs.values():
        resolve_template(p.template)  # every template is known to eapcore.answers.data
    ds = registry.datasets()
    assert set(BUILTIN_SOURCES) <= set(ds) and ds["demo"].source == "demo/problems_test.jsonl"
    assert [p.name for p in registry.PAPER_PAIRS] == list(METHOD_TABLE)


def test_resolve_path_is_relative_to_the_project():
    assert registry.resolve_path("eapcore/specs.py") == str(files.PROJECT_ROOT / "eapcore" / "specs.py")
    assert registry.resolve_path("org/model") == "org/model"
    assert registry.looks_local("./x") and registry.looks_local("/a/b") and not registry.looks_local("org/model")


def test_add_and_remove_user_pair(checkpoints, user_registry):
    pair = PairSpec("mine", ModelSpec(str(checkpoints["llama"])), ModelSpec(str(checkpoints["llama"])),
                    "mistral", 256, "GRPO")
    saved = registry.add_pair(pair)
    assert saved.architecture == "llama"  # filled in from the checkpoint's config
    assert registry.get_pair("mine") == saved
    data = json.loads(user_registry.read_text())  # plain JSON
    assert data["pairs"][0]["base"]["name_or_path"] == str(checkpoints["llama"]) and data["datasets"] == []
    with pytest.raises(RegistryError, match="exists already"):
        registry.add_pair(pair)
    registry.add_pair(PairSpec("mine", pair.base, pair.tuned, "mistral", 512), replace=True)
    assert registry.get_pair("mine").max_new_tokens == 512
    registry.remove_pair("mine")
    with pytest.raises(RegistryError, match="unknown pair 'mine'.*DeepSeek-Math"):
        registry.get_pair("mine")
    with pytest.raises(RegistryError, match="no user pair named 'mine'"):
        registry.remove_pair("mine")


@pytest.mark.parametrize("change, message", [
    ({"name": "Mistral"}, "built in"),
    ({"name": " "}, "name"),
    ({"template": "nope"}, "unknown prompt template"),
    ({"max_new_tokens": 0}, "positive integer"),
    ({"tuned": ModelSpec("/no/such/folder")}, "does not exist"),
    ({"tuned": "gpt2"}, "different architectures"),
])
def test_invalid_pairs_are_refused(checkpoints, change, message):
    fields = {"name": "bad", "base": ModelSpec(str(checkpoints["llama"])), "tuned": ModelSpec(str(checkpoints["llama"])),
              "template": "deepseek-math", "max_new_tokens": 16, **change}
    if fields["tuned"] == "gpt2":
        fields["tuned"] = ModelSpec(str(checkpoints["gpt2"]))
    with pytest.raises(RegistryError, match=message):
        registry.add_pair(PairSpec(**fields))
    assert "bad" not in registry.pairs()


def test_hand_edited_registry(user_registry, tmp_path):
    problems = tmp_path / "p.jsonl"
    problems.write_text('{"question": "1+1?", "answer": "2"}\n')
    user_registry.write_text(json.dumps({
        "pairs": [{"name": "hub pair", "base": "org/base-model", "tuned": {"name_or_path": "org/rl", "revision": "v1"},
                   "template": "chat", "max_new_tokens": 100}],
        "datasets": [{"name": "mine", "source": str(problems)}]}))
    p = registry.get_pair("hub pair")
    assert p.base == ModelSpec("org/base-model") and p.tuned.revision == "v1"
    assert registry.get_dataset("mine").source == str(problems)
    user_registry.write_text('{"pairs": [{"name": "x", "base": 3}]}')
    with pytest.raises(RegistryError, match=r"pairs\[0\].base"):
        registry.pairs()
    user_registry.write_text("{not json")
    with pytest.raises(RegistryError, match="not valid JSON"):
        registry.pairs()


def test_user_datasets(tmp_path):
    good = tmp_path / "set.jsonl"
    good.write_text('{"question": "What is 2+2?", "answer": "4"}\n')
    registry.add_dataset(DatasetSpec("my set", str(good)))
    assert registry.get_dataset("my set").source == str(good)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no question here"}\n')
    with pytest.raises(RegistryError, match="no usable problem"):
        registry.add_dataset(DatasetSpec("bad", str(bad)))
    with pytest.raises(RegistryError, match="does not exist"):
        registry.add_dataset(DatasetSpec("gone", str(tmp_path / "gone.jsonl")))
    with pytest.raises(RegistryError, match="built in"):
        registry.add_dataset(DatasetSpec("gsm8k", str(good)))
    registry.remove_dataset("my set")
    with pytest.raises(RegistryError, match="unknown dataset 'my set'"):
        registry.get_dataset("my set")
