"""Faults of issue 15 answered in one line that says what is wrong and what to do: broken model
folders (config.json not JSON, truncated weights, a missing shard, custom code without opt-in) at
every entry point, a relative path with one slash, an unreachable hub (one quick probe, no
retries), a read-only cache or one that is not a folder (finished runs stay viewable), the cache
root's `~` expanded once for writers and readers.

The read-only disk is real: a read-only bind mount in a user and mount namespace (`unshare -rm`,
no root needed; the test is skipped where the kernel forbids user namespaces).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from eapcore import cli, modelfiles
from eapcore.engine.models import ModelLoadError, load_model
from eapcore.runs import keys, registry
from eapcore.specs import ModelSpec, PairSpec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_runs import make_run  # noqa: E402

FAULTS = {  # fault: what the one line must say
    "config": r"config\.json is not valid JSON \(Expecting property name enclosed in double quotes at line 1, "
              r"column 2\); re-download the model or fix the file",
    "truncated": r"model\.safetensors is truncated or damaged \(\d+ of \d+ bytes\)\. Re-download \(or copy again\) "
                 r"the model",
    "shard": r"model-00002-of-00002\.safetensors \(listed in model\.safetensors\.index\.json\) is missing\. Re-download",
    "custom": r"runs its own Python code \(model type 'mymodel', auto_map in config\.json\), which needs your opt-in: "
              r"pass --trust-remote-code \(commands generate, attribute\), or set \"trust_remote_code\": true",
}


def broken_copy(good: Path, folder: Path, fault: str) -> Path:
    """A copy of checkpoint `good` with one fault."""
    shutil.copytree(good, folder)
    if fault == "config":
        (folder / "config.json").write_text("{not json")
    elif fault == "truncated":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif fault == "shard":
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    elif fault == "custom":
        config = json.loads((folder / "config.json").read_text())
        config.update(model_type="mymodel", auto_map={"AutoConfig": "configuration_my.MyConfig",
                                                      "AutoModelForCausalLM": "modeling_my.MyModel"})
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "configuration_my.py").write_text("raise SystemExit('custom code ran')\n")
    return folder


def one_error_line(err: str) -> str:
    """The single `error:` line of a command's stderr (no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("fault", list(FAULTS))
def test_broken_model_folders_are_one_line_everywhere(fault, checkpoints, tmp_path, monkeypatch, capsys):
    folder = broken_copy(checkpoints["llama"], tmp_path / f"model-{fault}", fault)
    monkeypatch.setenv("EAP_REGISTRY", str(tmp_path / "registry.json"))
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"idx": 0, "prompt_token_ids": [5, 6, 7], "generate_token_ids": [[8, 9, 10]]}) + "\n")
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "2"}) + "\n")

    assert cli.main(["attribute", "--model", str(folder), "--samples", str(samples), "--cut-len", "2",
                     "--device", "cpu", "--out", str(tmp_path / "out")]) == 2
    assert re.search(FAULTS[fault], one_error_line(capsys.readouterr().err))
    assert cli.main(["generate", "--model", str(folder), "--source", str(problems), "--out",
                     str(tmp_path / "answers.jsonl"), "--no-progress"]) == 2
    assert re.search(FAULTS[fault], one_error_line(capsys.readouterr().err))
    with pytest.raises(registry.RegistryError, match=f"pair 'p': tuned model: .*{FAULTS[fault]}"):
        registry.add_pair(PairSpec("p", ModelSpec(str(checkpoints["llama"])), ModelSpec(str(folder))))
    with pytest.raises(ModelLoadError, match=FAULTS[fault]):
        load_model(str(folder))
    assert not (tmp_path / "out").exists() and not (tmp_path / "answers.jsonl").exists()
    if fault == "custom":  # opted in, its code runs (and here refuses itself)
        with pytest.raises(SystemExit, match="custom code ran"):
            modelfiles.load_config(str(folder), trust_remote_code=True)


def test_a_relative_path_with_one_slash_is_a_folder(checkpoints, tmp_path, monkeypatch):
    """`models/x` on disk is a folder wherever it is used, and is saved in the registry so that it
    still is from the project folder (where workers run)."""
    monkeypatch.setenv("EAP_REGISTRY", str(tmp_path / "registry.json"))
    monkeypatch.chdir(tmp_path)
    shutil.copytree(checkpoints["llama"], tmp_path / "models" / "x")
    assert modelfiles.local_folder("models/x") == Path("models/x")
    assert load_model("models/x").arch == "llama"
    pair = registry.add_pair(PairSpec("rel", ModelSpec("models/x"), ModelSpec("models/x")))
    assert pair.base.name_or_path == str(tmp_path / "models" / "x")
    monkeypatch.chdir(ROOT)
    assert "files" in keys.model_identity(registry.get_pair("rel").base)
    with pytest.raises(ModelLoadError, match=rf"model 'models/nope' is not a folder here \({ROOT}\) nor in the "
                                             "local Hugging Face cache"):
        load_model("models/nope")


class CountingServer:
    """A local TCP endpoint that counts connections and closes each at once (a hub that answers
    nothing)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self):
        self.sock.close()


def test_an_unreachable_hub_is_one_probe_and_one_line(tmp_path):
    """The offline variables unset: one probe of the hub, then one line (transformers would retry
    for about 25 s). Run as a command in a fresh process, where the hub libraries are online."""
    server = CountingServer()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "hf"))
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "2"}) + "\n")
    r = subprocess.run([sys.executable, "-m", "eapcore", "generate", "--model", "some-org/some-model", "--source",
                        str(problems), "--out", str(tmp_path / "a.jsonl")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    server.close()
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert f"model 'some-org/some-model' is not a folder here ({ROOT}) nor in the local Hugging Face cache, and the " \
           f"hub is unreachable ({server.url} did not answer within 3 s" in line, line
    assert line.endswith("download it on a connected machine and give its local folder")
    # our probe, and huggingface_hub's own one-time fetch of its agent list (3 s timeout, no retry);
    # transformers' download with retries would connect again and again for about 25 s
    assert server.connections <= 2


def test_an_unreachable_dataset_source_is_one_line(monkeypatch):
    from huggingface_hub import constants

    from eapcore.answers.data import load_problems
    from eapcore.specs import DatasetSpec

    server = CountingServer()
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(modelfiles, "_probes", {})
    with pytest.raises(ValueError, match=rf"could not load dataset 'openai/gsm8k#main': the hub is unreachable "
                                         rf"\({server.url} did not answer within 3 s"):
        load_problems(DatasetSpec("gsm8k"))
    with pytest.raises(ValueError, match=rf"could not load dataset '{server.url}/x.jsonl': {server.url} did not "
                                         "answer within 3 s.*Give a local .jsonl/.csv file"):
        load_problems(DatasetSpec("web", source=f"{server.url}/x.jsonl"))
    server.close()
    assert server.connections == 1  # the same address: probed once


# ---- the cache root ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def namespaces():
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("user namespaces are not available here (unshare -rm), so no read-only mount can be made")


def in_namespace(mounts: str, script: str, env: dict) -> subprocess.CompletedProcess:
    """Run python `script` in the project folder inside a new user and mount namespace, after
    the shell commands `mounts`."""
    return subprocess.run(["unshare", "-rm", "sh", "-c", f'{mounts} && exec "{sys.executable}" -c "$0"', script],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _run_json(spec_json: Path, tmp_path: Path, alpha: float) -> Path:
    """A spec file for the run of `spec_json` with another alpha (a run the cache does not hold)."""
    data = json.loads(spec_json.read_text())["spec"]
    data["selection"]["alpha"] = alpha
    path = tmp_path / f"spec-{alpha}.json"
    path.write_text(json.dumps(data))
    return path


PAGES_SCRIPT = """
import json, sys
from eapcore import cli
from eapcore.views import query
from streamlit.testing.v1 import AppTest
rc = cli.main(["run", "--spec-json", sys.argv[1], "--quiet"])
data = query.load_run(sys.argv[2])
out = {"rc": rc, "n": len(data.sample_ids)}
for page in ("pages/heatmaps.py", "pages/run.py"):
    at = AppTest.from_file("app.py", default_timeout=120)
    at.switch_page(page).run()
    out[page] = {"exceptions": [e.message for e in at.exception], "warnings": [w.value for w in at.warning],
                 "start_disabled": [b.disabled for b in at.button if b.label == "▶ Start run"],
                 "charts": len(at.get("plotly_chart"))}
print(json.dumps(out))
"""


def test_a_read_only_cache_serves_finished_runs_and_says_why_nothing_runs(namespaces, tmp_path):
    cache = tmp_path / "cache"
    key = make_run(cache, pair="RO", dataset="gsm8k", alpha=0.5)
    spec = _run_json(cache / "runs" / key / "spec.json", tmp_path, 0.3)
    env = dict(os.environ, EAP_CACHE_DIR=str(cache), EAP_REGISTRY=str(tmp_path / "registry.json"))
    mounts = f"mount --bind {cache} {cache} && mount -o remount,bind,ro {cache}"
    script = "import sys; sys.argv[1:] = [%r, %r]\n" % (str(spec), key) + PAGES_SCRIPT
    r = in_namespace(mounts, script, env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    said = f"the cache root {cache} is read-only: finished runs can be viewed, but no run can start or resume; " \
           "set EAP_CACHE_DIR to a writable folder"
    assert out["rc"] == 1 and said in one_error_line(r.stderr)
    assert out["n"] == 12  # the finished run loads
    heat = out["pages/heatmaps.py"]
    assert not heat["exceptions"] and heat["charts"] >= 1 and any(said in w for w in heat["warnings"])
    run = out["pages/run.py"]
    assert not run["exceptions"] and any(said in w for w in run["warnings"]) and run["start_disabled"] == [True]
    assert not list(cache.rglob("*.tmp*")) and not (cache / "locks").exists()


def test_a_cache_root_that_is_a_file_is_one_line(tmp_path, monkeypatch, capsys):
    from streamlit.testing.v1 import AppTest

    from eapcore.runs import workers
    from eapcore.runs.commands import load_spec_json
    from eapcore.runs.errors import RunError

    other = tmp_path / "cache"
    key = make_run(other, pair="F", dataset="gsm8k", alpha=0.5)
    spec = _run_json(other / "runs" / key / "spec.json", tmp_path, 0.3)
    not_a_folder = tmp_path / "cache.txt"
    not_a_folder.write_text("a file")
    monkeypatch.setenv("EAP_CACHE_DIR", str(not_a_folder))
    said = f"the cache root {not_a_folder} is not a folder ({not_a_folder} is a file); set EAP_CACHE_DIR to a folder"
    assert cli.main(["run", "--spec-json", str(spec), "--quiet"]) == 1
    assert said in one_error_line(capsys.readouterr().err)
    for action in (["list"], ["size"]):  # not "0 item(s) in" a file
        assert cli.main(["cache", *action]) == 2
        out, err = capsys.readouterr()
        assert out == "" and one_error_line(err) == f"error: {said}"
    with pytest.raises(RunError, match="is not a folder"):
        workers.start(load_spec_json(str(spec)))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.switch_page("pages/home.py").run()
    assert not at.exception and any(said in w.value for w in at.warning)


def test_the_cache_root_expands_tilde_once_for_writers_and_readers(tmp_path, monkeypatch):
    from eapcore.runs.cache import Cache
    from eapcore.views import query

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("EAP_CACHE_DIR", "~/eap-cache")
    assert Cache().root == query.cache_root() == tmp_path / "eap-cache"
    key = make_run(Cache().root, pair="Tilde", dataset="gsm8k", alpha=0.5)
    assert [r.key for r in query.list_runs()] == [key] and query.load_run(key).info.pair == "Tilde"
    assert not (Path.cwd() / "~").exists()


def test_the_dashboard_listens_on_localhost_only(tmp_path):
    """`streamlit run app.py` with no address option binds 127.0.0.1 (the project's
    .streamlit/config.toml), not every interface; scripts/run.sh says so too."""
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "EAP_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
                             "--server.fileWatcherType", "none"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.3)
        listening = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.rsplit(":", 1)
                if state == "0A" and int(hex_port, 16) == port:  # LISTEN
                    listening.add(address)
        assert listening == {"0100007F"}, listening  # 127.0.0.1 (little-endian hex), nothing else
    finally:
        proc.terminate()
        proc.wait(10)
    assert "--server.address 127.0.0.1" in (ROOT / "scripts" / "run.sh").read_text()
