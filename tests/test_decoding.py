"""Continuous batching (eapcore.answers.decoding): greedy answers equal transformers' `generate`, token for
token, on every supported architecture (CPU, float32); its place in generation and the runner."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import transformers as tf

from conftest import char_tokenizer, model_of, tiny_config
from eapcore.answers.data import Problem
from eapcore.answers.decoding import ARCHITECTURES, SlotDecoder, plan_slots
from eapcore.answers.generation import TransformersBackend, cut_at_eos, generate_answers, make_backend
from eapcore.harness import read_samples
from eapcore.specs import GenerationSettings, ModelSpec

VOCAB = 50
# every architecture the decoder supports; sliding windows (6) shorter than the inputs
ARCH_CASES = [("llama", {}), ("mistral", {"sliding_window": 6}), ("qwen2", {}), ("gpt2", {}), ("qwen3", {}),
              ("olmo2", {}), ("olmo3", {"sliding_window": 6, "layer_types": ["sliding_attention", "full_attention"]})]
ARCH_IDS = ["llama", "mistral-window6", "qwen2", "gpt2", "qwen3", "olmo2", "olmo3-window6-then-full"]
PROJECT = Path(__file__).resolve().parents[1]


def random_model(cfg, seed: int = 0):
    """conftest.model_of with no default EOS (`generate` would stop at the config's even when given none)."""
    model = model_of(cfg, seed)
    model.generation_config.eos_token_id = None
    return model


def reference(model, prompts, limits, eos: set[int]) -> list[list[int]]:
    """transformers' greedy `generate`, one prompt at a time (no padding), cut after the first EOS."""
    out = []
    for prompt, limit in zip(prompts, limits):
        config = tf.GenerationConfig(do_sample=False, max_new_tokens=limit, eos_token_id=sorted(eos) or None,
                                     pad_token_id=0)
        ids = torch.tensor([prompt], device=model.device)
        with torch.no_grad():
            ids = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        out.append(cut_at_eos(ids[0, len(prompt):].tolist(), eos))
    return out


def job(seed: int, n: int = 13):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 21))] for _ in range(n)]
    return prompts, [rng.randrange(1, 15) for _ in prompts]


@pytest.mark.parametrize("arch, overrides", ARCH_CASES, ids=ARCH_IDS)
def test_answers_equal_generate(arch, overrides):
    """Mixed prompt lengths (1-20 tokens), per-prompt max_new_tokens (1-14), an EOS token that the
    model emits mid-way, more prompts than slots (refill) and as many slots as prompts (the tail
    moved down), sync intervals of 1 and 4 steps."""
    assert arch in ARCHITECTURES and sorted(ARCHITECTURES) == sorted(a for a, _ in ARCH_CASES)
    model = random_model(tiny_config(arch, VOCAB, **overrides))
    prompts, limits = job(seed=len(arch))
    # as EOS, the token the model emits most often after its first answer token: answers end mid-way
    eos = {Counter(t for a in reference(model, prompts, limits, set()) for t in a[1:]).most_common(1)[0][0]}
    expected = reference(model, prompts, limits, eos)
    assert any(len(a) < m and a[-1] in eos for a, m in zip(expected, limits)), "no answer ended at EOS"
    assert any(len(a) == m and eos.isdisjoint(a) for a, m in zip(expected, limits)), "no answer was cut"
    for slots, sync in ((3, 1), (3, 4), (len(prompts), 1), (len(prompts), 4)):
        decoder = SlotDecoder(model, eos, slots, sync_every=sync)
        assert decoder(prompts, limits) == expected, f"slots {slots}, sync every {sync}"
        assert decoder.stats["tokens"] >= sum(map(len, expected)) and decoder.stats["slots"] == slots
    if "sliding_window" in overrides:  # the window shapes the answers: the test above is not blind to it
        no_window = random_model(tiny_config(arch, VOCAB, **{**overrides, "sliding_window": 1000}))  # longer than any input
        assert reference(no_window, prompts, limits, eos) != expected


def test_rows_rounded_as_for_cuda_graphs(monkeypatch):
    """The CUDA schedule on the CPU (steps run rows rounded up to a multiple of 32, free slots
    among them, moved down at the end; the step itself eager): still equal to `generate`."""
    model = random_model(tiny_config("qwen2", VOCAB))
    prompts, limits = job(seed=7, n=45)
    decoder = SlotDecoder(model, set(), 40, sync_every=4)
    decoder.graphs_wanted = True
    monkeypatch.setattr(decoder, "_graph", lambda rows, keys: None)
    rows_run, step = set(), decoder._decode_once
    monkeypatch.setattr(decoder, "_decode_once", lambda rows, keys: rows_run.add(rows) or step(rows, keys))
    assert decoder(prompts, limits) == reference(model, prompts, limits, set())
    assert rows_run == {40, 32}  # all slots, then the survivors moved into the first 32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch, overrides", ARCH_CASES, ids=ARCH_IDS)
def test_cuda_answers_equal_generate(arch, overrides):
    """On the GPU (float32): the captured (CUDA graph) and the eager decode step both equal `generate`."""
    prompts, limits = job(seed=3, n=24)
    model = random_model(tiny_config(arch, VOCAB, **overrides)).to("cuda")
    expected = reference(model, prompts, limits, set())
    for graphs in (True, False):
        decoder = SlotDecoder(model, set(), 8, sync_every=4, cuda_graphs=graphs)
        assert decoder(prompts, limits) == expected, f"cuda graphs {graphs}"
        assert decoder.stats["graphs"].startswith("on" if graphs else "off"), decoder.stats["graphs"]


def test_stream_order_stop_and_errors():
    model = random_model(tiny_config("llama", VOCAB))
    prompts = [[5 + i] * 4 for i in range(6)]  # equal lengths: slots are filled in prompt order
    decoder = SlotDecoder(model, set(), 2)
    finished = list(decoder.stream(prompts, [1, 9, 2, 9, 3, 9]))
    assert {i: len(a) for i, a in finished} == dict(enumerate([1, 9, 2, 9, 3, 9]))
    assert [i for i, _ in finished] == [0, 2, 1, 3, 4, 5]  # as they finish; a freed slot takes the next prompt
    calls = []
    stopped = list(decoder.stream(prompts, 9, stop=lambda: calls.append(1) or True))
    assert len(calls) == 1 and len(stopped) < len(prompts)  # stop() ends the stream after its interval
    assert model.config._attn_implementation != "eapcore_slots"  # the model is left as it was
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        decoder(prompts, 0)
    with pytest.raises(ValueError, match="empty prompt"):
        decoder([[3], []], 4)


def test_plan_slots():
    gib = 2**30
    # 10 GiB free, 10% reserve, 1 GiB workspace: 8 GiB for slots of 1024 tokens x 1 MiB
    assert plan_slots(2**20, 1024, 10 * gib, gib, cap=1000) == 8
    assert plan_slots(2**20, 1024, 10 * gib, gib, cap=5) == 5
    assert plan_slots(2**20, 1024, gib, gib) == 0


def test_generate_answers_streams_in_problem_order(tmp_path):
    """The file has the same lines as with plain `generate`, in the problems' order, resumed or not."""
    model, tok = random_model(tiny_config("llama", 104)), char_tokenizer()
    problems = [Problem(i, "x" * (1 + 7 * i % 23), str(i), {}) for i in range(9)]
    plain = TransformersBackend(model, tok)
    expected = tmp_path / "plain.jsonl"
    generate_answers(problems, expected, plain, tok, "{question}", 6, 4, progress=False)
    out = tmp_path / "slots.jsonl"
    generate_answers(problems[2:5], out, SlotDecoder(model, plain.eos_ids, 2), tok, "{question}", 6, progress=False)
    seen = []
    report = generate_answers(problems, out, SlotDecoder(model, plain.eos_ids, 2), tok, "{question}", 6,
                              progress=False, on_progress=lambda n, tokens: seen.append((n, tokens)))
    assert (report.n_existing, report.n_generated) == (3, 6)
    assert seen[-1] == (6, report.n_tokens) and report.n_tokens > 0
    assert out.read_text() == expected.read_text()
    assert [s.idx for s in read_samples(out)[0]] == list(range(9))


def test_make_backend_choice(checkpoints, tmp_path):
    backend, _ = make_backend(ModelSpec(str(checkpoints["gpt2"])), GenerationSettings(backend="auto", dtype="float32"))
    assert isinstance(backend, SlotDecoder) and backend.slots == 0  # 0: sized when a job comes
    folder = tmp_path / "neox"  # an architecture the decoder has not been checked on
    model = random_model(tf.GPTNeoXConfig(vocab_size=104, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                          intermediate_size=64))
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    backend, _ = make_backend(ModelSpec(str(folder)), GenerationSettings(backend="auto", dtype="float32"))
    assert isinstance(backend, TransformersBackend)
    with pytest.raises(ValueError, match="backend 'continuous': architecture 'gpt_neox'"):
        make_backend(ModelSpec(str(folder)), GenerationSettings(backend="continuous", dtype="float32"))


def test_cli_backend_option(checkpoints, tmp_path, capsys):
    from eapcore import cli

    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"idx": i, "question": f"{i} + 1?", "answer": str(i + 1)}) + "\n"
                            for i in range(4)))
    for backend in ("continuous", "transformers"):
        assert cli.main(["generate", "--model", str(checkpoints["qwen2"]), "--source", str(data), "--out",
                         str(tmp_path / f"{backend}.jsonl"), "--max-new-tokens", "5", "--backend", backend,
                         "--dtype", "float32", "--no-progress"]) == 0
        assert json.loads(capsys.readouterr().out)["n_generated"] == 4
    assert (tmp_path / "continuous.jsonl").read_text() == (tmp_path / "transformers.jsonl").read_text()


def test_gpu_benchmark_tiny_mode(tmp_path):
    """benchmarks/gpu_generation.py --tiny (its CPU mode) runs every part but transformers'
    continuous batching (tried by hand: slow to warm up on a CPU) and writes its results."""
    proc = subprocess.run([sys.executable, "benchmarks/gpu_generation.py", "--tiny", "--skip", "cb"], cwd=PROJECT,
                          env={**os.environ, "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_generation.json").read_text())
    rows = {r["candidate"]: r for r in result["rows"]}
    assert rows["default"]["completed"] and rows["default"]["tokens"] == result["job"]["tokens"]
    assert rows["generate-b8"]["tokens_per_s"] > 0 and rows["generate-b32"]["batch"] == 32
    assert result["exact_float32"]["identical"] == result["exact_float32"]["sample"] == 12
    assert result["agreement"]["share_identical"] == 1.0  # float32 on the CPU: no rounding ties
    assert "| default (slots 48) |" in proc.stdout and "decode floor" in proc.stdout


def test_command_line_bar_shows_tokens_per_second(capsys):
    from eapcore.runs.commands import _Bars

    bars = _Bars(True)
    bars({"stage": "generate", "total": 10, "done": 3, "message": "generating base answers", "tokens_per_s": 1234.4})
    bars.close()
    assert "generating base answers, 1,234 tokens/s" in capsys.readouterr().err
