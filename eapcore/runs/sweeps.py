"""Grids of run specs: named presets (the paper's Table 1, the demo) and the specs of a grid."""
from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

from eapcore.runs import registry
from eapcore.specs import GROUPS, RunSpec

PRESETS: dict[str, dict[str, list]] = {
    "table1": {"pairs": [p.name for p in registry.PAPER_PAIRS], "datasets": ["math", "gsm8k", "college_math"],
               "alphas": [0.03, 0.1, 0.3, 0.5]},
    "demo": {"pairs": [p.name for p in registry.DEMO_PAIRS], "datasets": ["demo"], "alphas": [0.03, 0.1, 0.3, 0.5],
             "groups": list(GROUPS),  # the correct-vs-incorrect view, at alpha 0.5
             "defaults": {"gen_dtype": "float32", "gen_batch_size": 128}},  # as the lab evaluates its models
    # the SFT -> DPO -> RLVR families (registry.FAMILY_PAIRS): every pair of each family on the same
    # questions, so the pairs of a family can be compared run against run
    "families": {"pairs": [p.name for p in registry.FAMILY_PAIRS], "datasets": ["math500", "gsm8k"],
                 "alphas": [0.1, 0.5]},
    # the SmolLM2 pairs' shipped runs (eapcore.lab.smollm2 computes them on a GPU; 50 samples keep
    # the bundle small): answers graded right by both at alphas 0.1 and 0.5, and the problems RL fixed
    "smollm2": {"pairs": [p.name for p in registry.SMOLLM2_PAIRS], "datasets": ["smollm2"], "alphas": [0.1, 0.5],
                "groups": ["both_correct", "tuned_only"],
                "defaults": {"gen_dtype": "float32", "gen_batch_size": 128, "n": 50}},
}


def label(spec: RunSpec) -> str:
    """One line naming a run: pair | dataset | alpha | group."""
    return f"{spec.pair.name} | {spec.dataset.name} | alpha {spec.selection.alpha} | {spec.selection.group}"


def sweep_specs(pairs: Sequence[str], datasets: Sequence[str], alphas: Sequence[float],
                template: RunSpec | None = None, groups: Sequence[str] = ()) -> list[RunSpec]:
    """One spec per (pair, dataset, alpha), plus one per (pair, dataset, group) at the last alpha
    for each extra answer group in `groups`; other settings from `template`. Ordered so that
    consecutive specs share generations."""
    specs = []
    for pair_name, ds_name in itertools.product(pairs, datasets):
        pair, ds = registry.get_pair(pair_name), registry.get_dataset(ds_name)
        base = template or RunSpec(pair, ds)
        ds_here = dataclasses.replace(ds, limit=base.dataset.limit) if template else ds
        for alpha in alphas:
            specs.append(dataclasses.replace(base, pair=pair, dataset=ds_here,
                                             selection=dataclasses.replace(base.selection, alpha=alpha)))
        for group in groups:
            if group != specs[-1].selection.group:
                specs.append(dataclasses.replace(specs[-1], selection=dataclasses.replace(
                    specs[-1].selection, group=group)))
    return specs
