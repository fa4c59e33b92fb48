"""Statistics on stored score files: the paper's three metrics (`metrics`) and the tests,
intervals and where-in-the-network tables around them (`analysis`). Reads score files, never
models.

May import: the shared top-level modules. Never `eapcore.engine`, `eapcore.answers`,
`eapcore.runs`, `eapcore.views`.
"""
