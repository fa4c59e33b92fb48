"""Cache: atomic checksummed entries, damage detection, locks across processes, bundles, CLI."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from eapcore.runs.cache import Cache, CacheError, export_bundle, import_bundle
from eapcore.specs import SCORING_VERSION

PROJECT = Path(__file__).resolve().parents[1]


def writer(files: dict[str, bytes]):
    def write(folder: Path) -> None:
        for name, data in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
    return write


def hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def cache(tmp_path) -> Cache:
    return Cache(tmp_path / "cache")


def test_put_get_and_manifest(cache):
    assert cache.get("scores", "k1") is None
    entry = cache.put("scores", "k1", writer({"a.bin": b"abc", "sub/b.json": b"{}"}), {"model": "m"})
    got = cache.get("scores", "k1")
    assert got is not None and got.path == entry.path and got.meta == {"model": "m"}
    assert got.file("a.bin").read_bytes() == b"abc"
    assert got.manifest["files"]["sub/b.json"] == {"sha256": hashlib.sha256(b"{}").hexdigest(), "size": 2}
    assert [p.name for p in (cache.root / "scores").iterdir()] == ["k1"]  # no temporary folder left


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_damaged_entry_is_reported_removed_and_recomputed(cache, damage, caplog):
    cache.put("grades", "k", writer({"answers.jsonl": b'{"idx": 1}\n' * 50}))
    path = cache.entry_path("grades", "k")
    target = path / "answers.jsonl"
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[100] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-7])
    elif damage == "delete":
        target.unlink()
    else:
        (path / "manifest.json").write_text('{"files": ')
    assert cache.get("grades", "k") is None
    assert not path.exists()
    assert "grades/k is damaged" in cache.problems[0] and "grades/k is damaged" in caplog.text
    assert [e["event"] for e in cache.events()] == ["computed", "corrupted"]
    entry, computed = cache.get_or_compute("grades", "k", writer({"answers.jsonl": b"new\n"}))
    assert computed and entry.file("answers.jsonl").read_bytes() == b"new\n"


def test_failed_write_leaves_nothing(cache):
    def boom(folder: Path) -> None:
        (folder / "half.bin").write_bytes(b"x")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        cache.put("scores", "k", boom)
    assert cache.get("scores", "k") is None
    assert list((cache.root / "scores").iterdir()) == []


def test_get_or_compute_computes_once(cache):
    calls = []
    for _ in range(3):
        entry, computed = cache.get_or_compute("selections", "s", lambda f: calls.append(1) or writer({"x": b"1"})(f))
    assert len(calls) == 1 and not computed


WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from eapcore.runs.cache import Cache

    cache, counter = Cache(sys.argv[1]), Path(sys.argv[2])
    def write(folder):
        with open(counter, "a") as fh:
            fh.write("computed\\n")
        time.sleep(1.0)  # long enough for the other process to ask meanwhile
        (folder / "result.txt").write_text("42")
    entry, _ = cache.get_or_compute("scores", "same-key", write)
    print(entry.file("result.txt").read_text())
""")


def test_two_processes_compute_an_entry_once(cache, tmp_path):
    counter = tmp_path / "counter.txt"
    cmd = [sys.executable, "-c", WORKER, str(cache.root), str(counter)]
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [o[0].decode().strip() for o in outs] == ["42", "42"]
    assert counter.read_text().splitlines() == ["computed"]
    assert cache.get("scores", "same-key").file("result.txt").read_text() == "42"


PUTTER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from eapcore.runs.cache import Cache

    cache, start, n = Cache(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    for i in range(10):
        def write(folder, i=i):  # every writer of entry i finishes at the same moment, then renames
            (folder / "result.txt").write_text(n)
            time.sleep(max(0.0, start + 0.3 * i - time.time()))
        cache.put("scores", f"shared-{i}", write)
    print("ok")
""")


def test_processes_putting_the_same_entries_never_race(cache):
    """Writers of one entry (two runs sharing samples) rename into place under the entry's lock:
    no ENOTEMPTY, exactly one copy stored per entry, every later one dropped."""
    import time

    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    start = time.time() + 3
    procs = [subprocess.Popen([sys.executable, "-c", PUTTER, str(cache.root), str(start), str(n)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for n in range(6)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, [o[1].decode()[-2000:] for o in outs]
    stored = [e for e in cache.events() if e["event"] == "computed" and e["stored"]]
    assert sorted(e["key"] for e in stored) == sorted(f"shared-{i}" for i in range(10))
    for i in range(10):
        assert cache.get("scores", f"shared-{i}").file("result.txt").read_text() in "012345"
    assert not [p for p in (cache.root / "scores").iterdir() if p.name.startswith(".tmp")]


def test_entries_and_files_are_fsynced_before_and_after_the_rename(cache, monkeypatch):
    """Durable writes: every file of a new entry and its folder reach the disk before the rename
    that publishes it, and the parent folder (the rename) after it; likewise atomic files."""
    from eapcore import files

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a), str(b))) or real_replace(a, b))
    entry = cache.put("scores", "k", writer({"a.bin": b"abc", "sub/b.bin": b"x"}))
    rename = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(entry.path))
    tmp = events[rename][1]
    synced_before = {e[1] for e in events[:rename] if e[0] == "fsync"}
    assert {f"{tmp}/a.bin", f"{tmp}/sub/b.bin", f"{tmp}/sub", f"{tmp}/manifest.json", tmp} <= synced_before
    assert ("fsync", str(entry.path.parent)) in events[rename:]
    events.clear()
    files.write_json_atomic(cache.root / "x.json", {"a": 1})
    kinds = [e[0] for e in events]
    assert kinds == ["fsync", "replace", "fsync"] and events[2][1] == str(cache.root)


def test_file_hashes_are_memoised_per_file_version_across_processes(cache, tmp_path, monkeypatch):
    """A file is hashed once per version (path, size, mtime_ns, inode): another process reuses
    the hash from hashes.jsonl; a changed file is hashed again."""
    import hashlib

    from eapcore.runs import cache as cache_module

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(os.urandom(4096))
    out = subprocess.run([sys.executable, "-c", "import sys; from eapcore.runs.cache import Cache; "
                          "print(Cache(sys.argv[1]).file_sha256(sys.argv[2]))", str(cache.root), str(weights)],
                         env={**os.environ, "PYTHONPATH": str(PROJECT)}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == hashlib.sha256(weights.read_bytes()).hexdigest()
    monkeypatch.setattr(cache_module, "_HASHES", {})
    monkeypatch.setattr(cache_module, "sha256_file", lambda path: pytest.fail(f"{path} hashed again"))
    assert cache.file_sha256(weights) == out.stdout.strip()  # from the other process's line
    data = bytearray(weights.read_bytes())
    data[2048] ^= 1  # a change in the middle
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(cache_module, "sha256_file", lambda path: hashlib.sha256(Path(path).read_bytes()).hexdigest())
    assert cache.file_sha256(weights) == hashlib.sha256(bytes(data)).hexdigest() != out.stdout.strip()


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
    assert err.err.strip() == said and "installed 3, kept 0 existing, refused 1 stale run(s)" in err.out
    other = Cache(tmp_path / "other")
    assert sorted(p.name for p in (other.root / "runs").iterdir()) == ["newrun"]
    assert other.get("scores", "s1") is not None and not other.entry_path("scores", "old-only").exists()
    export_bundle(cache, ["oldrun"], tmp_path / "old.zip")
    assert cli.main(["import", str(tmp_path / "old.zip")]) == 1  # nothing usable in it


def test_lock_is_released_when_its_holder_is_killed(cache):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from eapcore.runs.cache import Cache; "
                               "l = Cache(sys.argv[1]).lock('run-x'); l.acquire(); print('held', flush=True); "
                               "time.sleep(60)", str(cache.root)],
                              env={**os.environ, "PYTHONPATH": str(PROJECT)}, stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == b"held"
    assert cache.is_locked("run-x")
    holder.kill()
    holder.wait()
    assert not cache.is_locked("run-x")


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
