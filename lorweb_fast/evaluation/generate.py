"""``eval generate``: run a LoRWeB pipeline over an evaluation set, batching different analogies in one call.

Output: ``RUNS/<task>/<id>/{a,a_prime,b,b_prime}.png`` and ``prompt.txt`` per triplet (``<id>_seed<s>`` per seed
when several seeds are given), ``RUNS/run.json`` (the generation settings) and ``RUNS/evalset.json`` (where every
input came from). Every file is written atomically (a temporary file renamed into place) and ``b_prime.png`` is
written last, so a triplet whose ``b_prime.png`` exists is finished: a rerun skips it.

Batches only hold analogies whose a and b have the same sizes, so every batch element gets the control grid it would
get alone (the pipeline gives the whole batch one grid size); with one generator per analogy, a batched run matches
one-by-one runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from .evalsets import EvalInputError, Triplet

#: run.json settings that must match when a run is resumed.
RESUME_KEYS = ("weights", "weights_file", "weights_sha256", "model", "encoder", "seeds", "steps", "guidance_scale",
               "pipe_kwargs", "dtype", "encoder_dtype", "resolution", "max_size", "long_edge")
#: settings that run.json files written before they existed lack: such a run cannot be checked for them
UNRECORDED_BEFORE = ("weights_file", "weights_sha256")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_save_image(image, path: Path) -> None:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def capped(image, long_edge: Optional[int]):
    """``image`` resized (bicubic) so that its long edge is at most ``long_edge`` (unchanged when 0/None)."""
    from PIL import Image

    if not long_edge or max(image.size) <= long_edge:
        return image
    scale = long_edge / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)


def output_id(triplet: Triplet, seed: int, seeds: Sequence[int]) -> str:
    return triplet.id if len(seeds) == 1 else f"{triplet.id}_seed{seed}"


def check_run_settings(out: Path, settings: dict, *, write: bool = True) -> None:
    """Check that a resumed run (``out/run.json`` exists) uses the same settings (raises ``EvalInputError``), then
    write ``out/run.json`` when ``write``."""
    path = out / "run.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise EvalInputError(f"{path} is not valid JSON ({exc})") from exc
        old.setdefault("resolution", "native")  # run.json files written before --resolution existed
        diff = {k: (old.get(k), settings.get(k)) for k in RESUME_KEYS if k in old and old.get(k) != settings.get(k)
                or k not in old and settings.get(k) is not None and k not in UNRECORDED_BEFORE}
        if diff:
            changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise EvalInputError(f"{out} holds a run with other settings ({changes}); use another --out folder")
    if write:
        atomic_write_text(path, json.dumps(settings, indent=2))


def _batches(jobs: list, batch_size: int) -> list:
    """Consecutive groups of at most ``batch_size`` jobs sharing (a size, b size)."""
    groups: dict = {}
    for job in jobs:
        groups.setdefault(job["sizes"], []).append(job)
    out = []
    for group in groups.values():
        out += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    return out


def generate(pipe, triplets: Sequence[Triplet], out, *, seeds: Sequence[int] = (50,), batch_size: int = 4,
             num_inference_steps: int = 28, guidance_scale: float = 2.5, device=None,
             input_long_edge: Optional[int] = 1024, progress: bool = True, pipe_kwargs: Optional[dict] = None) -> dict:
    """Generate b' for every (triplet, seed) not finished yet in ``out``; returns {"generated", "skipped"}.

    ``pipe`` is a ``LoRWeBKontextPipeline`` (called through ``pipe(a, a_prime, b, prompt, generator=...)``).
    ``input_long_edge`` caps the long edge of the a, a', b copies saved next to b' (the pipeline always gets the
    full-size inputs); 0 or None keeps them as they are. One ``torch.Generator(device).manual_seed(seed)`` per
    analogy.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise EvalInputError(f"batch size must be >= 1, got {batch_size}")
    if not seeds:
        raise EvalInputError("at least one seed is needed")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "evalset.json", json.dumps([t.describe() for t in triplets], indent=2))
    jobs, skipped = [], 0
    for t in triplets:
        for seed in seeds:
            d = out / t.task / output_id(t, seed, seeds)
            if (d / "b_prime.png").is_file():
                skipped += 1
                continue
            jobs.append({"triplet": t, "seed": seed, "dir": d})
    for job in jobs:  # sizes from the file headers: images are read one batch at a time
        t = job["triplet"]
        job["sizes"] = (_ref_size(t.a), _ref_size(t.b))
    generated = 0
    bar = tqdm(total=len(jobs), desc="eval generate", unit="b'", disable=not progress)
    for batch in _batches(jobs, batch_size):
        images = [[job["triplet"].a.load(), job["triplet"].a_prime.load(), job["triplet"].b.load()] for job in batch]
        a, a_prime, b = (list(x) for x in zip(*images))
        prompts = [job["triplet"].prompt for job in batch]
        gens = [torch.Generator(device=device or "cpu").manual_seed(int(job["seed"])) for job in batch]
        results = pipe(a, a_prime, b, prompts, num_inference_steps=num_inference_steps,
                       guidance_scale=guidance_scale, generator=gens, progress=False, **(pipe_kwargs or {}))
        if len(results) != len(batch):
            raise RuntimeError(f"the pipeline returned {len(results)} images for {len(batch)} analogies")
        for job, imgs, b_prime in zip(batch, images, results):
            d = job["dir"]
            for name, img in zip(("a", "a_prime", "b"), imgs):
                atomic_save_image(capped(img, input_long_edge), d / f"{name}.png")
            atomic_write_text(d / "prompt.txt", job["triplet"].prompt + "\n")
            atomic_save_image(b_prime, d / "b_prime.png")  # last: marks the triplet finished
            generated += 1
            bar.update(1)
    bar.close()
    return {"generated": generated, "skipped": skipped}


def _ref_size(ref) -> tuple:
    """(width, height) of an ImageRef after its crops, from the file header."""
    from .evalsets import image_size

    w, h = image_size(ref.path)
    if ref.box is not None:
        l, u, r, d = ref.box
        w, h = round(r * w) - round(l * w), round(d * h) - round(u * h)
    if ref.aspect is not None:
        if w / h > ref.aspect:
            w = max(1, round(h * ref.aspect))
        else:
            h = max(1, round(w / ref.aspect))
    return w, h


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _resolve_weights(weights) -> tuple[Path, Optional[Path]]:
    """(checkpoint file, its config.yaml or None) of ``--weights``: the file itself, or the folder's final or newest
    complete checkpoint as ``official_config.find_checkpoint`` picks it."""
    from ..lora_api import resolve_weight_file
    from ..official_config import find_checkpoint

    path = Path(weights)
    return find_checkpoint(path) if path.is_dir() else (resolve_weight_file(path), None)


def run_generate(args) -> dict:
    """``lorweb-fast eval generate``."""
    from ..cli import DTYPES, _device
    from ..flux import LoRWeBKontextPipeline
    from .evalsets import read_evalset

    if args.batch_size < 1:
        raise EvalInputError(f"batch size must be >= 1, got {args.batch_size}")
    triplets = read_evalset(args.evalset, args.format, seed=args.pair_seed, b_per_pair=args.b_per_pair,
                            pairs_file=args.pairs, tasks=args.tasks, max_per_task=args.max_per_task)
    for t in triplets:  # fail on a missing input before loading any model
        for ref in (t.a, t.a_prime, t.b):
            if not Path(ref.path).is_file():
                raise EvalInputError(f"image not found: {ref.path}")
    out = Path(args.out)
    pipe_kwargs = dict(args.pipe_kwargs or {})
    # the exact checkpoint: a run folder still training gains newer checkpoints, and a resumed evaluation must not
    # mix the b' of two of them (the file and its SHA-256 are recorded and checked on resume)
    weights_file, config = _resolve_weights(args.weights)
    settings = {"weights": str(args.weights), "weights_file": str(weights_file.resolve()),
                "weights_sha256": file_sha256(weights_file), "model": str(args.model), "encoder": args.encoder,
                "seeds": list(args.seeds), "steps": args.steps, "guidance_scale": args.guidance_scale,
                "pipe_kwargs": pipe_kwargs, "evalset": str(args.evalset), "format": args.format,
                "pair_seed": args.pair_seed, "dtype": args.dtype, "batch_size": args.batch_size,
                "encoder_dtype": args.dtype if getattr(args, "encoder_dtype", "auto") == "auto" else args.encoder_dtype,
                "resolution": args.resolution, "max_size": args.max_size, "long_edge": args.long_edge,
                "triplets": len(triplets)}
    check_run_settings(out, settings, write=False)  # before loading any model
    device = _device(args.device)
    kwargs = {"resolution": args.resolution, "max_size": args.max_size}
    if args.long_edge is not None:
        kwargs["long_edge"] = args.long_edge
    pipe = LoRWeBKontextPipeline.from_pretrained(args.model, weights_file, config=config, encoder=args.encoder,
                                                 dtype=DTYPES[args.dtype], device=device,
                                                 encoder_dtype=DTYPES[settings["encoder_dtype"]], **kwargs)
    check_run_settings(out, settings)  # nothing is written when the models fail to load
    result = generate(pipe, triplets, out, seeds=args.seeds, batch_size=args.batch_size,
                      num_inference_steps=args.steps, guidance_scale=args.guidance_scale, device=device,
                      input_long_edge=args.input_long_edge, progress=not args.quiet, pipe_kwargs=pipe_kwargs)
    print(f"eval generate: {result['generated']} generated, {result['skipped']} already done, in {out}")
    return result
