"""Frozen, hashable settings for every stage. A run is fully described by a `RunSpec`.

Every dataclass here is immutable and JSON-serialisable through `to_dict`; `spec_key` hashes the
canonical JSON, so two specs share a key exactly when every setting is equal.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

# Bump when the maths of the attribution or the metrics changes: cached scores then never serve.
SCORING_VERSION = "1"
# EAP-IG's points k = 0..m-1 (its own code's left sum; before: k = 1..m). Part of the key of
# scores computed with ig_steps > 0 only, so plain EAP's cached scores (and runs) stay valid.
IG_RULE = "left"

Granularity = Literal["layer", "head"]
Ablation = Literal["zero", "corrupted"]
Group = Literal["both_correct", "both_wrong", "base_only", "tuned_only"]
GROUPS: tuple[str, ...] = ("both_correct", "both_wrong", "base_only", "tuned_only")
GROUP_LABELS = {"both_correct": "both correct", "both_wrong": "both wrong",
                "base_only": "base right, tuned wrong", "tuned_only": "base wrong, tuned right"}
# (base correct, tuned correct) of each group's questions.
GROUP_SCORES: dict[str, tuple[bool, bool]] = {"both_correct": (True, True), "both_wrong": (False, False),
                                              "base_only": (True, False), "tuned_only": (False, True)}


@dataclass(frozen=True)
class ModelSpec:
    """One checkpoint: a hub id or a local folder."""

    name_or_path: str
    revision: str | None = None
    trust_remote_code: bool = False


# Fields added after runs were cached: part of a spec's key only when set (not at their default),
# so the keys of specs that leave them unset (every run cached before them) do not change.
_KEYED_WHEN_SET = {"key_when_set": True}


@dataclass(frozen=True)
class PairSpec:
    """A base (SFT) model and its RL-tuned version, of one architecture family."""

    name: str
    base: ModelSpec
    tuned: ModelSpec
    template: str = "deepseek-math"  # prompt template name (eapcore.answers.data.TEMPLATES)
    max_new_tokens: int = 4096
    algorithm: str = ""  # label only: GRPO, PPO, DPO, ...
    notes: str = ""
    architecture: str = ""  # label only: llama, mistral, qwen2, gpt2 (the registry fills it in)
    # label: the model family whose stages (SFT -> DPO -> RLVR, one lab, one base) the pair compares;
    # the pairs of one family are offered together (eapcore.views.query.family_siblings)
    family: str = field(default="", metadata=_KEYED_WHEN_SET)


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset: a registered name, or a local jsonl file (harness format or question+answer)."""

    name: str
    source: str = ""  # hub id, URL or local path; empty for built-in resolution by name
    split: str = "test"
    limit: int | None = None  # first `limit` problems only (None: all)


BACKENDS: tuple[str, ...] = ("auto", "continuous", "transformers", "vllm")  # eapcore.answers.generation says which


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int | None = None  # None: the pair's own
    batch_size: int = 0  # sequences decoded together; 0: from free memory (eapcore.answers.decoding)
    backend: Literal["auto", "continuous", "transformers", "vllm"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"


@dataclass(frozen=True)
class SelectionSettings:
    """Paper Eq. 10-12. T_cut = max(floor(alpha * T_ref), 1)."""

    alpha: float = 0.5
    beta: float = 0.5
    low: float = 0.5  # keep if mean length >= floor(low * T_ref)
    high: float = 1.5  # keep if mean length <= floor(high * T_ref)
    n: int = 100
    seed: int = 42
    group: Group = "both_correct"

    def __post_init__(self):  # 1 and 1.0 must give one key: the ratios are always floats
        for name in ("alpha", "beta", "low", "high"):
            object.__setattr__(self, name, float(getattr(self, name)))


@dataclass(frozen=True)
class AttributionSettings:
    """How edges are scored.

    Sign convention (all modes): score(u->v) = < a_u(ablated) - a_u(clean), dL/d(input of v) >,
    the first-order change of the loss when the edge is ablated. For zero ablation this is
    -< dL/d(input of v), a_u >: positive means removing the edge raises the loss.
    """

    granularity: Granularity = "layer"
    ablation: Ablation = "zero"
    ig_steps: int = 0  # 0: plain EAP at the clean input; m >= 1: EAP-IG over input embeddings (IG_RULE)
    loss: Literal["self_ce"] = "self_ce"  # truncated self-cross-entropy (docs/METHOD.md)
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_batch_tokens: int = 0  # 0: choose from free memory; otherwise pack samples up to this


@dataclass(frozen=True)
class MetricSettings:
    entropy: Literal["pooled", "per_sample", "histogram"] = "pooled"
    kurtosis: Literal["fisher", "pearson"] = "fisher"
    kurtosis_of: Literal["signed", "absolute"] = "signed"
    histogram_bins: int = 100


@dataclass(frozen=True)
class AnswersSpec:
    """Answers imported instead of generated and graded: a joined file of both models' answers to
    the same questions (the paper authors' `all_correct.jsonl`, read by eapcore.harness.read_joined).
    Every row is a question of the run's answer group (`SelectionSettings.group`), as the file
    declares by what it holds; the pair's models score these answers."""

    joined: str  # path of the joined jsonl file


@dataclass(frozen=True)
class RunSpec:
    pair: PairSpec
    dataset: DatasetSpec  # with `answers`: only a label for the questions (nothing is loaded from it)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    selection: SelectionSettings = field(default_factory=SelectionSettings)
    attribution: AttributionSettings = field(default_factory=AttributionSettings)
    scoring_version: str = SCORING_VERSION
    answers: AnswersSpec | None = field(default=None, metadata=_KEYED_WHEN_SET)  # None: generate and grade


def to_dict(spec: Any) -> dict[str, Any]:
    return dataclasses.asdict(spec)


def choices(cls: type, name: str) -> tuple[str, ...]:
    """The allowed values of a Literal-typed setting, e.g. choices(AttributionSettings, "device")
    (the command line and the Run page offer exactly these)."""
    return typing.get_args(typing.get_type_hints(cls)[name])


def _keyed_dict(spec: Any) -> Any:
    """to_dict(spec) without the fields keyed only when set that are at their default, at every level."""
    if not dataclasses.is_dataclass(spec):
        return spec
    return {f.name: _keyed_dict(getattr(spec, f.name)) for f in dataclasses.fields(spec)
            if not (f.metadata.get("key_when_set") and getattr(spec, f.name) == f.default)}


def spec_key(spec: Any, length: int = 16) -> str:
    """Content hash of a spec (or any JSON-able value): equal settings <=> equal key."""
    if dataclasses.is_dataclass(spec):
        spec = {"__type__": type(spec).__name__, **_keyed_dict(spec)}
    blob = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a (nested) frozen dataclass from `to_dict` output; unknown keys are an error."""
    kwargs = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown setting(s) {sorted(unknown)}; known: {sorted(fields)}")
    for name, value in data.items():
        ftype = fields[name].type  # a string ("AnswersSpec | None") under `from __future__ import annotations`
        sub = _DATACLASSES.get(ftype.split("|")[0].strip() if isinstance(ftype, str) else getattr(ftype, "__name__", ""))
        kwargs[name] = from_dict(sub, value) if sub is not None and isinstance(value, dict) else value
    return cls(**kwargs)


_DATACLASSES = {
    c.__name__: c
    for c in (ModelSpec, PairSpec, DatasetSpec, GenerationSettings, SelectionSettings,
              AttributionSettings, MetricSettings, AnswersSpec, RunSpec)
}
