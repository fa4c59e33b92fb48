"""The attribution engine: model loading and architecture adapters (`models`), the EAP
forward/backward loop and its memory model (`attribution`).

Owns tensors and checkpoints only; knows nothing of run caches, run specs or pages.
May import: the shared top-level modules (`eapcore.specs`, `eapcore.graph`, `eapcore.harness`,
`eapcore.files`, `eapcore.modelfiles`, and `eapcore.store`, where `checkpoints` keeps the GGUF
files and adapters it materialises). Never `eapcore.answers`, `eapcore.stats`, `eapcore.runs`,
`eapcore.views`.
"""
