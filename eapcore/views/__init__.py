"""Views: the read-only layer the pages use (`query`: every table a page shows; `maps`: the
relative-change maps of a run with their per-cell tests; `compare`: two runs on one graph and the
`compare` command) and the figure and table-export builders (`figures`). Computes what the pages
show; draws nothing, writes nothing to the cache and memoises nothing (the pages' cache layer does).

May import: the shared top-level modules, `eapcore.stats`, `eapcore.answers` (grading of stored
answers), and of `eapcore.runs` only `results` and `registry`. Never `eapcore.engine`.
"""
