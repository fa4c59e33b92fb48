"""`eapcore <command> ...` (the console script; the same as `python -m eapcore <command> ...`): a
dispatch table; each command lives in its stage module.

Every target is `module:function` with signature `function(argv: list[str]) -> int`.
Modules are imported lazily so `--help` and light commands start fast.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "attribute": ("eapcore.engine.attribution:command", "EAP scores of one model on a samples file"),
    "select": ("eapcore.answers.selection:command", "pick and truncate samples of a base/tuned pair"),
    "generate": ("eapcore.answers.generation:command", "greedy answers of one model to a dataset"),
    "grade": ("eapcore.answers.grading:command", "grade an answers file and report accuracy"),
    "metrics": ("eapcore.stats.report:command", "the paper's three metrics of base vs tuned scores"),
    "run": ("eapcore.runs.commands:command_run", "one full run spec, cached"),
    "pairs": ("eapcore.runs.registry_commands:command_pairs", "list, add or remove model pairs (--json)"),
    "datasets": ("eapcore.runs.registry_commands:command_datasets", "list, add or remove datasets (--json)"),
    "sweep": ("eapcore.runs.commands:command_sweep", "a grid of run specs (e.g. the paper's Table 1)"),
    "compare": ("eapcore.views.compare:command", "two runs that share a graph, edge by edge, with tests"),
    "cache": ("eapcore.runs.cache:command", "list, measure and remove cache entries"),
    "export": ("eapcore.runs.commands:command_export", "bundle cached runs into one file"),
    "import": ("eapcore.runs.commands:command_import", "load a bundle into the cache"),
    "lab": ("eapcore.lab:command", "train the demo pairs (SFT -> GRPO / DPO)"),
    "lab-smollm2": ("eapcore.lab.smollm2:command", "train, evaluate and sweep the SmolLM2 pairs (GPU; --tiny: CPU)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: eapcore <command> [options]   (or: python -m eapcore <command> [options])\n\n"
              "commands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module, func = COMMANDS[argv[0]][0].split(":")
    return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
