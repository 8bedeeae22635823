"""``lorweb-fast eval generate`` and ``lorweb-fast eval score``.

    lorweb-fast eval generate --evalset DIR --weights W [--model ID_OR_DIR] --out RUNS [--batch-size 4] [--seeds 50]
    lorweb-fast eval score --runs RUNS [RUNS2 ...] [--against BASELINE_RUNS ...] [--encoder ID_OR_DIR]
                           [--lpips-net alex] [--lpips-weights PATH] [--judge none|gemma3:ID_OR_DIR|replay:FILE]
                           [--metrics clip_dir,lpips,vlm] --out REPORT

A runs folder is given as PATH (named after its folder) or NAME=PATH; one NAME for several folders pools them.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def _named_path(text: str) -> tuple:
    """(name, path, named) of ``PATH`` (named after its last component; named False) or ``NAME=PATH`` (named True).
    A ``text`` that is an existing path, or whose part before the first "=" holds a path separator, is a path
    (folders such as ``runs/lr=1e-3``)."""
    name, sep, path = text.partition("=")
    named = True
    if not sep or Path(text).exists() or "/" in name or os.sep in name:
        path, named = text, False
        name = Path(text.rstrip("/")).name or text
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected PATH or NAME=PATH, got {text!r}")
    return name, path, named


def _methods(given: list, option: str) -> dict:
    """{name: path, or [paths] pooled} of ``--runs`` / ``--against`` entries: a NAME given to several folders
    (``ours=runs/custom ours=runs/relation252k``) pools them into one method; two folders that are only named after
    their last component (``a/runs b/runs``) must be named apart."""
    from .evalsets import EvalInputError

    grouped: dict = {}
    for name, path, named in given:
        grouped.setdefault(name, []).append((path, named))
    methods = {}
    for name, entries in grouped.items():
        if len(entries) > 1 and not all(named for _, named in entries):
            raise EvalInputError(f"{option}: several runs folders are named {name!r}: use NAME=PATH (the same NAME "
                                 "for several folders pools them into one method)")
        methods[name] = entries[0][0] if len(entries) == 1 else [path for path, _ in entries]
    return methods


def _metric_list(text: str) -> list:
    """``--metrics``: the names of a comma-separated subset of ``score.METRICS`` (ArgumentTypeError otherwise)."""
    from .score import METRICS

    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"metrics must be a comma-separated subset of {','.join(METRICS)}, "
                                         f"got {text!r}")
    return names


def add_eval_subparser(subparsers) -> argparse.ArgumentParser:
    """Register ``eval`` (with ``generate`` and ``score``) on the main parser's subparsers."""
    from ..cli import DEFAULT_MODEL, DTYPES, _key_value
    from ..validation import DEFAULT_STEPS
    from .evalsets import EVALSET_FORMATS
    from .generate import MERGE_CHOICES
    from .metrics import DEFAULT_CLIP, LPIPS_NETS

    ev = subparsers.add_parser("eval", help="the paper's evaluation protocol: generate over an eval set, then score")
    sub = ev.add_subparsers(dest="eval_command", required=True, metavar="{generate,score}")

    g = sub.add_parser("generate", help="b' for every triplet of an evaluation set (batched, resumable)")
    g.add_argument("--evalset", required=True, help="evaluation set folder")
    g.add_argument("--format", choices=EVALSET_FORMATS, default="auto",
                   help="evaluation-set layout (default: detected)")
    g.add_argument("--weights", required=True,
                   help="LoRWeB checkpoint (official safetensors format), or a run / checkpoint folder: its final or "
                        "newest complete checkpoint, with the folder's config.yaml; or a Hugging Face Hub repo id "
                        "(e.g. hilamanor/lorweb), downloaded")
    g.add_argument("--weight-name", default=None,
                   help="the checkpoint file inside the --weights folder or Hub repo (default: picked as above)")
    g.add_argument("--revision", default=None, help="Hub revision of a --weights repo id (branch, tag or commit)")
    g.add_argument("--model", default=DEFAULT_MODEL, help="FLUX.1-Kontext hub id or local directory")
    g.add_argument("--encoder", default=None, help="analogy encoder (default: the checkpoint's metadata, else CLIP)")
    g.add_argument("--out", required=True, help="runs folder: RUNS/<task>/<id>/{a,a_prime,b,b_prime}.png")
    g.add_argument("--batch-size", type=int, default=4, help="analogies per pipeline call (default 4)")
    g.add_argument("--merge", choices=MERGE_CHOICES, default="none",
                   help="merge strategy of every pipeline call (default none: the unmerged LoRWeB delta, as the "
                        "official inference.py, for every batch size; auto merges a batch of one only, so results "
                        "depend on the batching; full and offload need --batch-size 1)")
    g.add_argument("--seeds", type=int, nargs="+", default=[50],
                   help="generation seeds (official: 50); several seeds give <id>_seed<s> folders")
    g.add_argument("--steps", type=int, default=None,
                   help=f"denoising steps (default {DEFAULT_STEPS}, official; with --pipe-arg sigmas, one per "
                        "sigma)")
    g.add_argument("--guidance-scale", type=float, default=2.5,
                   help="guidance scale (default 2.5, official inference.py)")
    g.add_argument("--resolution", choices=("official", "native"), default="official",
                   help="official: cells at a's size, ~1 MP generation (inference.py); native: b's aspect, --long-edge")
    g.add_argument("--max-size", type=int, default=None, help="official resolution: control-grid long-edge cap "
                   "(inference.py -m)")
    g.add_argument("--long-edge", type=int, default=None, help="native resolution: control-grid long-edge cap "
                   "(default: the pipeline's)")
    g.add_argument("--input-long-edge", type=int, default=1024,
                   help="long-edge cap of the a, a', b copies saved in the runs folder (default 1024; 0: keep)")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="pipeline dtype (default bf16)")
    g.add_argument("--encoder-dtype", choices=["auto", *sorted(DTYPES)], default="auto",
                   help="analogy encoder dtype; auto (official inference.py): --dtype")
    g.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    g.add_argument("--pair-seed", type=int, default=None,
                   help="seed of the b choices (released set without --pairs, Relation252k; default 0)")
    g.add_argument("--b-per-pair", type=int, default=None,
                   help="b images per (a, a') in the released set without --pairs (default 2, as the paper)")
    g.add_argument("--pairs", default=None, help="released set: JSON/JSONL of {a_prime, b} paths fixing the b choices")
    g.add_argument("--tasks", nargs="+", default=None, help="only these tasks")
    g.add_argument("--max-per-task", type=int, default=None, help="at most this many triplets per task")
    g.add_argument("--pipe-arg", dest="pipe_kwargs", type=_key_value, action="append", default=[],
                   metavar="KEY=VALUE", help="extra pipeline argument (repeatable)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")

    s = sub.add_parser("score", help="CLIP Dir., LPIPS and the VLM judge over runs folders; metrics.json, summary.md")
    s.add_argument("--runs", type=_named_path, nargs="+", action="extend", required=True, metavar="[NAME=]RUNS",
                   help="runs folders to score (methods or checkpoints, compared side by side; repeatable; one NAME "
                        "for several folders pools them, e.g. the custom set and Relation252k as in the paper)")
    s.add_argument("--against", type=_named_path, nargs="+", action="extend", default=[], metavar="[NAME=]RUNS",
                   help="baseline runs folders for the pairwise 2AFC (repeatable)")
    s.add_argument("--out", required=True, help="report folder")
    s.add_argument("--metrics", type=_metric_list, default=None,
                   help="comma-separated subset of clip_dir,lpips,vlm (default: clip_dir,lpips, plus vlm with a judge)")
    s.add_argument("--encoder", default=DEFAULT_CLIP,
                   help=f"CLIP checkpoint for clip_dir (hub id or directory; default {DEFAULT_CLIP})")
    s.add_argument("--lpips-net", choices=LPIPS_NETS, default="alex", help="LPIPS backbone (default alex)")
    s.add_argument("--lpips-weights", default=None,
                   help="backbone ImageNet weights file (default: torchvision's cache, TORCH_HOME/hub/checkpoints)")
    s.add_argument("--judge", default="none", help="the VLM judge: none (default), gemma3:ID_OR_DIR or replay:FILE")
    s.add_argument("--judge-max-new-tokens", type=int, default=1024,
                   help="tokens a Gemma-3 judge may generate per answer (default 1024); an answer cut at this limit "
                        "is counted as truncated, and as failed when it lacks its score")
    s.add_argument("--judge-dtype", choices=sorted(DTYPES), default="bf16", help="Gemma-3 judge dtype (default bf16)")
    s.add_argument("--pairwise-seed", type=int, default=0, help="seed of the B'1/B'2 order (recorded; default 0)")
    s.add_argument("--batch-size", type=int, default=8, help="triplets per CLIP batch (default 8)")
    s.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(func=run_eval)
    return ev


def run_score(args) -> dict:
    """``lorweb-fast eval score``: the command line and the runs folders checked before any model loads, then
    ``score.score``; returns metrics.json's content."""
    from ..cli import DTYPES, _device
    from .evalsets import EvalInputError, check_images_decode, check_outside, read_runs, runs_folders
    from .judge import check_max_new_tokens, make_judge
    from .score import score

    runs, against = _methods(args.runs, "--runs"), _methods(args.against, "--against")
    clash = set(runs) & set(against)
    if clash:
        raise EvalInputError(f"names used both in --runs and --against: {sorted(clash)} (use NAME=PATH)")
    check_max_new_tokens(args.judge_max_new_tokens)  # whatever the judge: a bad value is a bad command line
    from .score import check_batch_size

    check_batch_size(args.batch_size)  # before a judge spends its load time
    from ..validation import check_output_dir

    check_output_dir("--out", args.out)  # a file: one line, before any model loads (not a NotADirectoryError)
    metrics = args.metrics or (["clip_dir", "lpips"] + (["vlm"] if args.judge not in ("", "none") else []))
    from ..validation import check_device

    device = check_device("--device", _device(args.device))  # a bad name or no GPU: one line, before any load
    images = []
    for name, paths in {**runs, **against}.items():  # bad folders and images fail before any model loads
        images += [p for item in read_runs(paths) for p in (item.a, item.a_prime, item.b, item.b_prime)]
        for path in runs_folders(paths):
            check_outside("--out", args.out, path, f"runs folder {name!r}")
    check_images_decode(images, progress=not args.quiet)
    if "clip_dir" in metrics:  # a missing local --encoder is named as such before a judge spends its load time
        from .metrics import check_clip_encoder

        check_clip_encoder(args.encoder)
    if "lpips" in metrics:  # its package and weights file are found missing before a judge spends its load time
        from .metrics import check_lpips

        check_lpips(args.lpips_net, args.lpips_weights)
    judge = make_judge(args.judge, device=device, dtype=DTYPES[args.judge_dtype],
                       max_new_tokens=args.judge_max_new_tokens) if "vlm" in metrics else None
    result = score(runs, args.out, metrics=metrics, encoder=args.encoder, lpips_net=args.lpips_net,
                   lpips_weights=args.lpips_weights, judge=judge, against=against, pairwise_seed=args.pairwise_seed,
                   batch_size=args.batch_size, device=device, progress=not args.quiet)
    failures = sum(m["overall"]["failures"] for m in result["methods"].values())  # every runs folder's
    print(f"eval score: wrote {Path(args.out) / 'metrics.json'} and {Path(args.out) / 'summary.md'} "
          f"({failures} failures)")
    return result


def run_eval(args):
    """Dispatch ``eval generate`` / ``eval score``."""
    if args.eval_command == "generate":
        from .generate import run_generate

        args.pipe_kwargs = dict(args.pipe_kwargs or [])
        return run_generate(args)
    return run_score(args)
