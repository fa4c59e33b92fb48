"""Statistics on stored score files: the paper's three metrics (`metrics`), the tests, intervals
and where-in-the-network tables around them (`analysis`), and the report of a base/tuned pair of
result directories (`report`: the one reader of the result format, metrics.json, the `metrics`
command). Reads score files, never models.

May import: the shared top-level modules. Never `eapcore.engine`, `eapcore.answers`,
`eapcore.runs`, `eapcore.views`.
"""
