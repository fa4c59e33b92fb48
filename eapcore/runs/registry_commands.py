"""`eapcore pairs list|add|remove` and `eapcore datasets list|add|remove`: the registry from the
command line, as the Run page edits it (`add` validates as eapcore.runs.registry does: a local
checkpoint folder's config and architecture, a dataset file's problems).

`--json` prints one JSON value on stdout for scripts: `list` an array of entries (each `to_dict`
of the spec plus `"builtin"`), `add` the entry as saved, `remove` `{"removed": NAME}`. Errors go
to stderr as one line, exit status 1 (2 for bad options). Notes go to stderr too, with status 0:
`list` warns of what it skipped in a broken registry.json (registry.problems()), `add` names the
hub models it could not check yet (not downloaded; a run checks them when it starts).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from eapcore.answers.data import TEMPLATES
from eapcore.runs import registry
from eapcore.specs import DatasetSpec, ModelSpec, PairSpec, to_dict

_BUILTIN = {"pairs": lambda: {p.name for p in registry.BUILTIN_PAIRS},
            "datasets": lambda: {d.name for d in registry.BUILTIN_DATASETS}}


def _rows(section: str) -> list[dict[str, Any]]:
    builtin = _BUILTIN[section]()
    known = registry.pairs() if section == "pairs" else registry.datasets()
    return [{**to_dict(spec), "builtin": name in builtin} for name, spec in known.items()]


def _table(section: str, rows: list[dict[str, Any]]) -> str:
    if section == "pairs":
        cells = [(r["name"], r["base"]["name_or_path"], r["tuned"]["name_or_path"], r["algorithm"], r["template"],
                  str(r["max_new_tokens"]), r["family"], "built in" if r["builtin"] else "user") for r in rows]
        head = ("name", "base", "tuned", "algorithm", "template", "max new", "family", "")
    else:
        cells = [(r["name"], r["source"] or "(built in, by name)", r["split"], str(r["limit"] or ""),
                  "built in" if r["builtin"] else "user") for r in rows]
        head = ("name", "source", "split", "limit", "")
    widths = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head))]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(head))).rstrip() for c in [head, *cells])


def _pair_args(p: argparse.ArgumentParser) -> None:
    d = PairSpec("", ModelSpec(""), ModelSpec(""))
    p.add_argument("name")
    p.add_argument("--base", required=True, help="base (SFT) model: hub id (org/name) or checkpoint folder")
    p.add_argument("--tuned", required=True, help="RL-tuned model: hub id or checkpoint folder")
    p.add_argument("--template", default=d.template,
                   help=f"prompt template: {', '.join(TEMPLATES)}, chat, or text with {{question}}")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--algorithm", default="", help="label only: GRPO, PPO, DPO, ...")
    p.add_argument("--notes", default="")
    p.add_argument("--family", default="", help="model family (label): pairs of one family are offered together")
    p.add_argument("--base-revision")
    p.add_argument("--tuned-revision")
    p.add_argument("--trust-remote-code", action="store_true", help="run the checkpoints' own code (opt-in)")


def _dataset_args(p: argparse.ArgumentParser) -> None:
    d = DatasetSpec("")
    p.add_argument("name")
    p.add_argument("--source", required=True, help="a local .jsonl (harness format or question + answer) or .csv file")
    p.add_argument("--split", default=d.split)
    p.add_argument("--limit", type=int, help="first N problems only")


def _new_pair(a: argparse.Namespace) -> PairSpec:
    return PairSpec(a.name, ModelSpec(registry.resolve_path(a.base), a.base_revision, a.trust_remote_code),
                    ModelSpec(registry.resolve_path(a.tuned), a.tuned_revision, a.trust_remote_code),
                    a.template, a.max_new_tokens, a.algorithm, a.notes, family=a.family)


def _new_dataset(a: argparse.Namespace) -> DatasetSpec:
    return DatasetSpec(a.name, registry.resolve_path(a.source), a.split, a.limit)


def _command(section: str, argv: list[str], add_args: Callable, new: Callable,
             add: Callable, remove: Callable) -> int:
    what = section[:-1]
    p = argparse.ArgumentParser(prog=f"eapcore {section}", description=f"List, add or remove {section} of the registry "
                                f"({registry.registry_path()}).")
    sub = p.add_subparsers(dest="action", required=True)
    for name, help_ in (("list", f"every known {what}, built in and yours"), ("add", f"validate and save a {what}"),
                        ("remove", f"remove one of your {section}")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--json", action="store_true", help="one JSON value on stdout")
        if name == "add":
            add_args(sp)
            sp.add_argument("--replace", action="store_true", help=f"replace your {what} of the same name")
        elif name == "remove":
            sp.add_argument("name")
    args = p.parse_args(argv)
    try:
        if args.action == "list":
            for problem in registry.problems():  # the built-ins and the readable entries are listed anyway
                print(f"warning: {problem}", file=sys.stderr)
            rows = _rows(section)
            print(json.dumps(rows, indent=1) if args.json else _table(section, rows))
        elif args.action == "add":
            saved = add(new(args), replace=args.replace)
            print(json.dumps(to_dict(saved), indent=1) if args.json else f"saved {what} {saved.name!r} in "
                  f"{registry.registry_path()}")
            later = registry.unchecked(saved) if section == "pairs" else []
            if later:
                print(f"note: not checked yet: {' and '.join(later)}, not downloaded here (not in the local "
                      "Hugging Face cache); a run checks them when it starts, after downloading them", file=sys.stderr)
        else:
            remove(args.name)
            print(json.dumps({"removed": args.name}) if args.json else f"removed {what} {args.name!r}")
    except registry.RegistryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def command_pairs(argv: list[str]) -> int:
    """`eapcore pairs list|add|remove [--json]`."""
    return _command("pairs", argv, _pair_args, _new_pair, registry.add_pair, registry.remove_pair)


def command_datasets(argv: list[str]) -> int:
    """`eapcore datasets list|add|remove [--json]`."""
    return _command("datasets", argv, _dataset_args, _new_dataset, registry.add_dataset, registry.remove_dataset)
