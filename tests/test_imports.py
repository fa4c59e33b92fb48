"""The allowed import directions (.importlinter; DESIGN.md "Layers") hold for the code, and the
linter does catch an import that breaks them (run on a copy of the tree with one bad import added)."""
from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTRACTS = ("Layers", "Pages import only", "Views read runs", "No import cycles")  # names' starts


def lint(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` over the packages under `root`, with its contracts from root/.importlinter."""
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--no-cache", "--no-logo"], cwd=root,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "COLUMNS": "250"}, capture_output=True,
                          text=True, timeout=300)


def test_the_code_keeps_every_import_contract():
    r = lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 kept, 0 broken" in r.stdout, r.stdout


@pytest.mark.parametrize("module, bad_import, contracts", [
    ("eapcore/stats/metrics.py", "from eapcore.engine import models", {"Layers"}),  # stats never imports the engine
    ("eapcore/engine/cached.py", "from eapcore.runs import cache", {"Layers", "No import cycles"}),  # nor the engine runs
    # the engine's store sits below it: checkpoints reaching up to the runs' cache again is caught
    ("eapcore/engine/checkpoints.py", "from eapcore.runs.cache import Cache", {"Layers", "No import cycles"}),
    ("eapcore/store.py", "from eapcore.engine import checkpoints", {"Layers", "No import cycles"}),  # nor the store up
    ("pages/common.py", "from eapcore.stats import analysis", {"Pages import only"}),  # pages compute nothing
    ("eapcore/views/query.py", "from eapcore.runs import stages", {"Views read runs"}),
    ("eapcore/runs/keys.py", "from eapcore.runs import runner", {"No import cycles"}),
])
def test_a_forbidden_import_is_caught(tmp_path, module, bad_import, contracts):
    for part in ("eapcore", "pages"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path)
    path = tmp_path / module
    path.write_text((path.read_text() if path.exists() else "") + f"\n{bad_import}  # noqa\n")
    r = lint(tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    broken = [line for line in r.stdout.splitlines() if " BROKEN" in line]
    assert len(broken) == len(contracts), r.stdout
    assert {c for c in CONTRACTS for line in broken if line.startswith(c)} == contracts, r.stdout


def _table(heading: str) -> list[list[str]]:
    """The first cells' backticked names of each row of the table under DESIGN.md's `heading`,
    bold (package) rows marked by a leading "**"."""
    text = (ROOT / "docs/DESIGN.md").read_text().split(f"\n## {heading}", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| ") and "`" in line.split(" | ")[0]]
    return [(["**"] if row.startswith("| **") else []) + re.findall(r"`([^`]+)`", row) for row in rows]


def test_design_module_map_lists_every_module_and_nothing_else():
    """Each module of eapcore has its row in DESIGN.md's module map (a subpackage's modules as
    `engine/x.py`), every row names a file that exists, and every package row a folder."""
    listed = set()
    for row in _table("Module map"):
        if row[:1] == ["**"]:
            assert all((ROOT / name).exists() for name in row[1:]), row
        else:
            listed |= {name if name.startswith("eapcore/") else f"eapcore/{name}" for name in row}
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "eapcore").rglob("*.py") if p.name != "__init__.py"}
    assert sorted(modules - listed) == [] and sorted(listed - modules) == []


def test_design_layers_table_is_the_layers_contract():
    """DESIGN.md's layers, from `eapcore.views` down, are .importlinter's, in the same order."""
    config = configparser.ConfigParser()
    config.read(ROOT / ".importlinter")
    layers = config["importlinter:contract:layers"]["layers"].strip().splitlines()
    contract = [{name.strip() for name in line.split("|")} for line in layers]
    table = [set(row) for row in _table("Layers (who may import whom)") if row[0].startswith("eapcore.")]
    assert table == contract
