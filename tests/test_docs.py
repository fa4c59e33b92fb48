"""docs/METHOD.md is the method as the code implements it: every citation of it resolves, its pair
table is the registry's, and the defaults it states are the settings' defaults; the project paths
the markdown files cite exist."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

from eapcore.runs import registry
from eapcore.specs import AttributionSettings, MetricSettings, SelectionSettings

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs/METHOD.md"


def test_every_citation_of_method_md_is_docs_method_md():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split() \
        if (ROOT / ".git").exists() else [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")]
    cited = []
    for name in files:
        if name.endswith((".py", ".md")) and name != "docs/METHOD.md":
            text = (ROOT / name).read_text(encoding="utf-8")
            cited += [(name, m.group(0)) for m in re.finditer(r"[\w/.]*METHOD\.md", text)]
    assert cited and METHOD.is_file()
    assert all(ref == "docs/METHOD.md" for _, ref in cited), [c for c in cited if c[1] != "docs/METHOD.md"]


def test_pair_table_is_the_registry():
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in METHOD.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| pair")]
    table = {r[0]: r for r in rows if len(r) == 6}
    for pair in registry.PAPER_PAIRS + registry.SMALL_PAIRS:
        assert table[pair.name] == [pair.name, pair.base.name_or_path, pair.tuned.name_or_path, pair.algorithm,
                                    pair.template, str(pair.max_new_tokens)]


def test_stated_defaults_are_the_settings_defaults():
    text = " ".join(METHOD.read_text().split())
    s, m, a = SelectionSettings(), MetricSettings(), AttributionSettings()
    for claim in (f"Default alpha = {s.alpha:g}", f"(low = {s.low:g}, high = {s.high:g})", f"(beta = {s.beta:g})",
                  f"(n = {s.n}, seed = {s.seed})", f"`{s.group}`, the default", f'(`entropy = "{m.entropy}"`, default)',
                  f'(`kurtosis = "{m.kurtosis}"`, `kurtosis_of = "{m.kurtosis_of}"`)', f"`histogram`, {m.histogram_bins} bins",
                  f'`AttributionSettings.loss = "{a.loss}"`', f"(`AttributionSettings.dtype`, default {a.dtype})"):
        assert claim in text, claim


def test_family_table_is_the_registry():
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in METHOD.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| family")]
    table = [r for r in rows if len(r) == 7]
    assert table == [[p.family, p.name, p.base.name_or_path, p.tuned.name_or_path, p.algorithm, p.template,
                      str(p.max_new_tokens)] for p in registry.FAMILY_PAIRS]
    text = " ".join(METHOD.read_text().split())
    from eapcore.answers.data import TEMPLATE_STOPS

    for template, stops in TEMPLATE_STOPS.items():
        assert all(f"`{stop}`" in text for stop in stops) and f"`{template}`" in text


def test_every_project_path_the_docs_cite_exists():
    """Paths such as `eapcore/engine/checkpoints.py` in the tracked markdown files name files that
    exist (modules moved into subpackages leave no stale path behind)."""
    docs = subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True).stdout.split() \
        if (ROOT / ".git").exists() else [str(p.relative_to(ROOT)) for p in ROOT.glob("**/*.md")]
    cited = {(doc, m.group(0)) for doc in docs
             for m in re.finditer(r"\b(?:eapcore|pages|tests|benchmarks|scripts)/[\w/.-]+\.(?:py|sh|md)\b",
                                  (ROOT / doc).read_text(encoding="utf-8"))}
    assert len(cited) > 20
    assert sorted(c for c in cited if not (ROOT / c[1]).exists()) == []
