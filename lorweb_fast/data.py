"""Training data: the official LoRWeB layout, finished 2x2 grids, ``lorweb-fast data check`` and ``data prepare``.

Two layouts are read, detected per sample from the image sizes (never guessed: an ambiguous sample is an
``AnalogyDataError`` naming its file):

``strip`` (official, what NVlabs/LoRWeB ``preprocess_data.py`` writes)::

    DIR/control/<id>.jpg    a | a' | b   a horizontal strip of three equal cells (any width: it is resized to 3W x H)
    DIR/target/<id>.jpg     b'           alone, any size
    DIR/target/<id>.txt     the caption (the edit description)
    DIR/analogy_metadata.json   [{"analogy_id": <id>, "edit_prompt": caption, ...}, ...]

  As the official loader: the samples are the images under target/ (nested folders included, "_controls" folders
  left out), each with the control named like it (.jpg, .jpeg, .png, .webp tried in that order); the caption is the
  ``edit_prompt`` of its analogy_metadata.json entry, else the .txt beside the target image (then ours:
  ``captions/<id>.txt``, ``control/<id>.txt``); a sample with none of them trains with an empty caption (official;
  a warning, or an error with ``missing_caption="raise"``). Control images without a target are not samples (a
  warning). A name with several control images uses the first in that order (a warning names the others, never
  read); target images sharing a name (``0007.jpg`` and ``0007.png``) are each a sample, as official (a warning).

  The trainer's target is the 2x2 grid [a a'; b b'] at b''s size (every cell W x H = b'.size, the strip resized to
  3W x H with bicubic first, as ai-toolkit ``_create_box_analogy_image`` with ``full_size_control_images: true``), and
  the control is that grid with its bottom-left quadrant copied into the bottom-right (``load_control_image``).

``grid`` (lorweb_fast's first format): ``control/<id>.*`` = [a a'; b b] and ``target/<id>.*`` = [a a'; b b'], two
grids of the same size; captions found as in the strip layout (beside the target, else ``captions/`` or
``control/``).

Bidirectional analogies (official ``is_bidirectional_analogy``): with probability 1/2 per sample draw the analogy is
reversed. ``"official"`` reproduces the official composition exactly: the target grid becomes [a' a; b' b], and the
control is built as the official code does it, whose top-row "swap" assigns through two views of the same tensor, so
both top cells end up holding the target's top-right cell: [a a; b' b']. ``"reverse"`` is the consistent reversal
(target [a' a; b' b], control [a' a; b' b']). The draw is a pure function of (seed, position in the sample stream),
so a resumed run sees the same swaps.

Training size: ``resize="bucket"`` (official, ai-toolkit ``setup_buckets``) or ``"long-edge"`` (see ``AnalogyFolder``).
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import errno
import json
import math
import os
import random
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Union

import torch

from ._files import FolderLock, image_read_error_message, image_read_errors, loads_json, same_or_inside
from ._files import atomic_write as _atomic_write
from .official_config import OFFICIAL_DEFAULTS, QUERY_MODES, QUERY_SOURCES
from .validation import silenced_lorweb_warnings, warn

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
#: the order in which the official loader tries a control image's extension (toolkit/dataloader_mixins.py
#: ``img_ext_list``, ``ControlFileItemDTOMixin.__init__``): the first file that exists is the control
CONTROL_SUFFIX_ORDER = (".jpg", ".jpeg", ".png", ".webp")
#: the relation captions the official config reads (``enable_relation_captions: true``, toolkit/data_loader.py): a
#: JSON list of {"analogy_id", "edit_prompt", ...} beside control/ and target/, written by preprocess_data.py
RELATION_METADATA = "analogy_metadata.json"
LAYOUTS = ("auto", "strip", "grid")
#: "bucket": the official training size (ai-toolkit aspect buckets of b''s size, see ``bucket_resize``);
#: "long-edge": lorweb_fast's first rule (long edge ``long_edge``, sides multiples of 32, no crop)
RESIZE_MODES = ("bucket", "long-edge")
#: the SDXL aspect buckets at 1024 that ai-toolkit scales to the training resolution (toolkit/buckets.py)
SDXL_BUCKETS_1024 = ((1024, 1024), (2048, 512), (1984, 512), (1920, 512), (1856, 512), (1792, 576), (1728, 576),
                     (1664, 576), (1600, 640), (1536, 640), (1472, 704), (1408, 704), (1344, 704), (1344, 768),
                     (1280, 768), (1216, 832), (1152, 832), (1152, 896), (1088, 896), (1088, 960), (1024, 960),
                     (960, 1024), (960, 1088), (896, 1088), (896, 1152), (832, 1152), (832, 1216), (768, 1280),
                     (768, 1344), (704, 1408), (704, 1472), (640, 1536), (640, 1600), (576, 1664), (576, 1728),
                     (576, 1792), (512, 1856), (512, 1920), (512, 1984), (512, 2048), (8192, 128), (128, 8192))
BIDIRECTIONAL = ("none", "official", "reverse")
#: where a caption .txt is looked for after the relation metadata and the .txt beside the target image (official)
CAPTION_DIRS = ("captions", "control")
#: a sample without any caption: "empty" (official: the loader's caption is "" when no caption file exists,
#: toolkit/dataloader_mixins.py ``CaptionProcessingDTOMixin.load_caption``; a warning names them) or "raise"
MISSING_CAPTION_MODES = ("empty", "raise")
#: the bucket divisibility of official FLUX.1-Kontext training: ai-toolkit's dataset sets ``bucket_tolerance`` to
#: ``sd.get_bucket_divisibility()`` (toolkit/data_loader.py ``AiToolkitDataset.__init__``), which is 16 for
#: FLUX.1-Kontext (extensions_built_in/flux_kontext.py ``FluxKontextModel.get_bucket_divisibility``); the config's
#: ``bucket_tolerance: 64`` default is overwritten.
OFFICIAL_BUCKET_DIVISIBILITY = 16

#: a control image of its target's size at least this many times wider than tall, with a width divisible by 3, could
#: be an a|a'|b strip as well as a grid: ambiguous
STRIP_MIN_ASPECT = 2.5
#: A strip control (another size than its target) whose aspect ratio is within this factor of its target's looks
#: like a finished 2x2 grid saved at another size: the official resize to 3W x H stretches it threefold (a
#: warning names such samples; a real strip is about three times as wide, relative to its height, as its target).
GRID_LIKE_ASPECT_TOLERANCE = 1.1


class AnalogyDataError(ValueError):
    """The training data folder is empty, incomplete, ambiguous or holds files that are not images."""


#: The lock file ``prepare_relation252k`` (``data prepare``) holds in its output folder while it runs.
PREPARE_LOCK_NAME = ".lorweb-prepare.lock"


# ---------------------------------------------------------------------------------------------- composition
#: Pillow modes with more than 8 bits per channel: their conversion to RGB (the official loader's) clips every value
#: above 255, so a 16-bit PNG trains as a nearly white image
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _oriented_size(path: Path) -> tuple[tuple[int, int], str]:
    """((width, height) of an image file after its EXIF orientation, its Pillow mode), read from the header (no
    decoding); verifies the file. Raises AnalogyDataError naming the file when it is not a readable image. A file
    that fails ``Image.verify`` but decodes completely (e.g. a PNG with a bad chunk checksum) is kept, as the
    official loader, which never verifies, trains on its pixels."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            try:
                im.verify()
            except image_read_errors() as exc:
                if _decode_exception(path) is not None:  # not readable: the verify error names the problem
                    raise exc
        with Image.open(path) as im:
            (w, h), mode = im.size, im.mode
            orientation = im.getexif().get(0x0112, 1)
    except image_read_errors() as exc:
        raise AnalogyDataError(image_read_error_message(path, exc)) from exc
    return ((h, w) if orientation in (5, 6, 7, 8) else (w, h)), mode


#: EXIF orientation -> the ``Image.Transpose`` that shows the image upright (Pillow's ``ImageOps.exif_transpose``)
_ORIENTATION_TRANSPOSE = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE",
                          6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}


def open_oriented(path: Union[str, Path]):
    """The image at ``path``, EXIF-transposed, in the file's own mode (P, L, RGBA, ...): the official box-analogy
    loader resizes strip and b' in that mode and converts only when it pastes the cells into the RGB grid. A file that
    does not decode completely (a truncated JPEG passes the header check) raises AnalogyDataError naming it.

    The pixels of ``ImageOps.exif_transpose`` (which the official loader calls), without its rewrite of the EXIF
    block after a rotation: Pillow cannot re-serialise a tag stored with another type than its own (cameras and
    editors write such files), and raised a bare ``struct.error`` or ``TypeError`` at every training draw of an image
    that decodes fine. The orientation is ``getexif()``'s, which also reads one given in XMP only, as
    ``exif_transpose`` does."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()  # decodes the whole file
            method = _ORIENTATION_TRANSPOSE.get(im.getexif().get(0x0112, 1))
            return im.transpose(Image.Transpose[method]) if method else im.copy()
    except image_read_errors() as exc:  # e.g. a truncated JPEG
        raise AnalogyDataError(image_read_error_message(path, exc)) from exc


def open_rgb(path: Union[str, Path]):
    """The image at ``path``, EXIF-transposed and converted to RGB (as ai-toolkit opens training images)."""
    return open_oriented(path).convert("RGB")


def strip_cells(strip, size: tuple[int, int]):
    """(a, a', b) of an a|a'|b strip, each ``size`` = (W, H): the strip is first resized to (3W, H) with bicubic
    (in the strip's own mode, where Pillow resizes P and 1 images with nearest), then cut into three W-wide cells
    (ai-toolkit ``_create_box_analogy_image``)."""
    from PIL import Image

    w, h = size
    strip = strip.resize((3 * w, h), Image.BICUBIC)
    return tuple(strip.crop((i * w, 0, (i + 1) * w, h)) for i in range(3))


def compose_grid(top_left, top_right, bottom_left, bottom_right):
    """The 2x2 RGB grid (2W, 2H) of four cells, (W, H) = ``bottom_right.size``: cells of another size are resized
    with bicubic in their own mode, then pasted (which converts them to RGB), as ai-toolkit
    ``_create_box_analogy_image``."""
    from PIL import Image

    w, h = bottom_right.size
    grid = Image.new("RGB", (2 * w, 2 * h))
    for cell, xy in ((top_left, (0, 0)), (top_right, (w, 0)), (bottom_left, (0, h)), (bottom_right, (w, h))):
        if cell.size != (w, h):
            cell = cell.resize((w, h), Image.BICUBIC)
        grid.paste(cell, xy)
    return grid


def strip_target_grid(strip, b_prime, *, swap: bool = False):
    """Training target [a a'; b b'] (or [a' a; b' b] with ``swap``) from a strip and b': an RGB grid (2W, 2H) with
    (W, H) = ``b_prime.size``."""
    a, a_prime, b = strip_cells(strip, b_prime.size)
    if swap:
        return compose_grid(a_prime, a, b_prime, b)
    return compose_grid(a, a_prime, b, b_prime)


def control_from_target(target, *, bidirectional: str = "none", swapped: bool = False):
    """The control grid the official loader derives from a target grid (ai-toolkit ``load_control_image``): the
    bottom-left quadrant copied into the bottom-right (split at h//2, w//2); with ``bidirectional="official"`` and a
    swapped sample, the official top-row copy leaves the top-right quadrant in both top cells (see module docstring).
    Same size and mode as ``target``; a target with an odd side raises AnalogyDataError.
    """
    w, h = target.size
    if w % 2 or h % 2:
        raise AnalogyDataError(f"a grid needs even sides to split into quadrants, got {w}x{h}")
    control = target.copy()
    control.paste(target.crop((0, h // 2, w // 2, h)), (w // 2, h // 2))
    if swapped and bidirectional == "official":
        control.paste(target.crop((w // 2, 0, w, h // 2)), (0, 0))
    return control


def swap_grid(grid):
    """[a a'; b b'] -> [a' a; b' b] (quadrants at w//2, h//2): the reversed analogy of a finished grid."""
    w, h = grid.size
    cw, ch = w // 2, h // 2
    out = grid.copy()
    out.paste(grid.crop((cw, 0, w, ch)), (0, 0))
    out.paste(grid.crop((0, 0, cw, ch)), (cw, 0))
    out.paste(grid.crop((cw, ch, w, h)), (0, ch))
    out.paste(grid.crop((0, ch, cw, h)), (cw, ch))
    return out


def official_caption(text: str) -> str:
    """The caption as the official loader hands it to the text encoders (toolkit/dataloader_mixins.py
    ``CaptionMixin.get_caption``): split on commas, each piece stripped, empty pieces dropped, joined with ", "
    ("make it red ,,bigger\n" -> "make it red, bigger")."""
    return ", ".join(piece.strip() for piece in text.split(",") if piece.strip())


def bidirectional_swap(seed: int, position: int) -> bool:
    """Whether the sample drawn at ``position`` of the sample stream (step * global batch + rank * batch + slot) is
    reversed: a fair coin that depends only on (seed, position), so resumed runs repeat it."""
    return random.Random(f"lorweb-bidirectional-{seed}-{position}").random() < 0.5


# ------------------------------------------------------------------------------------------ training size
def official_bucket(width: int, height: int, resolution: int = 512,
                    divisibility: int = OFFICIAL_BUCKET_DIVISIBILITY) -> tuple[int, int]:
    """The ai-toolkit bucket (W, H) of an image of ``width`` x ``height`` (toolkit/buckets.py
    ``get_bucket_for_image_size``): the SDXL buckets scaled to min(resolution, sqrt(w h)) / 1024 and floored to
    multiples of ``divisibility``; an exact match, else the bucket that crops the fewest pixels (first wins).
    AnalogyDataError when every bucket has a side of 0 at that scale (an image too small)."""
    res = min(resolution, int((width * height) ** 0.5))
    scaler = res / 1024
    buckets = []
    for bw, bh in SDXL_BUCKETS_1024:
        w, h = int(bw * scaler), int(bh * scaler)
        buckets.append((w - w % divisibility, h - h % divisibility))
    if (width, height) in buckets:
        return width, height
    best, best_removed = None, float("inf")
    for bw, bh in buckets:
        if bw <= 0 or bh <= 0:
            continue
        scale = max(bw / width, bh / height)
        new_w, new_h = int(width * scale), int(height * scale)
        removed = (new_w - bw) * new_h + (new_h - bh) * new_w
        if removed < best_removed:
            best, best_removed = (bw, bh), removed
    if best is None:
        raise AnalogyDataError(f"an image of {width}x{height} has no training bucket at resolution {resolution} with "
                               f"sides multiples of {divisibility} (too small); use --resize long-edge")
    return best


def bucket_resize(grid, cell_size: tuple[int, int], resolution: int = 512,
                  divisibility: int = OFFICIAL_BUCKET_DIVISIBILITY):
    """The official training-size step (ai-toolkit ``setup_buckets`` + ``load_and_process_image``): the bucket is
    chosen from the b' cell size (W, H), the whole grid is resized with bicubic to (ceil(W s), ceil(H s)) with
    s = max(bucket W / W, bucket H / H), then centre-cropped to the bucket: returns the grid at the bucket's
    (W, H) = ``official_bucket(W, H, resolution, divisibility)`` (the whole grid fits the bucket of one cell)."""
    from PIL import Image

    w, h = cell_size
    bw, bh = official_bucket(w, h, resolution, divisibility)
    scale = max(bw / w, bh / h)
    sw, sh = int(math.ceil(w * scale)), int(math.ceil(h * scale))
    x0, y0 = int((sw - bw) / 2), int((sh - bh) / 2)
    return grid.resize((sw, sh), Image.BICUBIC).crop((x0, y0, x0 + bw, y0 + bh))


# ------------------------------------------------------------------------------------------------- dataset
def detect_layout(control: Path, control_size: tuple[int, int], target: Path, target_size: tuple[int, int]) -> str:
    """``"strip"`` or ``"grid"`` from the sizes of a sample's control and target; AnalogyDataError naming the file
    when the sizes fit both, or two grids have an odd side.

    A control of another size than its target is a strip whatever its width: the official loader
    (``_create_box_analogy_image``) resizes every strip to 3W x H before cutting it, so it takes any width."""
    cw, ch = control_size
    if control_size != target_size:
        return "strip"
    if cw % 3 == 0 and cw >= STRIP_MIN_ASPECT * ch:
        raise AnalogyDataError(
            f"{control} ({cw}x{ch}) is ambiguous: the same size as its target (a finished 2x2 grid?) and shaped "
            f"like an a|a'|b strip; pass layout='strip' or 'grid' (--layout) to say which")
    if cw % 2 or ch % 2:
        raise AnalogyDataError(f"{control} and {target} are {cw}x{ch} grids with an odd side: a 2x2 grid needs "
                               "even sides")
    return "grid"


def _unread_images(files: list[Path]) -> list[str]:
    """Those of ``files`` whose extension names a format Pillow opens (not one it only writes, such as .pdf) but is
    not one of IMAGE_SUFFIXES, sorted."""
    from PIL import Image

    Image.init()
    known = {ext for ext, fmt in Image.registered_extensions().items()
             if fmt in Image.OPEN and ext not in IMAGE_SUFFIXES}
    return sorted(str(p) for p in files if p.suffix.lower() in known)


def _read_relation_captions(path: Path) -> dict:
    """{analogy_id: entry} of an ``analogy_metadata.json`` (empty when the file is absent), indexed as the official
    loader indexes it (toolkit/data_loader.py: ``{i['analogy_id']: i for i in ...}``): a file that is not a JSON list
    of objects with an ``analogy_id`` raises AnalogyDataError naming it (the official index fails there too); an
    entry's ``edit_prompt`` is checked only for the sample that uses it."""
    if not path.is_file():
        return {}
    entries = _read_json(path, "relation metadata")
    if not isinstance(entries, list):
        raise AnalogyDataError(f"relation metadata {path} must hold a JSON list of analogies, got "
                               f"{type(entries).__name__}")
    bad = next((k for k, e in enumerate(entries) if not isinstance(e, dict) or "analogy_id" not in e), None)
    if bad is not None:
        raise AnalogyDataError(f"relation metadata {path}: entry {bad} is not an object with an 'analogy_id'")
    return {e["analogy_id"]: e for e in entries if isinstance(e["analogy_id"], str)}  # others match no file name


class AnalogyFolder(torch.utils.data.Dataset):
    """Analogy samples from ``root/control`` and ``root/target`` in the ``strip`` (official) or ``grid`` layout (see
    the module docstring).

    Every sample is checked when the dataset is built: a missing control, an unreadable image or caption (bad
    UTF-8), a size that fits no layout or no training bucket, or mixed layouts under ``layout="auto"`` raise
    ``AnalogyDataError`` naming the file; with ``skip_bad=True`` a bad sample is dropped with a warning (mixed layouts
    always raise). An unknown ``layout``, ``bidirectional``, ``resize`` or ``missing_caption`` is a ValueError. A sample
    without a caption trains with an empty one, as the official loader's (``missing_caption="empty"``: one warning
    names them, ``missing_captions`` lists them), or is a bad sample (``missing_caption="raise"``).

    ``dataset[i]`` (or ``dataset[(i, swap)]`` for a bidirectional draw) is a dict ``{"control": PIL, "target": PIL,
    "caption": str, "name": id, "layout": str, "swapped": bool}`` with both grids at the training size:
    ``resize="bucket"`` (official) puts the grid into the ai-toolkit aspect bucket of its b' cell at resolution
    ``long_edge`` (sides multiples of ``bucket_divisibility``, bicubic, centre crop; ``bucket_resize``);
    ``resize="long-edge"`` scales it to long edge ``long_edge`` with sides multiples of ``multiple``. In the strip
    layout (and for a swapped draw) the control is derived from the resized target as the official loader does;
    ``swap`` takes effect only with ``bidirectional`` "official" or "reverse" (see the module docstring).
    ``full_grids(i)`` gives the grids before that resize.
    """

    def __init__(self, root: Union[str, Path], *, long_edge: int = 512, multiple: int = 32, skip_bad: bool = False,
                 layout: str = "auto", bidirectional: str = "none", resize: str = "bucket",
                 bucket_divisibility: int = OFFICIAL_BUCKET_DIVISIBILITY, missing_caption: str = "empty"):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if bidirectional not in BIDIRECTIONAL:
            raise ValueError(f"bidirectional must be one of {BIDIRECTIONAL}, got {bidirectional!r}")
        if missing_caption not in MISSING_CAPTION_MODES:
            raise ValueError(f"missing_caption must be one of {MISSING_CAPTION_MODES}, got {missing_caption!r}")
        self.missing_caption = missing_caption
        self.root, self.long_edge, self.multiple = Path(root), long_edge, multiple
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.layout, self.bidirectional = layout, bidirectional
        from .validation import MIN_LONG_EDGE, check_bucket_divisibility, check_int

        check_int("long_edge", long_edge, lo=MIN_LONG_EDGE)  # as TrainConfig: not blamed on the images
        check_bucket_divisibility("bucket_divisibility", bucket_divisibility, resize)
        if resize == "long-edge":  # the grid's sides are multiples of ``multiple`` and must split into two cells
            check_bucket_divisibility("multiple", multiple, "bucket")
        self.resize, self.bucket_divisibility = resize, bucket_divisibility
        control_dir, target_dir = self.root / "control", self.root / "target"
        for d in (self.root, control_dir, target_dir):
            if not d.is_dir():
                raise AnalogyDataError(f"training data folder {d} {_not_a_folder(d)} (expected {self.root}/control/ "
                                       f"and {self.root}/target/, each target image with its control image of the same "
                                       f"name; captions, optional, from analogy_metadata.json, <id>.txt beside the "
                                       f"target, captions/ or control/)")
        # the samples are the target images, as the official loader lists its dataset folder (os.walk of target/,
        # files with an image extension, not in a "_controls" folder); each finds its control in control/ by name
        walked = list(os.walk(target_dir))
        target_files = [Path(d) / f for d, _, files in walked for f in files]
        #: folders under target/ that are symlinks: os.walk does not enter them (nor does the official loader's)
        self.unfollowed_links = sorted(Path(d) / sub for d, subs, _ in walked for sub in subs
                                       if (Path(d) / sub).is_symlink() and sub != "_controls")  # never samples
        if self.unfollowed_links:
            warn(f"{len(self.unfollowed_links)} symlinked folders under {target_dir} are not entered, as in the "
                 f"official loader (os.walk): their images are not samples (e.g. {self.unfollowed_links[0]}); "
                 "copy the folder, or link its image files one by one (symlinked files are read)")
        targets = sorted((p for p in target_files if p.name.lower().endswith(IMAGE_SUFFIXES)
                          and p.parent.name != "_controls"), key=lambda p: p.relative_to(target_dir).as_posix())
        #: image files that are not samples or controls because their extension is not one of IMAGE_SUFFIXES (the
        #: official loader's list; e.g. .tif, .bmp, .gif): never read
        self.unread_images = _unread_images(
            target_files + [Path(d) / f for d, _, files in os.walk(control_dir) for f in files])
        if self.unread_images:
            warn(f"{len(self.unread_images)} image files under {target_dir} or {control_dir} are not read: only "
                 f"{', '.join(IMAGE_SUFFIXES)} files are samples and controls, as in the official loader (e.g. "
                 f"{self.unread_images[0]}); convert them to be trained on")
        if not targets:
            raise AnalogyDataError(f"no training samples: {target_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        relation = _read_relation_captions(self.root / RELATION_METADATA)
        control_files = sorted(p for p in control_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        # each name's control files in lookup order: the official (case-sensitive) extension order, then an
        # upper-case extension, which the official lookup would miss
        control_by_stem: dict[str, list[Path]] = {}
        for p in sorted(control_files, key=lambda p: (p.suffix not in CONTROL_SUFFIX_ORDER,
                                                      CONTROL_SUFFIX_ORDER.index(p.suffix.lower()))):
            control_by_stem.setdefault(p.stem, []).append(p)
        stems = {t.stem for t in targets}
        #: {name: control files} for the target names with several control images: the first is the one used (the
        #: official lookup order), the others are never read
        self.several_controls = {stem: files for stem, files in sorted(control_by_stem.items())
                                 if len(files) > 1 and stem in stems}
        if self.several_controls:
            stem, files = next(iter(self.several_controls.items()))
            warn(f"several control images share a target's name ({len(self.several_controls)} names); "
                 "each sample uses the first in the official lookup order "
                 f"({', '.join(CONTROL_SUFFIX_ORDER)}, then upper case) "
                 f"and never reads the others (e.g. {stem}: {files[0].name} over "
                 f"{', '.join(f.name for f in files[1:])})")
        target_names = [self._name(t) for t in targets]
        names = Counter(target_names)
        #: names shared by several target images (target/0007.jpg and target/0007.png): each is a sample, as in the
        #: official loader, with the same control image and caption
        self.shared_names = sorted(n for n, k in names.items() if k > 1)
        if self.shared_names:
            warn(f"several target images share a name ({len(self.shared_names)} names), each a sample "
                 f"with the same control image and caption, as in the official loader (e.g. "
                 f"{self.shared_names[0]}: "
                 + ", ".join(t.name for t, n in zip(targets, target_names) if n == self.shared_names[0]) + ")")
        #: {control file: names of the targets} for targets in different sub-folders of target/ that share a file
        #: name: the control lookup is by file name in control/ (official), so they all use that one control
        self.shared_controls = {}
        users_by_stem: dict[str, set] = {}
        for t, name in zip(targets, target_names):
            users_by_stem.setdefault(t.stem, set()).add(name)
        for stem, users in sorted(users_by_stem.items()):
            if stem in control_by_stem and len({name.rpartition("/")[0] for name in users}) > 1:
                self.shared_controls[str(control_by_stem[stem][0])] = sorted(users)
        if self.shared_controls:
            control, users = next(iter(self.shared_controls.items()))
            warn(f"targets in different sub-folders of {target_dir} share a file name and so one control image "
                 f"({len(self.shared_controls)} controls; the control lookup is by file name in {control_dir}, as "
                 f"in the official loader; sub-folders of control/ are not read): e.g. {control} for "
                 f"{', '.join(users)}")
        #: (control, target, caption, layout, grid size (W, H) before resizing)
        self.samples: list[tuple[Path, Path, str, str, tuple[int, int]]] = []
        self.skipped: list[str] = []
        self.problems: list[str] = []
        self._no_caption: set[Path] = set()  # targets whose caption lookup found nothing (filled by _caption)
        #: caption files that begin with a UTF-8 byte-order mark, kept in the prompt as the official loader keeps it
        self.bom_captions: list[Path] = []
        self._grid_like: dict[Path, str] = {}  # strips shaped like their target (filled by _check_sample): why
        self._high_bit_depth: dict[Path, str] = {}  # images in HIGH_BIT_DEPTH_MODES (filled by _check_sample): mode
        for target in targets:
            try:
                self.samples.append(self._check_sample(target, control_dir, control_by_stem, relation))
            except AnalogyDataError as exc:
                if not skip_bad:
                    raise AnalogyDataError(f"{exc} (pass skip_bad=True / --skip-bad to skip such samples)") from None
                name = self._name(target)
                warn(f"skipping training sample {name}: {exc}")
                self.skipped.append(name)
                self.problems.append(str(exc))
        if self.bom_captions:
            warn(f"{len(self.bom_captions)} caption files begin with a UTF-8 byte-order mark (e.g. "
                 f"{self.bom_captions[0]}), which stays in the prompt the text encoders read, as the official loader "
                 "(utf-8, not utf-8-sig) keeps it; save them as UTF-8 without a BOM")
        if self.missing_captions:
            warn(f"{len(self.missing_captions)} training samples have no caption and train with an empty "
                 f"one, as the official loader does (e.g. {self.missing_captions[0]}: no entry in "
                 f"{self.root / RELATION_METADATA}, no .txt beside its target, in captions/ or "
                 "control/); pass missing_caption='raise' / --missing-caption raise to refuse them")
        #: control images with no target image of their name: not samples (the official loader never looks at them)
        self.unused_controls = [p for p in control_files if p.stem not in stems]
        if self.unused_controls:
            warn(f"{len(self.unused_controls)} control images have no target image and are not training "
                 f"samples (e.g. {self.unused_controls[0]}): the samples are the images in {target_dir}")
        if self._high_bit_depth:
            path, mode = next(iter(self._high_bit_depth.items()))
            warn(f"{len(self._high_bit_depth)} images have more than 8 bits per channel (e.g. {path}: mode {mode}); "
                 "the conversion to RGB, as in the official loader, clips their values above 255 (a 16-bit image "
                 "trains nearly white): save them as 8-bit images")
        if self.grid_like_strips:
            name, why = next(iter(self.grid_like_strips.items()))
            if self.layout == "auto":  # a control of its target's size is a grid here: these have other sizes
                what, fix = ("controls of another size than their target have", "save each control at its target's "
                             "size")
            else:  # layout="strip" reads every control as a strip, the ones of their target's size too
                what, fix = "controls have", "use layout 'auto' or 'grid' (--layout), each control at its target's size"
            warn(f"{len(self.grid_like_strips)} {what} the target's aspect ratio, like a finished 2x2 grid (e.g. "
                 f"{name}: {why}); they are read as a|a'|b strips, as in the official loader, and stretched "
                 f"threefold by its resize to 3W x H: to train them as grids, {fix}")
        if not self.samples:
            raise AnalogyDataError(f"no usable training samples in {self.root} ({len(self.skipped)} skipped)")
        kinds = {s[3] for s in self.samples}
        if len(kinds) > 1:
            first = {kind: next(s[0] for s in self.samples if s[3] == kind) for kind in sorted(kinds)}
            raise AnalogyDataError(f"{self.root} mixes layouts ({first['grid']} is a 2x2 grid, {first['strip']} an "
                                   "a|a'|b strip, by their sizes); keep one layout per folder, or name it: "
                                   "layout='strip' / --layout strip reads every control as a strip, as the official "
                                   "loader does (an a|a'|b strip can have its target's size), layout='grid' / "
                                   "--layout grid every one as a grid")

    def skip_samples(self, problems: dict, skip_bad: bool) -> None:
        """Remove the samples ``problems`` ({index: why}) names: with ``skip_bad`` each with a warning (recorded in
        ``skipped`` / ``problems``), else ``AnalogyDataError`` naming the first of them, the dataset unchanged. No
        sample left is an error as well."""
        if not problems:
            return
        names = {i: self.name(i) for i in problems}
        if not skip_bad:
            first = min(problems)
            raise AnalogyDataError(f"{len(problems)} training samples cannot be used, e.g. {names[first]}: "
                                   f"{problems[first]} (pass skip_bad=True / --skip-bad to skip such samples)")
        for i in sorted(problems):
            warn(f"skipping training sample {names[i]}: {problems[i]}")
            self.skipped.append(names[i])
            self.problems.append(f"{names[i]}: {problems[i]}")
        self.samples = [s for i, s in enumerate(self.samples) if i not in problems]
        if not self.samples:
            raise AnalogyDataError(f"no usable training samples in {self.root} ({len(self.skipped)} skipped)")

    def skip_query_crop_problems(self, query_mode: str, query_source: str, skip_bad: bool) -> None:
        """With ``query_source="grid"`` (official), ``skip_samples`` those whose training-size grid has nothing to
        cut for the official training query crops of ``query_mode`` (side s = H // 2: a grid at most half as wide as
        it is tall has no a' cell); the same check in ``lorweb-fast train`` and ``data check``."""
        if query_source != "grid":
            return
        from .flux import query_crop_problem

        sizes = [self.grid_size(s[4]) for s in self.samples]
        crops = {i: query_crop_problem(*size, query_mode, "training") for i, size in enumerate(sizes)}
        self.skip_samples({i: f"at its training size {sizes[i]}: {why}" for i, why in crops.items() if why},
                          skip_bad)

    @property
    def high_bit_depth_images(self) -> dict:
        """{path: mode} of the images of the samples left whose mode is in ``HIGH_BIT_DEPTH_MODES``."""
        kept = {p for s in self.samples for p in s[:2]}
        return {str(p): mode for p, mode in self._high_bit_depth.items() if p in kept}

    @property
    def grid_like_strips(self) -> dict:
        """{name: why} of the strip samples (of those left) whose control has its target's aspect ratio, within
        ``GRID_LIKE_ASPECT_TOLERANCE``; not those listed in ``analogy_metadata.json`` (prepared strips)."""
        kept = {s[1] for s in self.samples}
        return {self._name(t): why for t, why in self._grid_like.items() if t in kept}

    @property
    def missing_captions(self) -> list:
        """Names of the samples that have no caption and train with an empty one (missing_caption="empty"); by
        target file, not by name (target/0007.jpg and target/0007.png share a name)."""
        return [self._name(s[1]) for s in self.samples if s[1] in self._no_caption]

    def _name(self, target: Path) -> str:
        """A sample's name: its target's path under target/ without the extension ("0007", "sub/0007")."""
        return target.relative_to(self.root / "target").with_suffix("").as_posix()

    def name(self, index: int) -> str:
        """The name of sample ``index``: its target's path under target/ without the extension (distinct for nested
        folders that repeat a file name; shared by target images that differ only in their extension, see
        ``shared_names``)."""
        return self._name(self.samples[index][1])

    def _check_sample(self, target: Path, control_dir: Path, control_by_stem: dict, relation: dict):
        """``samples``' entry for the target image ``target``: (control, target, caption, layout, grid size (W, H)
        before resizing: the target's size for a grid, twice it for a strip); records high-bit-depth images and
        grid-shaped strips. AnalogyDataError naming the file for a bad sample (see the class docstring)."""
        if target.exists() and not target.is_file():  # opening a FIFO would block forever
            raise AnalogyDataError(f"{target} is not a regular file (a folder, FIFO, socket or device)")
        control = next(iter(control_by_stem.get(target.stem, ())), None)
        if control is None:
            raise AnalogyDataError(f"{target} has no control image {control_dir / target.stem}.*")
        caption = self._caption(target, relation)
        (control_size, control_mode), (target_size, target_mode) = _oriented_size(control), _oriented_size(target)
        for path, mode in ((control, control_mode), (target, target_mode)):
            if mode in HIGH_BIT_DEPTH_MODES:
                self._high_bit_depth[path] = mode
        if self.layout == "auto" and target.stem in relation:
            # listed in analogy_metadata.json: a strip written by data prepare / the official preprocess_data.py,
            # which can have its target's size (cells at a's 10x30 halves, a 30x30 b'): never a grid
            layout = "strip"
        elif self.layout == "auto":
            layout = detect_layout(control, control_size, target, target_size)
        elif self.layout == "grid":
            if control_size != target_size or control_size[0] % 2 or control_size[1] % 2:
                raise AnalogyDataError(f"{control} ({control_size}) and {target} ({target_size}) are not two 2x2 "
                                       "grids of the same even size (layout='grid')")
            layout = "grid"
        else:
            layout = "strip"
        grid_size = target_size if layout == "grid" else (2 * target_size[0], 2 * target_size[1])
        if layout == "strip" and target.stem not in relation:  # a prepared strip (listed in analogy_metadata.json)
            # has cells at the smallest width and height of a, a', b and b' as it is: any shape, never a grid
            shape = (control_size[0] * target_size[1]) / (target_size[0] * control_size[1])
            if max(shape, 1 / shape) < GRID_LIKE_ASPECT_TOLERANCE:
                self._grid_like[target] = (f"control {control_size[0]}x{control_size[1]}, target "
                                           f"{target_size[0]}x{target_size[1]}")
        if self.resize == "bucket":  # a sample too small for any bucket fails here, naming its file
            try:
                official_bucket(grid_size[0] // 2, grid_size[1] // 2, self.long_edge, self.bucket_divisibility)
            except AnalogyDataError as exc:
                raise AnalogyDataError(f"{target}: {exc}") from None
        return control, target, caption, layout, grid_size

    def _caption(self, target: Path, relation: dict) -> str:
        """The official order (toolkit/dataloader_mixins.py ``CaptionProcessingDTOMixin.load_caption``): the
        ``edit_prompt`` of the relation metadata entry named like the target, else the .txt beside the target image;
        then ours: ``captions/<id>.txt``, ``control/<id>.txt``. None at all: "" (official; the sample is recorded in
        ``missing_captions``), or an error with ``missing_caption="raise"``."""
        stem = target.stem
        if stem in relation:
            prompt = relation[stem].get("edit_prompt")
            if not isinstance(prompt, str):
                raise AnalogyDataError(f"sample {stem}: its entry in {self.root / RELATION_METADATA} has no string "
                                       f"'edit_prompt' (got {prompt!r})")
            return official_caption(prompt)
        for path in (target.with_suffix(".txt"), *(self.root / sub / f"{stem}.txt" for sub in CAPTION_DIRS)):
            if path.is_file():
                try:
                    # text mode, as the official loader opens it: \r\n and \r read as \n
                    text = path.read_text(encoding="utf-8")
                except UnicodeDecodeError as exc:
                    raise AnalogyDataError(f"caption {path} is not valid UTF-8 ({exc.reason} at byte {exc.start})") \
                        from None
                if text.startswith("\ufeff"):  # utf-8 (not utf-8-sig), as officially: the mark stays in the prompt
                    self.bom_captions.append(path)
                return official_caption(text)
        if self.missing_caption == "raise":
            raise AnalogyDataError(f"sample {stem} has no caption: no entry in {self.root / RELATION_METADATA} and no "
                                   f"{target.with_suffix('.txt')} or {self.root / 'captions' / stem}.txt "
                                   "(missing_caption='raise'; the official loader trains it with an empty caption)")
        self._no_caption.add(target)
        return ""

    def __len__(self) -> int:
        return len(self.samples)

    def grid_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """Training size (W, H) of a grid of ``size`` (W, H): with ``resize="bucket"`` the official bucket of its
        cell (half the grid); with ``"long-edge"`` long edge ``long_edge``, sides multiples of ``multiple``."""
        w, h = size
        if self.resize == "bucket":
            return official_bucket(w // 2, h // 2, self.long_edge, self.bucket_divisibility)
        scale = self.long_edge / max(w, h)
        m = self.multiple
        return max(m, round(w * scale / m) * m), max(m, round(h * scale / m) * m)

    def full_grids(self, index: int, swap: bool = False):
        """(control grid, target grid) of sample ``index`` before resizing to the training size: RGB, both of the
        sample's grid size (``samples[index][4]``); ``swap`` (ignored with ``bidirectional="none"``): the reversed
        analogy, the control derived from the reversed target."""
        control_path, target_path, _, layout, _ = self.samples[index]
        swap = swap and self.bidirectional != "none"
        if layout == "grid" and not swap:
            return open_rgb(control_path), open_rgb(target_path)
        target = self._full_target(index, swap)
        return control_from_target(target, bidirectional=self.bidirectional, swapped=swap), target

    def _full_target(self, index: int, swap: bool):
        """The target grid of sample ``index`` before resizing: composed from the strip, or the grid file, reversed
        when ``swap``."""
        control_path, target_path, _, layout, _ = self.samples[index]
        if layout == "strip":  # resized in the files' own modes, converted when pasted (official order)
            return strip_target_grid(open_oriented(control_path), open_oriented(target_path), swap=swap)
        return swap_grid(open_rgb(target_path)) if swap else open_rgb(target_path)

    def __getitem__(self, key) -> dict:
        """``key`` = index or (index, swap): the sample dict of the class docstring, both grids at ``grid_size``."""
        from PIL import Image

        index, swap = key if isinstance(key, tuple) else (key, False)
        swap = bool(swap) and self.bidirectional != "none"
        control_path, target_path, caption, layout, grid_size = self.samples[index]
        size = self.grid_size(grid_size)
        cell = (grid_size[0] // 2, grid_size[1] // 2)

        def to_training_size(grid):
            if self.resize == "bucket":
                return bucket_resize(grid, cell, self.long_edge, self.bucket_divisibility)
            return grid.resize(size, Image.BICUBIC)

        if layout == "strip" or swap:
            # official order: compose the target at full size, resize it, then derive the control from it
            target = to_training_size(self._full_target(index, swap))
            control = control_from_target(target, bidirectional=self.bidirectional, swapped=swap)
        else:
            control = to_training_size(open_rgb(control_path))
            target = to_training_size(open_rgb(target_path))
        return {"control": control, "target": target, "caption": caption, "name": self.name(index),
                "layout": layout, "swapped": swap}


# -------------------------------------------------------------------------------------------- data check
#: the temporary names ``_atomic_write`` gives ``data prepare``'s files (".<name>.<8 random chars>.tmp"; before:
#: "...tmp.jpg" / "...tmp.txt"), removed when a killed run left them
_PREPARE_TEMPORARY = re.compile(r"\.(analogy_.+\.(jpg|txt)|analogy_metadata\.json)\.[a-z0-9_]{8}"
                                r"\.tmp(\.jpg|\.txt|\.json)?")
#: the same with the name cut to fit the file-name limit (``_files.temporary_prefix``): only at that length
_CUT_PREPARE_TEMPORARY = re.compile(r"\.analogy_.+\.[a-z0-9_]{8}\.tmp")


def _is_prepare_temporary(path: Path) -> bool:
    """Whether ``path`` is a temporary file a killed ``data prepare`` left (``_PREPARE_TEMPORARY``, or a cut name
    within 3 bytes of the file-name limit: a character boundary cuts at most 3 bytes short)."""
    from ._files import name_limit

    return (_PREPARE_TEMPORARY.fullmatch(path.name) is not None or (
        _CUT_PREPARE_TEMPORARY.fullmatch(path.name) is not None
        and len(os.fsencode(path.name)) >= name_limit(path.parent) - 3)) and path.is_file()


def _not_a_folder(path: Path) -> str:
    """Why ``path``, expected to be a folder, is not one."""
    return "is a file, not a folder" if path.exists() else "does not exist"


def check_folder(root: Union[str, Path], *, dump: Optional[Union[str, Path]] = None, skip_bad: bool = False,
                 layout: str = "auto", resize: str = "bucket", long_edge: int = 512,
                 bucket_divisibility: int = OFFICIAL_BUCKET_DIVISIBILITY, missing_caption: str = "empty",
                 query_mode: str = OFFICIAL_DEFAULTS["query_mode"], query_source: str = "grid",
                 progress: bool = True) -> dict:
    """Validate every sample of ``root``; return counts ``{"samples", "skipped", "layouts", "sizes",
    "training_sizes", "captions", "problems", "controls_without_target", "samples_without_caption",
    "several_controls", "shared_names", "shared_controls", "unread_images", "unfollowed_links",
    "grid_like_strips", "high_bit_depth_images"}``
    (``samples_without_caption``: the samples that train with an empty caption, ``missing_caption="empty"``;
    ``several_controls``: {name: [the control used, the others]}; ``shared_names``: names of several target images,
    each a sample; ``shared_controls``: {control: [names]} of targets in different sub-folders sharing a file name;
    ``unread_images``: image files with an extension the loader does not read; ``unfollowed_links``: symlinked
    folders under target/, not entered (``AnalogyFolder.unfollowed_links``); ``grid_like_strips``: {name: why},
    see ``AnalogyFolder.grid_like_strips``; ``high_bit_depth_images``: {path: mode} of 16/32-bit images; plus
    ``"dumped"``: the folder, with ``dump``). With ``dump``, write ``<id>_target.png``, ``<id>_control.png`` and
    ``<id>_caption.txt`` there (a nested sample's ``/`` written ``__``, and ``~2``, ``~3``, ... after a name an
    earlier sample's already took): the grids the trainer sees, before resizing to the training resolution. A
    ``dump`` that is a file or cannot be created is refused (``validation.UsageError``) before any sample is read.
    Every image is decoded completely (the training folder scan reads only headers): an image that does not decode
    is an AnalogyDataError naming it, or with ``skip_bad`` a skipped sample listed in ``problems``; so is a sample
    that ``lorweb-fast train`` with ``query_mode`` / ``query_source`` (its defaults) refuses because its grid has no
    official query crop (``AnalogyFolder.skip_query_crop_problems``)."""
    from ._progress import progress_bar

    from .validation import check_output_dir

    if dump is not None:
        check_output_dir("dump", dump)  # before the (long) validation of every sample
    with silenced_lorweb_warnings():  # its own: listed in the report; others shown (this thread's only)
        dataset = AnalogyFolder(root, skip_bad=skip_bad, layout=layout, resize=resize, long_edge=long_edge,
                                bucket_divisibility=bucket_divisibility, missing_caption=missing_caption)
        # the folder scan reads headers only (a truncated JPEG passes it and would fail at its training step):
        # here every image is decoded completely
        undecodable = {}
        with _image_pool() as pool:
            decoded = pool.map(lambda s: [decode_problem(p) for p in s[:2]], dataset.samples)
            for i, problems in enumerate(progress_bar(decoded, total=len(dataset), desc="decoding images",
                                                      unit="sample", disable=not progress)):
                bad = next((problem for problem in problems if problem is not None), None)
                if bad is not None:
                    undecodable[i] = bad
        dataset.skip_samples(undecodable, skip_bad)
        dataset.skip_query_crop_problems(query_mode, query_source, skip_bad)  # listed in the report's problems
    captions = [s[2] for s in dataset.samples]
    report = {"samples": len(dataset), "skipped": len(dataset.skipped),
              "layouts": dict(Counter(s[3] for s in dataset.samples)),
              "sizes": dict(Counter(f"{s[4][0]}x{s[4][1]}" for s in dataset.samples).most_common()),
              "training_sizes": dict(Counter("{}x{}".format(*dataset.grid_size(s[4]))
                                             for s in dataset.samples).most_common()),
              "captions": {"non_empty": sum(bool(c) for c in captions), "empty": sum(not c for c in captions),
                           "distinct": len({c for c in captions if c})},
              "problems": list(dataset.problems),
              "controls_without_target": [str(p) for p in dataset.unused_controls],
              "samples_without_caption": list(dataset.missing_captions),
              "several_controls": {stem: [str(p) for p in files] for stem, files in dataset.several_controls.items()},
              "shared_names": list(dataset.shared_names), "shared_controls": dict(dataset.shared_controls),
              "unread_images": list(dataset.unread_images),
              "unfollowed_links": [str(p) for p in dataset.unfollowed_links],
              "grid_like_strips": dict(dataset.grid_like_strips),
              "high_bit_depth_images": dataset.high_bit_depth_images}
    if dump is not None:
        out = Path(dump)
        out.mkdir(parents=True, exist_ok=True)
        names = [dataset.name(i) for i in range(len(dataset))]
        shared = {n for n, k in Counter(names).items() if k > 1}  # target/a.jpg and target/a.png: both samples
        files = [(names[i] if names[i] not in shared else  # keeps the extension
                  dataset.samples[i][1].relative_to(dataset.root / "target").as_posix()).replace("/", "__")
                 for i in range(len(dataset))]
        # target/sub/x.png and target/sub__x.png: sub__x, then sub__x~2; names compared case-folded, so that A.png
        # and a.png do not overwrite each other's files on a case-insensitive file system (macOS, Windows)
        taken, assigned = {f.casefold() for f in files}, set()
        for i, name in enumerate(files):
            if name.casefold() in assigned:
                k = 2
                while f"{name}~{k}".casefold() in taken:
                    k += 1
                files[i] = name = f"{name}~{k}"
                taken.add(name.casefold())
            assigned.add(name.casefold())
        for i in progress_bar(range(len(dataset)), desc="dumping grids", unit="sample", disable=not progress):
            name = files[i]
            control, target = dataset.full_grids(i)
            _atomic_write(out / f"{name}_target.png", lambda p: target.save(p, format="PNG"))
            _atomic_write(out / f"{name}_control.png", lambda p: control.save(p, format="PNG"))
            _atomic_write(out / f"{name}_caption.txt", lambda p: p.write_text(dataset.samples[i][2] + "\n",
                                                                              encoding="utf-8"))
        report["dumped"] = str(out)
    return report


# ------------------------------------------------------------------------------------------ data prepare
#: the fields of a Relation252K ``labels.json`` entry that ``data prepare`` reads
LABEL_FIELDS = ("img_name", "edit_instruction", "left_image_description", "right_image_description")


def _read_json(path: Path, what: str):
    """The JSON value in ``path``; AnalogyDataError naming ``what`` and the file when it is not valid UTF-8 JSON."""
    try:
        return loads_json(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AnalogyDataError(f"{what} {path} is not valid JSON ({exc})") from None


def _label_field(labels_path: Path, k: int, entry, field: str):
    """``entry[field]`` of entry ``k`` of ``labels_path``; AnalogyDataError naming the file, the entry and the field
    when the entry is not an object, lacks the field, or (img_name, edit_instruction) does not hold a string."""
    if not isinstance(entry, dict):
        raise AnalogyDataError(f"{labels_path}: entry {k} is a JSON {type(entry).__name__}, not an object with "
                               f"{', '.join(LABEL_FIELDS)}")
    name = f" ({entry['img_name']!r})" if isinstance(entry.get("img_name"), str) else ""
    if field not in entry:
        raise AnalogyDataError(f"{labels_path}: entry {k}{name} has no {field!r} field")
    value = entry[field]
    if field in ("img_name", "edit_instruction") and not isinstance(value, str):
        raise AnalogyDataError(f"{labels_path}: entry {k}{name}: {field} must be a string, got {value!r}")
    return value


def relation252k_pairs(src: Union[str, Path], *, max_samples_per_category: Optional[int] = None,
                       filter_categories: Optional[list[str]] = None, filter_json: Optional[str] = None,
                       progress: bool = True, unreadable: Optional[list] = None,
                       missing: Optional[list] = None, category_counts: Optional[dict] = None) -> list[dict]:
    """The (a, a') pairs of a downloaded Relation252K folder, as NVlabs/LoRWeB ``preprocess_data.py``
    (``Relation252KDataset`` + ``get_triplets``) reads them: every sub-folder ``<category>/Group1/`` with a
    ``labels.json`` (a list of ``{"img_name", "edit_instruction", "left_image_description",
    "right_image_description"}``); entries whose image is missing or cannot be decoded are skipped (the official
    ``_load_all_samples`` crops, so decodes, every image and drops those that fail, before the per-category cap
    counts; a warning counts them and ``unreadable``, when given, receives ``(path, error)`` for each; likewise
    ``missing`` receives the paths of the entries without an image file that the per-category cap reaches, also
    counted by a warning; ``category_counts`` receives {category: usable pairs} of every category read, zero
    included). Each pair is ``{"image_id": "<category>_<img_name>", "category", "path" (the side-by-side image),
    "img_name", "edit_prompt" (its edit_instruction), "left_image_description", "right_image_description"}``.
    Categories are taken in sorted order (the official script uses the file system's order).

    Raises AnalogyDataError naming the file: ``filter_json`` or a ``labels.json`` that is not valid JSON (the
    official script skips such a category), a ``labels.json`` that is not a list of objects, an entry without
    ``img_name``, or a used entry (its image exists) without one of the other fields (the official script stops
    with a KeyError on both); also when ``src`` is not a folder or holds no ``<category>/Group1/labels.json``, when
    ``filter_json`` is not a list of objects, and when ``filter_categories`` names none of the categories (unmatched
    names are warned about)."""
    from ._progress import progress_bar

    src = Path(src)
    if not src.is_dir():
        raise AnalogyDataError(f"Relation252K folder {src} {_not_a_folder(src)}")
    excluded = set()
    if filter_json:
        items = _read_json(Path(filter_json), "filter JSON")
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise AnalogyDataError(f"filter JSON {filter_json} must be a list of objects with an image_id")
        excluded = {item.get("image_id", "") for item in items}
    categories = sorted(d for d in src.iterdir() if d.is_dir() and (d / "Group1" / "labels.json").is_file())
    if not categories:
        raise AnalogyDataError(f"{src} holds no <category>/Group1/labels.json: not a Relation252K folder")
    if filter_categories:
        names = [d.name for d in categories]
        unknown = [c for c in filter_categories if c not in names]
        if len(unknown) == len(filter_categories):
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            raise AnalogyDataError(f"no category of {src} matches the category filter ({', '.join(unknown)}); its "
                                   f"{len(names)} categories: {shown}")
        if unknown:
            warn(f"{src} has no category {', '.join(unknown)} (category filter)")
    pairs, bad, absent = [], [], []
    with _image_pool() as pool:
        for category in progress_bar(categories, desc="reading labels", unit="category", disable=not progress):
            if not filter_categories or category.name in filter_categories:
                found = _category_pairs(category, excluded, max_samples_per_category or None, pool, bad, absent)
                pairs += found
                if category_counts is not None:
                    category_counts[category.name] = len(found)
    if absent:
        warn(f"skipped {len(absent)} Relation252K labels entries whose image file is missing, as the official "
             f"script does (e.g. {absent[0]})")
    if missing is not None:
        missing.extend(absent)
    if bad:
        warn(f"skipped {len(bad)} Relation252K images that cannot be decoded, as the official script does "
             f"(e.g. {bad[0][0]}: {bad[0][1]})")
    if unreadable is not None:
        unreadable.extend(bad)
    return pairs


class _ContextCarryingPool(ThreadPoolExecutor):
    """A ThreadPoolExecutor whose tasks run in a copy of the submitting thread's context (as ``asyncio.to_thread``):
    ``silenced_lorweb_warnings`` reaches them."""

    def submit(self, fn, /, *args, **kwargs):
        return super().submit(contextvars.copy_context().run, fn, *args, **kwargs)


@contextlib.contextmanager
def _image_pool():
    """Threads for decoding and encoding images (Pillow releases the GIL while it decodes and encodes), at most 8.
    On leaving, also by an error or an interrupt, the tasks not yet started are cancelled."""
    pool = _ContextCarryingPool(max_workers=min(8, os.cpu_count() or 1))
    try:
        yield pool
    finally:
        pool.shutdown(cancel_futures=True)


def _category_pairs(category: Path, excluded: set, cap: Optional[int], pool: ThreadPoolExecutor,
                    bad: list, missing: list) -> list[dict]:
    """The pairs of one Relation252K category (``relation252k_pairs``): at most ``cap`` whose image decodes, in
    labels order; ``(path, error)`` of each image that does not decode is appended to ``bad``, the path of each
    entry (not filtered out) without its image file to ``missing`` (those before the entry that completed the
    cap). Images are decoded on ``pool`` in chunks of as many entries as the cap still admits: every entry of a
    chunk would also be reached one by one (each earlier entry adds at most one to the count), so the fields
    checked, the pairs kept and the images reported are exactly the sequential ones, in order."""
    name = category.name
    labels_path = category / "Group1" / "labels.json"
    labels = _read_json(labels_path, "labels file")
    if not isinstance(labels, list):
        raise AnalogyDataError(f"{labels_path} holds a JSON {type(labels).__name__}, not a list of label objects")
    candidates = []  # (index, entry, img_name, image, image_id) of the entries whose image exists
    absent = []  # (index, image) of the entries whose image does not
    for k, entry in enumerate(labels):
        img_name = _label_field(labels_path, k, entry, "img_name")
        image = category / "Group1" / img_name
        image_id = f"{name}_{img_name}"
        if image_id in excluded:
            continue
        if image.is_file():
            candidates.append((k, entry, img_name, image, image_id))
        else:
            absent.append((k, str(image)))
    pairs, start, last = [], 0, -1
    while start < len(candidates) and (cap is None or len(pairs) < cap):
        chunk = candidates[start:start + (len(candidates) if cap is None else cap - len(pairs))]
        start += len(chunk)
        fields = [{field: _label_field(labels_path, k, entry, field) for field in LABEL_FIELDS[1:]}
                  for k, entry, *_ in chunk]
        errors = pool.map(_decode_error, [image for *_, image, _ in chunk])
        for (k, _, img_name, image, image_id), field, error in zip(chunk, fields, errors):
            if error is not None:
                bad.append((str(image), error))
                continue
            last = k
            pairs.append({"image_id": image_id, "category": name, "path": image, "img_name": img_name,
                          "edit_prompt": field["edit_instruction"],
                          "left_image_description": field["left_image_description"],
                          "right_image_description": field["right_image_description"]})
    # the entries read one by one would stop at the one that completed the cap
    reached = last if cap is not None and len(pairs) >= cap else len(labels)
    missing.extend(image for k, image in absent if k < reached)
    return pairs


def _decode_exception(path: Path) -> Optional[Exception]:
    """None when the image at ``path`` decodes completely, else the exception (as the official loader's crop
    would raise it)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
    except Exception as exc:  # PIL raises several unrelated types for corrupt or truncated files
        return exc
    return None


def _decode_error(path: Path) -> Optional[str]:
    """None when the image at ``path`` decodes completely, else ``"<Type>: <message>"``."""
    exc = _decode_exception(path)
    return None if exc is None else f"{type(exc).__name__}: {exc}"


def decode_problem(path: Path) -> Optional[str]:
    """None when the image at ``path`` decodes completely, else the one-line error naming the file (for a
    decompression bomb: the limit and how to raise it)."""
    exc = _decode_exception(path)
    return None if exc is None else image_read_error_message(path, exc)


def plan_analogies(pairs: list[dict], *, min_pairs_per_category: int = 2, max_analogies: Optional[int] = None,
                   seed: int = 0) -> list[dict]:
    """The official analogy pairing (``create_analogy_dataset``): within each category with at least
    ``min_pairs_per_category`` pairs, every i < j gives the forward analogy (A = pair i, C = pair j); categories in
    first-seen order. ``max_analogies`` keeps a random sample (official: unseeded ``random.sample``; here seeded).
    Each analogy is ``{"category", "A": pair i, "C": pair j, "direction": "forward", "id"}`` (pairs as
    ``relation252k_pairs`` gives them), ``id = analogy_<A id>_<C id>_<k:04d>`` with k its index in the final list."""
    groups: dict[str, list[dict]] = {}
    for pair in pairs:
        groups.setdefault(pair["category"], []).append(pair)
    analogies = []
    for category, group in groups.items():
        if len(group) < min_pairs_per_category:
            continue
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                analogies.append({"category": category, "A": group[i], "C": group[j], "direction": "forward"})
    if max_analogies and len(analogies) > max_analogies:
        analogies = random.Random(seed).sample(analogies, max_analogies)
    for k, analogy in enumerate(analogies):
        analogy["id"] = f"analogy_{analogy['A']['image_id']}_{analogy['C']['image_id']}_{k:04d}"
    return analogies


def _halves(path: Path):
    """(left, right) halves of a Relation252K side-by-side image, split at width // 2."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        w, h = im.size
        return im.crop((0, 0, w // 2, h)), im.crop((w // 2, 0, w, h))


def _metadata_entry(analogy: dict) -> dict:
    """The ``analogy_metadata.json`` entry of one analogy (the official entry fields: ``analogy_id``, ``edit_prompt``
    (A's), ``category``, ``direction``, the three file paths, ``pair_A`` and ``pair_C``)."""
    aid = analogy["id"]

    def pair(p):
        return {"image_id": p["image_id"], "edit_prompt": p["edit_prompt"],
                "left_image_description": p["left_image_description"],
                "right_image_description": p["right_image_description"], "img_name": p["img_name"]}

    return {"analogy_id": aid, "edit_prompt": analogy["A"]["edit_prompt"], "category": analogy["category"],
            "direction": analogy["direction"], "control_image_path": f"control/{aid}.jpg",
            "target_image_path": f"target/{aid}.jpg", "caption_path": f"target/{aid}.txt",
            "pair_A": pair(analogy["A"]), "pair_C": pair(analogy["C"])}


def strip_cell_modes(cells: list, analogy_id: str = "") -> list:
    """The colour modes of the a | a' | b cells as ``process_single_analogy`` (NVlabs/LoRWeB preprocess_data.py)
    leaves them: RGBA and every mode but RGB and L become RGB, L stays L; then the cells follow the first cell (a):
    after an L first cell the RGB cells become L (a greyscale strip), while an L cell after an RGB first cell is a
    ValueError (the official script's concatenation fails, and the analogy with it)."""
    cells = [c if c.mode in ("RGB", "L") else c.convert("RGB") for c in cells]
    if cells[0].mode == "L":
        return [c.convert("L") for c in cells]
    if any(c.mode == "L" for c in cells):
        raise ValueError(f"{analogy_id}: greyscale (L) cell after a colour first cell: the official "
                         "preprocess_data.py cannot concatenate them and fails this analogy")
    return cells


def write_analogy(analogy: dict, out: Path) -> None:
    """control/<id>.jpg (a | a' | b, every cell at the smallest width and height of the three, Lanczos, in the
    official colour modes: ``strip_cell_modes``), target/<id>.jpg (b' as is, RGBA as RGB) and target/<id>.txt (a's
    edit instruction), as ``process_single_analogy``; each file atomically, and none stays when one fails. An id
    holding a path separator, or cell modes the official script cannot concatenate, raise ValueError."""
    from PIL import Image

    if "/" in analogy["id"] or os.sep in analogy["id"]:  # an img_name in a sub-folder of Group1/
        raise ValueError(f"{analogy['id']}: the analogy id holds a path separator (from an img_name in a sub-folder); "
                         "its files would land in sub-folders of control/ and target/, where the training loader "
                         "cannot pair them (the official preprocess_data.py fails such an analogy)")
    a, a_prime = _halves(analogy["A"]["path"])
    b, b_prime = _halves(analogy["C"]["path"])
    cells = [a, a_prime, b]
    w, h = min(c.width for c in cells), min(c.height for c in cells)
    cells = strip_cell_modes([c if c.size == (w, h) else c.resize((w, h), Image.LANCZOS) for c in cells],
                             analogy["id"])
    strip = Image.new(cells[0].mode, (3 * w, h))
    for i, cell in enumerate(cells):
        strip.paste(cell, (i * w, 0))
    if b_prime.mode == "RGBA":  # other modes are saved as they are (JPEG refuses P or LA: the analogy fails)
        b_prime = b_prime.convert("RGB")
    aid = analogy["id"]
    files = ((out / "control" / f"{aid}.jpg", lambda p: strip.save(p, format="JPEG", quality=95)),
             (out / "target" / f"{aid}.jpg", lambda p: b_prime.save(p, format="JPEG", quality=95)),
             (out / "target" / f"{aid}.txt", lambda p: p.write_text(analogy["A"]["edit_prompt"], encoding="utf-8")))
    try:
        for path, write in files:
            _atomic_write(path, write)
    except BaseException:  # the analogy is unfinished: none of its files stay (no control without its target)
        for path, _ in files:
            path.unlink(missing_ok=True)
        raise


#: OSError numbers for a file name the output's file system refuses (ENAMETOOLONG: longer than its name limit,
#: temporary name included; EINVAL: characters it does not take, as vfat's), raised by a call on a named file:
#: ``data prepare`` fails that analogy only
NAME_REFUSED_ERRNOS = frozenset((errno.ENAMETOOLONG, errno.EINVAL))


#: the starts of prepare_relation252k's warnings whose causes its report lists (labels entries without their image,
#: undecodable images, small categories): ``data prepare`` prints the report, so it silences these warnings
PREPARE_REPORTED_WARNINGS = (r"skipped \d+ Relation252K labels entries whose image file is missing",
                             r"skipped \d+ Relation252K images that cannot be decoded",
                             r"\d+ categories have fewer than \d+ usable pairs")


def prepare_relation252k(src: Union[str, Path], out: Union[str, Path], *, max_analogies: Optional[int] = None,
                         filter_categories: Optional[list[str]] = None, filter_json: Optional[str] = None,
                         min_pairs_per_category: int = 2, max_samples_per_category: Optional[int] = None,
                         seed: int = 0, progress: bool = True) -> dict:
    """Turn a Relation252K folder into the official training layout (the job of ``preprocess_data.py``).

    Resumable: an analogy whose three files exist is skipped (files are written to a temporary name and renamed, so an
    existing file is complete; a killed run's temporary files are removed at the start). ``analogy_metadata.json``
    lists every written analogy (official entry fields); as the official script, the entries an earlier run wrote
    there are kept and this run's new ones appended; it is rewritten atomically at the end. Images that cannot be
    decoded, and labels entries without their image, are skipped (``relation252k_pairs``). Returns ``{"analogies",
    "written", "skipped", "failed": [(id, error)], "unreadable": [(image, error)], "missing": [image],
    "categories_left_out": {category: usable pairs}}`` (the categories with fewer than ``min_pairs_per_category``
    usable pairs, warned about). An analogy that cannot be written (e.g. cell modes the official script cannot
    concatenate, an id whose file names the file system refuses: ``NAME_REFUSED_ERRNOS``) is listed in "failed" and
    the run goes on; an output folder that cannot take the files (a full disk, read-only) stops it (OSError).

    Nothing is written when ``out`` is a file, not writable, ``src`` itself or inside one of its categories, or
    holds a file named ``control`` or ``target`` or a folder named ``analogy_metadata.json``
    (``validation.UsageError``), when the labels or filters are unusable (see ``relation252k_pairs``), or when no
    analogy can be formed (``AnalogyDataError``). While it runs it holds ``out/.lorweb-prepare.lock``
    (``PREPARE_LOCK_NAME``): a second run into ``out`` is refused naming the process that holds it."""
    from .validation import check_prepare_output

    out = check_prepare_output("out", out, src)  # refused before anything is read
    # one run per folder: two runs into it would each rewrite analogy_metadata.json without the other's entries
    lock = FolderLock(out, PREPARE_LOCK_NAME, "data prepare run")
    try:
        try:
            lock.acquire()
        except OSError as exc:
            raise AnalogyDataError(f"{out}: cannot create the folder or its lock file {PREPARE_LOCK_NAME} "
                                   f"({exc})") from None
        return _prepare_locked(src, out, max_analogies=max_analogies, filter_categories=filter_categories,
                               filter_json=filter_json, min_pairs_per_category=min_pairs_per_category,
                               max_samples_per_category=max_samples_per_category, seed=seed, progress=progress)
    finally:
        lock.release()


def _prepare_locked(src, out: Path, *, max_analogies, filter_categories, filter_json, min_pairs_per_category,
                    max_samples_per_category, seed, progress) -> dict:
    """``prepare_relation252k``'s work, once it holds ``out``'s lock."""
    from ._progress import progress_bar

    unreadable: list = []
    missing: list = []
    per_category: dict = {}
    pairs = relation252k_pairs(src, max_samples_per_category=max_samples_per_category,
                               filter_categories=filter_categories, filter_json=filter_json, progress=progress,
                               unreadable=unreadable, missing=missing, category_counts=per_category)
    analogies = plan_analogies(pairs, min_pairs_per_category=min_pairs_per_category, max_analogies=max_analogies,
                               seed=seed)
    small = {c: n for c, n in per_category.items() if n < min_pairs_per_category}
    if not analogies:
        most = max(per_category.values(), default=0)
        raise AnalogyDataError(f"{src}: no category has {min_pairs_per_category} or more usable pairs (the most in "
                               f"one category after the filters: {most}; labels entries without their image: "
                               f"{len(missing)}, images that do not decode: {len(unreadable)}), so no analogies")
    if small:
        category, n = next(iter(small.items()))
        warn(f"{len(small)} categories have fewer than {min_pairs_per_category} usable pairs and give no analogies "
             f"(e.g. {category}: {n}; --min-pairs-per-category)")
    metadata_path = out / "analogy_metadata.json"
    earlier = []  # what an earlier run listed, kept as the official script keeps it
    if metadata_path.is_file():
        try:
            earlier = loads_json(metadata_path.read_text(encoding="utf-8"))
            if not isinstance(earlier, list) or not all(isinstance(e, dict) and "analogy_id" in e for e in earlier):
                raise ValueError("not a list of analogy entries")
        except (OSError, ValueError) as exc:
            warn(f"cannot read the existing {metadata_path} ({exc}); it is rewritten with this run's "
                 "analogies")
            earlier = []
    for sub in ("control", "target", "."):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for tmp in (out / sub).iterdir():  # a killed run's temporary files (_atomic_write's names; older: .tmp.jpg)
            if _is_prepare_temporary(tmp):
                tmp.unlink(missing_ok=True)
    def write_one(analogy: dict) -> tuple[str, Optional[str]]:
        """("skipped", None) when its three files exist, ("written", None), or ("failed", error). A file name the
        file system refuses (``NAME_REFUSED_ERRNOS``: an id longer than its name limit) fails this analogy only."""
        aid = analogy["id"]
        files = (out / "control" / f"{aid}.jpg", out / "target" / f"{aid}.jpg", out / "target" / f"{aid}.txt")
        try:
            if all(f.is_file() for f in files):  # a name too long raises here already
                return "skipped", None
            write_analogy(analogy, out)
        except (OSError, ValueError) as exc:
            if isinstance(exc, OSError) and exc.errno in NAME_REFUSED_ERRNOS and exc.filename is not None:
                return "failed", (f"the file system of {out} refuses its file names ({exc.strerror}): the analogy "
                                  "id, made of its category and image names, is too long or holds characters it "
                                  "does not take; shorten or rename them")
            if isinstance(exc, OSError) and exc.filename is not None and same_or_inside(exc.filename, out):
                raise  # out cannot take the files (full disk, read-only): the run stops, naming the file
            return "failed", str(exc)
        return "written", None

    written = skipped = 0
    failed, entries = [], []
    # analogies are written on several threads (each to its own files), the results taken in the plan's order; an
    # interrupted run cancels the analogies not started (the next run resumes them)
    with _image_pool() as pool:
        results = pool.map(write_one, analogies)
        for analogy, (status, error) in progress_bar(zip(analogies, results), total=len(analogies),
                                                     desc="writing analogies", unit="analogy", disable=not progress):
            if status == "failed":
                failed.append((analogy["id"], error))
                continue
            skipped += status == "skipped"
            written += status == "written"
            entries.append(_metadata_entry(analogy))
    # this run's entries replace an earlier run's of the same id (its files were written from them), new ones follow
    current = {e["analogy_id"]: e for e in entries}
    entries = [current.pop(e["analogy_id"], e) for e in earlier] + list(current.values())
    _atomic_write(metadata_path,
                  # ASCII with \u escapes, as the official script's json.dump: a category or file name that is not
                  # UTF-8 (a surrogate escape) is written too, and reads back as the same name
                  lambda p: p.write_text(json.dumps(entries, indent=2), encoding="utf-8"))
    return {"analogies": len(analogies), "written": written, "skipped": skipped, "failed": failed,
            "unreadable": unreadable, "missing": missing, "categories_left_out": small}


# --------------------------------------------------------------------------------------------------- CLI
def add_data_subparser(subparsers) -> argparse.ArgumentParser:
    """``lorweb-fast data check|prepare``."""
    p = subparsers.add_parser("data", help="check a training folder or prepare Relation252K in the official layout")
    sub = p.add_subparsers(dest="data_command", required=True, metavar="{check,prepare}")
    c = sub.add_parser("check", help="validate every sample, print counts, optionally dump the grids the trainer sees")
    c.add_argument("data", help="training folder (control/, target/)")
    c.add_argument("--dump", default=None, metavar="OUT",
                   help="write OUT/<id>_target.png, <id>_control.png, <id>_caption.txt (before training resize)")
    c.add_argument("--layout", choices=LAYOUTS, default="auto", help="sample layout (default: from the sizes)")
    c.add_argument("--skip-bad", action="store_true", help="report broken samples instead of failing on the first")
    c.add_argument("--missing-caption", choices=MISSING_CAPTION_MODES, default="empty",
                   help="a sample without a caption: empty (official: trains with an empty caption, reported) or "
                        "raise (a broken sample), as lorweb-fast train")
    c.add_argument("--resize", choices=RESIZE_MODES, default="bucket", help="training-size rule, as lorweb-fast train")
    c.add_argument("--long-edge", type=int, default=512, help="training resolution, as lorweb-fast train")
    c.add_argument("--bucket-divisibility", type=int, default=OFFICIAL_BUCKET_DIVISIBILITY, help="as lorweb-fast train")
    c.add_argument("--query-mode", choices=QUERY_MODES, default=OFFICIAL_DEFAULTS["query_mode"],
                   help="as lorweb-fast train: a grid with nothing to cut for its official training query crops is "
                        "a problem")
    c.add_argument("--query-source", choices=QUERY_SOURCES, default="grid", help="as lorweb-fast train")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    r = sub.add_parser("prepare", help="Relation252K folder -> control/ strips, target/ b' + captions (official)")
    r.add_argument("src", help="downloaded Relation252K folder (<category>/Group1/labels.json + images)")
    r.add_argument("out", help="output training folder")
    r.add_argument("--max-analogies", type=int, default=None, help="keep a random sample of this many analogies")
    r.add_argument("--filter-categories", nargs="+", default=None, help="only these categories")
    r.add_argument("--filter-json", default=None, help="JSON list of {image_id} entries to leave out")
    r.add_argument("--min-pairs-per-category", type=int, default=2,
                   help="categories with fewer usable pairs are left out (default 2, at least 2: an analogy takes "
                        "two pairs of one category)")
    r.add_argument("--max-samples-per-category", type=int, default=None,
                   help="at most this many (a, a') pairs read per category, in labels order (default: all)")
    r.add_argument("--seed", type=int, default=0, help="seed of the --max-analogies sample")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_data)
    return p


def run_data(args) -> dict:
    """``lorweb-fast data check|prepare``: the options are checked (``validation.check_data_args``) before any
    folder is read or written."""
    from .validation import check_data_args

    check_data_args(args)
    if args.data_command == "check":
        report = check_folder(args.data, dump=args.dump, skip_bad=args.skip_bad, layout=args.layout,
                              resize=args.resize, long_edge=args.long_edge,
                              bucket_divisibility=args.bucket_divisibility, missing_caption=args.missing_caption,
                              query_mode=args.query_mode, query_source=args.query_source, progress=not args.quiet)
        print(f"{report['samples']} samples ({report['skipped']} skipped); layouts: "
              + ", ".join(f"{k} {v}" for k, v in report["layouts"].items()))
        print("grid sizes: " + ", ".join(f"{k} x{v}" for k, v in list(report["sizes"].items())[:10])
              + (" ..." if len(report["sizes"]) > 10 else ""))
        print(f"training sizes ({args.resize}): " + ", ".join(f"{k} x{v}" for k, v in
                                                             list(report["training_sizes"].items())[:10])
              + (" ..." if len(report["training_sizes"]) > 10 else ""))
        cap = report["captions"]
        print(f"captions: {cap['non_empty']} non-empty, {cap['empty']} empty, {cap['distinct']} distinct non-empty")
        no_caption = report["samples_without_caption"]
        if no_caption:
            print(f"samples without a caption (trained with an empty one, as official): {len(no_caption)}, e.g. "
                  f"{no_caption[0]}")
        print(f"problems: {len(report['problems'])}")
        for problem in report["problems"]:
            print(f"  {problem}")
        listed = (  # (report key, what its entries are, the first entry shown as an example)
            ("controls_without_target", "control images without a target (not samples)", str),
            ("several_controls", "names with several control images (the first in the official order is used)",
             lambda stem, files: f"{stem}: {Path(files[0]).name} over {', '.join(Path(f).name for f in files[1:])}"),
            ("shared_names", "names shared by several target images (each a sample)", str),
            ("shared_controls", "control images shared by targets in different sub-folders (lookup by file name)",
             lambda control, users: f"{control} for {', '.join(users)}"),
            ("unread_images", f"image files not read (extension not one of {', '.join(IMAGE_SUFFIXES)})", str),
            ("unfollowed_links", "symlinked folders under target/ not entered (as the official loader)", str),
            ("high_bit_depth_images", "images with more than 8 bits per channel (clipped to white above 255 by the "
             "RGB conversion)", lambda path, mode: f"{path} ({mode})"),
            ("grid_like_strips", "controls shaped like a finished 2x2 grid (their target's aspect ratio), read as "
             "strips and stretched threefold", lambda name, why: f"{name}: {why}"))
        for key, what, example in listed:
            entries = report[key]
            if entries:
                first = next(iter(entries.items())) if isinstance(entries, dict) else (entries[0],)
                print(f"{what}: {len(entries)}, e.g. {example(*first)}")
        if args.dump:
            print(f"wrote the trainer's grids to {report['dumped']}")
        return report
    with silenced_lorweb_warnings(*PREPARE_REPORTED_WARNINGS):  # the causes the report below prints
        report = prepare_relation252k(args.src, args.out, max_analogies=args.max_analogies,
                                      filter_categories=args.filter_categories, filter_json=args.filter_json,
                                      min_pairs_per_category=args.min_pairs_per_category,
                                      max_samples_per_category=args.max_samples_per_category, seed=args.seed,
                                      progress=not args.quiet)
    print(f"{report['analogies']} analogies: {report['written']} written, {report['skipped']} already there, "
          f"{len(report['failed'])} failed; metadata in {Path(args.out) / 'analogy_metadata.json'}")
    for aid, err in report["failed"]:
        print(f"  failed {aid}: {err}")
    if report["unreadable"]:
        print(f"{len(report['unreadable'])} source images could not be decoded and were left out (as the official "
              "script does):")
        for image, err in report["unreadable"]:
            print(f"  {image}: {err}")
    if report["missing"]:
        print(f"{len(report['missing'])} labels entries have no image file and were left out (as the official "
              f"script does), e.g. {report['missing'][0]}")
    if report["categories_left_out"]:
        left_out = list(report["categories_left_out"].items())
        print(f"{len(left_out)} categories with fewer than {args.min_pairs_per_category} usable pairs were left out: "
              + ", ".join(f"{c} ({n})" for c, n in left_out[:10]) + (", ..." if len(left_out) > 10 else ""))
    if report["failed"] and not report["written"] and not report["skipped"]:  # a `prepare && train` must stop here
        raise AnalogyDataError(f"data prepare: none of the {report['analogies']} analogies could be written (see "
                               f"the failures above); {args.out} holds no sample")
    return report
