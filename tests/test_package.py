"""The package: pyproject.toml's dependencies and extras are the requirements files', a wheel holds
every module and the demo data, and `pip install` of it (and `pip install -e` of a checkout) gives
an `eapcore` command that works outside the checkout.

Installs go into throwaway virtual environments that see this interpreter's installed
dependencies through a .pth file (never the checkout): `pip install --no-deps`, no index, no
build isolation, so nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(".git", ".venv", "cache", "test-output", "build", "dist", "*.egg-info",
                                "__pycache__", ".pytest_cache", ".import_linter_cache")


def requirement_lines(path: Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines()
            if line.split("#")[0].strip() and not line.startswith("-r")]


def test_pyproject_dependencies_are_the_requirements_files():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    assert project["project"]["optional-dependencies"]["dev"] == requirement_lines(ROOT / "requirements-dev.txt")
    assert set(project["project"]["optional-dependencies"]["ray"]) <= set(requirement_lines(ROOT / "requirements-dev.txt"))
    assert project["project"]["scripts"] == {"eapcore": "eapcore.cli:main"}
    listed = set(project["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "eapcore").rglob("__init__.py")}
    assert on_disk | {"eapcore.demo"} == listed, "pyproject.toml [tool.setuptools] packages must list every subpackage"


def _run(cmd: list, cwd: Path, env: dict | None = None, timeout: float = 300) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _venv(folder: Path) -> Path:
    """A fresh venv whose python also sees this interpreter's site-packages (the dependencies), not the checkout."""
    _run([sys.executable, "-m", "venv", "--without-pip", folder], folder.parent)
    purelib = Path(subprocess.check_output([folder / "bin" / "python", "-c",
                                            "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                           text=True).strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (purelib / "_eapcore_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    return folder / "bin"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A copy of the checkout (builds write build/ and *.egg-info next to the sources)."""
    src = tmp_path_factory.mktemp("src") / "eapcore-src"
    shutil.copytree(ROOT, src, ignore=IGNORE)
    return src


@pytest.fixture(scope="module")
def wheel(source, tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", source,
          "-w", dist], source)
    return next(dist.glob("eapcore-*.whl"))


def _user_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("EAP_CACHE_DIR", "EAP_REGISTRY", "PYTHONPATH")}
    return env | {"XDG_CACHE_HOME": str(home / "xdg-cache"), "XDG_CONFIG_HOME": str(home / "xdg-config"),
                  "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def test_wheel_holds_every_module_the_demo_and_the_pinned_dependencies(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "eapcore").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    demo = {"eapcore/" + p.relative_to(ROOT).as_posix() for p in (ROOT / "demo").rglob("*") if p.is_file()}
    assert demo and demo <= names, sorted(demo - names)
    assert not any(n.startswith(("pages/", "tests/", "app.py")) for n in names)
    assert "[console_scripts]\neapcore = eapcore.cli:main" in entry
    requires = [line.removeprefix("Requires-Dist: ") for line in meta.splitlines() if line.startswith("Requires-Dist: ")]
    assert [r for r in requires if "extra ==" not in r] == requirement_lines(ROOT / "requirements.txt")


def test_installed_wheel_runs_outside_the_checkout(wheel, tmp_path):
    """`pip install` of the wheel: `eapcore` is `python -m eapcore`, imports the installed copy,
    keeps its cache and registry in the user's folders, and finds the demo pairs' checkpoints and
    runs inside the package."""
    bin_ = _venv(tmp_path / "venv")
    _run([bin_ / "python", "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = _user_env(tmp_path)
    where = _run([bin_ / "python", "-c", "import eapcore, eapcore.files as f; print(eapcore.__file__, f.IN_CHECKOUT)"],
                 work, env)
    assert where.split()[0].startswith(str(tmp_path / "venv")) and where.split()[1] == "False"
    assert _run([bin_ / "eapcore", "--help"], work, env) == _run([bin_ / "python", "-m", "eapcore", "--help"], work, env)
    pairs = json.loads(_run([bin_ / "eapcore", "pairs", "list", "--json"], work, env))
    demo = next(p for p in pairs if p["name"] == "demo: SFT vs GRPO")
    assert demo["builtin"] and demo["base"]["name_or_path"] == "demo/sft"
    problems = tmp_path / "mine.jsonl"
    problems.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "2"}) + "\n")
    _run([bin_ / "eapcore", "datasets", "add", "mine", "--source", problems], work, env)
    registry = tmp_path / "xdg-config" / "eapcore" / "registry.json"
    assert [d["name"] for d in json.loads(registry.read_text())["datasets"]] == ["mine"]
    # the demo checkpoints resolve inside the installed package: the memory prediction reads their configs
    predicted = json.loads(_run([bin_ / "eapcore", "run", "--pair", "demo: SFT vs GRPO", "--dataset", "demo",
                                 "--device", "cpu", "--predict"], work, env))
    assert predicted["fits"] and predicted["device"] == "cpu"
    bundle = tmp_path / "venv" / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / \
        "site-packages" / "eapcore" / "demo" / "runs.zip"
    _run([bin_ / "eapcore", "import", bundle], work, env)
    assert len(list((tmp_path / "xdg-cache" / "eapcore" / "runs").iterdir())) >= 8
    assert not (work / "cache").exists() and not (work / "registry.json").exists()


def test_editable_install_runs_the_checkout(source, tmp_path):
    bin_ = _venv(tmp_path / "venv")
    _run([bin_ / "python", "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-e",
          source], tmp_path)
    env = _user_env(tmp_path)
    where = _run([bin_ / "python", "-c", "import eapcore, eapcore.files as f; print(eapcore.__file__, f.IN_CHECKOUT)"],
                 tmp_path, env)
    assert where.split() == [str(source / "eapcore" / "__init__.py"), "True"]
    assert "pairs" in _run([bin_ / "eapcore", "--help"], tmp_path, env)
