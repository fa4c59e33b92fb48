"""Views: the read-only layer the pages use (`query`) and the figure and table-export builders
(`figures`). Computes every number a page shows; draws nothing and writes nothing to the cache.

May import: the shared top-level modules, `eapcore.stats`, and `eapcore.runs`' read API. Never
`eapcore.engine` or `eapcore.answers`.
"""
