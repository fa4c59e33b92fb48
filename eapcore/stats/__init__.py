"""Statistics on stored score files: the paper's three metrics (`metrics`), the tests, intervals
and node tables around them (`analysis`), the per-cell tests of relative-change maps with
false-discovery-rate control and their noise floor (`significance`), and the report of a
base/tuned pair of result directories (`report`: the one reader of the result format,
metrics.json, the `metrics` command). Reads score files, never models.

May import: the shared top-level modules. Never `eapcore.engine`, `eapcore.answers`,
`eapcore.runs`, `eapcore.views`.
"""
