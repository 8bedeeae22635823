"""Evaluation-set and runs-folder readers.

Every evaluation-set reader returns a list of ``Triplet`` (task, id, a, a', b, prompt), sorted by (task, id); the
runs-folder reader returns ``RunItem``. Images are ``ImageRef``: a file, optionally a crop of it (a half of a
Relation252k side-by-side pair; a released-set b cropped to a's aspect ratio), read only when needed.

Layouts:

- ``folder``: ``EVALSET/<task>/<id>/{a,a_prime,b}.<ext>`` and ``prompt.txt`` (ext: png, jpg, jpeg, webp, bmp).
- ``lorweb``: the released LoRWeB evaluation set (hilamanor/LoRWeB_evalset, as its README describes it):
  ``original/unsplash_<category>/<stem>.jpg`` (the Unsplash photos) and
  ``decoded_random_inference_set/<db>/<category>/<Prompt_With_Underscores>/<a-stem>_<k>.png`` (a' images, a being
  ``original/unsplash_<category>/<a-stem>.*``). The prompt is the folder name with underscores as spaces. The paper
  (section 4, appendix A.2) picks, for each (a, a'), ``b_per_pair`` = 2 random photos b of the same category whose
  aspect ratio (width / height) is within 0.15 of a's, and crops them to a's aspect ratio; the released set does not
  list those choices, so the reader makes them with a recorded seed (the closest other photos when too few are within
  the tolerance, flagged ``b_aspect_outside_tolerance``), or takes them from a pairs file (JSON list or JSONL of
  ``{"a_prime": <path under the root>, "b": <path under the root>}``).
- ``relation252k``: Relation252k's unseen tasks: ``<task>/Group1/labels.json`` (entries with ``img_name`` and
  ``edit_instruction``) and ``<task>/Group1/<img_name>``, each image a side-by-side pair (left: original, right:
  edited). Each pair (a, a') gets a b (the left half of another pair of the same task) chosen with a recorded seed.

Runs folders: ``RUNS/<task>/<id>/{a,a_prime,b,b_prime}.<ext>`` and ``prompt.txt`` (any method's outputs).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from .._files import loads_json
from ..validation import warn

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
EVALSET_FORMATS = ("auto", "folder", "lorweb", "relation252k")
#: The paper's aspect-ratio tolerance when choosing b for an (a, a') pair (appendix A.2).
ASPECT_TOLERANCE = 0.15


class EvalInputError(ValueError):
    """Bad evaluation input: a missing or unreadable file, an empty task, an inconsistent folder."""


@dataclass(frozen=True)
class ImageRef:
    """An image file, optionally cropped: ``box`` (left, upper, right, lower) in fractions of the size, then a centre
    crop to the aspect ratio ``aspect`` (width / height)."""

    path: Path
    box: Optional[tuple] = None
    aspect: Optional[float] = None

    def load(self):
        """The RGB PIL image; a missing or unreadable file raises ``EvalInputError`` naming it."""
        img = load_rgb(self.path)
        if self.box is not None:
            img = img.crop(self.pixel_box(*img.size))
        if self.aspect is not None:
            img = center_crop_to_aspect(img, self.aspect)
        return img

    def pixel_box(self, w: int, h: int) -> tuple:
        """The crop (left, upper, right, lower) of ``box`` on a w x h image, edges rounded down (a half of an odd
        width ends at w // 2, as the official split); ``EvalInputError`` when it has no pixels."""
        l, u, r, d = self.box
        box = (math.floor(l * w), math.floor(u * h), math.floor(r * w), math.floor(d * h))
        if box[2] <= box[0] or box[3] <= box[1]:
            raise EvalInputError(f"{self.path} ({w}x{h}) is too small for its crop box {tuple(self.box)}: the crop "
                                 f"has no pixels ({max(box[2] - box[0], 0)}x{max(box[3] - box[1], 0)})")
        return box

    def describe(self) -> dict:
        """``{"path"[, "box"][, "crop_to_aspect"]}``: where the image comes from (recorded in evalset.json; an
        absolute path, which names the file from any working directory)."""
        out = {"path": os.path.abspath(self.path)}
        if self.box is not None:
            out["box"] = list(self.box)
        if self.aspect is not None:
            out["crop_to_aspect"] = self.aspect
        return out


@dataclass
class Triplet:
    """One analogy a : a' :: b : ? of task ``task``; ``key`` = "<task>/<id>"."""

    task: str
    id: str
    a: ImageRef
    a_prime: ImageRef
    b: ImageRef
    prompt: str
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """``"<task>/<id>"``."""
        return f"{self.task}/{self.id}"

    def describe(self) -> dict:
        """``{"id": key, "task", "prompt", "a", "a_prime", "b" (``ImageRef.describe``), **extra}``."""
        return {"id": self.key, "task": self.task, "prompt": self.prompt, "a": self.a.describe(),
                "a_prime": self.a_prime.describe(), "b": self.b.describe(), **self.extra}


# ------------------------------------------------------------------------------------------------------ images
def load_rgb(path: Union[str, Path]):
    """An RGB PIL image (fully read; ``flux.load_image``); ``EvalInputError`` naming the file when it is missing or
    not an image."""
    from ..flux import load_image

    try:
        return load_image(Path(path))
    except (FileNotFoundError, ValueError) as exc:
        raise EvalInputError(str(exc)) from None


def utf8_bytes(text: str) -> bytes:
    """``text`` as UTF-8 for hashing; a name that is not UTF-8 (a file or folder name read with surrogates) gives
    its own bytes, every other text the same bytes as ``text.encode()``."""
    return text.encode("utf-8", "surrogateescape")


def file_signature(*paths) -> str:
    """A short hash of the files' names, sizes and modification times (cache keys: a replaced file is a new one)."""
    h = hashlib.sha256()
    for p in paths:
        st = Path(p).stat()
        h.update(utf8_bytes(f"{Path(p).name}:{st.st_size}:{st.st_mtime_ns};"))
    return h.hexdigest()[:16]


def image_size(path: Path) -> tuple:
    """(width, height) from the file header; ``EvalInputError`` naming the file when it is not a readable image."""
    from PIL import Image

    from .._files import image_read_error_message, image_read_errors

    try:
        with Image.open(path) as im:
            return im.size
    except image_read_errors() as exc:
        raise EvalInputError(image_read_error_message(path, exc)) from exc


def check_images_decode(paths: Sequence[Path], *, progress: bool = True) -> None:
    """EvalInputError naming the first of ``paths`` that is missing, a folder or not a complete image (a Git LFS
    pointer, a truncated JPEG, one over Pillow's decompression-bomb limit): each distinct file is decoded once
    (threads, a progress bar), before any model loads."""
    from .._progress import progress_bar
    from ..data import _image_pool, decode_problem

    paths = list(dict.fromkeys(Path(p) for p in paths))
    for path in paths:
        if not path.is_file():
            raise EvalInputError(f"{path} is a folder; give an image file" if path.is_dir() else
                                 f"image not found: {path}")
    with _image_pool() as pool:
        for problem in progress_bar(pool.map(decode_problem, paths), total=len(paths), desc="checking input images",
                                    unit="image", disable=not progress):
            if problem is not None:
                raise EvalInputError(problem)


def center_crop_to_aspect(img, aspect: float):
    """The largest centred crop of ``img`` with width / height = ``aspect``."""
    w, h = img.size
    if w / h > aspect:  # too wide
        new_w = max(1, round(h * aspect))
        left = (w - new_w) // 2
        return img.crop((left, 0, left + new_w, h))
    new_h = max(1, round(w / aspect))
    top = (h - new_h) // 2
    return img.crop((0, top, w, top + new_h))


def find_image(directory: Path, stem: str) -> Optional[Path]:
    """``directory/<stem>.<ext>`` for the first of IMAGE_EXTENSIONS that exists as a file (case-insensitive ext:
    ``.Jpg`` too; the exact lower- or upper-case name first); None when there is none or ``directory`` is missing."""
    if not directory.is_dir():
        return None
    by_suffix = {}
    for cand in directory.iterdir():
        if cand.stem == stem and cand.suffix.lower() in IMAGE_EXTENSIONS:
            by_suffix.setdefault(cand.suffix.lower(), []).append(cand)
    for ext in IMAGE_EXTENSIONS:
        found = sorted((c for c in by_suffix.get(ext, ()) if c.is_file()),
                       key=lambda c: (c.suffix != ext, c.suffix != ext.upper(), c.name))
        if found:
            return found[0]
    return None


def _require_image(directory: Path, stem: str) -> Path:
    """``find_image(directory, stem)``; ``EvalInputError`` when there is none (naming a folder of that name)."""
    path = find_image(directory, stem)
    if path is None:
        folders = sorted(c.name for c in directory.glob(f"{stem}.*")
                         if c.suffix.lower() in IMAGE_EXTENSIONS and c.is_dir()) if directory.is_dir() else []
        raise EvalInputError(f"missing image {directory / stem}.<{'|'.join(e[1:] for e in IMAGE_EXTENSIONS)}>"
                             + (f" ({directory / folders[0]} is a folder; give an image file)" if folders else ""))
    return path


def read_text(path: Path, what: str) -> str:
    """The UTF-8 text of ``path``; ``EvalInputError`` naming ``what`` and the file when it is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise EvalInputError(f"{what} {path} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def check_outside(flag: str, out: Union[str, Path], folder: Union[str, Path], what: str) -> None:
    """``EvalInputError`` when the output folder ``out`` is ``folder`` or inside it: its sub-folders would be read
    back as tasks of ``folder`` by the next run."""
    from .._files import same_or_inside

    if same_or_inside(out, folder):
        out, folder = Path(out).resolve(), Path(folder).resolve()
        raise EvalInputError(f"{flag} {out} is inside {what} {folder}: its folders would be read as tasks by the "
                             "next run; choose a folder outside it")


def _subdirs(path: Path) -> list:
    """The sub-folders of ``path``, sorted, hidden ones left out."""
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _seeded_rng(seed: int, *parts: str) -> random.Random:
    """A ``random.Random`` seeded from (``seed``, ``parts``) only: an item's draw does not depend on the others."""
    digest = hashlib.sha256(utf8_bytes(":".join([str(seed), *parts]))).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def _check_nonempty(triplets: list, root: Path, what: str) -> list:
    """The triplets sorted by (task, id); none, or two with the same (task, id) (they would be generated into one
    folder and scored as one), raise naming the problem."""
    if not triplets:
        raise EvalInputError(f"no analogy triplets found in {root} ({what})")
    seen = Counter(f"{t.task}/{t.id}" for t in triplets)
    repeated = sorted(k for k, n in seen.items() if n > 1)
    if repeated:
        raise EvalInputError(f"{root}: {len(repeated)} triplet ids occur more than once ({', '.join(repeated[:5])}"
                             f"{', ...' if len(repeated) > 5 else ''}): the same image is listed twice, or two files "
                             "share a name stem")
    return sorted(triplets, key=lambda t: (t.task, t.id))


# --------------------------------------------------------------------------------------------- folder layout
def read_folder_evalset(root: Union[str, Path]) -> list:
    """``EVALSET/<task>/<id>/{a,a_prime,b}.<ext>`` + ``prompt.txt`` (stripped): task and id are the folder names.
    ``EvalInputError`` for a missing folder, a training folder, a task without items, a missing image or prompt."""
    root = Path(root)
    if not root.is_dir():
        raise EvalInputError(f"evaluation set folder not found: {root}")
    if (root / "control").is_dir() and (root / "target").is_dir():
        raise EvalInputError(f"{root} looks like a training folder (control/, target/), not an evaluation set: "
                             "eval generate reads EVALSET/<task>/<id>/{a,a_prime,b}.<ext> + prompt.txt, the "
                             "released set or Relation252k (see --format)")
    triplets = []
    for task_dir in _subdirs(root):
        items = _subdirs(task_dir)
        if not items:
            raise EvalInputError(f"task {task_dir.name!r} has no triplets: {task_dir} holds no <id>/ folders")
        for item in items:
            prompt_file = item / "prompt.txt"
            if not prompt_file.is_file():
                raise EvalInputError(f"missing prompt file {prompt_file}")
            triplets.append(Triplet(task_dir.name, item.name, *(ImageRef(_require_image(item, s))
                                                                  for s in ("a", "a_prime", "b")),
                                    prompt=read_text(prompt_file, "prompt file").strip()))
    return _check_nonempty(triplets, root, "folder layout <task>/<id>/{a,a_prime,b}.<ext> + prompt.txt")


# ----------------------------------------------------------------------------------- released LoRWeB eval set
def _lorweb_root(root: Path) -> Path:
    """``root`` or ``root/data``, whichever holds original/ and decoded_random_inference_set/; else EvalInputError."""
    for cand in (root, root / "data"):
        if (cand / "original").is_dir() and (cand / "decoded_random_inference_set").is_dir():
            return cand
    raise EvalInputError(f"{root} is not the released LoRWeB evaluation set: expected original/ and "
                         "decoded_random_inference_set/ in it (or in its data/ folder)")


def _read_pairs_file(path: Path) -> dict:
    """{a_prime relative path: [b relative paths]} from a JSON list or JSONL of {"a_prime", "b"}."""
    if not path.is_file():
        raise EvalInputError(f"pairs file not found: {path}")
    text = read_text(path, "pairs file")
    try:
        rows = loads_json(text) if text.lstrip().startswith("[") else \
            [loads_json(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise EvalInputError(f"{path} is not a JSON list or JSONL file ({exc})") from exc
    pairs: dict = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not {"a_prime", "b"} <= set(row):
            raise EvalInputError(f"{path}: entry {i} must be an object with 'a_prime' and 'b', got {row!r}")
        if not isinstance(row["a_prime"], str) or not isinstance(row["b"], str):
            raise EvalInputError(f"{path}: entry {i}: 'a_prime' and 'b' must be path strings, got {row!r}"[:300])
        pairs.setdefault(str(Path(row["a_prime"])), []).append(str(Path(row["b"])))
    return pairs


def read_lorweb_evalset(root: Union[str, Path], *, b_per_pair: int = 2, seed: int = 0,
                        pairs_file: Union[str, Path, None] = None,
                        aspect_tolerance: float = ASPECT_TOLERANCE, tasks: Optional[Sequence[str]] = None) -> list:
    """The released LoRWeB evaluation set (see the module docstring). Task = "<category>__<Prompt_With_Underscores>"
    for the db folder db_not_in_trainset, "<category>__<db>__<Prompt_With_Underscores>" for another db folder; id =
    "<a'-stem>__<b-stem>"; b is cropped to a's aspect ratio (``ImageRef.aspect``), ``extra`` = {"category"} (plus
    ``b_aspect_outside_tolerance``: True when the closest photos outside ``aspect_tolerance`` completed the picks).
    With ``tasks``, only those tasks are read (a pairs file then needs entries for them only)."""
    base = _lorweb_root(Path(root))
    if b_per_pair < 1:
        raise EvalInputError(f"b_per_pair must be >= 1, got {b_per_pair}")
    pairs = _read_pairs_file(Path(pairs_file)) if pairs_file else None
    originals: dict = {}
    for cat_dir in _subdirs(base / "original"):
        category = cat_dir.name[len("unsplash_"):] if cat_dir.name.startswith("unsplash_") else cat_dir.name
        originals[category] = {p.stem: p for p in sorted(cat_dir.iterdir())
                               if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS}
    sizes: dict = {}

    def aspect(path: Path) -> float:
        if path not in sizes:
            sizes[path] = image_size(path)
        w, h = sizes[path]
        return w / h

    triplets = []
    short_of_close = []  # (a' image, category, photos within the aspect tolerance): warned once at the end
    found: set = set()
    decoded = base / "decoded_random_inference_set"
    for db_dir in _subdirs(decoded):
        for cat_dir in _subdirs(db_dir):
            category = cat_dir.name
            if category not in originals:
                raise EvalInputError(f"{cat_dir}: no matching originals folder "
                                     f"{base / 'original' / ('unsplash_' + category)}")
            for prompt_dir in _subdirs(cat_dir):
                task = prompt_dir.name if db_dir.name == "db_not_in_trainset" else f"{db_dir.name}__{prompt_dir.name}"
                task = f"{category}__{task}"
                found.add(task)
                if tasks and task not in tasks:
                    continue
                files = sorted(p for p in prompt_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
                if not files:
                    raise EvalInputError(f"task {task!r} has no triplets: no a' images in {prompt_dir}")
                for a_prime in files:
                    m = re.fullmatch(r"(.+)_(\d+)", a_prime.stem)
                    if m is None:
                        raise EvalInputError(f"{a_prime}: expected a file named <a-stem>_<k>.<ext>")
                    a_path = originals[category].get(m.group(1))
                    if a_path is None:
                        expected = base / "original" / f"unsplash_{category}" / m.group(1)
                        raise EvalInputError(f"{a_prime}: its source image {expected}.<ext> is missing")
                    a_aspect = aspect(a_path)
                    rel = str(a_prime.relative_to(base))
                    note = {}
                    if pairs is not None:
                        if rel not in pairs:
                            raise EvalInputError(f"pairs file {pairs_file} has no b for {rel}")
                        bs = []
                        for b_rel in pairs[rel]:
                            b_path = base / b_rel
                            if not b_path.is_file():
                                raise EvalInputError(f"pairs file {pairs_file}: b image not found: {b_path}")
                            if os.path.samefile(b_path, a_path):  # b' = a' would solve it (the picks exclude a)
                                raise EvalInputError(f"pairs file {pairs_file}: the b of {rel} is its own a "
                                                     f"({b_rel}); b must be another photo")
                            bs.append(b_path)
                    else:
                        cands = [p for stem, p in originals[category].items() if stem != m.group(1)]
                        close = [p for p in cands if abs(aspect(p) - a_aspect) <= aspect_tolerance]
                        rng = _seeded_rng(seed, rel)
                        if len(close) >= b_per_pair:
                            bs = rng.sample(close, b_per_pair)
                        else:
                            if len(cands) < b_per_pair:
                                raise EvalInputError(f"category {category!r} has {len(cands)} other photos in "
                                                     f"{base / 'original'}; {b_per_pair} b images are needed for {rel}")
                            far = sorted(set(cands) - set(close), key=lambda p: (abs(aspect(p) - a_aspect), p.name))
                            bs = close + far[:b_per_pair - len(close)]
                            note = {"b_aspect_outside_tolerance": True}
                            short_of_close.append((rel, category, len(close)))
                    for b_path in bs:
                        triplets.append(Triplet(
                            task, f"{a_prime.stem}__{b_path.stem}", ImageRef(a_path), ImageRef(a_prime),
                            ImageRef(b_path, aspect=round(a_aspect, 6)), prompt=prompt_dir.name.replace("_", " "),
                            extra={"category": category, **note}))
    missing = [t for t in tasks or () if t not in found]
    if missing:
        raise EvalInputError(f"tasks not found in {root}: {missing}")
    if short_of_close:  # one warning for the cause, not one per a' image
        rel, category, close = short_of_close[0]
        count = "1 a' image has" if len(short_of_close) == 1 else f"{len(short_of_close)} a' images have"
        warn(f"{count} fewer than {b_per_pair} photos of their category with an aspect ratio within "
             f"{aspect_tolerance} of a's (e.g. {rel}: {close} in {category!r}); the closest others complete their b "
             "images (recorded as b_aspect_outside_tolerance)")
    return _check_nonempty(triplets, base, "released LoRWeB layout")


# ---------------------------------------------------------------------------------------------- Relation252k
def read_relation252k(root: Union[str, Path], *, seed: int = 0, tasks: Optional[Sequence[str]] = None) -> list:
    """Relation252k tasks (e.g. its released unseen tasks): every pair (a, a') with a b from another pair of the same
    task, chosen with ``seed``. Task = the category folder name, id = "<a-image-stem>__<b-image-stem>"; a and a' are
    the left and right halves of one image, b the left half of another (``ImageRef.box``)."""
    root = Path(root)
    if not root.is_dir():
        raise EvalInputError(f"Relation252k folder not found: {root}")
    cats = [d for d in _subdirs(root) if (d / "Group1" / "labels.json").is_file()]
    if tasks:
        names = {d.name for d in cats}
        missing = [t for t in tasks if t not in names]
        if missing:
            raise EvalInputError(f"tasks not found in {root}: {missing}")
        cats = [d for d in cats if d.name in set(tasks)]
    left, right = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)
    triplets = []
    for cat in cats:
        labels_path = cat / "Group1" / "labels.json"
        try:
            labels = loads_json(read_text(labels_path, "labels file"))
        except json.JSONDecodeError as exc:
            raise EvalInputError(f"{labels_path} is not valid JSON ({exc})") from exc
        if not isinstance(labels, list):
            raise EvalInputError(f"{labels_path} holds a JSON {type(labels).__name__}, not a list of label objects")
        entries = []
        for i, e in enumerate(labels):
            if not isinstance(e, dict) or not isinstance(e.get("img_name"), str) \
                    or not isinstance(e.get("edit_instruction"), str):
                raise EvalInputError(f"{labels_path}: entry {i} needs 'img_name' and 'edit_instruction' strings")
            path = cat / "Group1" / e["img_name"]
            if not path.is_file():
                raise EvalInputError(f"{labels_path}: image not found: {path}")
            entries.append((path, e["edit_instruction"]))
        # "x.png" and "sub/../x.png" are one image; two symlinks to one blob (a Hugging Face cache) stay two entries
        files = {path: Path(os.path.normpath(os.path.abspath(path))) for path, _ in entries}
        distinct = len(set(files.values()))
        if distinct < 2:
            raise EvalInputError(f"task {cat.name!r} has {distinct} distinct pair images in "
                                 f"{labels_path} ({len(entries)} entries); an analogy needs 2")
        for path, instruction in entries:
            others = [p for p, _ in entries if files[p] != files[path]]  # b is never a's own image
            b_path = _seeded_rng(seed, cat.name, path.name).choice(others)
            triplets.append(Triplet(cat.name, f"{path.stem}__{b_path.stem}", ImageRef(path, box=left),
                                    ImageRef(path, box=right), ImageRef(b_path, box=left), prompt=instruction))
    return _check_nonempty(triplets, root, "Relation252k layout <task>/Group1/labels.json")


# ------------------------------------------------------------------------------------------------ dispatch
def detect_format(root: Union[str, Path]) -> str:
    """"lorweb" (original/ and decoded_random_inference_set/ in ``root`` or ``root/data``), "relation252k" (a
    sub-folder with Group1/labels.json) or "folder"; EvalInputError when ``root`` is not a folder."""
    root = Path(root)
    if not root.is_dir():
        raise EvalInputError(f"evaluation set folder not found: {root}")
    try:
        _lorweb_root(root)
        return "lorweb"
    except EvalInputError:
        pass
    if any((d / "Group1" / "labels.json").is_file() for d in _subdirs(root)):
        return "relation252k"
    return "folder"


def read_evalset(root: Union[str, Path], fmt: str = "auto", *, seed: int = 0, b_per_pair: int = 2,
                 pairs_file=None, tasks: Optional[Sequence[str]] = None, max_per_task: Optional[int] = None) -> list:
    """Triplets of an evaluation set in any supported layout (``fmt`` in EVALSET_FORMATS), optionally restricted to
    ``tasks`` and to the first ``max_per_task`` triplets of each task. The restrictions only drop triplets: every
    reader picks each b from ``seed`` and the item itself, so a task's triplets are the same with or without them.
    ``pairs_file`` (fixed b choices) is for the released LoRWeB layout only."""
    if fmt not in EVALSET_FORMATS:
        raise EvalInputError(f"unknown evaluation-set format {fmt!r}; choose from {EVALSET_FORMATS}")
    _check_max_per_task(max_per_task)
    if fmt == "auto":
        fmt = detect_format(root)
    if pairs_file and fmt != "lorweb":
        raise EvalInputError(f"a pairs file ({pairs_file}) fixes the b choices of the released LoRWeB layout; {root} "
                             f"is read as the {fmt} layout")
    if fmt == "folder":
        triplets = read_folder_evalset(root)
    elif fmt == "lorweb":
        triplets = read_lorweb_evalset(root, b_per_pair=b_per_pair, seed=seed, pairs_file=pairs_file, tasks=tasks)
    else:
        triplets = read_relation252k(root, seed=seed, tasks=tasks)
    if tasks:
        known = {t.task for t in triplets}
        missing = [t for t in tasks if t not in known]
        if missing:
            raise EvalInputError(f"tasks not found in {root}: {missing}")
        triplets = [t for t in triplets if t.task in set(tasks)]
    return first_per_task(triplets, max_per_task)


def _check_max_per_task(max_per_task: Optional[int]) -> None:
    """EvalInputError for a ``max_per_task`` below 1 (None: no limit)."""
    if max_per_task is not None and max_per_task < 1:
        raise EvalInputError(f"max_per_task (--max-per-task) must be >= 1, got {max_per_task}")


def first_per_task(triplets: Sequence[Triplet], max_per_task: Optional[int]) -> list:
    """The first ``max_per_task`` triplets of each task, in order (all of them for None)."""
    _check_max_per_task(max_per_task)
    if max_per_task is None:
        return list(triplets)
    counts: dict = {}
    kept = []
    for t in triplets:
        counts[t.task] = counts.get(t.task, 0) + 1
        if counts[t.task] <= max_per_task:
            kept.append(t)
    return kept


# --------------------------------------------------------------------------------------------- runs folders
@dataclass
class RunItem:
    """One finished triplet of a runs folder: the four image files and the prompt (may be empty)."""

    task: str
    id: str
    a: Path
    a_prime: Path
    b: Path
    b_prime: Path
    prompt: str = ""

    @property
    def key(self) -> str:
        """``"<task>/<id>"``."""
        return f"{self.task}/{self.id}"


def acquire_output_lock(lock) -> None:
    """``lock.acquire()`` (a ``_files.FolderLock`` on an ``--out`` folder), its refusals as one-line
    ``EvalInputError`` naming ``--out``: another run holds it, or the folder or its lock file cannot be created."""
    from .._files import FolderInUseError

    try:
        lock.acquire()
    except FolderInUseError as exc:
        raise EvalInputError(f"--out {exc}") from None
    except OSError as exc:
        raise EvalInputError(f"--out {lock.folder}: cannot create the folder or its lock file {lock.name} "
                             f"({exc})") from None


def runs_folders(runs) -> list:
    """A method's runs folders: ``[runs]``, or the folders it pools when ``runs`` is a list (``read_runs``)."""
    return list(runs) if isinstance(runs, (list, tuple)) else [runs]


def read_runs(runs: Union[str, Path, Sequence[Union[str, Path]]]) -> list:
    """``RUNS/<task>/<id>/{a,a_prime,b,b_prime}.<ext>`` (+ optional ``prompt.txt``), sorted by (task, id). A missing
    image, a task folder without triplets or an empty runs folder raise ``EvalInputError`` naming the path.

    A list of runs folders pools them into one method's triplets (the paper's numbers pool the custom set with
    Relation252k's unseen tasks): a folder given twice, or a triplet (task / id) in two of them, is refused."""
    if isinstance(runs, (list, tuple)):
        if not runs:
            raise EvalInputError("no runs folder to read")
        resolved = [Path(r).resolve() for r in runs]
        if len(set(resolved)) != len(resolved):
            raise EvalInputError(f"a runs folder is given twice in {[str(r) for r in runs]}")
        items, seen = [], {}
        for folder in runs:
            for item in read_runs(folder):
                if item.key in seen:
                    raise EvalInputError(f"triplet {item.task}/{item.id} is in both {seen[item.key]} and {folder}: "
                                         "pooled runs folders must hold different triplets")
                seen[item.key] = folder
                items.append(item)
        return sorted(items, key=lambda t: (t.task, t.id))
    root = Path(runs)
    if not root.is_dir():
        raise EvalInputError(f"runs folder not found: {root}")
    items = []
    for task_dir in _subdirs(root):
        ids = _subdirs(task_dir)
        if not ids:
            raise EvalInputError(f"task {task_dir.name!r} has no triplets: {task_dir} holds no <id>/ folders")
        for d in ids:
            files = {}
            for stem in ("a", "a_prime", "b", "b_prime"):
                path = find_image(d, stem)
                if path is None:
                    hint = " (an unfinished generate run? run `eval generate` again to finish it)" \
                        if stem == "b_prime" else ""
                    raise EvalInputError(f"missing image {d / stem}.<{'|'.join(e[1:] for e in IMAGE_EXTENSIONS)}>"
                                         f"{hint}")
                files[stem] = path
            prompt = read_text(d / "prompt.txt", "prompt file").strip() if (d / "prompt.txt").is_file() else ""
            items.append(RunItem(task_dir.name, d.name, prompt=prompt, **files))
    if not items:
        raise EvalInputError(f"no triplets in runs folder {root} (expected <task>/<id>/{{a,a_prime,b,b_prime}}."
                             f"<{'|'.join(e[1:] for e in IMAGE_EXTENSIONS)}>)")
    return sorted(items, key=lambda t: (t.task, t.id))
