"""Answers: datasets and prompt templates (`data`), answer generation (`generation`), grading
(`grading`) and the paper's selection and truncation (`selection`).

May import: the shared top-level modules. Never `eapcore.engine`, `eapcore.stats`,
`eapcore.runs`, `eapcore.views`.
"""
