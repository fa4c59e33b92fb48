"""The runs' cache: sealed run folders, bundles, listing and the `cache` command, model keys
(the store under it: test_store.py)."""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import pytest

from eapcore.runs.cache import Cache, CacheError, export_bundle, import_bundle
from eapcore.specs import SCORING_VERSION
from test_store import writer


def hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def cache(tmp_path) -> Cache:
    return Cache(tmp_path / "cache")


def test_model_fingerprints_hash_whole_files(tmp_path, monkeypatch):
    """Two large checkpoints that differ only in the middle of a weights file (sparse files of
    300 MB: the old fingerprint read the first and last 16 MB) have different identities."""
    from eapcore.runs import keys
    from eapcore.specs import ModelSpec

    monkeypatch.setenv("EAP_CACHE_DIR", str(tmp_path / "cache"))
    ids = []
    for name, byte in (("a", b"\x01"), ("b", b"\x02")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        with open(folder / "model.safetensors", "wb") as fh:
            fh.truncate(300 << 20)
            fh.seek(150 << 20)
            fh.write(byte)
        ids.append(keys.model_identity(ModelSpec(str(folder))))
    assert ids[0]["files"]["config.json"] == ids[1]["files"]["config.json"]
    assert ids[0]["files"]["model.safetensors"] != ids[1]["files"]["model.safetensors"]


def test_hub_models_are_keyed_by_the_commit_of_their_revision(tmp_path, monkeypatch):
    """A hub id's identity is the commit its revision names in the local Hugging Face cache (the
    default branch moves); a commit hash is itself; unknown here and offline: the name as given."""
    from huggingface_hub import constants

    from eapcore.runs import keys
    from eapcore.specs import ModelSpec

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--org--name"
    for ref, commit in (("main", "a" * 40), ("v1", "b" * 40)):
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    identity = keys.model_identity(ModelSpec("org/name"))
    assert identity == {"hub": "org/name", "revision": "a" * 40, "trust_remote_code": False}
    assert keys.model_identity(ModelSpec("org/name", revision="v1"))["revision"] == "b" * 40
    assert keys.model_identity(ModelSpec("org/name", revision="c" * 40))["revision"] == "c" * 40
    assert keys.model_identity(ModelSpec("org/other", revision="v2"))["revision"] == "v2"
    (repo / "refs" / "main").write_text("d" * 40)  # the branch moved and the new commit was fetched
    (repo / "snapshots" / ("d" * 40)).mkdir()
    (repo / "snapshots" / ("d" * 40) / "config.json").write_text("{}")
    assert keys.model_identity(ModelSpec("org/name"))["revision"] == "d" * 40


def test_import_refuses_runs_of_another_scoring_version(cache, tmp_path, capsys, monkeypatch):
    """A bundle's runs must carry this code's scoring version: others are stale and not imported,
    nor the entries only they use; the command says so in one line per run."""
    from eapcore import cli

    cache.put("scores", "old-only", writer({"scores.safetensors": b"old"}))
    make_run(cache, "oldrun", version="0")
    cache.seal_run("oldrun", [("generations", "g1"), ("scores", "old-only")], skip=("status.json",))
    make_run(cache, "newrun")
    export_bundle(cache, ["oldrun", "newrun"], tmp_path / "b.zip")
    monkeypatch.setenv("EAP_CACHE_DIR", str(tmp_path / "other"))
    assert cli.main(["import", str(tmp_path / "b.zip")]) == 0
    err = capsys.readouterr()
    said = ("warning: runs/oldrun: computed with scoring version '0' while this code computes "
            f"'{SCORING_VERSION}': its scores are stale, so it is not imported; run its spec again here")
    assert err.err.strip() == said and "installed 3 cache entries (1 run), kept 0 cache entries (0 runs) already there, refused 1 stale run(s)" \
        in err.out
    (tmp_path / "not.zip").write_text("not a zip")
    assert cli.main(["import", str(tmp_path / "not.zip")]) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"error: {tmp_path / 'not.zip'}: not a readable zip bundle") and line.count("not.zip") == 1
    other = Cache(tmp_path / "other")
    assert sorted(p.name for p in (other.root / "runs").iterdir()) == ["newrun"]
    assert other.get("scores", "s1") is not None and not other.entry_path("scores", "old-only").exists()
    export_bundle(cache, ["oldrun"], tmp_path / "old.zip")
    assert cli.main(["import", str(tmp_path / "old.zip")]) == 1  # nothing usable in it


def make_run(cache: Cache, key: str = "run1", version: str = SCORING_VERSION) -> None:
    cache.put("generations", "g1", writer({"answers.jsonl": b"a\n"}))
    cache.put("scores", "s1", writer({"scores.safetensors": os.urandom(256)}))
    folder = cache.run_dir(key)
    folder.mkdir(parents=True)
    (folder / "spec.json").write_text(json.dumps({"key": key, "spec": {"pair": {"name": "p"}, "dataset": {"name": "d"},
                                                                      "selection": {"alpha": 0.5},
                                                                      "scoring_version": version}}))
    (folder / "status.json").write_text(json.dumps({"stage": "done"}))
    (folder / "base").mkdir()
    (folder / "base" / "scores.safetensors").write_bytes(os.urandom(512))
    cache.seal_run(key, [("generations", "g1"), ("scores", "s1")], skip=("status.json",))


def test_sealed_run_verification(cache):
    make_run(cache)
    assert cache.verify_run("run1") == []
    assert cache.run_entries("run1") == [("generations", "g1"), ("scores", "s1")]
    (cache.run_dir("run1") / "status.json").write_text("{}")  # mutable, not sealed
    assert cache.verify_run("run1") == []
    (cache.run_dir("run1") / "base" / "scores.safetensors").write_bytes(b"short")
    assert "truncated" in cache.verify_run("run1")[0]


def test_bundle_round_trip_is_bit_exact(cache, tmp_path):
    make_run(cache)
    bundle = export_bundle(cache, ["run1"], tmp_path / "b.zip")
    assert set(bundle["files"]) >= {"runs/run1/spec.json", "generations/g1/answers.jsonl", "scores/s1/manifest.json"}
    other = Cache(tmp_path / "other")
    result = import_bundle(other, tmp_path / "b.zip")
    assert sorted(result["installed"]) == ["generations/g1", "runs/run1", "scores/s1"]
    for rel in ("runs/run1", "generations/g1", "scores/s1"):
        assert hashes(other.root / rel) == hashes(cache.root / rel)
    assert import_bundle(other, tmp_path / "b.zip")["kept"] == ["generations/g1", "runs/run1", "scores/s1"]


def test_export_refuses_unfinished_or_damaged(cache, tmp_path):
    make_run(cache)
    (cache.entry_path("scores", "s1") / "scores.safetensors").write_bytes(b"x")
    with pytest.raises(CacheError, match="scores/s1"):
        export_bundle(cache, ["run1"], tmp_path / "b.zip")
    with pytest.raises(CacheError, match="not a finished"):
        export_bundle(cache, ["nope"], tmp_path / "b.zip")


def _rezip(src: Path, dst: Path, change) -> None:
    """Copy a bundle, letting change(name, data) -> [(name, data, ZipInfo|None)] alter members."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            for name, data, zinfo in change(info.filename, zin.read(info.filename)):
                zout.writestr(zinfo or name, data)


@pytest.mark.parametrize("attack", ["traversal", "absolute", "symlink", "tampered", "unlisted"])
def test_import_refuses_unsafe_or_damaged_bundles(cache, tmp_path, attack):
    make_run(cache)
    export_bundle(cache, ["run1"], tmp_path / "b.zip")
    bad = tmp_path / "bad.zip"

    def change(name, data):
        out = [(name, data, None)]
        if name == "runs/run1/spec.json":
            if attack == "traversal":
                out.append(("runs/run1/../../../evil.txt", b"x", None))
            elif attack == "absolute":
                out.append(("/tmp/evil.txt", b"x", None))
            elif attack == "symlink":
                link = zipfile.ZipInfo("runs/run1/link")
                link.external_attr = (0o120777 << 16)
                out.append(("runs/run1/link", b"/etc/passwd", link))
            elif attack == "tampered":
                out = [(name, data.replace(b'"p"', b'"q"'), None)]
            else:
                out.append(("runs/run1/extra.txt", b"x", None))
        return out

    _rezip(tmp_path / "b.zip", bad, change)
    other = Cache(tmp_path / "other")
    with pytest.raises(CacheError):
        import_bundle(other, bad)
    assert not (tmp_path / "evil.txt").exists() and not other.run_dir("run1").exists()


def test_listing_size_remove_clear_and_cli(cache, monkeypatch, capsys):
    from eapcore.runs.cache import command

    make_run(cache)
    rows = cache.list_entries()
    assert {(r["kind"], r["key"]) for r in rows} == {("generations", "g1"), ("scores", "s1"), ("runs", "run1")}
    assert next(r for r in rows if r["kind"] == "runs")["about"] == "p | d | alpha 0.5 | done"
    assert cache.size()["runs"] > 512
    monkeypatch.setenv("EAP_CACHE_DIR", str(cache.root))
    assert command(["list"]) == 0 and "3 item(s)" in capsys.readouterr().out
    assert command(["size"]) == 0 and "total" in capsys.readouterr().out
    with pytest.raises(CacheError, match="too short"):
        cache.remove("r")
    assert command(["rm", "run1"]) == 0 and "removed runs/run1" in capsys.readouterr().out
    assert command(["rm", "missing-key"]) == 1
    assert command(["clear"]) == 1  # not confirmed
    assert command(["clear", "--yes"]) == 0
    assert cache.list_entries() == []
    with pytest.raises(CacheError, match="invalid key"):
        cache.entry_path("scores", "../up")
