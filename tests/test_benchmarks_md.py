"""BENCHMARKS.md's tables of issues 19 and 20 are the committed GPU results
(benchmarks/results_issue19_20.json) as this code formats them, with the memory model's figures
computed by the benchmark script itself (`--predict`) and the graph sizes by eapcore.graph."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from eapcore.graph import Graph

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results_issue19_20.json"
NAMES = {"qwen3-8b": "Qwen3-8B", "olmo2-7b": "OLMo-2-7B", "mistral-7b-window": "Mistral-7B, window 4096"}
GRAPHS = {"qwen3-8b": Graph(36, 32, 8, "head"), "olmo2-7b": Graph(32, 32, 32, "head")}
D_MODEL = 4096  # both shapes


def head_output_slices(graph: Graph) -> int:
    """Source outputs (each T x d) the head-granularity backward forms and contracts per sample: all
    of them for the logits, then for each layer those before its MLP (q, k, v and MLP input in one pass)."""
    return graph.n_forward + sum(graph.n_sources_before_mlp(l) for l in range(graph.n_layers))


def table_rows() -> dict[str, list[str]]:
    """{table: markdown rows} of the issue 19/20 section, from the results and the memory model."""
    spec = importlib.util.spec_from_file_location("gpu_attribution", ROOT / "benchmarks/gpu_attribution.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.predict(str(RESULTS))
    layer = {(r["shape"], r["tokens"]): r for r in rows if r["granularity"] == "layer" and not r.get("kernel")}
    out: dict[str, list[str]] = {"layer": [], "head": [], "window": [], "memory": []}
    for r in rows:
        s, T = r["seconds"], r["tokens"]
        common = (f"{r['batch']} | {s:.3f} | {T / s:,.0f} | {r['peak_gib']:.1f} | {r['all_kept_gib']:.1f} | "
                  f"{r['floor_s']:.3f} | {s / r['floor_s']:.2f}")
        if r.get("kernel"):
            out["window"].append(f"| {r['kernel']} | {T:,} | {common} |")
        elif r["granularity"] == "layer":
            out["layer"].append(f"| {NAMES[r['shape']]} | {T:,} | {common} |")
        else:
            extra = s - layer[(r["shape"], T)]["seconds"]
            traffic = 2 * 2 * T * D_MODEL * head_output_slices(GRAPHS[r["shape"]]) / 1e12  # bf16, written and read
            out["head"].append(f"| {NAMES[r['shape']]} | {T:,} | {common} | {extra:.2f} | {traffic:.2f} | "
                               f"{traffic / extra:.2f} |")
    for r in json.loads(RESULTS.read_text())["rows"]:
        if r["method"] == "memory-model":
            meas, model = r["graph_bytes_per_token"], r["model_bytes_per_token"]
            out["memory"].append(f"| {NAMES[r['shape']]} | {r['granularity']} | {meas:,.0f} | {model:,} | "
                                 f"{100 * (model - meas) / meas:+.1f}% |")
    return out


@pytest.mark.parametrize("table", ["layer", "head", "window", "memory"])
def test_tables_are_the_results(table):
    text = (ROOT / "BENCHMARKS.md").read_text()
    missing = [row for row in table_rows()[table] if row not in text]
    assert not missing, "BENCHMARKS.md lacks (or has other numbers than) these rows:\n" + "\n".join(missing)


def test_stated_graph_sizes_and_card():
    text = " ".join((ROOT / "BENCHMARKS.md").read_text().split())
    for shape, g in GRAPHS.items():
        assert f"{g.n_forward:,} sources x {g.n_backward:,} destinations" in text, shape
        assert f"{head_output_slices(g):,} source outputs" in text, shape
    data = json.loads(RESULTS.read_text())
    assert f"{data['card']}" in text and f"{data['matmul_tflops']:.1f} TFLOP/s" in text
    assert "813 sources x 1037 destinations" in text and Graph(28, 28, 4, "head").n_backward == 1037


if __name__ == "__main__":
    for name, rows in table_rows().items():
        print(name, *rows, sep="\n")
