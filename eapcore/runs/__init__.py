"""Runs: the content-addressed cache (`cache`), known pairs and datasets (`registry`) and the
runner that executes a RunSpec stage by stage. The only place that knows the cache layout.

May import: the shared top-level modules, `eapcore.engine`, `eapcore.answers`, `eapcore.stats`.
Never `eapcore.views`.
"""
