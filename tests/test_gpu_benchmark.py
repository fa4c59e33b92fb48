"""The GPU benchmark's CPU mode (--tiny): the script the lead runs on the GPU machine, checked here
on scaled-down shapes of the same architectures (windows included)."""
import json
import subprocess
import sys
from pathlib import Path

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
