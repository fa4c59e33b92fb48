"""Runs: the cache of runs (`cache`: `eapcore.store` plus run folders and bundles), known pairs
and datasets (`registry`), and the runner split by job: stage keys (`keys`), memory prediction
(`memory`), worker control (`workers`), the stages (`stages`), `runner.run`, grids (`sweeps`),
the command lines (`commands`), and reading finished runs (`results`). The only place that knows
the layout of runs and stage entries.

May import: the shared top-level modules, `eapcore.engine`, `eapcore.answers`, `eapcore.stats`.
Never `eapcore.views`. Public API for the pages: `workers` (start/status/cancel), `memory`,
`registry`; `results` is read through `eapcore.views`.
"""
