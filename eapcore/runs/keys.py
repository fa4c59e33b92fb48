"""What a run's stages are keyed by (pure apart from reading the files they fingerprint), and
whether a spec can run at all.

    generations/<k>  k = (model identity, dataset identity, template, max_new_tokens, generation settings),
                     or for answers imported from a joined file (file fingerprint, model, group, limit),
                     or for a quick run (the whole dataset's generation key, order seed, questions
                     answered): the first K questions of the seeded order
    grades/<k>       k = (generation key, grading code identity)
    selections/<k>   k = (both grade keys, selection settings)
    scores/<k>       k = (model identity, the sample's prompt + first T_cut answer tokens, T_cut,
                          scoring settings, SCORING_VERSION)

Model identity is the hub id and the commit of its revision, or for a local folder the sha256 of
each of its files (whole contents, hashed once per file version); dataset identity likewise (a
local file's sha256). The scoring settings are granularity, ablation, ig_steps, loss and dtype:
`device` and `max_batch_tokens` change scores by rounding only and are not part of a score key
(they are part of the run key).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from eapcore import modelfiles
from eapcore.answers.selection import settings_problems
from eapcore.runs import registry
from eapcore.runs.errors import RunError
from eapcore.specs import (IG_RULE, SCORING_VERSION, AttributionSettings, DatasetSpec, ModelSpec, RunSpec,
                           SelectionSettings, spec_key, to_dict)
from eapcore.store import Store, sha256_file

SCORE_SETTINGS = ("granularity", "ablation", "ig_steps", "loss", "dtype")
MIN_QUESTIONS = 2  # a run's metrics compare questions (Wilcoxon signed-rank, bootstrap): one is not enough


def digest(obj: Any) -> str:
    """32-hex sha256 of the canonical JSON of obj."""
    return spec_key(obj, length=32)


def hub_revision(model: ModelSpec) -> str | None:
    """The commit a hub model's revision names: the revision itself when it is a commit hash, else
    the commit the local Hugging Face cache holds for it, else the hub's answer when the hub is
    reachable, else the revision as given (None: the default branch)."""
    from huggingface_hub import HfApi, try_to_load_from_cache

    if model.revision and len(model.revision) == 40 and all(c in "0123456789abcdef" for c in model.revision):
        return model.revision
    try:
        cached = try_to_load_from_cache(model.name_or_path, "config.json", revision=model.revision)
        if isinstance(cached, str):
            return Path(cached).parent.name  # .../snapshots/<commit>/config.json
        if modelfiles.hub_unavailable() is None:
            return HfApi().model_info(model.name_or_path, revision=model.revision, timeout=10).sha or model.revision
    except Exception:  # noqa: BLE001  (an invalid id, a hub error: the run's loading says what is wrong)
        pass
    return model.revision


def model_identity(model: ModelSpec) -> dict[str, Any]:
    """What a model's outputs depend on: a GGUF file's sha256, an adapter's files and its base's
    identity (eapcore.engine.checkpoints), a local folder's file contents (wherever it lies), or
    the hub id and the commit of its revision (hub_revision)."""
    from eapcore.engine import checkpoints

    local = registry.resolve_path(model.name_or_path)
    if checkpoints.is_derived(local):
        return {**checkpoints.identity(local, model.revision), "trust_remote_code": model.trust_remote_code}
    if Path(local).is_dir():
        return {"files": Store().fingerprint(local), "trust_remote_code": model.trust_remote_code}
    return {"hub": model.name_or_path, "revision": hub_revision(model), "trust_remote_code": model.trust_remote_code}


def dataset_identity(ds: DatasetSpec) -> dict[str, Any]:
    local = registry.resolve_path(ds.source) if ds.source else ""
    if local and Path(local).is_file():
        return {"file": Store().fingerprint(local), "limit": ds.limit}
    return {"name": ds.name, "source": ds.source, "split": ds.split, "limit": ds.limit}


def grading_identity() -> dict[str, Any]:
    """The grading code (eapcore/answers/grading.py source) and math-verify version: grades depend on them."""
    import importlib.metadata as md

    from eapcore.answers import grading

    try:
        mv = md.version("math-verify")
    except md.PackageNotFoundError:
        mv = None
    return {"source": sha256_file(grading.__file__), "math_verify": mv}


def max_new_tokens(spec: RunSpec) -> int:
    return spec.generation.max_new_tokens or spec.pair.max_new_tokens


def generation_key(model: ModelSpec, spec: RunSpec) -> str:
    gen = dataclasses.replace(spec.generation, max_new_tokens=max_new_tokens(spec))
    return digest({"stage": "generations", "model": model_identity(model), "dataset": dataset_identity(spec.dataset),
                   "template": spec.pair.template, "settings": to_dict(gen)})


def grades_key(generation: str) -> str:
    return digest({"stage": "grades", "generation": generation, "grading": grading_identity()})


def selection_key(base_grades: str, tuned_grades: str, settings: SelectionSettings) -> str:
    return digest({"stage": "selections", "base": base_grades, "tuned": tuned_grades, "settings": to_dict(settings)})


def score_key(model_id: str, prompt_ids: Sequence[int], answer_ids: Sequence[int], cut_len: int,
              settings: AttributionSettings) -> str:
    """Key of one sample's scores; model_id = digest(model_identity(model))."""
    return digest({"stage": "scores", "model": model_id, "prompt": list(prompt_ids),
                   "answer": list(answer_ids[:cut_len]), "cut_len": cut_len,
                   "settings": {k: getattr(settings, k) for k in SCORE_SETTINGS},
                   "scoring_version": SCORING_VERSION, **({"ig_rule": IG_RULE} if settings.ig_steps else {})})


def import_key(which: str, spec: RunSpec) -> str:
    """Key of `which` model's answers imported from the spec's joined file: the file's content,
    the answer group its rows are declared to be, and the dataset limit (first rows only)."""
    return digest({"stage": "generations", "format": "joined", "which": which, "group": spec.selection.group,
                   "imported": Store().fingerprint(registry.resolve_path(spec.answers.joined)),
                   "limit": spec.dataset.limit})


def quick_key(full_generation: str, spec: RunSpec, questions: int) -> str:
    """Key of a quick run's answers: the first `questions` of the seeded order, taken from the
    answers of the whole dataset's generation `full_generation` (eapcore.runs.stages.stage_quick)."""
    return digest({"stage": "generations", "quick": {"from": full_generation, "seed": spec.quick.seed,
                                                     "questions": questions}})


def stage_keys(spec: RunSpec, questions: int | None = None) -> dict[str, Any]:
    """Keys of the generation (or import), grade and selection entries of a spec (only the
    fingerprints of local files are read). A quick spec needs `questions`, the number it answered
    (quick.json of its run folder)."""
    models = (("base", spec.pair.base), ("tuned", spec.pair.tuned))
    if spec.quick is not None and questions is None:
        raise ValueError("a quick run's keys depend on the questions it answered: give `questions`")
    gen = {w: import_key(w, spec) if spec.answers else generation_key(m, spec) for w, m in models}
    if spec.quick is not None:
        gen = {w: quick_key(k, spec, questions) for w, k in gen.items()}
    grades = {w: grades_key(k) for w, k in gen.items()}
    return {"generations": gen, "grades": grades,
            "selection": selection_key(grades["base"], grades["tuned"], spec.selection)}


def check_spec(spec: RunSpec) -> None:
    """RunError for settings a run cannot honour (before anything is computed)."""
    a, s = spec.attribution, spec.selection
    problems = []
    if spec.scoring_version != SCORING_VERSION:
        problems.append(f"the spec is for scoring version {spec.scoring_version!r} but this code computes "
                        f"{SCORING_VERSION!r}; build the spec again")
    if a.ablation != "zero":
        problems.append("runs use zero ablation (the paper's); clean/corrupted EAP needs corrupted prompts, "
                        "available from Python via eapcore.engine.attribution.attribute(corrupt=...)")
    if a.ig_steps < 0 or a.max_batch_tokens < 0:
        problems.append("ig_steps and max_batch_tokens must be >= 0")
    problems += settings_problems(s)
    if isinstance(s.n, int) and s.n != 0 and s.n < MIN_QUESTIONS:
        problems.append(f"n must be 0 (every question that passes) or at least {MIN_QUESTIONS}: a run's metrics "
                        f"compare questions, not {s.n}")
    if max_new_tokens(spec) < 1 or spec.generation.batch_size < 0:
        problems.append("max_new_tokens must be >= 1 and the generation batch size >= 0 (0: from free memory)")
    if spec.quick is not None and (spec.answers is not None or s.n <= 0 or spec.quick.chunk < 0):
        problems.append("a quick run generates answers until n questions pass the selection: it needs n > 0, "
                        "chunk >= 0 and no imported answers (--joined)")
    if spec.answers and not Path(registry.resolve_path(spec.answers.joined)).is_file():
        problems.append(f"the joined answers file {spec.answers.joined} does not exist")
    if problems:
        raise RunError("invalid run spec: " + "; ".join(problems))
