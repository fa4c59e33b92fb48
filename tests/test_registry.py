"""Registry: built-in pairs and datasets as docs/METHOD.md gives them; user pairs/datasets in registry.json."""
from __future__ import annotations

import json
import re
import shutil
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
    with pytest.raises(RegistryError, match=re.escape("exists already; remove it first, or replace it (`--replace` "
                                                      "on the command line, replace=True in Python)")):
        registry.add_pair(pair)
    registry.add_pair(PairSpec("mine", pair.base, pair.tuned, "mistral", 512), replace=True)
    assert registry.get_pair("mine").max_new_tokens == 512
    registry.remove_pair("mine")
    with pytest.raises(RegistryError, match="unknown pair 'mine'.*DeepSeek-Math.*Add one with `eapcore pairs add "
                                            "NAME --base MODEL --tuned MODEL`"):
        registry.get_pair("mine")
    with pytest.raises(RegistryError, match="no user pair named 'mine'"):
        registry.remove_pair("mine")
    with pytest.raises(RegistryError, match="^pair 'DeepSeek-Math' is built in and cannot be removed$"):
        registry.remove_pair("DeepSeek-Math")


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


def test_a_broken_registry_keeps_the_builtins_and_says_what_and_where(user_registry, tmp_path):
    """A bad entry is skipped, a file that is not JSON hides no built-in pair; problems() names
    the file and the JSON error, unknown names mention it, and editing never overwrites it."""
    user_registry.write_text(json.dumps({"pairs": [{"name": "x", "base": 3}, {"name": "ok", "base": "org/a",
                                                                               "tuned": "org/b"}]}))
    assert "ok" in registry.pairs() and "x" not in registry.pairs() and "DeepSeek-Math" in registry.pairs()
    assert registry.problems() == [f"{user_registry} pairs[0].base: a model must be a hub id / folder string or an "
                                   "object with name_or_path, not int (entry skipped; fix it in the file)"]
    user_registry.write_text('{"pairs": [{"name": "mine", "base": "org/a"},]}')  # a trailing comma
    assert set(registry.pairs()) == {p.name for p in registry.BUILTIN_PAIRS}
    assert set(registry.datasets()) == {d.name for d in registry.BUILTIN_DATASETS}
    said = f"{user_registry} is not valid JSON (Expecting value at line 1, column 46); fix it by hand or delete it"
    assert registry.problems() == [said]
    with pytest.raises(RegistryError, match="unknown pair 'mine'.*Note: " + re.escape(said)):
        registry.get_pair("mine")
    problems = tmp_path / "p.jsonl"
    problems.write_text('{"question": "1+1?", "answer": "2"}\n')
    with pytest.raises(RegistryError, match=re.escape(said)):
        registry.add_dataset(DatasetSpec("new", str(problems)))
    assert user_registry.read_text() == '{"pairs": [{"name": "mine", "base": "org/a"},]}'  # not overwritten


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
    with pytest.raises(RegistryError, match="unknown dataset 'my set'.*`eapcore datasets add NAME --source FILE`"):
        registry.get_dataset("my set")
    with pytest.raises(RegistryError, match="^dataset 'gsm8k' is built in and cannot be removed$"):
        registry.remove_dataset("gsm8k")


def test_pairs_and_datasets_commands_say_what_the_user_can_do(checkpoints, user_registry, capsys):
    """`eapcore pairs|datasets`: a name taken names `--replace`, a built-in cannot be removed, hub
    ids not downloaded yet are saved with a note that they are not checked yet, and a broken
    registry.json is a warning on stderr while `list` still lists (stdout stays JSON with --json)."""
    from eapcore import cli

    local = str(checkpoints["llama"])
    add = ["pairs", "add", "mine", "--base", local, "--tuned", local, "--template", "mistral"]
    assert cli.main(add) == 0
    out, err = capsys.readouterr()
    assert out.startswith("saved pair 'mine'") and err == ""  # both checked: no note
    assert cli.main(add) == 1
    assert capsys.readouterr().err == ("error: a pair named 'mine' exists already; remove it first, or replace it "
                                       "(`--replace` on the command line, replace=True in Python)\n")
    assert cli.main([*add, "--max-new-tokens", "64", "--replace"]) == 0 and registry.get_pair("mine").max_new_tokens == 64
    capsys.readouterr()
    for section, builtin in (("pairs", "DeepSeek-Math"), ("datasets", "gsm8k")):
        assert cli.main([section, "remove", builtin]) == 1
        assert capsys.readouterr().err == f"error: {section[:-1]} {builtin!r} is built in and cannot be removed\n"

    assert cli.main(["pairs", "add", "hub", "--base", local, "--tuned", "nonexist/folder", "--template", "mistral",
                     "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["tuned"]["name_or_path"] == "nonexist/folder" and registry.unchecked(registry.get_pair("hub")) \
        == ["tuned 'nonexist/folder'"]
    assert err == ("note: not checked yet: tuned 'nonexist/folder', not downloaded here (not in the local "
                   "Hugging Face cache); a run checks them when it starts, after downloading them\n")

    data = json.loads(user_registry.read_text())
    user_registry.write_text(json.dumps({"pairs": [{"name": "x", "base": 3}, *data["pairs"]], "datasets": [7]}))
    assert cli.main(["pairs", "list", "--json"]) == 0
    out, err = capsys.readouterr()
    assert {"DeepSeek-Math", "mine", "hub"} <= {row["name"] for row in json.loads(out)}
    assert err.splitlines() == [f"warning: {p}" for p in registry.problems()] and len(err.splitlines()) == 2
    assert "pairs[0].base: a model must be" in err and "datasets[0]: expected a JSON object" in err
    user_registry.write_text("{not json")
    assert cli.main(["datasets", "list"]) == 0
    out, err = capsys.readouterr()
    assert "gsm8k" in out and err == f"warning: {registry.problems()[0]}\n" and "is not valid JSON" in err


def _retokenized(src: Path, dst: Path, order) -> Path:
    """A copy of checkpoint `src` whose char tokenizer lists its characters in another order."""
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    shutil.copytree(src, dst)
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(specials + order(list(string.printable)))},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(dst)
    return dst


def test_pairs_of_other_vocabularies_or_shapes_are_refused(checkpoints, tmp_path):
    from conftest import make_checkpoint

    base = checkpoints["llama"]
    swapped = _retokenized(base, tmp_path / "swapped", lambda chars: chars[1::-1] + chars[2:])  # "0", "1" swapped
    deeper = make_checkpoint(tmp_path / "deeper", "llama", n_layers=3)
    wider = tmp_path / "wider"
    shutil.copytree(base, wider)
    config = json.loads((wider / "config.json").read_text())
    (wider / "config.json").write_text(json.dumps(dict(config, vocab_size=config["vocab_size"] + 8)))
    cases = {swapped: r"base and tuned have different tokenizers \(2 tokens differ, e.g. '0' is id 4 in base and 5 "
                      r"in tuned\), so their answers and scores cannot be compared token for token",
             deeper: r"base and tuned have different shapes \(n_layers 2 vs 3\), so their edges cannot be compared",
             wider: r"base and tuned have different shapes \(vocab 104 vs 112\)",
             checkpoints["gpt2"]: r"base and tuned have different architectures \('llama' and 'gpt2'\)"}
    for tuned, message in cases.items():
        with pytest.raises(RegistryError, match=r"pair 'mixed': " + message):
            registry.add_pair(PairSpec("mixed", ModelSpec(str(base)), ModelSpec(str(tuned))))
    assert "mixed" not in registry.pairs()
    assert registry.check_pair(PairSpec("same", ModelSpec(str(base)), ModelSpec(str(base)))) == "llama"
    assert registry.check_pair(PairSpec("hub", ModelSpec(str(base)), ModelSpec("org/not-here"))) is None


def test_uploads_are_content_addressed_next_to_the_registry(user_registry, tmp_path, monkeypatch):
    """Two uploads with one file name never replace each other (a dataset saved from the first keeps
    its problems), they live outside the cache (`cache clear` keeps them), and a large file that
    is not JSON gets a short message and is not kept."""
    from eapcore.answers.data import read_problems_file
    from eapcore.runs.cache import Cache

    monkeypatch.setenv("EAP_CACHE_DIR", str(tmp_path / "cache"))
    first = registry.store_upload("set.jsonl", b'{"question": "What is 1 + 1?", "answer": "2"}\n')
    registry.add_dataset(DatasetSpec("first", str(first)))
    second = registry.store_upload("set.jsonl", b'{"question": "What is 5 + 5?", "answer": "10"}\n')
    assert first != second and first.name == second.name == "set.jsonl"
    assert registry.store_upload("set.jsonl", first.read_bytes()) == first  # the same content, stored once
    assert first.parent.parent == user_registry.parent / "uploads"
    with pytest.raises(RegistryError, match="a dataset named 'first' exists already"):
        registry.add_dataset(DatasetSpec("first", str(second)))
    Cache().put("scores", "k", lambda folder: (folder / "x").write_bytes(b"x"))
    Cache().clear()
    assert read_problems_file(registry.resolve_path(registry.get_dataset("first").source))[0][0].answer == "2"

    junk = (b"\x00\xff" * 1000 + b"\n") * 5000 + b"not json at all\n" * 50000  # 10 MB, 55000 bad lines
    with pytest.raises(RegistryError) as err:
        registry.store_upload("big.jsonl", junk)
    message = str(err.value)
    assert len(message) < 1500 and message.startswith("upload big.jsonl: no usable problem in big.jsonl: 0 of 55000 "
                                                      "lines read; skipped:\n  line 1: not UTF-8 text")
    assert "... and 54995 more" in message
    assert sorted(p.name for p in (user_registry.parent / "uploads").rglob("*")) == sorted(
        [first.parent.name, second.parent.name, "set.jsonl", "set.jsonl"])
