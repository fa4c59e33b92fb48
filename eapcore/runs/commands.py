"""`eapcore run | sweep | export | import` (also `python -m eapcore ...`): the command lines of runs."""
from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
from pathlib import Path
from typing import Sequence

from eapcore.answers.generation import progress_text
from eapcore.runs import registry
from eapcore.files import read_json_or_none
from eapcore.runs.cache import Cache
from eapcore.runs.errors import Cancelled, RunError
from eapcore.runs.keys import check_spec
from eapcore.runs.memory import predict_memory
from eapcore.runs.results import quick_summary
from eapcore.runs.runner import explain, run
from eapcore.runs.sweeps import PRESETS, label, sweep_specs
from eapcore.runs.workers import FINAL
from eapcore.specs import (GROUPS, AnswersSpec, AttributionSettings, DatasetSpec, GenerationSettings, PairSpec,
                           QuickSettings, RunSpec, SelectionSettings, choices, from_dict, spec_key)
from eapcore.store import CacheError


def _add_settings(p: argparse.ArgumentParser) -> None:
    """Every setting of a RunSpec but the pair, dataset and alpha, with the specs' defaults and choices."""
    g, s, a = GenerationSettings(), SelectionSettings(), AttributionSettings()
    p.add_argument("--limit", type=int, help="first N problems of the dataset only")
    p.add_argument("--max-new-tokens", type=int, help="answer length cap (default: the pair's)")
    p.add_argument("--gen-batch-size", type=int, default=g.batch_size,
                   help="sequences decoded together (0: from free memory)")
    p.add_argument("--backend", choices=choices(GenerationSettings, "backend"), default=g.backend)
    p.add_argument("--gen-dtype", choices=choices(GenerationSettings, "dtype"), default=g.dtype)
    p.add_argument("--beta", type=float, default=s.beta)
    p.add_argument("--low", type=float, default=s.low)
    p.add_argument("--high", type=float, default=s.high)
    p.add_argument("--n", type=int, default=s.n, help="questions drawn (<= 0: all that pass)")
    p.add_argument("--seed", type=int, default=s.seed)
    p.add_argument("--group", choices=GROUPS, default=s.group)
    p.add_argument("--granularity", choices=choices(AttributionSettings, "granularity"), default=a.granularity)
    p.add_argument("--dtype", choices=choices(AttributionSettings, "dtype"), default=a.dtype, help="attribution dtype")
    p.add_argument("--device", choices=choices(AttributionSettings, "device"), default=a.device)
    p.add_argument("--ig-steps", type=int, default=a.ig_steps)
    p.add_argument("--max-batch-tokens", type=int, default=a.max_batch_tokens, help="0: fit to free memory")
    q = QuickSettings()
    p.add_argument("--quick", action="store_true",
                   help="answer questions in a seeded random order, in rounds, only until --n of them pass the "
                        "selection rules (T_ref from the answers so far; README 'Quick runs')")
    p.add_argument("--quick-seed", type=int, default=q.seed, help="order of the questions of a quick run")
    p.add_argument("--quick-chunk", type=int, default=q.chunk,
                   help="questions added per round of a quick run (0: 2N, then as the pass rate so far says)")


def _spec_from_args(args, pair: PairSpec, ds: DatasetSpec, alpha: float, answers: AnswersSpec | None = None) -> RunSpec:
    return RunSpec(
        pair, dataclasses.replace(ds, limit=args.limit) if args.limit else ds,
        GenerationSettings(args.max_new_tokens, args.gen_batch_size, args.backend, args.gen_dtype),
        SelectionSettings(alpha, args.beta, args.low, args.high, args.n, args.seed, args.group),
        AttributionSettings(granularity=args.granularity, dtype=args.dtype, device=args.device,
                            ig_steps=args.ig_steps, max_batch_tokens=args.max_batch_tokens),
        answers=answers, quick=QuickSettings(args.quick_seed, args.quick_chunk) if args.quick else None)


def _local_file(path: str, what: str) -> str:
    """The absolute path of an existing local file; RunError naming `what` otherwise."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise RunError(f"{what} {path} does not exist (give a path to a file)")
    return str(p.resolve())


def dataset_from_args(dataset: str | None, source: str | None, joined: str | None) -> tuple[DatasetSpec, AnswersSpec | None]:
    """The run's dataset (and imported answers) from `--dataset`, `--source` or `--joined`.

    --dataset NAME alone: a registered dataset. --source FILE: that dataset file, unregistered,
    checked as `datasets add` checks it (--dataset then only names it; default: the file's stem).
    --joined FILE: both models' answers imported from a joined file (--dataset names the
    questions; default: "<folder>/<file stem>", the authors' layout being <series>/<dataset>/all_correct.jsonl)."""
    if source and joined:
        raise RunError("give --source (a dataset to generate answers on) or --joined (answers to import), not both")
    if joined:
        path = Path(_local_file(joined, "joined answers file"))
        return DatasetSpec(dataset or f"{path.parent.name}/{path.stem}"), AnswersSpec(str(path))
    if source:
        local = Path(source).expanduser()
        if local.exists() or local.suffix.lower() in (".jsonl", ".json", ".csv"):
            return registry.validate_dataset(DatasetSpec(dataset or local.stem, _local_file(source, "dataset file"))), None
        return DatasetSpec(dataset or source, source), None  # a jsonl URL or a hub id, loaded by the run
    if not dataset:
        raise RunError("give --dataset (a registered dataset), --source FILE or --joined FILE")
    return registry.get_dataset(dataset), None


def load_spec_json(text_or_path: str) -> RunSpec:
    """A RunSpec from JSON text or a file: either to_dict(spec) or spec.json's {"key", "spec"}."""
    path = Path(text_or_path)
    text = path.read_text() if not text_or_path.lstrip().startswith("{") and path.is_file() else text_or_path
    try:
        data = json.loads(text)
        return from_dict(RunSpec, data["spec"] if "spec" in data and "pair" not in data else data)
    except (ValueError, KeyError, TypeError) as err:
        raise RunError(f"--spec-json: not a run spec ({type(err).__name__}: {err})") from None


class _Bars:
    """tqdm bars for progress callbacks: one bar per stage, with the stage's message, generated
    tokens/s and the ETA of status.json (tqdm's own items-per-second estimate is not shown: in
    generation it is optimistic, the short answers finishing first)."""

    def __init__(self, enabled: bool, position: int = 0):
        self.enabled, self.position, self.bar, self.stage = enabled, position, None, None

    def __call__(self, st: dict) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        if st["stage"] != self.stage:
            self.close()
            self.stage = st["stage"]
            if st["stage"] in FINAL:
                return
            self.bar = tqdm(total=st["total"], initial=st["done"], desc=st["stage"], unit="item",
                            position=self.position, leave=False, file=sys.stderr,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
        if self.bar is not None:
            self.bar.total = st["total"]
            self.bar.n = st["done"]
            cached = f"{st['cached']} from cache" if st.get("cached") else ""
            self.bar.set_postfix_str(", ".join(filter(None, (cached, st.get("message"), progress_text(
                st.get("tokens_per_s"), st.get("eta_s"))))), refresh=False)
            self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _on_sigterm(folder: Path):
    def handler(signum, frame):  # cooperative: the run stops at its next check, cleanly
        if not folder.is_dir():
            raise Cancelled("cancelled before the run started")
        (folder / "cancel").touch()
    return handler


def _add_executor(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", choices=("serial", "ray"), default="serial",
                   help="serial: this process; ray: generation and attribution as Ray tasks over the cluster's "
                        "GPUs (needs pip install 'eapcore[ray]' and a cache on a filesystem all nodes share)")
    p.add_argument("--address", help="with --executor ray: the cluster (e.g. auto, or HOST:PORT); "
                                     "default: a new local cluster")


def _run_on_ray(specs: list[RunSpec], args) -> list[tuple[RunSpec, Path | None, str | None]]:
    """The specs through eapcore.runs.distributed, with one progress bar per phase."""
    from eapcore.runs import distributed

    bars = _Bars(not args.quiet)
    try:
        return distributed.run_specs(specs, args.address, Cache(), progress=lambda phase, done, total: bars(
            {"stage": phase, "done": done, "total": total, "message": "on Ray"}))
    finally:
        bars.close()


HASH_NOTE_BYTES = 10 ** 9  # local model files to hash before a run starts, above which the command says so


def _note_hashing(spec: RunSpec, cache: Cache) -> None:
    """Say so when the run will first read whole local model files for its cache keys (a 7B folder:
    about 15 GB, 15 s at 1 GB/s; once per file version, hashes.jsonl), which it does before any
    status or progress exists."""
    paths = {registry.resolve_path(m.name_or_path) for m in (spec.pair.base, spec.pair.tuned)}
    pending = sum(cache.unhashed_bytes(path) for path in paths)
    if pending > HASH_NOTE_BYTES:
        print(f"note: reading {pending / 1e9:.1f} GB of local model files once for their sha256 (the cache keys; "
              "about 1 GB/s, remembered per file version)", file=sys.stderr)


def _print_metrics(folder: Path) -> None:
    quick = read_json_or_none(folder / "quick.json")
    if isinstance(quick, dict):
        print(f"  quick run: {quick_summary(quick)}")
    m = read_json_or_none(folder / "metrics.json") or {}
    for name in ("activation_intensity", "information_complexity", "kurtosis"):
        if isinstance(m.get(name), dict):
            r = m[name]
            print(f"  {name:<24} base {r['base']:.6g}  tuned {r['tuned']:.6g}  change {r['relative_change']:+.2f}%")


def command_run(argv: list[str]) -> int:
    """`eapcore run --pair NAME (--dataset NAME | --source FILE | --joined FILE) [--alpha A] [...]` or `--spec-json JSON|FILE`."""
    p = argparse.ArgumentParser(prog="eapcore run", description="Run one spec (cached, resumable).")
    p.add_argument("--pair", help=f"a registered pair ({', '.join(registry.pairs())})")
    p.add_argument("--dataset", help=f"a registered dataset ({', '.join(registry.datasets())}); with --source or "
                                     "--joined: a name for the questions")
    p.add_argument("--source", help="a dataset file (.jsonl/.csv), used without registering it")
    p.add_argument("--joined", help="import both models' answers from a joined file (the authors' "
                                    "all_correct.jsonl) instead of generating them; its rows are the questions "
                                    "of --group")
    p.add_argument("--alpha", type=float, default=SelectionSettings().alpha, help="T_cut = max(floor(alpha * T_ref), 1); default %(default)s")
    p.add_argument("--spec-json", help="a whole spec as JSON text or file (replaces the options)")
    _add_settings(p)
    p.add_argument("--predict", action="store_true", help="only print the memory prediction")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_executor(p)
    args = p.parse_args(argv)
    try:
        if args.spec_json:
            spec = load_spec_json(args.spec_json)
        else:
            if not args.pair:
                p.error("give --pair and a dataset (--dataset, --source or --joined), or --spec-json")
            ds, answers = dataset_from_args(args.dataset, args.source, args.joined)
            spec = _spec_from_args(args, registry.get_pair(args.pair), ds, args.alpha, answers)
        check_spec(spec)
        key = spec_key(spec)
        if args.predict:
            print(json.dumps(predict_memory(spec), indent=1))
            return 0
        cache = Cache()
        signal.signal(signal.SIGTERM, _on_sigterm(cache.run_dir(key)))
        print(f"run {key}: {label(spec)}", file=sys.stderr)
        _note_hashing(spec, cache)
        if args.executor == "ray":
            ((_, folder, error),) = _run_on_ray([spec], args)
            if error:
                raise RunError(error)
        else:
            bars = _Bars(not args.quiet)
            folder = run(spec, bars, cache)
            bars.close()
    except Cancelled as err:
        print(f"cancelled: {err}", file=sys.stderr)
        return 130
    except (RunError, registry.RegistryError, CacheError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # before the run could write its status (a full or read-only disk)
        print(f"error: {explain(err, 'start')}", file=sys.stderr)
        return 1
    print(f"done: {folder}")
    _print_metrics(folder)
    return 0


def _grid_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named grid (its parts can be overridden)")
    p.add_argument("--pairs", nargs="+", help="pair names")
    p.add_argument("--datasets", nargs="+", help="dataset names")
    p.add_argument("--alphas", nargs="+", type=float,
                   help="alpha values (T_cut = max(floor(alpha * T_ref), 1)); no default here: give them or "
                        f"--preset (`eapcore run --alpha` defaults to {SelectionSettings().alpha})")


def _parse_with_preset(p: argparse.ArgumentParser, argv: list[str]):
    """Parse argv with the chosen preset's defaults (options given explicitly still win)."""
    known, _ = p.parse_known_args(argv)
    p.set_defaults(**PRESETS.get(known.preset, {}).get("defaults", {}))
    return p.parse_args(argv)


def _grid(p: argparse.ArgumentParser, args) -> list[RunSpec]:
    preset = PRESETS.get(args.preset, {})
    pairs, datasets, alphas = (args.pairs or preset.get("pairs"), args.datasets or preset.get("datasets"),
                               args.alphas or preset.get("alphas"))
    if not (pairs and datasets and alphas):
        p.error("give --preset, or --pairs, --datasets and --alphas")
    template = _spec_from_args(args, registry.get_pair(pairs[0]), registry.get_dataset(datasets[0]), alphas[0])
    return sweep_specs(pairs, datasets, alphas, template, preset.get("groups", ()))


def command_sweep(argv: list[str]) -> int:
    """`python -m eapcore sweep [--preset table1|demo] [--pairs ...] [--datasets ...] [--alphas ...]`."""
    from tqdm.auto import tqdm

    p = argparse.ArgumentParser(prog="python -m eapcore sweep",
                                description="Run a grid of specs (pairs x datasets x alphas), one after the other.")
    _grid_args(p)
    _add_settings(p)
    p.add_argument("--dry-run", action="store_true", help="list the specs and their keys only")
    p.add_argument("--quiet", action="store_true")
    _add_executor(p)
    args = _parse_with_preset(p, argv)
    try:
        specs = _grid(p, args)
    except (registry.RegistryError, RunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.dry_run:
        for s in specs:
            print(f"{spec_key(s)}  {label(s)}")
        return 0
    if args.executor == "ray":
        try:
            results = _run_on_ray(specs, args)
        except Cancelled:
            print("sweep cancelled", file=sys.stderr)
            return 130
        except RunError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        for s, _, error in results:
            if error:
                print(f"error in {spec_key(s)} ({label(s)}): {error}", file=sys.stderr)
        failed = [r for r in results if r[2]]
        print(f"{len(results) - len(failed)} of {len(results)} runs done in {Cache().root / 'runs'} (Ray)")
        return 1 if failed else 0
    cache, failed = Cache(), []
    outer = tqdm(specs, desc="sweep", unit="run", disable=args.quiet, file=sys.stderr)
    for s in outer:
        outer.set_postfix_str(label(s))
        bars = _Bars(not args.quiet, position=1)
        signal.signal(signal.SIGTERM, _on_sigterm(cache.run_dir(spec_key(s))))
        try:
            run(s, bars, cache)
        except Cancelled:
            bars.close()
            print("sweep cancelled", file=sys.stderr)
            return 130
        except RunError as err:
            failed.append((s, str(err)))
            tqdm.write(f"error in {spec_key(s)} ({s.pair.name} | {s.dataset.name} | alpha "
                       f"{s.selection.alpha}): {err}", file=sys.stderr)
        bars.close()
    outer.close()
    print(f"{len(specs) - len(failed)} of {len(specs)} runs done in {cache.root / 'runs'}")
    return 1 if failed else 0


def _run_keys(cache: Cache, wanted: Sequence[str]) -> list[str]:
    """Full run keys for keys or unique prefixes; RunError if unknown or ambiguous."""
    runs = sorted(p.name for p in (cache.root / "runs").iterdir() if p.is_dir()) if (cache.root / "runs").is_dir() else []
    out = []
    for w in wanted:
        hits = [k for k in runs if k.startswith(w)]
        if len(hits) != 1:
            raise RunError(f"run key {w!r} matches {len(hits)} runs ({hits[:3]}); see `python -m eapcore cache list`")
        out.append(hits[0])
    return out


def command_export(argv: list[str]) -> int:
    """`python -m eapcore export [KEY ...] [--all] [--preset/--pairs/--datasets/--alphas] --out FILE.zip`."""
    from eapcore.runs.cache import export_bundle

    p = argparse.ArgumentParser(prog="python -m eapcore export",
                                description="Bundle finished runs and the cache entries they use into one zip.")
    p.add_argument("keys", nargs="*", help="run keys (or unique prefixes)")
    p.add_argument("--all", action="store_true", help="every finished run")
    _grid_args(p)
    _add_settings(p)
    p.add_argument("--out", required=True, help="bundle file to write (.zip)")
    args = _parse_with_preset(p, argv)
    cache = Cache()
    try:
        keys = _run_keys(cache, args.keys)
        if args.preset or args.pairs:
            keys += [spec_key(s) for s in _grid(p, args)]
        if args.all:
            keys += [q.name for q in sorted((cache.root / "runs").glob("*")) if not cache.verify_run(q.name)]
        if not keys:
            p.error("give run keys, --all, or a grid (--preset / --pairs ...)")
        bundle = export_bundle(cache, keys, args.out)
    except (RunError, CacheError, registry.RegistryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"error: cannot write {args.out}: {err.strerror}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {len(bundle['runs'])} run(s), {len(bundle['entries'])} cache entries, "
          f"{len(bundle['files'])} files")
    return 0


def command_import(argv: list[str]) -> int:
    """`python -m eapcore import FILE.zip [FILE.zip ...] [--overwrite]`."""
    from eapcore.runs.cache import import_bundle

    p = argparse.ArgumentParser(prog="python -m eapcore import",
                                description="Check bundles' checksums and install their runs and entries in the cache.")
    p.add_argument("bundles", nargs="+", metavar="bundle")
    p.add_argument("--overwrite", action="store_true", help="replace runs that exist here already")
    args = p.parse_args(argv)
    cache = Cache()
    status = 0
    for bundle in args.bundles:
        try:
            result = import_bundle(cache, bundle, overwrite=args.overwrite)
        except CacheError as err:
            print(f"error: {err}", file=sys.stderr)  # the message names the bundle
            return 1
        except OSError as err:  # a read-only or full cache
            print(f"error: {explain(err, 'import', cache)}", file=sys.stderr)
            return 1
        for line in result["stale"]:
            print(f"warning: {line}", file=sys.stderr)
        def counted(labels: list[str]) -> str:
            runs = sum(label.startswith("runs/") for label in labels)
            return f"{len(labels)} cache entries ({runs} run{'' if runs == 1 else 's'})"

        print(f"{bundle}: installed {counted(result['installed'])}, kept {counted(result['kept'])} already there, "
              f"refused {len(result['stale'])} stale run(s), in {cache.root}")
        if result["stale"] and not (result["installed"] or result["kept"]):
            status = 1  # nothing of this bundle could be used
    return status
