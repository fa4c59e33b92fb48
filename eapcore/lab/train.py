"""SFT (plain PyTorch), GRPO and DPO (TRL) of the lab's tiny model, greedy evaluation, sampling.

The TRL trainers run on CPU in float32 (TRL defaults bf16 to True: we turn it off), with no
dataloader workers, no reporting, fixed seeds. Every stage reads its start model from a saved
Hugging Face folder and writes its result to another.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

from .problems import Problem, build_prompt, is_correct


def _quiet() -> None:
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers
    transformers.logging.set_verbosity_error()
    try:
        import datasets
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass


def common_args(out: Path, seed: int, device: str = "cpu", logging_steps: int = 10, **kw: Any) -> dict[str, Any]:
    return dict(output_dir=str(out / "_trainer"), bf16=False, fp16=False, use_cpu=device == "cpu",
                dataloader_num_workers=0, report_to=[], save_strategy="no", seed=seed,
                data_seed=seed, disable_tqdm=True, logging_steps=logging_steps, **kw)


class _LogCollector:
    """A TrainerCallback-like recorder of every logged dict (loss, reward, ...)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Collector(TrainerCallback):
            def __init__(self):
                self.logs: list[dict[str, Any]] = []

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs:
                    self.logs.append({"step": state.global_step, **logs})

        return Collector()


class _Deadline:
    """A TrainerCallback that stops training (cleanly, so the model is still saved) at a unix time."""

    def __new__(cls, deadline: float):
        from transformers import TrainerCallback

        class Deadline(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if time.time() > deadline:
                    control.should_training_stop = True

        return Deadline()


def _callbacks(logs, deadline: float | None) -> list:
    return [logs] + ([_Deadline(deadline)] if deadline else [])


def save(model, tokenizer, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)


def save_adapter(peft_model, folder: Path, base_ref: str, tokenizer=None) -> None:
    """A peft model's LoRA adapter in bfloat16 (half the bytes; merged in float32 when loaded,
    eapcore.engine.checkpoints), its base recorded as `base_ref` (a model reference, e.g. "../sft"),
    and, when `tokenizer` is given (an adapter over a GGUF file, which holds no tokenizer.json), its
    tokenizer.json beside it: the dashboard decodes answers with it, also for the adapters over
    this one (eapcore.views.query.load_tokenizer). An adapter's identity is its adapter_* files
    only, so the tokenizer changes no key."""
    import torch
    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
    weights = folder / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in load_file(weights).items()}, weights)
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base_ref
    cfg_path.write_text(json.dumps(cfg, indent=1, sort_keys=True) + "\n")
    (folder / "README.md").unlink(missing_ok=True)  # peft's model-card template


def load(folder: Path | str, device: str = "cpu"):
    """(model, tokenizer) of a checkpoint folder, GGUF file or adapter (eapcore.engine.checkpoints)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eapcore.engine.checkpoints import local_folder

    folder = local_folder(str(folder))
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").to(device)
    return model, tok


# ---------------------------------------------------------------- generation and evaluation
def generate(model, tok, prompts: Sequence[str], max_new_tokens: int = 64, batch_size: int = 128,
             do_sample: bool = False, temperature: float = 1.0, num_return_sequences: int = 1,
             seed: int | None = None) -> list[str]:
    """Completions (decoded without special tokens), `num_return_sequences` per prompt in order."""
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    model.eval()
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        enc = tok(list(prompts[i:i + batch_size]), return_tensors="pt", padding=True).to(model.device)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                 temperature=temperature if do_sample else None, top_k=0 if do_sample else None,
                                 top_p=1.0 if do_sample else None,
                                 num_return_sequences=num_return_sequences,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        out.extend(tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def evaluate(model, tok, problems: Sequence[Problem], max_new_tokens: int = 64, batch_size: int = 128) -> list[bool]:
    """Greedy correctness of each problem, in order."""
    completions = generate(model, tok, [build_prompt(p.question) for p in problems], max_new_tokens, batch_size)
    return [is_correct(c, p.answer) for c, p in zip(completions, problems)]


def sample_correctness(model, tok, problems: Sequence[Problem], k: int, seed: int,
                       max_new_tokens: int = 64, batch_sequences: int = 256) -> tuple[list[str], list[list[bool]]]:
    """k samples at temperature 1 per problem (batches of `batch_sequences` answers):
    (completions flat, correctness [n][k])."""
    completions = generate(model, tok, [build_prompt(p.question) for p in problems], max_new_tokens,
                           batch_size=max(1, batch_sequences // k), do_sample=True, num_return_sequences=k,
                           seed=seed)
    ok = [[is_correct(completions[i * k + j], p.answer) for j in range(k)] for i, p in enumerate(problems)]
    return completions, ok


# ---------------------------------------------------------------- SFT
def sft_batch(tok, problems: Sequence[Problem]):
    """Right-padded input ids, attention mask and labels (prompt and padding masked with -100);
    the completion is the worked solution followed by eos."""
    import torch

    prompts = [tok(build_prompt(p.question))["input_ids"] for p in problems]
    comps = [tok(p.solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for p in problems]
    width = max(len(a) + len(b) for a, b in zip(prompts, comps))
    ids = torch.full((len(problems), width), tok.pad_token_id)
    labels = torch.full((len(problems), width), -100)
    mask = torch.zeros(len(problems), width, dtype=torch.long)
    for i, (a, b) in enumerate(zip(prompts, comps)):
        n = len(a) + len(b)
        ids[i, :n] = torch.tensor(a + b)
        mask[i, :n] = 1
        labels[i, len(a):n] = torch.tensor(b)
    return ids, mask, labels


def sft(model, tok, problems: Sequence[Problem], out: Path, steps: int, batch_size: int = 32,
        lr: float = 1e-3, seed: int = 0, warmup: int = 30, schedule: str = "cosine",
        log_every: int = 50, deadline: float | None = None, base_ref: str | None = None) -> dict[str, Any]:
    """Supervised fine-tuning on worked solutions, loss on the completion (solution + eos) only.

    A plain PyTorch loop (AdamW, warmup then cosine or constant lr, grad clip 1.0, batches drawn
    with a seeded generator): on 2 CPU cores it runs about 3x faster per step than TRL's
    SFTTrainer on this model size, with the same objective as SFTTrainer's prompt-completion mode. A peft model (LoRA) trains its
    adapter only and is saved as an adapter over `base_ref`. Stops early, saved, at `deadline`."""
    import math

    import torch

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = min(warmup, max(steps - 1, 0))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        if schedule == "constant":
            return lr
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    logs: list[dict[str, Any]] = []
    t0 = time.time()
    model.train()
    running = 0.0
    for step in range(steps):
        idx = torch.randint(len(problems), (batch_size,), generator=gen).tolist()
        ids, mask, labels = (x.to(model.device) for x in sft_batch(tok, [problems[i] for i in idx]))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        running += loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            n = (step % log_every) + 1
            logs.append({"step": step + 1, "loss": running / n, "seconds": time.time() - t0})
            print(f"sft step {step + 1}/{steps} loss {running / n:.4f} ({time.time() - t0:.0f} s)", flush=True)
            running = 0.0
        if deadline and time.time() > deadline:
            print(f"sft: deadline reached after {step + 1} steps", flush=True)
            break
    model.eval()
    if base_ref is not None:
        save_adapter(model, out, base_ref, tok)
    else:
        save(model, tok, out)
    return {"seconds": time.time() - t0, "logs": logs, "steps": step + 1}


# ---------------------------------------------------------------- GRPO
def correctness_reward(completions, answer, **kwargs) -> list[float]:
    """1.0 when the last boxed answer equals the reference, else 0.0."""
    return [1.0 if is_correct(c, a) else 0.0 for c, a in zip(completions, answer)]


def grpo(start: Path, problems: Sequence[Problem], out: Path, steps: int, prompts_per_step: int = 8,
         num_generations: int = 8, lr: float = 2e-5, beta: float = 0.0, seed: int = 0,
         temperature: float = 1.0, max_completion_length: int = 48, loss_type: str = "dapo",
         scale_rewards: str = "group", warmup: int = 0, num_iterations: int = 1,
         epsilon: float = 0.2, top_entropy_quantile: float = 1.0, reward_fn=None, device: str = "cpu",
         peft_config=None, base_ref: str = "", deadline: float | None = None,
         logging_steps: int = 10) -> dict[str, Any]:
    """Online RL from the saved SFT folder `start` with the correctness reward (TRL GRPOTrainer).

    `reward_fn(completions, answer, **kw) -> list[float]` replaces the reward (tests only).
    With a peft `peft_config` a LoRA adapter is trained and saved over `base_ref`."""
    _quiet()
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(seed)
    model, tok = load(start)
    data = Dataset.from_list([{"prompt": build_prompt(p.question), "answer": str(p.answer)}
                              for p in problems])
    args = GRPOConfig(**common_args(out, seed, device, logging_steps), max_steps=steps,
                      per_device_train_batch_size=prompts_per_step * num_generations,
                      num_generations=num_generations, learning_rate=lr, beta=beta,
                      temperature=temperature, top_k=0, top_p=1.0,
                      max_completion_length=max_completion_length, loss_type=loss_type,
                      scale_rewards=scale_rewards, lr_scheduler_type="constant_with_warmup",
                      warmup_steps=warmup, weight_decay=0.0, num_iterations=num_iterations,
                      epsilon=epsilon, top_entropy_quantile=top_entropy_quantile,
                      remove_unused_columns=False, disable_dropout=True,
                      max_grad_norm=1.0)
    logs = _LogCollector()
    trainer = GRPOTrainer(model=model, reward_funcs=reward_fn or correctness_reward, args=args, train_dataset=data,
                          processing_class=tok, callbacks=_callbacks(logs, deadline), peft_config=peft_config)
    return _train_and_save(trainer, tok, out, logs, peft_config, base_ref)


def _train_and_save(trainer, tok, out: Path, logs, peft_config, base_ref: str) -> dict[str, Any]:
    t0 = time.time()
    trainer.train()
    if peft_config is not None:
        save_adapter(trainer.model, out, base_ref)
    else:
        save(trainer.model, tok, out)
    return {"seconds": time.time() - t0, "logs": logs.logs, "steps": trainer.state.global_step}


# ---------------------------------------------------------------- DPO
def preference_pairs(model, tok, problems: Sequence[Problem], k: int, seed: int,
                     max_new_tokens: int = 64, reference_fallback: bool = False,
                     batch_sequences: int = 256) -> list[dict[str, str]]:
    """Offline pairs from the model's own samples: one correct (chosen) vs one wrong (rejected)
    per problem that has both among its k samples. With `reference_fallback` (smoke runs of an
    untrained model only) a problem with no correct sample uses the reference solution as chosen."""
    completions, ok = sample_correctness(model, tok, problems, k, seed, max_new_tokens, batch_sequences)
    pairs = []
    for i, p in enumerate(problems):
        good = [completions[i * k + j] for j in range(k) if ok[i][j]]
        bad = [completions[i * k + j] for j in range(k) if not ok[i][j]]
        if reference_fallback and bad and not good:
            good = [p.solution]
        if good and bad:
            pairs.append({"prompt": build_prompt(p.question), "chosen": good[0], "rejected": bad[0]})
    return pairs


def dpo(start: Path, pairs: Sequence[dict[str, str]], out: Path, steps: int, batch_size: int = 32,
        lr: float = 1e-5, beta: float = 0.1, seed: int = 0, sft_weight: float = 0.0, device: str = "cpu",
        peft_config=None, base_ref: str = "", deadline: float | None = None, max_length: int = 128,
        logging_steps: int = 10) -> dict[str, Any]:
    """DPO from the saved SFT folder `start` on fixed preference pairs (TRL DPOTrainer);
    `sft_weight` > 0 adds the chosen answers' NLL (RPO) with that weight. With a peft
    `peft_config` a LoRA adapter is trained (the reference is the adapter switched off)."""
    _quiet()
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(seed)
    model, tok = load(start)
    data = Dataset.from_list(list(pairs))
    loss_type, weights = (["sigmoid", "sft"], [1.0, sft_weight]) if sft_weight > 0 else (["sigmoid"], None)
    args = DPOConfig(**common_args(out, seed, device, logging_steps), max_steps=steps,
                     per_device_train_batch_size=batch_size,
                     learning_rate=lr, beta=beta, loss_type=loss_type, loss_weights=weights,
                     lr_scheduler_type="constant", weight_decay=0.0, max_length=max_length,
                     disable_dropout=True, dataset_num_proc=None)
    logs = _LogCollector()
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                         callbacks=_callbacks(logs, deadline), peft_config=peft_config)
    return _train_and_save(trainer, tok, out, logs, peft_config, base_ref)


def dump(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=str) + "\n")
