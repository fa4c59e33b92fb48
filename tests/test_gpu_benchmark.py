"""The GPU benchmarks' CPU modes (--tiny): the scripts the lead runs on the GPU machine, checked
here on scaled-down shapes of the same architectures (windows included)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_mode_runs_every_requested_row(tmp_path):
    out = tmp_path / "rows.json"
    runs = "qwen3-8b:layer,head:32;olmo2-7b:head:48;mistral-7b-window:layer:32,64"
    r = subprocess.run([sys.executable, "benchmarks/gpu_attribution.py", "--tiny", "--runs", runs,
                        "--window-kernels", "blocks", "--reps", "1", "--warmup", "first", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    got = [(row["shape"], row["granularity"], row["tokens"], row.get("kernel")) for row in rows]
    assert got == [("qwen3-8b", "layer", 32, None), ("qwen3-8b", "head", 32, None), ("olmo2-7b", "head", 48, None),
                   ("mistral-7b-window", "layer", 32, "blocks"), ("mistral-7b-window", "layer", 64, "blocks")]
    assert all(isinstance(row["seconds"], float) and row["floor_s"] > 0 for row in rows)
    assert [row["window"] for row in rows if row.get("kernel")] == [16, 16]


NOT_ON_THE_GPU_MACHINE = ("datasets", "streamlit", "transformer_lens", "wandb", "plotly", "trl")
RECORD_IMPORTS = """import atexit, json, os, sys
atexit.register(lambda: open(os.environ["IMPORT_LOG"], "a").write(
    json.dumps(sorted({m.split(".")[0] for m in sys.modules})) + "\\n"))
"""


def test_whole_run_benchmark_tiny_mode(tmp_path):
    """benchmarks/gpu_run.py: a tokenizer folder with its chat template from a GGUF file
    (--make-tokenizer), then --tiny: both checkpoints, `eapcore run` in a child process, every
    stage's clock, the plain-generate measurement; no process imports what the GPU machine lacks."""
    from eapcore.lab import tiny_gguf as T
    from eapcore.lab.problems import build_prompt, generate

    tok = T.train_tokenizer([build_prompt(p.question) + p.solution for p in generate(200, seed=5)], 350)
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    gguf = T.write_gguf(T.build_model(tok.get_vocab_size()), tok, tmp_path / "tiny.gguf", chat_template=template)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(RECORD_IMPORTS)
    env = {**os.environ, "EAP_CACHE_DIR": str(tmp_path / "cache"), "IMPORT_LOG": str(tmp_path / "imports.jsonl"),
           "PYTHONPATH": str(tmp_path / "site"), "OMP_NUM_THREADS": "1"}
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + 2?", "answer": f"#### {i + 2}"}) + "\n"
                            for i in range(20)))
    script = [sys.executable, "benchmarks/gpu_run.py"]
    made = subprocess.run([*script, "--make-tokenizer", str(tmp_path / "tok"), "--tokenizer-from", str(gguf)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    assert "chat_template" in (tmp_path / "tok" / "tokenizer_config.json").read_text() + "".join(
        p.name for p in (tmp_path / "tok").iterdir())
    (tmp_path / "imports.jsonl").unlink()
    r = subprocess.run([*script, "--tiny", "--tokenizer", str(tmp_path / "tok"), "--data", str(data), "--work",
                        str(tmp_path / "work"), "--out", str(tmp_path / "run.json")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((tmp_path / "run.json").read_text())
    after, before = result["after"], result["before"]
    assert list(after["clock"]) == ["generate", "grade", "select", "attribute", "metrics"]
    assert {c["device"] for c in after["clock"].values()} == {"cpu"}
    assert after["answers"] == 24 and after["selected"] == 4 and after["answer_tokens"] > 0
    assert after["total_s"] == pytest.approx(sum(c["seconds"] for c in after["clock"].values()), abs=0.2)
    assert before["questions"] == 8 and before["batches"] == 1 and before["generate_stage_s_extrapolated"] > 0
    assert before["total_s_extrapolated"] == pytest.approx(
        after["total_s"] - after["clock"]["generate"]["seconds"] + before["generate_stage_s_extrapolated"], abs=1)
    assert "| generate |" in r.stdout and "| total |" in r.stdout
    logged = [set(json.loads(line)) for line in (tmp_path / "imports.jsonl").read_text().splitlines()]
    assert len(logged) >= 3  # the benchmark, `pairs add` and `run`
    assert all("eapcore" in m and not m & set(NOT_ON_THE_GPU_MACHINE) for m in logged), \
        [sorted(m & set(NOT_ON_THE_GPU_MACHINE)) for m in logged]


def test_bf16_agreement_script_small(checkpoints, tmp_path):
    """benchmarks/bf16_agreement.py on a tiny checkpoint: three answer sets per dtype, compared with
    the reference's logits at each first difference; float32 answers all identical."""
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + 2?", "answer": str(i + 2)}) + "\n" for i in range(4)))
    out = tmp_path / "agreement.json"
    r = subprocess.run([sys.executable, "benchmarks/bf16_agreement.py", "--model", str(checkpoints["llama"]), "--data",
                        str(data), "--n", "3", "--new-tokens", "5", "--template", "{question}", "--alone-n", "2",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {row["dtype"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"bfloat16", "float32"}
    f32 = rows["float32"]
    assert (f32["ours"]["identical"], f32["ours"]["of"], f32["alone"]["identical"], f32["alone"]["of"]) == (3, 3, 2, 2)
    for row in rows.values():
        for diff in row["ours"]["differences"] + row["alone"]["differences"]:
            assert diff["first_difference"] < 5 and "question" in diff
    assert "| float32 | 3/3 | 2/2 | 2/2 |" in r.stdout


def test_spread_benchmark_tiny_mode(tmp_path):
    """benchmarks/gpu_spread.py --tiny: the model on one device and spread over cpu:0/cpu:1 gives
    the same scores and loss bit for bit; the model made in place on each layer's device (the 70B
    path) passes the adapter's conformance check and attributes."""
    out = tmp_path / "spread.json"
    r = subprocess.run([sys.executable, "benchmarks/gpu_spread.py", "--tiny", "--reps", "1", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.read_text())
    spread = [row for row in result["rows"] if len(row["devices"]) == 2]
    assert len(result["rows"]) == 5 and len(spread) == 3
    assert all(row["equal_to_one_device"] and row["equal_with_the_same_work"] for row in spread if "equal_to_one_device" in row)
    assert sum("equal_to_one_device" in row for row in spread) == 2
    assert result["big"]["layers_per_device"] == {"cpu:0": 2, "cpu:1": 2}
    assert all(row["seconds"] > 0 for row in result["rows"])


def test_determinism_script_tiny_mode():
    """benchmarks/gpu_determinism.py --tiny: on the CPU in float32 every case gives the same bits twice."""
    for what, lines in (("kept", 2), ("twice", 3)):
        r = subprocess.run([sys.executable, "benchmarks/gpu_determinism.py", what, "--tiny"], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        out = [line for line in r.stdout.splitlines() if line.startswith(what)]
        assert len(out) == lines and all("equal True" in line for line in out), r.stdout
