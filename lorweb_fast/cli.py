"""``lorweb-fast`` command line: ``infer``, ``train`` and an offline ``demo``.

    lorweb-fast infer --a A.png --a-prime A2.png --b B.png --prompt "..." --weights W.safetensors [--model ID_OR_DIR]
                      [--encoder ID_OR_DIR] [--out b_prime.png]
    lorweb-fast train --data DIR --out DIR [--model ID_OR_DIR] [--steps N] [--resume] ...
    lorweb-fast demo --out DIR
    lorweb-fast eval generate --evalset DIR --weights W --out RUNS   /   lorweb-fast eval score --runs RUNS --out REPORT
    lorweb-fast data check DATA [--dump OUT]    |    lorweb-fast data prepare RELATION252K OUT

Bad inputs (missing images, files that are not images, weights that do not match the model, an empty data folder)
end with a one-line error naming the problem and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

from ._files import atomic_write
from .official_config import DTYPE_NAMES, OFFICIAL_MODEL

DEFAULT_MODEL = OFFICIAL_MODEL
DTYPES = DTYPE_NAMES


def _device(name: Optional[str]) -> str:
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _save_image(image, path: Path) -> Path:
    from ._files import save_image_atomically

    return save_image_atomically(image, path)  # a failed save keeps the file's earlier content


def analogy_strip(a, a_prime, b, b_prime):
    """One image a | a' | b | b' (each resized to b' size) for a quick look at a result."""
    from PIL import Image

    w, h = b_prime.size
    strip = Image.new("RGB", (4 * w + 3 * 4, h), (255, 255, 255))
    for i, im in enumerate((a, a_prime, b, b_prime)):
        strip.paste(im.convert("RGB").resize((w, h)), (i * (w + 4), 0))
    return strip


# --------------------------------------------------------------------------------------------------- infer
def run_infer(args) -> Path:
    from .flux import LoRWeBKontextPipeline, plot_coefficients
    from .validation import check_infer_args

    images = check_infer_args(args)  # every path and option, before loading any model; a, a', b decoded
    device = _device(args.device)
    pipe = LoRWeBKontextPipeline.from_pretrained(args.model, args.weights, encoder=args.encoder, config=args.config,
                                                 query_mode=args.query_mode, pooling_type=args.pooling_type,
                                                 query_source=args.query_source, dtype=DTYPES[args.dtype],
                                                 encoder_dtype=DTYPES.get(args.encoder_dtype), device=device,
                                                 resolution=args.resolution,
                                                 **{k: getattr(args, k) for k in ("max_area", "max_size", "long_edge")
                                                    if getattr(args, k) is not None})
    generator = torch.Generator(device=pipe.pipe._execution_device).manual_seed(args.seed)
    merge = "none" if args.no_merge else args.merge
    (b_prime,) = pipe(*images, args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                      generator=generator, merge=merge, progress=False if args.quiet else None, **args.pipe_kwargs)
    out = _save_image(b_prime, Path(args.out))
    if args.coefficients_plot:
        plot_coefficients(pipe.transformer, args.coefficients_plot)
        print(f"wrote {out} and {args.coefficients_plot}")
    else:
        print(f"wrote {out}")
    return out


# --------------------------------------------------------------------------------------------------- train
def _train_config(args):
    from .training import TrainConfig

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
              if hasattr(args, f.name)}
    values["betas"] = tuple(values["betas"])
    if values.get("mixed_precision", "") is None:  # not given: the official bf16, whatever the launcher says
        values["mixed_precision"] = TrainConfig.mixed_precision
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")  # accelerate launch's (its default "no" included)
        if launcher and launcher.lower() != values["mixed_precision"] and _main_rank():
            from .training import MIXED_PRECISIONS
            from .validation import warn

            how = (f"pass --mixed-precision {launcher.lower()} to train in it" if launcher.lower() in MIXED_PRECISIONS
                   else f"train supports --mixed-precision {' / '.join(MIXED_PRECISIONS)}")
            warn(f"the launcher's mixed precision {launcher!r} (ACCELERATE_MIXED_PRECISION: accelerate launch "
                 f"--mixed_precision or accelerate config) is not used: train runs in --mixed-precision "
                 f"{values['mixed_precision']} (the official default); {how}")
    return TrainConfig(**values)


def run_train(args) -> dict:
    from .training import train
    from .validation import UsageError, check_train_args

    try:
        cfg = _train_config(args)
        cfg.validate()
    except (TypeError, ValueError) as exc:
        raise UsageError(as_flag_message(str(exc))) from None
    check_train_args(args)  # paths, before loading any model
    grouped_before = _process_group_initialized()
    failed = True
    try:
        result = train(cfg)
        failed = False
        if _main_rank():  # once, not once per process
            print(f"trained to step {result['step']}; weights in {Path(result['out']) / 'lorweb.safetensors'}")
    finally:
        if not grouped_before:
            _end_process_group(failed)
    return result


def _process_group_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _end_process_group(failed: bool) -> None:
    """Destroy the process group ``train`` started (``accelerate launch``), as accelerate's ``end_training`` does:
    torch warns at exit about an NCCL group left alive, and under torch 2.15 a gloo rank sometimes aborted at exit
    ("terminate called without an active exception"). After a failure only a gloo group is destroyed (local):
    an NCCL group's shutdown may wait for ranks still inside a collective, which the launcher stops once this rank
    has exited."""
    if not _process_group_initialized():
        return
    if failed and torch.distributed.get_backend() != "gloo":
        return
    torch.distributed.destroy_process_group()


def as_flag_message(message: str) -> str:
    """A TrainConfig error ("steps must be at least 1, got 0") with its leading field name written as the
    command-line flag that sets it ("--steps must be ...")."""
    from .training import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}  # data and out too: --data, --out
    match = re.match(r"([a-z_]+)(\[\d+\])? must ", message)
    if match is None or match.group(1) not in fields:
        return message
    name = match.group(1)
    flag = "--quiet" if name == "progress" else "--" + name.replace("_", "-")
    return flag + message[len(name):]


# ---------------------------------------------------------------------------------------------------- demo
def run_demo(args) -> dict:
    """Tiny models from configs, a synthetic analogy set, a short training run and one inference; offline."""
    from . import demo
    from .flux import LoRWeBKontextPipeline, plot_coefficients
    from .training import TrainConfig, train
    from .validation import check_demo_args

    check_demo_args(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    print(f"[demo] building a tiny FLUX.1-Kontext pipeline and a tiny CLIP in {out / 'models'}")
    demo.build_tiny_kontext_pipeline(out / "models" / "flux-kontext-tiny", seed=args.seed)
    demo.build_tiny_clip(out / "models" / "clip-tiny", seed=args.seed)
    print(f"[demo] writing {args.samples} synthetic analogies (left-right flip, colour swap) to {out / 'data'}")
    demo.make_synthetic_analogies(out / "data", args.samples, seed=args.seed)
    cfg = TrainConfig(data=str(out / "data"), out=str(out / "train"), model=str(out / "models" / "flux-kontext-tiny"),
                      encoder=str(out / "models" / "clip-tiny"), steps=args.steps, batch_size=min(2, args.samples),
                      learning_rate=args.learning_rate, mixed_precision="no", long_edge=2 * demo.DEMO_CELL,
                      resize="long-edge",
                      max_sequence_length=demo.DEMO_MAX_SEQUENCE_LENGTH, num_loras=8, rank=2, key_dim=8,
                      checkpoint_every=max(1, args.steps // 2), num_workers=0, seed=args.seed,
                      progress=not args.quiet)
    result = train(cfg)
    atomic_write(out / "loss.png", lambda tmp: shutil.copyfile(out / "train" / "loss.png", tmp))

    print("[demo] inference on a held-out analogy with the trained weights")
    # native resolution: the official one generates at ~1 MP, far too slow for the tiny CPU demo
    pipe = LoRWeBKontextPipeline.from_pretrained(cfg.model, out / "train", resolution="native",
                                                 long_edge=2 * demo.DEMO_CELL)
    a, a_prime, b, prompt = demo.demo_analogy(seed=args.seed + 1)
    (b_prime,) = pipe(a, a_prime, b, prompt, num_inference_steps=args.inference_steps,
                      generator=torch.Generator().manual_seed(args.seed),
                      max_sequence_length=demo.DEMO_MAX_SEQUENCE_LENGTH, progress=not args.quiet)
    files = {
        "b_prime": _save_image(b_prime, out / "b_prime.png"),
        "analogy": _save_image(analogy_strip(a, a_prime, b, b_prime), out / "analogy.png"),
        "loss_plot": out / "loss.png",
        "coefficients": plot_coefficients(pipe.transformer, out / "coefficients.png"),
    }
    rows = [json.loads(line) for line in (out / "train" / "loss.jsonl").read_text().splitlines()]
    summary = {"steps": result["step"], "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"],
               "seconds": round(time.time() - start, 1), "files": {k: str(v) for k, v in files.items()}}
    atomic_write(out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
    print(f"[demo] done in {summary['seconds']} s: " + ", ".join(str(v) for v in files.values()))
    return summary


# ---------------------------------------------------------------------------------------------------- parser
def _key_value(text: str):
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    from .reference import ACTIVATIONS, REDUCTIONS
    from .data import BIDIRECTIONAL, LAYOUTS, MISSING_CAPTION_MODES, RESIZE_MODES, add_data_subparser
    from .training import ADAPTER_PRECISIONS, BATCHINGS, CONTROL_LATENTS, ENCODER_DTYPES, MIXED_PRECISIONS, \
        NAN_LOSS, OPTIMIZERS, QUANTIZE_BASE, TIMESTEP_TYPES, WEIGHTING_SCHEMES, TrainConfig
    from .official_config import POOLING_TYPES, QUERY_MODES, QUERY_PROJECTION_TYPES, QUERY_SOURCES, SAVE_DTYPES
    from .validation import DEFAULT_STEPS, OneLineArgumentParser

    QUERY_CHOICES = {"query_mode": QUERY_MODES, "pooling_type": POOLING_TYPES,
                     "query_projection_type": QUERY_PROJECTION_TYPES, "query_source": QUERY_SOURCES,
                     "save_dtype": tuple(SAVE_DTYPES)}

    from . import __version__

    parser = OneLineArgumentParser(prog="lorweb-fast", description="LoRWeB visual analogies on FLUX.1-Kontext.")
    parser.add_argument("--version", action="version", version=f"lorweb-fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{infer,train,data,demo,eval}")

    p = sub.add_parser("infer", help="b' for one analogy a : a' :: b : ?")
    p.add_argument("--a", required=True, help="image a")
    p.add_argument("--a-prime", required=True, help="image a' (a edited)")
    p.add_argument("--b", required=True, help="image b")
    p.add_argument("--prompt", required=True, help="description of the edit")
    p.add_argument("--weights", required=True,
                   help="LoRWeB checkpoint (official safetensors format), or a folder: its final or newest complete "
                        "checkpoint, with the folder's config.yaml; or a Hugging Face Hub repo id (e.g. "
                        "hilamanor/lorweb), downloaded")
    p.add_argument("--weight-name", default=None,
                   help="the checkpoint file inside the --weights folder or Hub repo (default: picked as above)")
    p.add_argument("--revision", default=None, help="Hub revision of a --weights repo id (branch, tag or commit)")
    p.add_argument("--config", default=None,
                   help="official config.yaml (default: the one beside the weights, when present)")
    p.add_argument("--query-mode", choices=QUERY_MODES, default=None,
                   help="default: the config.yaml, else the checkpoint metadata, else \"cat-aa'b\"")
    p.add_argument("--pooling-type", choices=POOLING_TYPES, default=None, help="patch query modes' pooling")
    p.add_argument("--query-source", choices=QUERY_SOURCES, default=None,
                   help="grid: the official query from the control grid; images: a, a', b files (not official); "
                        "default: what the checkpoint records, else grid")
    p.add_argument("--resolution", choices=("official", "native"), default="official",
                   help="official: cells at a's size, ~1 MP generation, control snapped to a Kontext resolution; "
                        "native: b's aspect, grid long edge capped at --long-edge, never upscaled")
    p.add_argument("--max-size", type=int, default=None,
                   help="official resolution: cap on the control grid's long edge (inference.py -m)")
    p.add_argument("--max-area", type=int, default=None,
                   help="official resolution: generated pixels (default 1024**2, as the official pipeline)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="FLUX.1-Kontext hub id or local directory")
    p.add_argument("--encoder", default=None,
                   help="analogy encoder hub id or directory (default: the checkpoint's metadata, else CLIP ViT-L/14)")
    p.add_argument("--out", default="b_prime.png", help="output image (default b_prime.png)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"denoising steps (default: {DEFAULT_STEPS}, official; with --pipe-arg sigmas, one per sigma)")
    p.add_argument("--guidance-scale", type=float, default=2.5,
                   help="FLUX guidance (default: %(default)s, official)")
    p.add_argument("--seed", type=int, default=50,
                   help="generator seed, on the execution device as inference.py (default: %(default)s, official)")
    p.add_argument("--long-edge", type=int, default=None,
                   help="native resolution: cap on the control grid's long edge (default 1024)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="pipeline dtype (default: %(default)s)")
    p.add_argument("--encoder-dtype", choices=["auto", *sorted(DTYPES)], default="auto",
                   help="analogy encoder dtype; auto (official inference.py): --dtype")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    merging = p.add_mutually_exclusive_group()
    merging.add_argument("--merge", choices=("auto", "full", "offload", "jit", "none"), default="auto",
                         help="merge strategy (see lorweb_fast.flux.merged; default: %(default)s): auto picks from "
                              "the free memory; full keeps a merged copy of the adapted weights, offload keeps the "
                              "originals in host memory, jit merges one layer at a time inside its forward, none "
                              "runs the fused LoRA path")
    merging.add_argument("--no-merge", action="store_true", help="same as --merge none")
    p.add_argument("--coefficients-plot", default=None, help="also write a coefficient heat map here")
    p.add_argument("--pipe-arg", dest="pipe_kwargs", type=_key_value, action="append", default=[],
                   metavar="KEY=VALUE", help="extra FluxKontextPipeline argument (repeatable)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars (the denoising loop's, and diffusers', transformers' and huggingface_hub's "
                        "loading bars), as in train, data, demo and eval")
    p.set_defaults(func=run_infer)

    t = sub.add_parser("train", help="train LoRWeB on an analogy folder (works under accelerate launch)")
    t.add_argument("--data", required=True,
                   help="analogy folder: control/ and target/ (official: a|a'|b strips and b' images, captions in "
                        "analogy_metadata.json or .txt beside the targets; or 2x2 grids); see lorweb-fast data check")
    t.add_argument("--out", required=True, help="output folder (weights, checkpoints, loss log and plot)")
    choices = {"optimizer": OPTIMIZERS, "mixed_precision": MIXED_PRECISIONS, "weighting_scheme": WEIGHTING_SCHEMES,
               "activation": ACTIVATIONS, "reduce": REDUCTIONS, "timestep_type": TIMESTEP_TYPES, "layout": LAYOUTS,
               "bidirectional": BIDIRECTIONAL, "adapter_precision": ADAPTER_PRECISIONS,
               "quantize_base": QUANTIZE_BASE, "resize": RESIZE_MODES, "batching": BATCHINGS,
               "control_latents": CONTROL_LATENTS, "encoder_dtype": ENCODER_DTYPES, "nan_loss": NAN_LOSS,
               "missing_caption": MISSING_CAPTION_MODES,
               **QUERY_CHOICES}
    helps = {"batch_size": "per process", "resume": "continue from the newest checkpoint in --out",
             "overwrite": "delete the run already in --out (its checkpoints, weights and logs) and start over",
             "skip_bad": "skip broken samples with a warning instead of failing",
             "missing_caption": "a sample without a caption: empty (official: it trains with an empty caption; a "
                                "warning names them) or raise (a broken sample: an error, or skipped with --skip-bad)",
             "timestep_type": "weighted (official: uniform over the 1000-step grid, bell-curve loss weight), linear "
                              "(same grid, no weight) or diffusers (--weighting-scheme)",
             "weighting_scheme": "diffusers' timestep density / loss weighting (with --timestep-type diffusers)",
             "adam_eps": "AdamW epsilon (official 1e-6)",
             "layout": "data layout: auto (from the image sizes), strip (official a|a'|b + b') or grid (2x2 grids)",
             "bidirectional": "reverse half of the analogies at random: official (is_bidirectional_analogy, exactly as "
                              "the official loader composes them) or reverse (control [a' a; b' b'])",
             "adapter_precision": "bf16: fused kernels in the compute dtype (fp32 accumulation); fp32: the official "
                                  "numerics (x and query cast to the fp32 LoRA parameters)",
             "quantize_base": "qfloat8: the official fp8 quantization (optimum-quanto, transformer and T5, CPU or "
                              "GPU); int8 / nf4: the transformer loaded by stock diffusers with bitsandbytes (GPU)",
             "cudnn_attention": "let the transformer's attention use cuDNN's SDPA kernels while training (off: their "
                                "backward returned NaN gradients on an H200 with torch 2.11)",
             "nan_loss": "skip (official: a step whose loss is NaN makes no update, logged) or raise (stop with an "
                         "error)",
             "checkpoint_every": "steps between checkpoints (official 250)",
             "keep_checkpoints": "newest checkpoints kept (official 4); 0: keep every checkpoint",
             "keep_milestone_every": "checkpoints at steps that are multiples of this are never rotated out "
                                     "(official ai-toolkit: 500); 0: rotate them like the others",
             "long_edge": "training resolution: the bucket resolution (official 512) or the long edge (--resize)",
             "resize": "bucket (official ai-toolkit aspect buckets of b''s size, centre crop) or long-edge",
             "bucket_divisibility": ("bucket sides are multiples of this (official 16: ai-toolkit replaces the "
                                     "config's bucket_tolerance with FluxKontextModel.get_bucket_divisibility())"),
             "control_latents": "sample (official: the control grid's VAE latents drawn from the latent "
                                "distribution) or mode (its mean, as diffusers' pipeline at inference)",
             "encoder_dtype": "analogy encoder dtype; auto (official): the training dtype (--mixed-precision)",
             "batching": "bucket (official: every batch from one training size, a bucket's last batch may be "
                         "smaller) or mixed (batches across sizes, each resized to its first sample's size)"}
    for f in dataclasses.fields(TrainConfig):  # one option per TrainConfig field, its default from the dataclass
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("data", "out"):
            continue
        text = helps.get(f.name)
        if f.name == "betas":
            t.add_argument(flag, type=float, nargs=2, default=list(f.default), help="AdamW betas (default: 0.9 0.99)")
        elif f.name == "progress":  # --quiet as in data, demo and eval; --no-progress kept as an alias
            t.add_argument("--quiet", "--no-progress", dest="progress", action="store_false", help="no progress bar")
        elif isinstance(f.default, bool) and f.default:
            t.add_argument("--no-" + flag[2:], dest=f.name, action="store_false",
                           help=f"turn {f.name.replace('_', ' ')} off (on by default)")
        elif isinstance(f.default, bool):
            t.add_argument(flag, action="store_true", help=text)
        elif f.name == "mixed_precision":  # None: not given (a launcher's precision is then named in a warning)
            t.add_argument(flag, default=None, choices=choices[f.name],
                           help=f"default: {f.default} (official); accelerate launch's --mixed_precision is not read")
        else:
            t.add_argument(flag, type=type(f.default), default=f.default, choices=choices.get(f.name),
                           help=f"{text} (default: %(default)s)" if text else "default: %(default)s")
    t.set_defaults(func=run_train)

    add_data_subparser(sub)
    d = sub.add_parser("demo", help="offline end-to-end run on tiny random models (about a minute on a 2-core CPU)")
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument("--steps", type=int, default=40, help="training steps (default: %(default)s)")
    d.add_argument("--samples", type=int, default=16, help="synthetic analogies (default: %(default)s)")
    d.add_argument("--learning-rate", type=float, default=1e-2, help="default: %(default)s")
    d.add_argument("--inference-steps", type=int, default=8, help="denoising steps (default: %(default)s)")
    d.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=run_demo)

    from .evaluation.cli import add_eval_subparser

    add_eval_subparser(sub)  # eval generate / eval score (dispatch: evaluation.cli.run_eval)
    return parser


def one_line(text: str) -> str:
    """``text`` on one line: its non-blank lines stripped and joined with "; ", or with a space after a line that
    already ends in ":", ";" or "," (a multi-line "...; the model was not changed:" list reads "...: a; b")."""
    joined = ""
    for line in (raw.strip() for raw in text.splitlines()):
        if line:
            joined += line if not joined else (" " if joined[-1] in ":;," else "; ") + line
    return joined


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``lorweb-fast``: the command's exit status (0; 2 for bad input; 1 for a failed write; 130 after Ctrl-C; 141
    when the reader of its output has gone, as ``lorweb-fast ... | head``)."""
    return run_writing_stdout("lorweb-fast", lambda: _run(argv))


def run_writing_stdout(prog: str, run) -> int:
    """``run()`` (a command's body, returning its exit status; argparse's SystemExit passes through) with its output
    flushed before the status is returned, as a Unix filter ends: a reader that has gone (a closed pipe) ends the
    command quietly with 141 (128 + SIGPIPE, what a shell reports for a C program a closed pipe stopped), and output
    that cannot be written (a full disk) is one line on stderr and status 1, never "Exception ignored" and status 120
    at interpreter exit. A file name that is not UTF-8 (held by Python as surrogate escapes) is printed escaped
    (``caf\\udce9``) where stdout's encoding would raise on it (``printable_stdout``)."""
    try:
        with printable_stdout():
            status = run()
    except SystemExit as exc:  # --help, a usage error: their text must reach the reader too
        failed = _flush_stdout(prog)
        if failed is not None and exc.code in (0, None):
            raise SystemExit(failed) from None
        raise
    except BrokenPipeError:
        if not stdout_reader_gone():
            raise
        _discard_stdout()
        return 141
    failed = _flush_stdout(prog)
    return status if failed is None else failed


@contextlib.contextmanager
def printable_stdout():
    """stdout writing what its encoding cannot (a non-UTF-8 file name, held as surrogate escapes, under a UTF-8
    locale such as en_US.UTF-8 whose stdout is "strict") as backslash escapes inside the block, its error handler
    restored after: a command's report never dies half printed on a file name."""
    stream = sys.stdout
    errors = getattr(stream, "errors", None)
    changed = False
    if errors == "strict" and callable(getattr(stream, "reconfigure", None)):
        try:
            stream.reconfigure(errors="backslashreplace")
            changed = True
        except (ValueError, OSError, io.UnsupportedOperation):  # a detached or closed stream: left as it is
            pass
    try:
        yield
    finally:
        if changed:
            try:
                stream.reconfigure(errors=errors)
            except (ValueError, OSError, io.UnsupportedOperation):
                pass


def stdout_reader_gone() -> bool:
    """Whether stdout is a pipe (or socket) whose reader has gone: poll reports an error or hang-up on it. A
    BrokenPipeError from anything else (a worker's pipe) is not taken for it."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no file descriptor (a captured stdout), no poll
        return False


def _discard_stdout() -> None:
    """Point stdout's file descriptor at /dev/null: what is still buffered goes nowhere at interpreter exit instead
    of raising there (Python's own advice for SIGPIPE)."""

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _flush_stdout(prog: str) -> Optional[int]:
    """Flush stdout: None when done, else the exit status (141: its reader has gone; 1: it cannot be written,
    said in one line on stderr)."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _discard_stdout()
        return 141
    except OSError as exc:
        _discard_stdout()
        _stderr_line(f"{prog}: error: cannot write the output (stdout): {exc.strerror or one_line(str(exc))}")
        return 1
    except (ValueError, AttributeError):  # closed or replaced by the caller
        pass
    return None


def _run(argv: Optional[Sequence[str]] = None) -> int:
    from .model import LoRWeBCheckpointError
    from .ops import BackendUnavailableError

    args = build_parser().parse_args(argv)
    if getattr(args, "pipe_kwargs", None) is not None:
        args.pipe_kwargs = dict(args.pipe_kwargs)
    quiet = bool(getattr(args, "quiet", False)) or getattr(args, "progress", True) is False
    sub = getattr(args, f"{args.command}_command", None)  # "data check", "eval score": as argparse's errors
    command = args.command if sub is None else f"{args.command} {sub}"
    try:
        with library_progress_bars(enabled=not quiet), one_line_warnings(command), command_logging(command):
            args.func(args)
    except (FileNotFoundError, LoRWeBCheckpointError, BackendUnavailableError, ValueError) as exc:
        from .validation import REPORTED_BY_MAIN_PROCESS

        if not getattr(exc, REPORTED_BY_MAIN_PROCESS, False):  # the main process's error, raised on every rank
            _stderr_line(f"lorweb-fast {command}: error: {one_line(str(exc))}")
        return 2
    except ImportError as exc:  # a package the command needs is missing or broken: one line naming it
        line = _import_error_line(exc)
        if line is None:  # a name an installed package lacks (a bug, or versions that do not fit): its traceback
            raise
        _stderr_line(f"lorweb-fast {command}: error: {one_line(line)}")
        return 2
    except OSError as exc:  # a write that failed (full disk, read-only folder, I/O error): one line, not a traceback
        if isinstance(exc, BrokenPipeError) and stdout_reader_gone():  # `... | head`: ends quietly, as a filter
            hint = _continue_hint(command, args)
            _discard_stdout()
            if hint and _main_rank():  # work that continues: how
                _stderr_line(f"lorweb-fast {command}: stopped: the reader of its output has gone{hint}")
            return 141
        step = getattr(exc, "lorweb_step", None)
        _stderr_line(f"lorweb-fast {command}: error: {_os_error_line(exc)}"
                     + ("" if step is None else f" (writing step {step})") + _continue_hint(command, args))
        return 1
    except KeyboardInterrupt as interrupt:  # Ctrl-C: one line saying how to continue, not a traceback from torch
        if _main_rank():  # once under accelerate launch, whose launcher passes the Ctrl-C on to every rank
            _stderr_line(f"lorweb-fast {command}: interrupted{_continue_hint(command, args)}")
        _free_interrupted_frames(interrupt)
        return 130  # 128 + SIGINT, as a shell reports a process Ctrl-C stopped
    return 0


def _free_interrupted_frames(interrupt: BaseException) -> None:
    """Free now what the interrupted code held (the locals of its frames), with Python's "Exception ignored in
    ... __del__" reports silenced meanwhile: an object Ctrl-C left half built (pyparsing's grammar inside
    matplotlib's first plot) fails in its ``__del__``, which Python would report after the command's last line,
    at interpreter exit. The caller's ``sys.unraisablehook`` is back afterwards."""
    import gc
    import traceback

    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        traceback.clear_frames(interrupt.__traceback__)
        gc.collect()
    finally:
        sys.unraisablehook = hook


def _main_rank() -> bool:
    """Whether this is the main process: rank 0 of the process group, or (the group already ended, or not yet
    started) of the launcher's RANK variable."""
    import os

    if _process_group_initialized():
        return torch.distributed.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def _stderr_line(text: str) -> None:
    """``text`` and its newline in one write: the ranks of ``accelerate launch`` share stderr, and ``print``'s
    separate writes of a message and its newline let two ranks' lines run together."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _import_error_line(exc: ImportError) -> Optional[str]:
    """The line for an ImportError: a MissingDependencyError's message, or for a package that is not installed at
    all (a ModuleNotFoundError whose top-level package cannot be found) the package and its pip command; None for
    anything else (a module or name an installed package lacks: a bug or a version mismatch, shown as a
    traceback)."""
    import importlib.util

    from .validation import MissingDependencyError, dependency_message, missing_package

    if isinstance(exc, MissingDependencyError):
        return str(exc)
    top = missing_package(exc)
    if top in ("", "lorweb_fast"):
        return None
    try:
        installed = importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):  # a package blocked in sys.modules (None) or without a spec
        installed = False
    return None if installed else dependency_message(top, "this command", exc)


def _os_error_line(exc: OSError) -> str:
    """``<file>: <cause>`` (``<file> -> <file2>`` for a rename) of an OSError; its text when it names no file."""
    if exc.filename is None:
        return one_line(str(exc))
    where = str(exc.filename) + ("" if exc.filename2 is None else f" -> {exc.filename2}")
    return f"{where}: {exc.strerror or one_line(str(exc))}"


def _continue_hint(command: str, args) -> str:
    """How an interrupted ``command`` continues: "" when it does not."""
    if command == "train":
        from .training import latest_checkpoint

        try:
            newest = latest_checkpoint(args.out)
        except OSError:
            newest = None
        if newest is None:
            return f"; no checkpoint was written to {args.out} yet"
        if getattr(args, "overwrite", False):  # interrupted before or after it deleted the old run
            return (f"; the newest checkpoint in {args.out} is {newest.name}: run the same command with --resume "
                    "instead of --overwrite to continue from it, or the same command to start over")
        again = "again" if getattr(args, "resume", False) else "with --resume"
        return f"; the newest checkpoint is {newest.name}: run the same command {again} to continue from it"
    if command == "eval generate":
        return "; run the same command again to continue (the images written are kept)"
    if command == "data prepare":
        return "; run the same command again to continue (the analogies written are kept)"
    if command == "demo" and Path(args.out).is_dir() and any(Path(args.out).iterdir()):
        return (f"; {args.out} holds this run's partial demo, which the same command refuses: delete it before "
                "running it again")
    return ""


class _OneLineFormatter(logging.Formatter):
    def __init__(self, command: str):
        super().__init__()
        self.command = command

    def format(self, record: logging.LogRecord) -> str:
        return f"lorweb-fast {self.command}: {record.levelname.lower()}: {one_line(record.getMessage())}"


@contextlib.contextmanager
def command_logging(command: str):
    """The package's log lines (``lorweb_fast.*`` loggers: the trainer's buckets, "resumed from ...", skipped NaN
    steps) shown on stderr while a command runs, from INFO up, one line each as ``lorweb-fast <command>: info: ...``
    (Python's default shows only warnings, without the command). Under a launcher only the main process shows them
    (``_main_rank``; as accelerate's loggers do by default), not one copy per rank. The package logger's level,
    propagation and handlers are given back after the command; records do not also reach the root logger's
    handlers meanwhile."""
    package = logging.getLogger("lorweb_fast")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter(command))
    handler.addFilter(lambda record: _main_rank())
    saved = (package.level, package.propagate)
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    package.propagate = False
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(saved[0])
        package.propagate = saved[1]


@contextlib.contextmanager
def one_line_warnings(command: str):
    """Warnings shown while a command runs read ``lorweb-fast <command>: warning: <message>`` on one line, as its
    errors do (Python's default format adds the warning's file, line, category and source line; a category other
    than UserWarning is kept before the message). Under a launcher only the main process prints them (``_main_rank``:
    every rank loads the same model and data, so each warning would otherwise show once per rank). Only the format
    and the ranks that print change: which warnings are raised, and their capture
    (``warnings.catch_warnings(record=True)``, pytest), do not."""
    original, original_show = warnings.formatwarning, warnings.showwarning
    printing = original_show is getattr(warnings, "_showwarning_orig", None)  # not a capture's (record=True)

    def formatwarning(message, category, filename, lineno, line=None):
        kind = "" if category is UserWarning else f"{category.__name__}: "  # a library's FutureWarning keeps its kind
        return f"lorweb-fast {command}: warning: {kind}{one_line(str(message))}\n"

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if _main_rank():
            original_show(message, category, filename, lineno, file, line)

    warnings.formatwarning = formatwarning
    if printing:
        warnings.showwarning = showwarning
    try:
        yield
    finally:
        warnings.formatwarning = original
        if printing and warnings.showwarning is showwarning:
            warnings.showwarning = original_show


@contextlib.contextmanager
def library_progress_bars(enabled: bool):
    """With ``enabled=False`` (``--quiet``): diffusers', transformers' and huggingface_hub's own progress bars
    (loading pipeline components and weights, writing shards, downloads) are off for the block, and put back as they
    were after it (huggingface_hub's per-group states included; transformers' switch also turns huggingface_hub's
    on, so huggingface_hub is restored last)."""
    if enabled:
        yield
        return
    import importlib

    switches = []
    for module_name in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            logging_module = importlib.import_module(module_name)
        except ImportError:
            continue
        switches.append((logging_module.is_progress_bar_enabled(), logging_module.disable_progress_bar,
                         logging_module.enable_progress_bar))
    hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")  # the module (``utils.tqdm`` is the class)
    hub_states = getattr(hub_tqdm, "progress_bar_states", None)
    hub_before = None if hub_states is None else dict(hub_states)
    hub_was_disabled = hub_tqdm.are_progress_bars_disabled()
    try:
        for _, disable, _ in switches:
            disable()
        hub_tqdm.disable_progress_bars()
        yield
    finally:
        for was_on, _, enable in switches:
            if was_on:
                enable()
        if hub_before is not None:
            hub_states.clear()
            hub_states.update(hub_before)
        elif hub_was_disabled:
            hub_tqdm.disable_progress_bars()
        else:
            hub_tqdm.enable_progress_bars()


if __name__ == "__main__":
    sys.exit(main())
