"""What can be told about a model reference before transformers loads it, and the two loaders
(config, tokenizer) that the engine and generation share, so that a bad folder or an unreachable
hub is answered in one line instead of a traceback or 25 s of retries.

- check_folder(): a checkpoint folder's config.json is JSON, custom code is not run unless opted
  in (`--trust-remote-code`, or `"trust_remote_code": true` in registry.json), and every weights
  file is whole (safetensors: the header's tensors end where the file ends; the shards an index
  lists are there; a zip-format .bin has its central directory). Reads headers only.
- hub_unavailable() / unreachable(): why the Hugging Face hub (or any address) cannot be used
  (the offline variables, or one probe of its address that fails within PROBE_TIMEOUT_S, without
  retries), or None.
- in_local_cache(): whether a hub id's config is in the local Hugging Face cache.
- load_config() / load_tokenizer() / load_causal_lm(): transformers' Auto classes with those checks, local files
  only when the hub is unavailable, and CheckpointError messages.
A name is a folder when it exists on disk (relative to the working directory) or looks like a
path (files.looks_like_path); otherwise it is a hub id.
"""
from __future__ import annotations

import json
import os
import struct
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

from eapcore.files import looks_like_path, read_json_checked, shorten

PROBE_TIMEOUT_S = 3.0
_PROBE_MEMO_S = 60.0  # a probe's answer is reused this long (a dashboard asks often)
_probes: dict[str, tuple[float, str | None]] = {}
OPT_IN = ("pass --trust-remote-code (commands generate, attribute), or set \"trust_remote_code\": true for "
          "this model in registry.json; read its code first")


class CheckpointError(ValueError):
    """A model reference that cannot be loaded; the message says why and what to do."""


# ---- local folders ------------------------------------------------------------------------------

def local_folder(name_or_path: str) -> Path | None:
    """The folder `name_or_path` names (existing, `~` expanded), None for a hub id; CheckpointError
    for a path that does not exist or is not a folder."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{name_or_path} is a file; give the checkpoint folder that holds config.json")
        return path
    if looks_like_path(name_or_path):
        raise CheckpointError(f"model folder {name_or_path} does not exist")
    return None


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of a checkpoint folder as a dict; CheckpointError if missing or not JSON."""
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"model folder {folder} has no config.json: it is not a Hugging Face checkpoint "
                              "folder (save one with model.save_pretrained(folder))")
    try:
        config = read_json_checked(path, "re-download the model or fix the file")
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds {type(config).__name__}, not a JSON object: re-download the model")
    return config


def needs_custom_code(config: dict[str, Any]) -> bool:
    """Whether transformers would run the folder's own Python code (an `auto_map` for a model
    type that transformers does not know)."""
    from transformers import CONFIG_MAPPING

    return bool(config.get("auto_map")) and config.get("model_type") not in CONFIG_MAPPING


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"{size} bytes, not even a header"
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            return f"{size} bytes, but its header alone needs {8 + n}"
        try:
            header = json.loads(fh.read(n))
        except (ValueError, UnicodeDecodeError):
            return "its header is not valid"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)]
    expected = 8 + n + max(ends, default=0)
    return None if size >= expected else f"{size} of {expected} bytes"


def weights_problems(folder: Path) -> list[str]:
    """One line per weights file of `folder` that is not whole (see the module docstring)."""
    problems = []
    for index in folder.glob("*.index.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            problems.append(f"{index.name} is not a valid shard index")
            continue
        problems += [f"{s} (listed in {index.name}) is missing" for s in sorted(shards) if not (folder / s).is_file()]
    for path in sorted(folder.glob("*.safetensors")):
        why = _safetensors_problem(path)
        if why:
            problems.append(f"{path.name} is truncated or damaged ({why})")
    for path in sorted(folder.glob("*.bin")):
        with open(path, "rb") as fh:
            zipped = fh.read(4) == b"PK\x03\x04"
        if zipped and not zipfile.is_zipfile(path):
            problems.append(f"{path.name} is truncated or damaged (its zip directory is missing)")
    return problems


def check_folder(folder: Path, trust_remote_code: bool = False) -> dict[str, Any]:
    """config.json of a checkpoint folder after the checks of the module docstring;
    CheckpointError naming the file and what to do."""
    config = read_config(folder)
    if needs_custom_code(config) and not trust_remote_code:
        raise CheckpointError(f"model folder {folder} runs its own Python code (model type "
                              f"{config.get('model_type')!r}, auto_map in config.json), which needs your opt-in: "
                              f"{OPT_IN}")
    problems = weights_problems(folder)
    if problems:
        raise CheckpointError(f"model folder {folder}: {'; '.join(problems)}. Re-download (or copy again) "
                              "the model: an interrupted download or copy leaves such files")
    return config


# ---- the hub -----------------------------------------------------------------------------------

def hub_unavailable(offline_vars: tuple[str, ...] = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")) -> str | None:
    """Why the Hugging Face hub cannot be used, or None: one of the offline variables set, or
    `unreachable` of its address (huggingface_hub's endpoint, $HF_ENDPOINT)."""
    for var in offline_vars:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"the hub is switched off here ({var}=1)"
    from huggingface_hub import constants

    problem = unreachable(constants.ENDPOINT)
    return problem and f"the hub is unreachable ({problem})"


def unreachable(url: str) -> str | None:
    """Why `url` cannot be reached, or None: one HEAD request, no retries, that gets no answer
    within PROBE_TIMEOUT_S (any HTTP answer means reachable; proxies as urllib takes them from
    the environment). The answer is reused for _PROBE_MEMO_S."""
    now = time.monotonic()
    seen = _probes.get(url)
    if seen is None or now - seen[0] > _PROBE_MEMO_S:
        seen = (now, _probe(url))
        _probes[url] = seen
    return seen[1]


def _probe(url: str) -> str | None:
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        return f"{url} did not answer within {PROBE_TIMEOUT_S:g} s: {shorten(reason, 120)}"
    return None


def in_local_cache(repo_id: str, revision: str | None = None) -> bool:
    """Whether hub model `repo_id`'s config.json is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)
    except ValueError:  # not a valid repo id
        return False


def _load(what: str, loader: Any, name_or_path: str, revision: str | None, trust_remote_code: bool,
          local_only: bool = False, **kwargs: Any) -> Any:
    """loader(name, ...) for a checked folder or a hub id (local files only when the hub is
    unavailable or `local_only`), with transformers' errors turned into one CheckpointError line."""
    folder = local_folder(name_or_path)
    if folder is not None:
        check_folder(folder, trust_remote_code)
        source, offline = str(folder), None
    else:
        source, offline = name_or_path, "only local files were asked for" if local_only else hub_unavailable()
    try:
        return loader(source, revision=revision, trust_remote_code=trust_remote_code,
                      **({"local_files_only": True} if offline else {}), **kwargs)
    except (OSError, ValueError) as err:
        text = str(err)
        if "trust_remote_code" in text:
            raise CheckpointError(f"model {name_or_path!r} runs its own Python code, which needs your opt-in: "
                                  f"{OPT_IN}") from None
        if folder is not None:
            raise CheckpointError(f"could not read the {what} of model folder {folder}: "
                                  f"{shorten(text.splitlines()[0] if text else type(err).__name__)}") from None
        if offline:
            raise CheckpointError(f"model {name_or_path!r} is not a folder here ({Path.cwd()}) nor in the local "
                                  f"Hugging Face cache, and {offline}: download it on a connected machine and "
                                  "give its local folder") from None
        raise CheckpointError(f"could not load the {what} of {name_or_path!r} from the Hugging Face hub: check the "
                              "id's spelling, and that the model is public or you are logged in "
                              f"({type(err).__name__}: {shorten(text.splitlines()[0] if text else '', 160)})") from None


def load_config(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False,
                local_only: bool = False) -> Any:
    """transformers' AutoConfig of a folder or hub id, after the checks above."""
    from transformers import AutoConfig

    return _load("config", AutoConfig.from_pretrained, name_or_path, revision, trust_remote_code, local_only)


def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False,
                   local_only: bool = False) -> Any:
    """transformers' AutoTokenizer of a folder or hub id, after the checks above."""
    from transformers import AutoTokenizer

    return _load("tokenizer", AutoTokenizer.from_pretrained, name_or_path, revision, trust_remote_code, local_only)


def load_causal_lm(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False,
                   **kwargs: Any) -> Any:
    """transformers' AutoModelForCausalLM of a folder or hub id (kwargs: dtype, ...), after the checks above."""
    from transformers import AutoModelForCausalLM

    return _load("weights", AutoModelForCausalLM.from_pretrained, name_or_path, revision, trust_remote_code,
                 False, **kwargs)
