"""``eval score``: the paper's metrics over one or more runs folders, resumable.

Per runs folder and triplet: ``clip_dir``, ``lpips``, the VLM score (``vlm_accuracy``, ``vlm_consistency``) and, per
baseline runs folder (``against``), the 2AFC answer. CLIP and LPIPS values are cached in
``REPORT/cache/<run>/metrics.jsonl`` (keyed by the metric's settings and the image files' sizes and times), judge
answers in ``REPORT/judge/`` (per item and prompt, keyed by the image files too): a killed run resumes without
recomputing finished items.

Pairwise order: whether this run's b' is shown as B'1 or B'2 is randomised per item with a recorded seed and balanced
within each task (``pairwise_orders``): a task's judged items are put in a seeded random order and alternate between
the two positions, so every task with two or more items has both (half each; an odd item out goes to a seeded
position) and its order-balanced win rate exists. The orders are reproducible from (``pairwise_seed``, run, baseline,
the task's judged items); ``metrics.json`` records the seed and each item's order.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from pathlib import Path
from typing import Optional, Sequence

from .._files import append_text, loads_json, naming_the_file
from .evalsets import EvalInputError, RunItem, acquire_output_lock, check_outside, file_signature, load_rgb, \
    read_runs, runs_folders, utf8_bytes
from .judge import PAIRWISE_PROMPT, PARSERS, SCORE_PROMPT, JudgeCache, JudgeRequest, ask
from ..validation import warn

METRICS = ("clip_dir", "lpips", "vlm")
#: The lock file ``eval score`` holds in its ``--out`` while it runs (``_files.FolderLock``).
SCORE_LOCK_NAME = ".lorweb-score.lock"


class MetricCache:
    """Append-only JSONL of {id, metric, sig, value}; a line that does not parse (a killed run's torn last line) is
    ignored, and a later line for the same (id, metric) replaces an earlier one. A symlink at ``path`` (none of ours
    is one) is neither read nor written through: the cache starts anew in its place."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.values: dict = {}
        if self.path.is_file() and not self.path.is_symlink():
            for line in self.path.read_text(encoding="utf-8").splitlines():  # put_many appends UTF-8
                try:
                    rec = loads_json(line)
                    self.values[(rec["id"], rec["metric"])] = (rec["sig"], rec["value"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    def get(self, item_id: str, metric: str, sig: str):
        """The cached value of (``item_id``, ``metric``) when it was computed with signature ``sig``, else None."""
        hit = self.values.get((item_id, metric))
        return hit[1] if hit is not None and hit[0] == sig else None

    def put_many(self, records: Sequence[tuple]) -> None:
        """Append ``records`` ((id, metric, sig, value) tuples) to the file and to ``values``."""
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps({"id": item_id, "metric": metric, "sig": sig, "value": value}) + "\n"
                        for item_id, metric, sig, value in records)
        with naming_the_file(self.path):
            append_text(self.path, lines)
        self.values.update({(item_id, metric): (sig, value) for item_id, metric, sig, value in records})


def _sig(settings: str, *files) -> str:
    """16 hex digits of the SHA-256 of a metric's settings (its ``cache_id``) and the files' ``file_signature``."""
    return hashlib.sha256(utf8_bytes(settings + file_signature(*files))).hexdigest()[:16]


def _draw(seed: int, run: str, against: str, what: str) -> float:
    """A uniform [0, 1) number that depends only on (seed, run, against, what); a name that is not UTF-8 (a task
    folder's, read with surrogates) hashes as its bytes, the others as before."""
    digest = hashlib.sha256(utf8_bytes(f"{seed}:{run}:{against}:{what}")).digest()
    return random.Random(digest).random()


def pairwise_orders(seed: int, run: str, against: str, items: Sequence[RunItem]) -> dict:
    """{item key: ["run", "against"] or ["against", "run"]} (which b' is B'1 and which is B'2) for the judged
    ``items`` of one run against one baseline: per task, the items in a random order drawn from (seed, run,
    against, item), alternating between the two positions from a seeded start, so each task has floor(n/2) or
    ceil(n/2) items in each position."""
    by_task: dict = {}
    for it in items:
        by_task.setdefault(it.task, []).append(it.key)
    orders = {}
    for task, keys in by_task.items():
        start = int(_draw(seed, run, against, f"task:{task}") < 0.5)
        for i, key in enumerate(sorted(keys, key=lambda k: (_draw(seed, run, against, k), k))):
            orders[key] = ["run", "against"] if (i + start) % 2 == 0 else ["against", "run"]
    return orders


def _images(item: RunItem, stems=("a", "a_prime", "b", "b_prime")) -> list:
    """The RGB PIL images of ``item``'s ``stems``, in that order."""
    return [load_rgb(getattr(item, s)) for s in stems]


#: Mean absolute difference (0..1 per channel) of two 32x32 thumbnails above which two input files of one triplet id
#: are different pictures (the same picture saved at another size or as JPEG stays far below it).
DIFFERENT_PICTURE = 0.1


def _thumbnail(path: Path):
    """The 32x32 thumbnail of an image file, decoded once per file version (a runs folder compared with several
    baselines, or a baseline with several runs folders, reads each input once)."""
    st = Path(path).stat()
    return _thumbnail_of(str(path), st.st_mtime_ns, st.st_size) / 255.0  # float64, as numpy divides uint8


@functools.lru_cache(maxsize=4096)
def _thumbnail_of(path: str, mtime_ns: int, size: int):
    """(32, 32, 3) uint8: the image at ``path`` box-resized to 32x32 (cached per path, time and size; 3 KB each, so
    the full cache holds 12 MB for the process's life)."""
    import numpy as np
    from PIL import Image

    return np.asarray(load_rgb(path).resize((32, 32), Image.BOX), dtype=np.uint8)


def baseline_mismatch(item: RunItem, other: RunItem) -> Optional[str]:
    """Why the baseline triplet ``other`` (the same ``<task>/<id>``) is not the same analogy as ``item``, or None:
    another prompt (when both folders have one), or another a, a' or b picture (files that differ and whose 32x32
    thumbnails differ by more than ``DIFFERENT_PICTURE`` on average). The 2AFC shows the judge this run's a, a', b
    beside both b', so a baseline b' made from other inputs would be judged against the wrong analogy."""
    import filecmp

    if item.prompt and other.prompt and item.prompt != other.prompt:
        return (f"the baseline's prompt for {item.key} is {other.prompt!r}, this run's {item.prompt!r}: the baseline "
                "holds another analogy under this id")
    for stem in ("a", "a_prime", "b"):
        mine, theirs = getattr(item, stem), getattr(other, stem)
        if filecmp.cmp(mine, theirs, shallow=False):
            continue
        diff = float(abs(_thumbnail(mine) - _thumbnail(theirs)).mean())
        if diff > DIFFERENT_PICTURE:
            return (f"the baseline's {stem} for {item.key} ({theirs}) is another picture than this run's ({mine}; mean "
                    f"difference {diff:.2f} of 32x32 thumbnails): the baseline holds another analogy under this id")
    return None


def score_run(name: str, items: Sequence[RunItem], out: Path, *, metrics: Sequence[str], clip=None, lpips=None,
              judge=None, baselines: Optional[dict] = None, pairwise_seed: int = 0, batch_size: int = 8,
              progress: bool = True) -> dict:
    """Per-triplet results and failures for one runs folder ``name``: ``{"per_triplet": [{id, task, clip_dir,
    lpips, vlm_accuracy, vlm_consistency[, pairwise: {baseline: {order, better, won}}]}] (in ``items`` order, None
    where not computed or failed), "failures": [...], "answers": [judge records]}`` (see ``report``). ``clip`` /
    ``lpips``: a ``ClipDirectional`` / ``LPIPSDistance``, needed when ``metrics`` names them; the VLM score and the
    2AFC against ``baselines`` ({name: [RunItem]}) run only with "vlm" in ``metrics`` and a ``judge``."""
    from .._progress import progress_bar

    cache = MetricCache(out / "cache" / name / "metrics.jsonl")
    rows = {it.key: {"id": it.key, "task": it.task, "clip_dir": None, "lpips": None, "vlm_accuracy": None,
                     "vlm_consistency": None} for it in items}
    failures: list = []
    answers: list = []

    if "clip_dir" in metrics:
        sig_base = clip.cache_id
        todo = []
        for it in items:
            sig = _sig(sig_base, it.a, it.a_prime, it.b, it.b_prime)
            value = cache.get(it.key, "clip_dir", sig)
            if value is None:
                todo.append((it, sig))
            else:
                rows[it.key]["clip_dir"] = value
        for i in progress_bar(range(0, len(todo), batch_size), desc=f"{name}: clip_dir",
                              disable=not progress or not todo):
            chunk = todo[i:i + batch_size]
            values = clip([_images(it) for it, _ in chunk])
            cache.put_many([(it.key, "clip_dir", sig, v) for (it, sig), v in zip(chunk, values)])
            for (it, _), v in zip(chunk, values):
                rows[it.key]["clip_dir"] = v

    if "lpips" in metrics:
        sig_base = lpips.cache_id
        for it in progress_bar(items, desc=f"{name}: lpips", disable=not progress):
            sig = _sig(sig_base, it.b, it.b_prime)
            value = cache.get(it.key, "lpips", sig)
            if value is None:
                value = lpips(*_images(it, ("b", "b_prime")))
                cache.put_many([(it.key, "lpips", sig, value)])
            rows[it.key]["lpips"] = value

    if "vlm" in metrics and judge is not None:
        jcache = JudgeCache(out / "judge")
        for it in progress_bar(items, desc=f"{name}: VLM score", disable=not progress):
            req = JudgeRequest(name, it.key, "score", SCORE_PROMPT, images=lambda it=it: _images(it),
                               files_sig=file_signature(it.a, it.a_prime, it.b, it.b_prime))
            rec = ask(judge, jcache, req)
            answers.append(rec)
            parsed = PARSERS["score"](rec["response"]) if rec["backend_error"] is None else None
            if parsed is not None and parsed.ok:
                rows[it.key]["vlm_accuracy"] = parsed.value["accuracy"]
                rows[it.key]["vlm_consistency"] = parsed.value["consistency"]
            else:
                failures.append({"id": it.key, "task": it.task, "kind": "score",
                                 "error": rec["backend_error"] or parsed.error, "response": rec["response"],
                                 "truncated": bool(rec.get("truncated"))})

        for base_name, base_items in (baselines or {}).items():
            by_key = {b.key: b for b in base_items}
            mismatch = {it.key: baseline_mismatch(it, by_key[it.key])
                        for it in progress_bar(items, desc=f"{name} vs {base_name}: same inputs", disable=not progress)
                        if it.key in by_key}
            orders = pairwise_orders(pairwise_seed, name, base_name,
                                     [it for it in items if it.key in by_key and mismatch[it.key] is None])
            for it in progress_bar(items, desc=f"{name} vs {base_name}: VLM 2AFC", disable=not progress):
                entry = {"order": None, "better": None, "won": None}
                rows[it.key].setdefault("pairwise", {})[base_name] = entry
                other = by_key.get(it.key)
                if other is None or mismatch[it.key] is not None:
                    error = f"{it.key} is missing in the baseline runs folder" if other is None else mismatch[it.key]
                    failures.append({"id": it.key, "task": it.task, "kind": "pairwise", "against": base_name,
                                     "error": error, "response": None})
                    continue
                order = orders[it.key]
                entry["order"] = order
                pair = {"run": it.b_prime, "against": other.b_prime}
                req = JudgeRequest(name, it.key, "pairwise", PAIRWISE_PROMPT, against=base_name, order=order,
                                   files_sig=file_signature(it.a, it.a_prime, it.b, *(pair[o] for o in order)),
                                   images=lambda it=it, pair=pair, order=order: (
                                       _images(it, ("a", "a_prime", "b")) + [load_rgb(pair[o]) for o in order]))
                rec = ask(judge, jcache, req)
                answers.append(rec)
                parsed = PARSERS["pairwise"](rec["response"]) if rec["backend_error"] is None else None
                if parsed is not None and parsed.ok:
                    entry["better"] = parsed.value
                    entry["won"] = order[parsed.value - 1] == "run"
                else:
                    failures.append({"id": it.key, "task": it.task, "kind": "pairwise", "against": base_name,
                                     "error": rec["backend_error"] or parsed.error, "response": rec["response"],
                                     "truncated": bool(rec.get("truncated"))})
        known = {it.key for it in items}
        for base_name, base_items in (baselines or {}).items():
            extra = sorted(b.key for b in base_items if b.key not in known)
            if extra:
                failures.append({"id": None, "task": None, "kind": "pairwise", "against": base_name,
                                 "error": f"{len(extra)} baseline triplets have no match in {name}: {extra[:5]}",
                                 "response": None})
    return {"per_triplet": [rows[it.key] for it in items], "failures": failures, "answers": answers}


def _coverage(items: dict) -> Optional[dict]:
    """None when every runs folder of ``items`` ({name: [RunItem]}) holds the same triplets; else {"triplets": {name:
    count}, "shared": count of the triplets all of them hold}, after a warning: their means are over other
    analogies."""
    keys = {name: {it.key for it in its} for name, its in items.items()}
    if len({frozenset(k) for k in keys.values()}) <= 1:
        return None
    coverage = {"triplets": {name: len(k) for name, k in keys.items()}, "shared": len(set.intersection(*keys.values()))}
    warn(f"the runs folders hold different triplets ({coverage_text(coverage)}): each one's means are over "
         "its own triplets, so the side-by-side numbers compare different analogies")
    return coverage


def coverage_text(coverage: dict) -> str:
    """"ours: 3, ckpt: 1; shared: 1" for a ``_coverage`` result."""
    return ", ".join(f"{n}: {c}" for n, c in coverage["triplets"].items()) + f"; shared: {coverage['shared']}"


def _path_text(paths):
    """A runs folder as metrics.json records it: its path, or the list of pooled paths."""
    return [str(p) for p in paths] if isinstance(paths, (list, tuple)) else str(paths)


def check_batch_size(batch_size) -> None:
    """EvalInputError unless ``batch_size`` (``--batch-size``) is an integer >= 1."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EvalInputError(f"batch_size (--batch-size) must be an integer >= 1, got {batch_size!r}")


def _same_folders(run, baseline) -> bool:
    """Whether a method and a baseline are the same runs folder(s) (resolved paths, in any order)."""
    return {Path(p).resolve() for p in runs_folders(run)} == {Path(p).resolve() for p in runs_folders(baseline)}


def score(runs: dict, out, *, metrics: Sequence[str] = METRICS, encoder: Optional[str] = None,
          lpips_net: str = "alex", lpips_weights=None, judge=None, against: Optional[dict] = None,
          pairwise_seed: int = 0, batch_size: int = 8, device=None, progress: bool = True) -> dict:
    """Score every runs folder of ``runs`` ({name: path}) and write the report in ``out``; returns metrics.json's
    content. ``judge``: a judge backend (``judge.make_judge``) or None (no VLM metrics). A list of paths as a value
    (in ``runs`` or ``against``) pools those folders into one method (``read_runs``). ``encoder``: the CLIP
    checkpoint of clip_dir (None: ``metrics.DEFAULT_CLIP``). EvalInputError for an unknown metric, no runs folder, a
    bad ``batch_size``, "vlm" without a judge, ``against`` without "vlm", a bad runs folder or an ``out`` inside
    one."""
    from ..cli import library_progress_bars
    from .metrics import DEFAULT_CLIP, ClipDirectional, LPIPSDistance
    from .._files import FolderLock, remove_temporaries
    from ..validation import plotting_available
    from .report import REPORT_FILES, aggregate, write_report

    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise EvalInputError(f"unknown metrics {unknown}; choose from {METRICS}")
    if not runs:
        raise EvalInputError("no runs folder to score")
    check_batch_size(batch_size)
    if "vlm" in metrics and judge is None:
        raise EvalInputError("the vlm metric needs a judge (--judge gemma3:ID_OR_DIR or replay:FILE)")
    if against and "vlm" not in metrics:
        raise EvalInputError("--against (pairwise 2AFC) needs the vlm metric and a judge")
    out = Path(out)
    items = {name: read_runs(path) for name, path in runs.items()}  # fail on bad folders before loading models
    base_items = {name: read_runs(path) for name, path in (against or {}).items()}
    for name, paths in {**runs, **(against or {})}.items():  # a report inside a runs folder breaks the next scoring
        for path in runs_folders(paths):
            check_outside("out", out, path, f"runs folder {name!r}")
    # without matplotlib the report is written without its plots (warned now, not after the scoring); a scoring
    # that draws none (no VLM and not both of LPIPS and CLIP Dir., no baselines) needs no warning
    plots = plotting_available("the report's plots") if "vlm" in metrics or {"lpips", "clip_dir"} <= set(metrics) \
        else False
    # one scoring per report folder: a second one would remove this one's temporaries as a killed scoring's and mix
    # the two scorings' report files
    lock = FolderLock(out, SCORE_LOCK_NAME, "eval score run")
    try:
        acquire_output_lock(lock)
        remove_temporaries(out, REPORT_FILES)  # a killed scoring's
        # LPIPS first: its missing weights are found in a moment, before the CLIP encoder spends its load time
        with library_progress_bars(enabled=progress):  # progress=False: transformers' loading bars off too
            lpips = LPIPSDistance(lpips_net, weights=lpips_weights, device=device) if "lpips" in metrics else None
            clip = ClipDirectional(encoder or DEFAULT_CLIP, device=device) if "clip_dir" in metrics else None
        coverage = _coverage(items)
        if isinstance(getattr(judge, "truncated", None), list):  # a judge reused across scorings: this run's cut
            judge.truncated = []                                   # answers (and their warning) start afresh
        results = {}
        for name in runs:
            # a baseline that is this method's own runs folder(s) (the README's way to put baselines in Fig. 5) is
            # not judged against itself: its win rate is N/A, as in the paper's table
            baselines = {b: base_items[b] for b in base_items if not _same_folders(runs[name], against[b])}
            results[name] = score_run(name, items[name], out, metrics=metrics, clip=clip, lpips=lpips,
                                      judge=judge, baselines=baselines if "vlm" in metrics else None,
                                      pairwise_seed=pairwise_seed, batch_size=batch_size, progress=progress)
        settings = {"runs": {k: _path_text(v) for k, v in runs.items()},
                    "against": {k: _path_text(v) for k, v in (against or {}).items()},
                    "metrics": list(metrics), "encoder": clip.name if clip else None,
                    "lpips": {"net": lpips.net, "weights": lpips.weights} if lpips else None,
                    "judge": judge.name if judge is not None else None, "pairwise_seed": pairwise_seed}
        if coverage is not None:
            settings["coverage"] = coverage
        report = {name: aggregate(res["per_triplet"], res["failures"], list((against or {})), res["answers"])
                  for name, res in results.items()}
        return write_report(out, report, results, settings, plots=plots)
    finally:
        lock.release()
