"""The demo lab: synthetic math problems, a tiny Llama model, and the SFT -> GRPO / DPO pairs.

`python -m eapcore lab --out demo/` trains everything on CPU in minutes (see `eapcore.lab.run`).

May import: `eapcore.answers` (grading's `last_boxed`), the shared top-level modules, and for the
real lab (`smollm2`) `eapcore.engine.checkpoints` and `eapcore.runs` (its sweep runs the pipeline).
"""
from __future__ import annotations


def command(argv: list[str]) -> int:
    from .run import command as _command

    return _command(argv)
