"""The content-addressed store: atomic checksummed entries, damage detection, locks across
processes, the hash memo; the runs' cache reads and writes the same layout."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from eapcore.store import CacheError, Store

PROJECT = Path(__file__).resolve().parents[1]


def writer(files: dict[str, bytes]):
    def write(folder: Path) -> None:
        for name, data in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
    return write


@pytest.fixture
def cache(tmp_path) -> Store:
    return Store(tmp_path / "cache")


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
    from eapcore.store import Store

    cache, counter = Store(sys.argv[1]), Path(sys.argv[2])
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
    from eapcore.store import Store

    cache, start, n = Store(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
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

    from eapcore import store as store_module

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(os.urandom(4096))
    out = subprocess.run([sys.executable, "-c", "import sys; from eapcore.store import Store; "
                          "print(Store(sys.argv[1]).file_sha256(sys.argv[2]))", str(cache.root), str(weights)],
                         env={**os.environ, "PYTHONPATH": str(PROJECT)}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == hashlib.sha256(weights.read_bytes()).hexdigest()
    monkeypatch.setattr(store_module, "_HASHES", {})
    monkeypatch.setattr(store_module, "sha256_file", lambda path: pytest.fail(f"{path} hashed again"))
    assert cache.unhashed_bytes(weights) == 0 and cache.unhashed_bytes(tmp_path / "nothing") == 0
    assert cache.file_sha256(weights) == out.stdout.strip()  # from the other process's line
    data = bytearray(weights.read_bytes())
    data[2048] ^= 1  # a change in the middle
    weights.write_bytes(bytes(data))
    assert cache.unhashed_bytes(weights) == cache.unhashed_bytes(tmp_path) == 4096  # the new version, alone in it
    monkeypatch.setattr(store_module, "sha256_file", lambda path: hashlib.sha256(Path(path).read_bytes()).hexdigest())
    assert cache.file_sha256(weights) == hashlib.sha256(bytes(data)).hexdigest() != out.stdout.strip()


def test_lock_is_released_when_its_holder_is_killed(cache):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from eapcore.store import Store; "
                               "l = Store(sys.argv[1]).lock('run-x'); l.acquire(); print('held', flush=True); "
                               "time.sleep(60)", str(cache.root)],
                              env={**os.environ, "PYTHONPATH": str(PROJECT)}, stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == b"held"
    assert cache.is_locked("run-x")
    holder.kill()
    holder.wait()
    assert not cache.is_locked("run-x")


def test_the_runs_cache_shares_the_layout_and_the_store_lists_finds_and_removes(cache):
    """The runs' Cache is this store plus run folders: what one writes the other reads, in one
    layout (the engine's `models/` entries beside the stages'); listing, search by key prefix
    (scratch folders included), removal and clearing need nothing of runs."""
    from eapcore.runs.cache import Cache

    entry = cache.put("models", "abcd1234", writer({"config.json": b"{}"}), {"model": "x.gguf", "kind": "gguf"})
    runs_view = Cache(cache.root)
    assert runs_view.get("models", "abcd1234") == entry
    runs_view.put("scores", "ef567890", writer({"a.bin": b"1"}))
    assert cache.get("scores", "ef567890").file("a.bin").read_bytes() == b"1"
    assert [(r["kind"], r["key"], r["about"]) for r in cache.list_entries()] == \
        [("models", "abcd1234", "kind=gguf, model=x.gguf"), ("scores", "ef567890", "")]
    assert runs_view.list_entries() == cache.list_entries()
    for store, kind in ((cache, "work"), (cache, "locks"), (runs_view, "runs")):
        with pytest.raises(CacheError, match="reserved"):
            store.entry_path(kind, "k")
    (cache.work_dir("scores", "ef567890") / "part").write_bytes(b"12")
    assert sorted(p.relative_to(cache.root).as_posix() for p in cache.find("ef56")) == \
        ["scores/ef567890", "work/scores-ef567890"]
    assert sorted(cache.remove("ef56")) == ["scores/ef567890", "work/scores-ef567890"]
    assert cache.get("scores", "ef567890") is None and cache.size()["models"] > 0
    assert cache.clear() > 0 and cache.list_entries() == [] and not cache.find("abcd")
