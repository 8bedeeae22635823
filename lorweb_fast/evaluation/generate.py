"""``eval generate``: run a LoRWeB pipeline over an evaluation set, batching different analogies in one call.

Output: ``RUNS/<task>/<id>/{a,a_prime,b,b_prime}.png`` and ``prompt.txt`` per triplet (``<id>_seed<s>`` per seed
when several seeds are given), ``RUNS/run.json`` (the generation settings) and ``RUNS/evalset.json`` (where every
input came from). Every file is written atomically (a temporary file renamed into place) and ``b_prime.png`` is
written last, so a triplet whose ``b_prime.png`` exists is finished: a rerun skips it.

Batches only hold analogies whose a and b have the same sizes, so every batch element gets the control grid it would
get alone (the pipeline gives the whole batch one grid size). Every batch runs the same merge strategy (``merge``,
default "none": the unmerged LoRWeB delta, as the official inference), whatever its size; with one generator per
analogy, a batched run then matches one-by-one runs up to floating-point rounding (batched matmuls may round
differently). The pipeline's own default, "auto", would merge the weights for a batch of one and run unmerged for
larger batches, so a triplet's numerics would depend on the batch it lands in.

A resumed run must use the settings ``run.json`` recorded (``RESUME_KEYS``): the checkpoint, the generation settings
and everything that picks the triplets (evaluation set, its format, ``--pair-seed``, ``--b-per-pair``, the ``--pairs``
file's SHA-256), and the device type of the generators (a CPU and a CUDA generator draw different noise from one
seed); ``--tasks`` and ``--max-per-task`` only restrict a run to a subset of the same triplets and may change. Local
model, encoder and weights paths are recorded resolved (``source_identity``). For the layouts that pick b at random
from a listing (the released set without ``--pairs``, Relation252K), every (a, a') pair's picks are recorded too
(``b_choices``): a resume after photos added to the set changed a recorded pair's picks is refused.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import torch

from .._files import FolderLock, atomic_write, loads_json, remove_temporaries, \
    save_image_atomically
from .evalsets import EvalInputError, Triplet, utf8_bytes

#: The files ``generate`` writes in each triplet's folder (b_prime.png last: it marks the triplet finished).
TRIPLET_FILES = ("a.png", "a_prime.png", "b.png", "prompt.txt", "b_prime.png")
#: The lock file ``eval generate`` holds in its ``--out`` while it runs (``_files.FolderLock``).
GENERATE_LOCK_NAME = ".lorweb-generate.lock"

#: run.json settings that must match when a run is resumed.
RESUME_KEYS = ("weights", "weights_file", "weights_sha256", "model", "encoder", "seeds", "steps", "guidance_scale",
               "pipe_kwargs", "dtype", "encoder_dtype", "resolution", "max_size", "long_edge", "merge", "evalset",
               "format", "pair_seed", "b_per_pair", "pairs_sha256", "input_long_edge", "generator_device")
#: RESUME_KEYS recorded as None where they choose nothing (``--pair-seed`` / ``--b-per-pair`` with a layout or a
#: pairs file that fixes every b): not compared on resume (older runs recorded the value given, or its default)
CHOOSING_NOTHING_WHEN_NONE = ("pair_seed", "b_per_pair")
#: settings that run.json files written before they existed lack: such a run cannot be checked for them
UNRECORDED_BEFORE = ("weights_file", "weights_sha256", "b_per_pair", "pairs_sha256", "input_long_edge",
                     "generator_device")
#: ``merge`` values of ``generate`` (the pipeline's ``merge``; "none" = the unmerged path)
MERGE_CHOICES = ("none", "auto", "full", "offload", "jit")
#: pipeline arguments ``generate`` sets itself, and the option that sets them instead of ``--pipe-arg``
OWN_PIPE_ARGS = {"merge": "--merge", "num_inference_steps": "--steps", "guidance_scale": "--guidance-scale",
                 "generator": "--seeds", "seed": "--seeds", "num_images_per_prompt": "--seeds", "progress": "--quiet",
                 "output_type": None}


def atomic_write_text(path: Path, text: str) -> None:
    """``path`` holds ``text`` completely or keeps what it held (``_files.atomic_write``; no temporary is left),
    synced to disk before the rename: a resumed run takes an existing file as done."""
    atomic_write(path, lambda tmp: tmp.write_bytes(text.encode()), sync=True)


def atomic_save_image(image, path: Path) -> None:
    """``image`` as ``path`` (a .png), written and synced as ``atomic_write_text``."""
    save_image_atomically(image, path, sync=True)


def capped(image, long_edge: Optional[int]):
    """``image`` resized (bicubic) so that its long edge is at most ``long_edge`` (unchanged when 0/None)."""
    from PIL import Image

    if not long_edge or max(image.size) <= long_edge:
        return image
    scale = long_edge / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)


def output_id(triplet: Triplet, seed: int, seeds: Sequence[int]) -> str:
    """The output folder name under ``RUNS/<task>/``: the triplet id, ``<id>_seed<seed>`` when several seeds run."""
    return triplet.id if len(seeds) == 1 else f"{triplet.id}_seed{seed}"


def source_identity(value) -> Optional[str]:
    """How run.json records a model, encoder or weights source (``_files.recorded_location``: a local path resolved,
    so the same files typed another way match and a relative path typed in another directory does not; a Hugging
    Face Hub id as given); None stays None."""
    from .._files import recorded_location

    return None if value is None else recorded_location(value)


#: settings recorded as ``source_identity``
SOURCE_KEYS = ("weights", "model", "encoder")


def _same_setting(key: str, old, new) -> bool:
    """Whether a recorded setting matches the current one. ``evalset``: the same folder (a relative path, as older
    run.json files hold, is resolved against the current directory); ``weights``, ``model``, ``encoder``: the same
    ``source_identity`` (the same for older run.json files, which hold them as typed); ``format``: an old recorded
    "auto" (older run.json files did not record the detected format) matches any format."""
    if key == "evalset" and old is not None and new is not None:
        return Path(old).resolve() == Path(new).resolve()
    if key in SOURCE_KEYS and old is not None and new is not None:
        return source_identity(old) == source_identity(new)
    if key == "format" and old == "auto":
        return True
    return old == new


def check_run_settings(out: Path, settings: dict, *, write: bool = True) -> None:
    """Check that a resumed run (``out/run.json`` exists) uses the same settings (the ``RESUME_KEYS``; raises
    ``EvalInputError``), then write ``out/run.json`` when ``write``. A key the old run.json lacks is accepted when it
    is in ``UNRECORDED_BEFORE`` (the run predates it and cannot be checked) or its new value is None. ``b_choices``
    ({task: {pair: picks}}, ``b_choices_by_task``) must match for the pairs both record; ``settings`` then records the
    union."""
    path = out / "run.json"
    if path.is_file():
        try:
            old = loads_json(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise EvalInputError(f"{path} is not valid JSON ({exc})") from exc
        if not isinstance(old, dict):
            raise EvalInputError(f"{path} does not hold a JSON object of settings")
        old.setdefault("resolution", "native")  # run.json files written before --resolution existed
        if old["resolution"] == "native" and "long_edge" in old and old["long_edge"] is None:
            from ..flux import DEFAULT_LONG_EDGE

            old["long_edge"] = DEFAULT_LONG_EDGE  # recorded as not given before it was recorded resolved
        # before --merge existed every call ran the pipeline's own default, "auto" (unless --pipe-arg merge=...)
        old.setdefault("merge", (old.get("pipe_kwargs") or {}).get("merge", "auto"))
        from ..validation import resolve_step_count

        if isinstance(old.get("pipe_kwargs"), dict) and old["pipe_kwargs"].get("sigmas"):
            # the steps that ran: run.json files written before --pipe-arg sigmas set the step count recorded the
            # --steps default
            old["steps"] = resolve_step_count(None, old["pipe_kwargs"])
        diff = {k: (old.get(k), settings.get(k)) for k in RESUME_KEYS
                if k in old and not _same_setting(k, old[k], settings.get(k))
                and not (k in CHOOSING_NOTHING_WHEN_NONE and settings.get(k) is None)
                or k not in old and settings.get(k) is not None and k not in UNRECORDED_BEFORE}
        if diff:
            changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise EvalInputError(f"{out} holds a run with other settings ({changes}); use another --out folder")
        recorded, now = old.get("b_choices"), settings.get("b_choices")
        if isinstance(recorded, dict) and now is not None:
            changed = sorted(task for task, pairs in now.items() if isinstance(recorded.get(task), dict)
                             and any(recorded[task].get(pair, picks) != picks for pair, picks in pairs.items()))
            if changed:
                raise EvalInputError(
                    f"{out} holds a run whose b choices differ from the ones the evaluation set gives now in "
                    f"{len(changed)} task(s) ({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}): the "
                    "set's listing changed since the run started (photos added or removed), and resuming would add a "
                    "second set of b to the same a'; restore the set, or use another --out folder")
            merged = {task: dict(pairs) for task, pairs in recorded.items() if isinstance(pairs, dict)}
            for task, pairs in now.items():  # pairs and tasks of earlier, restricted calls stay recorded
                merged.setdefault(task, {}).update(pairs)
            settings["b_choices"] = merged
    if write:
        atomic_write_text(path, json.dumps(settings, indent=2))


def _batches(jobs: list, batch_size: int) -> list:
    """The jobs grouped by (a size, b size) (groups in first-seen order, jobs in order), each group cut into
    batches of at most ``batch_size``."""
    groups: dict = {}
    for job in jobs:
        groups.setdefault(job["sizes"], []).append(job)
    out = []
    for group in groups.values():
        out += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    return out


def check_generate_options(*, batch_size: int, merge: str, pipe_kwargs: Optional[dict] = None) -> None:
    """``EvalInputError`` for a batch size < 1, an unknown ``merge``, a ``merge`` that cannot serve batches of
    different analogies ("full", "offload") with ``batch_size`` > 1, or a pipeline argument in ``pipe_kwargs`` that
    ``generate`` sets itself (``OWN_PIPE_ARGS``)."""
    if batch_size < 1:
        raise EvalInputError(f"batch_size (--batch-size) must be >= 1, got {batch_size}")
    if merge not in MERGE_CHOICES:
        raise EvalInputError(f"merge must be one of {MERGE_CHOICES}, got {merge!r}")
    if merge in ("full", "offload") and batch_size > 1:
        raise EvalInputError(f"merge {merge!r} merges one analogy at a time: use batch size 1, or merge 'jit' or "
                             f"'none' for batches of {batch_size}")
    for key in pipe_kwargs or {}:
        if key in OWN_PIPE_ARGS:
            use = OWN_PIPE_ARGS[key]
            raise EvalInputError(f"pipeline argument {key!r} is set by eval generate itself"
                                 + (f"; use {use}" if use else " (b' is saved as a PNG image)"))


def generate(pipe, triplets: Sequence[Triplet], out, *, seeds: Sequence[int] = (50,), batch_size: int = 4,
             num_inference_steps: int = 28, guidance_scale: float = 2.5, device=None, merge: str = "none",
             input_long_edge: Optional[int] = 1024, progress: bool = True, pipe_kwargs: Optional[dict] = None) -> dict:
    """Generate b' for every (triplet, seed) not finished yet in ``out``; returns {"generated": count, "skipped":
    count of those already finished}, counted per (triplet, seed).

    ``pipe`` is a ``LoRWeBKontextPipeline``, called once per batch with lists of B images and prompts:
    ``pipe(a, a_prime, b, prompts, num_inference_steps=..., guidance_scale=..., generator=[B generators],
    merge=..., progress=False, **pipe_kwargs)``, which must return B images (else RuntimeError).
    ``merge`` (``MERGE_CHOICES``) is passed to every pipeline call: "none" (default) runs the unmerged LoRWeB delta
    for every batch size; "auto" lets the pipeline merge a batch of one and run larger batches unmerged, so results
    then depend on the batching; "full" and "offload" need ``batch_size`` 1. ``input_long_edge`` caps the long edge
    of the a, a', b copies saved next to b' (the pipeline always gets the full-size inputs); 0 or None keeps them as
    they are. One ``torch.Generator(device).manual_seed(seed)`` per analogy; ``device=None``: the pipeline's
    execution device (as the official inference.py, which seeds its generator there), else the CPU.
    """
    from .._progress import progress_bar

    check_generate_options(batch_size=batch_size, merge=merge, pipe_kwargs=pipe_kwargs)
    if not seeds:
        raise EvalInputError("at least one seed is needed")
    _check_distinct_seeds(seeds)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_temporaries(out, ("evalset.json", "run.json"))  # a killed run's (never read, but they would stay)
    _record_triplets(out / "evalset.json", triplets)
    jobs, skipped = [], 0
    for t in triplets:
        for seed in seeds:
            d = out / t.task / output_id(t, seed, seeds)
            if (d / "b_prime.png").is_file():
                skipped += 1
                continue
            remove_temporaries(d, TRIPLET_FILES)
            jobs.append({"triplet": t, "seed": seed, "dir": d})
    for job in jobs:  # sizes from the file headers: images are read one batch at a time
        t = job["triplet"]
        job["sizes"] = (_ref_size(t.a), _ref_size(t.b))
    if device is None:
        device = getattr(getattr(pipe, "pipe", None), "_execution_device", None) or "cpu"
    generated = 0
    # the bar is closed when a call raises too (an open one garbles the next output in a notebook)
    with progress_bar(total=len(jobs), desc="eval generate", unit="b'", disable=not progress) as bar:
        for batch in _batches(jobs, batch_size):
            images = [[job["triplet"].a.load(), job["triplet"].a_prime.load(), job["triplet"].b.load()]
                      for job in batch]
            a, a_prime, b = (list(x) for x in zip(*images))
            prompts = [job["triplet"].prompt for job in batch]
            gens = [torch.Generator(device=device).manual_seed(int(job["seed"])) for job in batch]
            results = pipe(a, a_prime, b, prompts, num_inference_steps=num_inference_steps,
                           guidance_scale=guidance_scale, generator=gens, merge=merge, progress=False,
                           **(pipe_kwargs or {}))
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
    return {"generated": generated, "skipped": skipped}


def _recorded_triplets(path: Path) -> dict:
    """{id: record} of the triplet records (``Triplet.describe``) in the JSON list in ``path`` ({} when absent)."""
    if not path.is_file():
        return {}
    try:
        return {r["id"]: r for r in loads_json(path.read_text(encoding="utf-8"))}
    except (json.JSONDecodeError, TypeError, KeyError) as exc:
        raise EvalInputError(f"{path} is not a JSON list of triplet records ({exc!r})") from exc


def _record_triplets(path: Path, triplets: Sequence[Triplet]) -> None:
    """Add the triplets' records (``Triplet.describe``) to the JSON list in ``path``, replacing records of the same
    id: a resumed run restricted to some tasks keeps the records of the triplets generated before."""
    records = _recorded_triplets(path)
    records.update((t.key, t.describe()) for t in triplets)
    atomic_write_text(path, json.dumps(sorted(records.values(), key=lambda r: r["id"]), indent=2))


def _ref_size(ref) -> tuple:
    """(width, height) of an ImageRef after its crops, from the file header."""
    from .evalsets import image_size

    w, h = image_size(ref.path)
    if ref.box is not None:
        left, upper, right, lower = ref.pixel_box(w, h)  # as ImageRef.load (a box without pixels raises)
        w, h = right - left, lower - upper
    if ref.aspect is not None:
        if w / h > ref.aspect:
            w = max(1, round(h * ref.aspect))
        else:
            h = max(1, round(w / ref.aspect))
    return w, h


#: evaluation-set layouts whose reader picks each b at random from a listing (``--pair-seed``)
RANDOM_B_FORMATS = ("lorweb", "relation252k")


def b_choices_by_task(root, triplets: Sequence[Triplet]) -> dict:
    """{task: {pair: picks}}: for every (a, a') pair, a 16-hex signature of the b sources picked for it (paths
    relative to the evaluation set ``root``; the pair is named by a signature of its a and a' sources), for layouts
    whose b are picked at random from a listing: a photo added to or removed from the set can change a pair's picks,
    which a resume must not mix with the recorded ones (triplet ids hold b's name, so new picks would be new triplets
    beside the old). Pairs added to or removed from the set change no other pair's entry."""
    root = Path(root).resolve()

    def where(ref) -> str:
        d = ref.describe()
        path = Path(ref.path).resolve()
        d["path"] = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        return json.dumps(d, sort_keys=True)

    def sign(text: str) -> str:
        return hashlib.sha256(utf8_bytes(text)).hexdigest()[:16]

    picks: dict = {}
    for t in triplets:
        pair = sign(where(t.a) + "\n" + where(t.a_prime))
        picks.setdefault(t.task, {}).setdefault(pair, []).append(where(t.b))
    return {task: {pair: sign("\n".join(sorted(bs))) for pair, bs in sorted(pairs.items())}
            for task, pairs in sorted(picks.items())}


def file_sha256(path: Path) -> str:
    """The SHA-256 (hex) of the file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _weights_identity(weights, weights_file: Path) -> str:
    """What a resume checks besides the SHA-256: the checkpoint file's resolved path, or for a Hugging Face Hub repo id
    ``<repo>@<commit>/<path in the repo>`` (huggingface_hub's cache keeps ``.../snapshots/<commit>/<path>``), which does
    not depend on where the cache lives."""
    from ..lora_api import hub_repo_id

    repo, parts = hub_repo_id(str(weights)), weights_file.parts
    if repo is not None and "snapshots" in parts:
        at = len(parts) - 1 - parts[::-1].index("snapshots")
        return f"{repo}@{'/'.join(parts[at + 1:])}"
    return str(weights_file.resolve())


def _check_distinct_seeds(seeds: Sequence[int]) -> None:
    """A seed given twice would generate the same b' twice into one folder."""
    repeated = sorted(s for s, count in Counter(seeds).items() if count > 1)
    if repeated:
        raise EvalInputError(f"--seeds repeats {', '.join(map(str, repeated))}: each seed gives one b' per triplet, "
                             "give every seed once")


def check_generate_args(args, pipe_kwargs: dict) -> int:
    """The numeric options and the output folder of ``eval generate``, named by their flags, before anything is
    read, loaded or written (the pipeline would refuse the same values only after the models loaded and run.json was
    written, and a rerun with the corrected value would then be refused as a run with other settings). Returns the
    step count (``resolve_step_count``: one per ``--pipe-arg sigmas``, else ``--steps``, else 28)."""
    from ..validation import (MAX_GUIDANCE_SCALE, MAX_SEED, MAX_STEPS, MIN_LONG_EDGE, UsageError,
                              check_cli_pipe_args, check_int, check_output_dir, check_pipe_kwargs, check_real,
                              resolve_step_count)

    if args.steps is not None:
        check_int("--steps", args.steps, lo=1, hi=MAX_STEPS)
    check_real("--guidance-scale", args.guidance_scale, lo=0.0, hi=MAX_GUIDANCE_SCALE)
    for seed in args.seeds:
        check_int("--seeds", seed, lo=0, hi=MAX_SEED)
    _check_distinct_seeds(args.seeds)
    for flag, value in (("--long-edge", args.long_edge), ("--max-size", args.max_size)):
        if value is not None:
            check_int(flag, value, lo=MIN_LONG_EDGE)
    if args.input_long_edge is not None:
        check_int("--input-long-edge", args.input_long_edge, lo=0)
    if args.b_per_pair is not None:  # read by the released-set reader only (run_generate refuses it elsewhere)
        check_int("--b-per-pair", args.b_per_pair, lo=1)
    check_output_dir("--out", args.out)
    try:
        check_pipe_kwargs(pipe_kwargs)
    except ValueError as exc:
        raise EvalInputError(f"--pipe-arg: {exc}") from None
    try:  # the values too, as infer checks them (tensor-only keys and bad values failed after the loads)
        check_cli_pipe_args(pipe_kwargs)
    except (TypeError, ValueError) as exc:
        raise EvalInputError(str(exc)) from None
    try:
        return resolve_step_count(args.steps, pipe_kwargs)
    except UsageError as exc:
        raise EvalInputError(str(exc)) from None


def _check_inputs_decode(triplets: Sequence[Triplet], *, progress: bool = True) -> None:
    """Fail on a missing input, a file that is not a complete image (a Git LFS pointer, a truncated JPEG, one over
    Pillow's decompression-bomb limit) or a crop box without pixels, before any model loads or run.json is written:
    every distinct a, a', b file is decoded once (threads, a progress bar), as ``infer`` checks its inputs."""
    from .evalsets import check_images_decode, image_size

    check_images_decode([ref.path for t in triplets for ref in (t.a, t.a_prime, t.b)], progress=progress)

    for ref in dict.fromkeys(ref for t in triplets for ref in (t.a, t.a_prime, t.b) if ref.box is not None):
        ref.pixel_box(*image_size(ref.path))  # a crop box without pixels (a half of a 1-pixel-wide image)


def _check_official_grids(triplets, query_mode: str, query_source: str, max_size, multiple) -> None:
    """``EvalInputError`` naming the first triplet whose a the official resolution cannot generate from
    (``flux.official_grid_problem``: an a of aspect ratio 2:1 or wider leaves the official crops no b; sides that
    round to 0), in the command line's option names."""
    from ..flux import CLI_OPTION_NAMES, DEFAULT_MAX_AREA, official_grid_problem

    for t in triplets:
        problem = official_grid_problem(_ref_size(t.a), query_mode=query_mode, query_source=query_source,
                                        max_size=max_size, multiple=multiple, option_names=CLI_OPTION_NAMES,
                                        max_area=DEFAULT_MAX_AREA)
        if problem:
            raise EvalInputError(f"{t.key}: its a ({t.a.path}) is {problem}")


def run_generate(args) -> dict:
    """``lorweb-fast eval generate``: every option and input checked, then ``generate`` under the ``--out`` lock;
    returns its {"generated", "skipped"}."""
    from ..cli import DTYPES, _device
    from ..validation import check_checkpoint_encoder, check_device, check_model_source, pipeline_grid_multiple
    from ..flux import DEFAULT_LONG_EDGE, LoRWeBKontextPipeline, resolve_query_source
    from ..lora_api import resolve_checkpoint
    from .evalsets import acquire_output_lock, check_outside, detect_format, first_per_task, read_evalset

    merge = args.merge
    pipe_kwargs = dict(args.pipe_kwargs or {})
    check_generate_options(batch_size=args.batch_size, merge=merge, pipe_kwargs=pipe_kwargs)
    steps = check_generate_args(args, pipe_kwargs)  # --pipe-arg sigmas: one step per sigma
    device = check_device("--device", _device(args.device))  # a bad name: one line, before anything loads
    if args.resolution == "official" and args.long_edge is not None:
        raise EvalInputError("--long-edge applies to --resolution native; the official resolution is capped by "
                             "--max-size")
    if args.resolution == "native" and args.max_size is not None:
        raise EvalInputError("--max-size applies to --resolution official; the native resolution is capped by "
                             "--long-edge")
    # as infer and train: a missing local folder (or a hub id not cached offline) is one line, before anything loads
    check_model_source("--model", args.model, "model_index.json")
    if args.encoder is not None:
        check_model_source("--encoder", args.encoder, "config.json")
    fmt = detect_format(args.evalset) if args.format == "auto" else args.format
    # the b choices' options where the reader draws b at random; given where they choose nothing, they are refused
    # (a --pairs file with another layout is read_evalset's refusal) and recorded as None (not compared on resume)
    uses = {"--pair-seed": fmt in RANDOM_B_FORMATS and not args.pairs,
            "--b-per-pair": fmt == "lorweb" and not args.pairs}
    for flag, value in (("--pair-seed", args.pair_seed), ("--b-per-pair", args.b_per_pair)):
        if value is not None and not uses[flag] and not (args.pairs and fmt != "lorweb"):
            why = ("--pairs fixes the b choices" if args.pairs else "the folder layout fixes every b" if fmt == "folder"
                   else "Relation252k draws one b per (a, a')")
            raise EvalInputError(f"{flag} applies where b images are drawn at random (the released set without "
                                 f"--pairs{', Relation252k' if flag == '--pair-seed' else ''}); {why}")
    seed, per_pair = args.pair_seed or 0, args.b_per_pair or 2  # the defaults (--b-per-pair 0 is refused above)
    picked = read_evalset(args.evalset, fmt, seed=seed, b_per_pair=per_pair, pairs_file=args.pairs, tasks=args.tasks)
    pair_seed = seed if uses["--pair-seed"] else None  # as recorded in run.json
    b_per_pair = per_pair if uses["--b-per-pair"] else None
    triplets = first_per_task(picked, args.max_per_task)
    # --max-per-task cuts after the picks: whole tasks are signed
    b_choices = b_choices_by_task(args.evalset, picked) if fmt in RANDOM_B_FORMATS and not args.pairs else None
    _check_inputs_decode(triplets, progress=not args.quiet)
    out = Path(args.out)
    check_outside("--out", out, args.evalset, "the evaluation set")
    # the exact checkpoint: a run folder still training gains newer checkpoints, and a resumed evaluation must not
    # mix the b' of two of them (the file and its SHA-256 are recorded and checked on resume)
    weights_file, config = resolve_checkpoint(args.weights, getattr(args, "weight_name", None),
                                              revision=getattr(args, "revision", None))
    from ..model import resolve_checkpoint_settings

    checkpoint_settings = resolve_checkpoint_settings(weights_file, config)
    if args.encoder is None:  # the encoder the checkpoint names, checked as infer checks it
        check_checkpoint_encoder(checkpoint_settings["encoder"])
    if args.resolution == "official":  # an a the official crops cannot use: refused before loading, as infer does
        _check_official_grids(triplets, checkpoint_settings["query_mode"], resolve_query_source(weights_file),
                              args.max_size, pipeline_grid_multiple(args.model))
    # one run per folder: a second `eval generate` into it (started twice) would race on its records
    lock = FolderLock(out, GENERATE_LOCK_NAME, "eval generate run")
    try:
        acquire_output_lock(lock)
        # what picks the triplets (the evaluation set, its format, the b choices) is recorded and checked on resume
        # too: triplet ids hold b's name, so another choice of b would add new folders next to the old ones
        settings = {"weights": source_identity(args.weights),
                    "weights_file": _weights_identity(args.weights, weights_file),
                    "weights_sha256": file_sha256(weights_file), "model": source_identity(args.model),
                    "encoder": source_identity(args.encoder),
                    "seeds": list(args.seeds), "steps": steps, "guidance_scale": args.guidance_scale,
                    "pipe_kwargs": pipe_kwargs, "merge": merge, "evalset": str(Path(args.evalset).resolve()),
                    "format": fmt, "pair_seed": pair_seed, "b_per_pair": b_per_pair,
                    "pairs_sha256": file_sha256(Path(args.pairs)) if args.pairs else None,
                    "input_long_edge": args.input_long_edge, "dtype": args.dtype, "batch_size": args.batch_size,
                    "encoder_dtype": (args.dtype if getattr(args, "encoder_dtype", "auto") == "auto"
                                      else args.encoder_dtype),
                    "resolution": args.resolution, "max_size": args.max_size,
                    # resolved: --long-edge 1024 spelled out is the native default's run
                    "long_edge": (DEFAULT_LONG_EDGE if args.long_edge is None and args.resolution == "native"
                                  else args.long_edge),
                    "generator_device": device.type, "b_choices": b_choices,
                    # the triplets the folder records after this call: a resume restricted by --tasks adds to them
                    "triplets": len(_recorded_triplets(out / "evalset.json").keys() | {t.key for t in triplets})}
        check_run_settings(out, settings, write=False)  # before loading any model
        kwargs = {"resolution": args.resolution, "max_size": args.max_size}
        if args.long_edge is not None:
            kwargs["long_edge"] = args.long_edge
        pipe = LoRWeBKontextPipeline.from_pretrained(args.model, weights_file, config=config, encoder=args.encoder,
                                                     dtype=DTYPES[args.dtype], device=device,
                                                     encoder_dtype=DTYPES[settings["encoder_dtype"]], **kwargs)
        check_run_settings(out, settings)  # nothing is written when the models fail to load
        result = generate(pipe, triplets, out, seeds=args.seeds, batch_size=args.batch_size,
                          num_inference_steps=steps, guidance_scale=args.guidance_scale, device=device, merge=merge,
                          input_long_edge=args.input_long_edge, progress=not args.quiet, pipe_kwargs=pipe_kwargs)
    finally:
        lock.release()
    print(f"eval generate: {result['generated']} generated, {result['skipped']} already done, in {out}")
    return result
