"""Argument checks shared by every entry point (functional API, modules, checkpoints, pipeline, training, CLI).

Each helper raises an error naming the argument and the expected range and returns the checked value; they never
modify anything, so a failed check leaves models and files as they were. ``UsageError`` is what the command line
turns into one line on stderr and exit status 2.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
import os
import re
import warnings
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch


class UsageError(ValueError):
    """A command-line path or option is unusable (reported as one line, exit status 2, before any model loads)."""


# ------------------------------------------------------------------------------------------------- packages
class MissingDependencyError(ImportError):
    """A package that a feature needs is missing or fails to import; the message names the feature, the package,
    the import error and the pip command (the command line prints it as one line, exit status 2)."""


#: pip's names of the packages whose import name differs
PIP_NAMES = {"optimum": "optimum-quanto", "yaml": "pyyaml", "PIL": "pillow"}


def _flat(text: str) -> str:
    return " ".join(str(text).split())


def missing_package(exc: BaseException) -> str:
    """The top-level package a ModuleNotFoundError names ("" for another error, or one that names none)."""
    return (getattr(exc, "name", None) or "").split(".")[0] if isinstance(exc, ModuleNotFoundError) else ""


def dependency_message(module: str, needed_for: str, exc: BaseException, *, pip: Optional[str] = None,
                       alternative: str = "") -> str:
    """"<needed_for> needs <package>, which cannot be imported (<error>): <what to do>[, or <alternative>]": pip
    install when the package is missing, the package it lacks when its own import needs another one (lpips ->
    torchvision), a reinstall when it is installed but its import fails (a bitsandbytes built for another CUDA)."""
    top = module.split(".")[0]
    pip = pip or PIP_NAMES.get(top, top)
    absent = missing_package(exc)
    if absent == top:
        how = f"pip install {pip}"
    elif absent:
        how = f"{pip} imports {absent}, which is missing: pip install {PIP_NAMES.get(absent, absent)}"
    else:
        how = f"{pip} is installed but its import fails: reinstall it (pip install --force-reinstall {pip})"
    return (f"{needed_for} needs {pip}, which cannot be imported ({_flat(exc)}): {how}"
            + (f", or {alternative}" if alternative else ""))


def require(module: str, needed_for: str, *, pip: Optional[str] = None, alternative: str = "",
            error: type = MissingDependencyError):
    """``importlib.import_module(module)``, or ``error`` (MissingDependencyError; another type where a caller's
    errors have their own, e.g. the evaluation's EvalInputError) with ``dependency_message`` when it fails."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise error(dependency_message(module, needed_for, exc, pip=pip, alternative=alternative)) from exc


def plotting_available(skipped: str) -> bool:
    """Whether matplotlib imports; else a warning that ``skipped`` (the plots not drawn, e.g. "loss.png") is not
    drawn while the rest of the work goes on."""
    import importlib

    try:
        importlib.import_module("matplotlib.figure")
    except ImportError as exc:
        warn(f"not drawing {skipped}: " + dependency_message("matplotlib", "plotting", exc))
        return False
    return True


def diffusers_classes(*names: str) -> tuple:
    """``getattr(diffusers, name)`` for each name. diffusers imports a class's module lazily and wraps an import
    error inside it (a bitsandbytes, peft or torchvision it found installed at its own import but that fails to
    import) in a multi-line RuntimeError: that is a MissingDependencyError naming the error instead."""
    import diffusers

    try:
        return tuple(getattr(diffusers, name) for name in names)
    except RuntimeError as exc:
        cause = exc.__cause__
        while isinstance(cause, RuntimeError):  # one wrapper per lazily imported module on the way
            cause = cause.__cause__
        if not isinstance(cause, ImportError):
            raise
        absent = missing_package(cause)
        how = (f"pip install {PIP_NAMES.get(absent, absent)}" if absent else
               "reinstall the package it names (pip install --force-reinstall ...), or uninstall it if it is an "
               "optional one (bitsandbytes, peft)")
        raise MissingDependencyError(f"diffusers cannot import {', '.join(names)}: a package it imports fails to "
                                     f"import ({_flat(cause)}): {how}") from exc


# ------------------------------------------------------------------------------------------------- numbers
#: The largest float32: the optimizers (torch's AdamW kernels, bitsandbytes') take their hyperparameters as float32,
#: and a larger learning rate, weight decay or epsilon failed at the first step ("value cannot be converted to type
#: float without overflow") after the model had loaded and the run had started writing.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _range_text(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi == FLOAT32_MAX and not hi_open:  # a bound of the type, not of the setting
        return f"{'>' if lo_open else '>='} {lo} and at most float32's largest value {hi:.4g}"
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi}"
    return "finite"


def float_or_inf(value: numbers.Real) -> float:
    """``float(value)``, with an int beyond the float range (e.g. 10**400) as +-inf instead of an OverflowError."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def check_real(name: str, value, lo: Optional[float] = None, hi: Optional[float] = None, *, lo_open: bool = False,
               hi_open: bool = False) -> float:
    """``value`` as a float: a real number (not bool, not a string, not a tensor with more than one element),
    finite, and within [lo, hi] (open ends with ``lo_open`` / ``hi_open``)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number ({_range_text(lo, hi, lo_open, hi_open)}), got "
                        f"{type(value).__name__} {value!r}")
    value = float_or_inf(value)
    if not math.isfinite(value):
        bounds = _range_text(lo, hi, lo_open, hi_open)
        raise ValueError(f"{name} must be finite{'' if bounds == 'finite' else f' ({bounds})'}, got {value}")
    if (lo is not None and (value < lo or (lo_open and value == lo))) or \
            (hi is not None and (value > hi or (hi_open and value == hi))):
        raise ValueError(f"{name} must be {_range_text(lo, hi, lo_open, hi_open)}, got {value:g}")
    return value


def check_int(name: str, value, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """``value`` as an int: an integer (not bool; a float or string is refused) within [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer ({_range_text(lo, hi, False, False)}), got "
                        f"{type(value).__name__} {value!r}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be an integer {_range_text(lo, hi, False, False)}, got {value}")
    return value


def check_positive_int(name: str, value) -> int:
    return check_int(name, value, lo=1)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def check_choice(name: str, value, choices: Sequence) -> object:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------------- tensors
def check_tensor(name: str, value) -> torch.Tensor:
    """``value`` when it is a torch.Tensor, else TypeError naming ``name`` and the type given."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_float_tensor(name: str, value) -> torch.Tensor:
    """A floating-point tensor (integer, boolean and complex tensors are refused: they would silently truncate or
    break the math)."""
    check_tensor(name, value)
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def check_has_values(name: str, value: torch.Tensor) -> torch.Tensor:
    """Raise ValueError when ``value`` is on the meta device (a shape without values)."""
    if value.device.type == "meta":
        raise ValueError(f"{name} is on the meta device: it holds no values (give a tensor with data, on any device)")
    return value


def batched_by_vmap(t: torch.Tensor) -> bool:
    """Whether ``t`` is, or wraps (under other torch.func transforms), a tensor batched by ``torch.func.vmap``: one
    value per replica, which cannot be read on the host."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


def refuse_finiteness_check_under_vmap(name: str, *tensors: Optional[torch.Tensor]) -> None:
    """ValueError naming ``check_finite=False`` when one of ``tensors`` is batched by ``torch.func.vmap``: the
    finiteness check reads their values on the host, which vmap cannot do (torch's own error names neither)."""
    if any(t is not None and batched_by_vmap(t) for t in tensors):
        raise ValueError(f"{name} is batched by torch.func.vmap: its finiteness check reads its values on the host, "
                         "which vmap cannot do; pass check_finite=False (and check the inputs outside vmap)")


def all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` (any shape and dtype, dense, with values) holds no NaN or Inf; one device synchronisation.

    Decided by the sum first: a NaN or an Inf makes the sum NaN or infinite, so a finite sum proves every value
    finite, in one reduction without a boolean temporary (on CPU about 7-200x faster than ``isfinite(t).all()``,
    depending on the dtype; that check dominated checkpoint loads and saves). A sum that is not finite (a non-finite
    value, or finite values whose sum overflows the dtype) is decided exactly by ``isfinite``. float8, which has
    neither kernel, is checked in float32.
    """
    t = t.detach()
    if t.is_floating_point() and t.element_size() == 1:
        t = t.float()
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def check_finite_tensor(name: str, value: torch.Tensor, hint: str = "") -> torch.Tensor:
    """Raise ValueError when ``value`` holds NaN or Inf (one device synchronisation), is on the meta device, or is
    batched by ``torch.func.vmap`` (its values cannot be read there)."""
    check_has_values(name, value)
    refuse_finiteness_check_under_vmap(name, value)
    if not all_finite(value):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"{name} holds {bad} NaN or Inf values{'; ' + hint if hint else ''}")
    return value


def check_regex(name: str, pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{name} is not a valid regular expression ({exc}): {pattern!r}") from None
    return pattern


# --------------------------------------------------------------------------------------------------- paths
def _writable_parent(name: str, path: Path) -> None:
    """The nearest existing ancestor of ``path`` must be a writable directory (folders are created later)."""
    parent = path.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{name} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{name} {path}: folder {parent} is not writable")


def check_output_file(name: str, path, suffixes: Optional[Iterable[str]] = None) -> Path:
    """An output file path: not an existing folder, a known extension (``suffixes``, lower case with the dot),
    and a writable (or creatable) folder; an existing file must be writable."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{name} {path} is a folder; give a file name")
    if suffixes is not None:
        suffixes = sorted(set(suffixes))
        if path.suffix.lower() not in suffixes:
            shown = ", ".join(suffixes[:12]) + (", ..." if len(suffixes) > 12 else "")
            raise UsageError(f"{name} {path}: unknown file extension {path.suffix or '(none)'!r}; use one of {shown}")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{name} {path} is not writable")
    _writable_parent(name, path)
    return path


def check_output_dir(name: str, path) -> Path:
    """An output folder: an existing writable folder, or a path whose nearest existing ancestor is writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{name} {path} is a file; give a folder")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"{name} {path} is not writable")
        return path
    _writable_parent(name, path)
    return path


def check_prepare_output(name: str, out, src) -> Path:
    """``data prepare``'s output folder ``out`` for the Relation252K folder ``src``: an output folder
    (``check_output_dir``) that is neither ``src`` nor inside one of its categories (a sub-folder of ``src`` that is
    no category, such as ``src/prepared``, is fine: it is never read as one), whose ``control`` / ``target`` are
    folders if they exist and whose ``analogy_metadata.json`` is a file if it exists (refused before anything is
    read or written)."""
    out = check_output_dir(name, out)
    src = Path(src)
    resolved, source = out.resolve(), src.resolve()
    if src.is_dir() and (resolved == source or (source in resolved.parents and (
            source / resolved.relative_to(source).parts[0] / "Group1").is_dir())):
        raise UsageError(f"{name} {out} is the Relation252K folder {src} or inside one of its categories: the "
                         "training layout would be written among the source images; choose a folder outside them")
    for sub in ("control", "target"):
        if (out / sub).exists() and not (out / sub).is_dir():
            raise UsageError(f"{name} {out}: {out / sub} is a file, where the {sub} images go; remove it or choose "
                             "another folder")
    if (out / "analogy_metadata.json").exists() and not (out / "analogy_metadata.json").is_file():
        raise UsageError(f"{name} {out}: {out / 'analogy_metadata.json'} is not a file; remove it or choose another "
                         "folder")
    return out


def check_input_file(name: str, path, suffixes: Optional[Iterable[str]] = None) -> Path:
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{name} {path} is a folder; give a file")
    if not path.is_file():
        raise UsageError(f"{name} {path} " + ("is not a regular file" if path.exists() else "does not exist"))
    if suffixes is not None and path.suffix.lower() not in set(suffixes):
        raise UsageError(f"{name} {path} must be a {' / '.join(sorted(set(suffixes)))} file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{name} {path} is not readable")
    return path


#: Pillow formats offered for generated images (``infer --out``): the common raster formats, each kept where this
#: Pillow writes an RGB image in it (WebP, JPEG 2000 and AVIF need their libraries). A fixed list, not every registered
#: writer: probing them all ran deprecated ones (IM: deprecated in Pillow 13, removed in 15) and needed the warnings
#: silenced through Python's process-wide filters.
IMAGE_WRITE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF", "PPM", "TGA", "JPEG2000", "AVIF")


def image_suffixes() -> set[str]:
    """File extensions under which PIL writes an RGB image, of ``IMAGE_WRITE_FORMATS`` (tried on a 1x1 image in
    memory, so a generation is never lost to a late save error)."""
    import io

    from PIL import Image

    probe, usable, writable = Image.new("RGB", (1, 1)), set(), {}
    for ext, fmt in Image.registered_extensions().items():
        if fmt in IMAGE_WRITE_FORMATS and fmt in Image.SAVE:
            writable.setdefault(fmt, []).append(ext)
    for fmt, extensions in writable.items():
        try:
            probe.save(io.BytesIO(), format=fmt)
        except Exception:
            continue
        usable.update(extensions)
    return usable


#: matplotlib file types that need an external program (pgf: a LaTeX installation), which a finished run would
#: find missing only when it writes the plot
EXTERNAL_PLOT_TYPES = {".pgf"}


def plot_suffixes() -> set[str]:
    """File extensions matplotlib can write by itself; MissingDependencyError when matplotlib cannot be imported."""
    FigureCanvasBase = require("matplotlib.backend_bases", "plotting").FigureCanvasBase

    return {"." + ext for ext in FigureCanvasBase.get_supported_filetypes()} - EXTERNAL_PLOT_TYPES


def check_device(name: str, device) -> torch.device:
    """A torch device that exists on this machine (``cuda`` without a visible GPU is refused)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"{name} {device!r} is not a device ({exc})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{name} {device}: no CUDA GPU is visible on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"{name} {device}: only {torch.cuda.device_count()} CUDA devices are visible")
    elif dev.type == "meta":
        raise UsageError(f"{name} {device}: the meta device holds no data and cannot run a pipeline; use --device "
                         "cpu or cuda")
    elif dev.type != "cpu" and not (hasattr(torch, dev.type)
                                    and getattr(getattr(torch, dev.type), "is_available", lambda: False)()):
        raise UsageError(f"{name} {device}: no {dev.type} device on this machine")
    return dev


# ------------------------------------------------------------------------------------------------ warnings
#: Packages whose frames a warning skips to reach the caller's line (lorweb_fast itself, and the libraries that call
#: into it: a pipeline call, a module's forward, a context manager).
_LIBRARY_PACKAGES = frozenset({"lorweb_fast", "torch", "diffusers", "transformers", "accelerate", "peft",
                               "contextlib"})


#: Set on the copy of the main process's error that the other ranks of a multi-process run raise
#: (``training._prepare_output_in_order``): the command line prints the main process's error and not the copies.
REPORTED_BY_MAIN_PROCESS = "_lorweb_reported_by_main_process"


class LoRWeBWarning(UserWarning):
    """The category of every warning lorweb_fast gives (a ``UserWarning``). The warnings point at the caller's line,
    so a ``module="lorweb_fast"`` filter does not catch them; ``warnings.filterwarnings("ignore",
    category=lorweb_fast.LoRWeBWarning)`` does."""


#: the LoRWeB warnings silenced in this context (``silenced_lorweb_warnings``): (regex or None for all, list to
#: collect their messages in or None) pairs, the innermost block's first
_SILENCED: "contextvars.ContextVar[tuple]" = contextvars.ContextVar("lorweb_fast_silenced", default=())


@contextlib.contextmanager
def silenced_lorweb_warnings(*messages: str, into: Optional[list] = None):
    """The block's own LoRWeBWarnings (``warn``) not given: those whose message matches one of the regular
    expressions ``messages`` at its start, case-insensitively (as ``warnings.filterwarnings``), or all of them when
    none are given; their messages are appended to ``into`` when given. Blocks nest. Per thread and context (a
    ``contextvars`` setting; the library's thread pools carry it to their tasks), unlike
    ``warnings.catch_warnings``, which swaps the process-wide filters before Python 3.14: other threads' warnings
    and their filters are left alone."""
    patterns = [re.compile(m, re.I) for m in messages] or [None]
    token = _SILENCED.set(tuple((pattern, into) for pattern in patterns) + _SILENCED.get())
    try:
        yield
    finally:
        _SILENCED.reset(token)


def warn(message: str, category: type[Warning] = LoRWeBWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside lorweb_fast and the libraries in
    ``_LIBRARY_PACKAGES`` (the user's script, notebook cell or test) rather than to lorweb_fast's own line; to the
    outermost frame when every frame is library code (the ``lorweb-fast`` command). Not given inside a
    ``silenced_lorweb_warnings`` block that silences it."""
    import sys

    if issubclass(category, LoRWeBWarning):
        for pattern, into in _SILENCED.get():
            if pattern is None or pattern.match(message):
                if into is not None:
                    into.append(message)
                return
    frame, stacklevel = sys._getframe(), 1  # stacklevel 1: this frame, which calls warnings.warn
    while frame.f_back is not None:
        if (frame.f_globals.get("__name__") or "").split(".", 1)[0] not in _LIBRARY_PACKAGES:
            break
        frame, stacklevel = frame.f_back, stacklevel + 1
    warnings.warn(message, category, stacklevel=stacklevel)
    _bound_registry(frame.f_globals.get("__warningregistry__"))


#: How many distinct LoRWeB warnings (text and line) a module's ``__warningregistry__`` keeps; older ones are dropped.
MAX_REGISTERED_WARNINGS = 256


def _bound_registry(registry) -> None:
    """Drop the oldest LoRWeB entries of a ``__warningregistry__`` beyond MAX_REGISTERED_WARNINGS. Python keeps one
    entry per distinct warning text and line for ever, and ours name image sizes and files: a server warning about
    new images would grow its registry without bound. A dropped warning may be shown once more."""
    if not isinstance(registry, dict) or len(registry) <= MAX_REGISTERED_WARNINGS:
        return
    # (text, category, lineno) keys, and (text, category) ones under the "once" / "module" filters
    # over a copy of the keys (one step under the GIL): another thread's warning from the same module may add an
    # entry meanwhile
    ours = [key for key in list(dict.keys(registry))
            if isinstance(key, tuple) and len(key) in (2, 3) and isinstance(key[1], type)
            and issubclass(key[1], LoRWeBWarning)]
    for key in ours[:len(ours) - MAX_REGISTERED_WARNINGS]:
        registry.pop(key, None)


#: Aspect ratios (long side / short side) above this are squashed noticeably by the 2x2 grid.
EXTREME_ASPECT_RATIO = 4.0


def warn_aspect_ratios(a: Sequence, a_prime: Sequence, b: Sequence, *, cells_from: str = "b") -> bool:
    """Warn when the images that set the cell shape (``cells_from``: "b" at the native resolution, "a" at the
    official one, where every cell takes a's size) have different aspect ratios within a batch (every grid then
    uses the first one's shape) or when any image is more elongated than ``EXTREME_ASPECT_RATIO`` (its cell
    squashes it). Returns whether the batch's aspect ratios differ (warned)."""
    ratios = [im.size[0] / max(1, im.size[1]) for im in (a if cells_from == "a" else b)]
    stretched = len(ratios) > 1 and max(ratios) / min(ratios) > 1.01
    if stretched:
        shown = ", ".join(f"{r:.2f}" for r in ratios)
        warn(f"the {cells_from} images of this batch have different aspect ratios ({shown}"
             "); every grid uses the first analogy's cell shape, so the others are stretched. Run them in "
             "separate calls to keep their proportions")
    for role, images in (("a", a), ("a_prime", a_prime), ("b", b)):
        for i, im in enumerate(images):
            w, h = im.size
            if max(w, h) > EXTREME_ASPECT_RATIO * max(1, min(w, h)):
                warn(f"{role}[{i}] is {w}x{h} (aspect ratio {max(w, h) / max(1, min(w, h)):.1f}:1); the "
                     "2x2 analogy grid squashes such extreme shapes. Crop it closer to square for better "
                     "results")
    return stretched


def warn_grid_sizes(sizes: Sequence[tuple[int, int]], *, official: bool = False) -> None:
    """Warn when the analogies of one batch would be generated at other sizes in calls of their own: at the native
    resolution ``sizes`` are the control grids each b gives ((width, height) each; the batch makes every grid at the
    first one's size); at the official resolution (``official``) (generation width, height, control grid width,
    height) each grid's shape gives with ``max_area`` (the batch takes both from the first grid's shape, and the
    rounding to the pipeline's multiple, or the nearest preferred Kontext resolution, can change for shapes that
    differ by less than ``warn_aspect_ratios``' tolerance). Either way the others' b' differ from one-by-one calls
    (another resolution)."""
    if len(set(sizes)) > 1:
        shown = ", ".join(f"{size[0]}x{size[1]}" + (f" (control grid {size[2]}x{size[3]})" if official else "")
                          for size in sizes)
        if official:
            warn(f"the analogies of this batch are generated at other sizes in calls of their own ({shown}, from "
                 "their a images' shapes); the batch generates every one at the first one's size, so the others' b' "
                 "differ from one-by-one calls. Run them in separate calls, or give a images of one shape")
        else:
            warn(f"the b images of this batch give control grids of different sizes in calls of their own ({shown}); "
                 "the batch makes every grid at the first one's size, so the others' b' differ from one-by-one "
                 "calls. Run them in separate calls, or give b images of one size")


# ------------------------------------------------------------------------------------------------ pipeline
#: Smallest grid long edge: two cells of at least 16 pixels (FLUX packs 2x2 latents after the 8x VAE).
MIN_LONG_EDGE = 32
#: Smallest generation area of the official resolution: a MIN_LONG_EDGE square.
MIN_MAX_AREA = MIN_LONG_EDGE ** 2
#: Largest denoising step count and guidance scale a command takes (larger ones overflow inside diffusers, after
#: the model has loaded; the official values are 28 and 2.5).
MAX_STEPS = 10_000
MAX_GUIDANCE_SCALE = 1e4
#: the largest generator seed (torch.Generator.manual_seed takes a 64-bit unsigned value)
MAX_SEED = 2 ** 64 - 1
_SIZE_OPTIONS = ("max_area / max_size (--max-area / --max-size) with resolution 'official', long_edge "
                 "(--long-edge) with 'native'")
#: FluxKontextPipeline arguments that LoRWeBKontextPipeline sets itself, with the option that controls each.
PIPELINE_OWNED_ARGS = {"image": "the a, a_prime, b images", "prompt": "the prompt argument",
                       "height": _SIZE_OPTIONS, "width": _SIZE_OPTIONS, "num_inference_steps": "num_inference_steps",
                       "guidance_scale": "guidance_scale", "generator": "generator / seed",
                       "output_type": "output_type", "max_area": _SIZE_OPTIONS, "_auto_resize": "(fixed)",
                       "return_dict": "(fixed)"}


def check_pipe_kwargs(pipe_kwargs: dict, call=None) -> dict:
    """Refuse keys that FluxKontextPipeline.__call__ does not take, and keys the LoRWeB pipeline sets itself."""
    import inspect

    if call is None:
        call = diffusers_classes("FluxKontextPipeline")[0].__call__
    params = inspect.signature(call).parameters
    accepted = set(params) - {"self"}
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key in pipe_kwargs:
        if key in PIPELINE_OWNED_ARGS:
            raise ValueError(f"pipeline argument {key!r} is set by the LoRWeB pipeline "
                             f"(use {PIPELINE_OWNED_ARGS[key]})")
        if key not in accepted and not open_ended:
            raise ValueError(f"unknown pipeline argument {key!r}; FluxKontextPipeline accepts "
                             f"{', '.join(sorted(accepted - set(PIPELINE_OWNED_ARGS)))}")
    if "num_images_per_prompt" in pipe_kwargs and pipe_kwargs["num_images_per_prompt"] is not None:
        check_int("num_images_per_prompt", pipe_kwargs["num_images_per_prompt"], lo=1)
    for key in ("true_cfg_scale",):
        if key in pipe_kwargs:
            check_real(key, pipe_kwargs[key], lo=0.0)
    if "max_sequence_length" in pipe_kwargs:
        check_int("max_sequence_length", pipe_kwargs["max_sequence_length"], lo=1, hi=512)
    return pipe_kwargs


#: FluxKontextPipeline arguments that need an IP adapter (``pipe.pipe.load_ip_adapter``) in the transformer
IP_ADAPTER_ARGS = ("ip_adapter_image", "ip_adapter_image_embeds", "negative_ip_adapter_image",
                   "negative_ip_adapter_image_embeds")


def _check_text(name: str, value, count: int) -> None:
    """A prompt-like pass-through argument: None, one string (every analogy's) or ``count`` strings."""
    if value is None or isinstance(value, str):
        return
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{name} must be a string or a list of strings, got {_short_repr(value)}")
    if len(value) != count:
        what = "prompts" if name == "prompt" else f"{name} entries"
        raise ValueError(f"got {len(value)} {what} for {count} analogies (give one string for all, or one per "
                         "analogy)")


def _check_batch_tensor(name: str, value, dims: int, batch: int, what: str) -> None:
    """``value`` a ``dims``-D tensor with ``batch`` rows, one per ``what`` ("analogies" or "images")."""
    if not isinstance(value, torch.Tensor) or value.dim() != dims:
        raise TypeError(f"{name} must be a {dims}-D tensor, got {_short_repr(value)}")
    if value.shape[0] != batch:
        one = {"analogies": "analogy", "images": "image"}[what]
        raise ValueError(f"{name} holds {value.shape[0]} rows for {batch} {what}: give one row per {one}")


def _short_repr(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def check_pipe_call(pipe_kwargs: dict, prompt, generator, *, count: int, callback_tensor_inputs=None,
                    has_ip_adapter: bool = False):
    """The batch and type of what LoRWeBKontextPipeline.__call__ passes on to FluxKontextPipeline, checked before
    any model runs (diffusers checks some of it only after the encoders ran, some never): ``count`` analogies,
    ``pipe_kwargs["num_images_per_prompt"]`` images each. ``prompt``: one string, ``count`` of them, or None with
    ``prompt_embeds`` ((count, L, D)) and ``pooled_prompt_embeds`` ((count, D')) given; likewise ``prompt_2``,
    ``negative_prompt``, ``negative_prompt_2`` and the negative embeddings. ``generator``: None, a torch.Generator or
    one per image; ``latents``: (count * images per analogy, L, C); ``sigmas``: a non-empty sequence of numbers in
    [0, 1]; ``joint_attention_kwargs``: None or a dict (its ``"scale"`` a finite number);
    ``callback_on_step_end_tensor_inputs`` among ``callback_tensor_inputs``; IP-adapter arguments only with
    ``has_ip_adapter``. Returns the prompts to pass on (a list of ``count`` strings, or None for embeddings)."""
    per_prompt = pipe_kwargs.get("num_images_per_prompt") or 1
    images = count * per_prompt
    embeds = pipe_kwargs.get("prompt_embeds")
    if embeds is not None:
        for name, value in (("prompt", prompt), ("prompt_2", pipe_kwargs.get("prompt_2"))):
            if value is not None:
                raise ValueError(f"give {name} or prompt_embeds, not both (prompt_embeds replace the prompts; "
                                 f"pass {name}=None)")
        _check_batch_tensor("prompt_embeds", embeds, 3, count, "analogies")
        if pipe_kwargs.get("pooled_prompt_embeds") is None:
            raise ValueError("prompt_embeds need pooled_prompt_embeds (from the same text encoders: "
                             "pipe.pipe.encode_prompt returns both)")
        prompts = None
    else:
        if prompt is None:
            raise ValueError("prompt is None: give the edit description (one string, or one per analogy), or "
                             "prompt_embeds with pooled_prompt_embeds")
        _check_text("prompt", prompt, count)
        prompts = [prompt] * count if isinstance(prompt, str) else list(prompt)
    if pipe_kwargs.get("pooled_prompt_embeds") is not None:
        if embeds is None:
            raise ValueError("pooled_prompt_embeds are used only with prompt_embeds")
        _check_batch_tensor("pooled_prompt_embeds", pipe_kwargs["pooled_prompt_embeds"], 2, count, "analogies")
    for name in ("prompt_2", "negative_prompt", "negative_prompt_2"):
        _check_text(name, pipe_kwargs.get(name), count)
    negative_embeds = pipe_kwargs.get("negative_prompt_embeds")
    if negative_embeds is not None:
        for name in ("negative_prompt", "negative_prompt_2"):
            if pipe_kwargs.get(name) is not None:
                raise ValueError(f"give {name} or negative_prompt_embeds, not both")
        _check_batch_tensor("negative_prompt_embeds", negative_embeds, 3, count, "analogies")
        if pipe_kwargs.get("negative_pooled_prompt_embeds") is None:
            raise ValueError("negative_prompt_embeds need negative_pooled_prompt_embeds (pipe.pipe.encode_prompt "
                             "returns both)")
    if pipe_kwargs.get("negative_pooled_prompt_embeds") is not None:
        if negative_embeds is None:
            raise ValueError("negative_pooled_prompt_embeds are used only with negative_prompt_embeds")
        _check_batch_tensor("negative_pooled_prompt_embeds", pipe_kwargs["negative_pooled_prompt_embeds"], 2,
                            count, "analogies")
    if generator is not None:
        if isinstance(generator, (list, tuple)):
            if not all(isinstance(g, torch.Generator) for g in generator):
                raise TypeError(f"generator must be a torch.Generator or a list of them, got {_short_repr(generator)}")
            if len(generator) != images:
                raise ValueError(f"got {len(generator)} generators for {images} images ({count} analogies x "
                                 f"{per_prompt} per prompt): give one generator, or one per image")
        elif not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or a list of them, got {_short_repr(generator)}")
    if pipe_kwargs.get("latents") is not None:
        _check_batch_tensor("latents", pipe_kwargs["latents"], 3, images, "images")
    if pipe_kwargs.get("sigmas") is not None:
        sigmas = pipe_kwargs["sigmas"]
        if isinstance(sigmas, (str, bytes)) or not (isinstance(sigmas, Sequence) or hasattr(sigmas, "__array__")):
            raise TypeError(f"sigmas must be a list of numbers in [0, 1], got {_short_repr(sigmas)}")
        sigmas = list(sigmas)
        if not sigmas or len(sigmas) > MAX_STEPS:
            raise ValueError(f"sigmas must hold 1 to {MAX_STEPS} numbers in [0, 1] (one denoising step each), got "
                             f"{len(sigmas)}")
        _check_sigma_values("sigmas", sigmas)
    attention = pipe_kwargs.get("joint_attention_kwargs")
    if attention is not None:
        if not isinstance(attention, dict):
            raise TypeError(f"joint_attention_kwargs must be a dict or None, got {_short_repr(attention)}")
        if "scale" in attention:
            check_real("joint_attention_kwargs['scale']", attention["scale"])
    callback = pipe_kwargs.get("callback_on_step_end")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback_on_step_end must be callable, got {_short_repr(callback)}")
    names = pipe_kwargs.get("callback_on_step_end_tensor_inputs")
    if names is not None and callback_tensor_inputs is not None:
        unknown = [n for n in names if n not in callback_tensor_inputs] if isinstance(names, (list, tuple)) \
            else names
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs must be a list of {list(callback_tensor_inputs)}, "
                             f"got {_short_repr(unknown)}")
    if not has_ip_adapter:
        for name in IP_ADAPTER_ARGS:
            if pipe_kwargs.get(name) is not None:
                raise ValueError(f"{name} needs an IP adapter in the transformer; load one with "
                                 "pipe.pipe.load_ip_adapter(...) first")
    return prompts


def check_generation_options(*, num_inference_steps, guidance_scale, long_edge, merge, output_type, seed=0,
                             progress=None) -> None:
    """Range and type of LoRWeBKontextPipeline.__call__'s own options."""
    check_int("num_inference_steps", num_inference_steps, lo=1, hi=MAX_STEPS)
    check_int("seed", seed, lo=0, hi=MAX_SEED)  # as --seed: torch.Generator.manual_seed's non-negative range
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None, got {progress!r}")
    check_real("guidance_scale", guidance_scale, lo=0.0, hi=MAX_GUIDANCE_SCALE)
    if long_edge is not None:
        check_int("long_edge", long_edge, lo=MIN_LONG_EDGE)
    if merge not in ("auto", "none", "full", "offload", "jit", True, False):
        raise ValueError(f"merge must be 'auto', 'none', 'full', 'offload', 'jit', True or False, got {merge!r}")
    if output_type not in ("pil", "np"):
        raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")


# ------------------------------------------------------------------------------------------------ training
#: TrainConfig ranges: field -> (lo, hi, lo_open); fields not listed get type and finiteness checks only.
TRAIN_RANGES = {
    "steps": (1, None, False), "batch_size": (1, None, False), "learning_rate": (0.0, FLOAT32_MAX, True),
    "weight_decay": (0.0, FLOAT32_MAX, False), "max_grad_norm": (0.0, None, False),
    "long_edge": (MIN_LONG_EDGE, None, False),
    "logit_std": (0.0, None, True), "caption_dropout": (0, 1, False), "guidance_scale": (0.0, None, False),
    "max_sequence_length": (1, 512, False), "num_loras": (1, None, False), "rank": (1, None, False),
    "key_dim": (1, None, False), "heads": (1, None, False), "checkpoint_every": (1, None, False),
    "keep_checkpoints": (0, None, False), "seed": (0, 2 ** 63 - 1, False), "num_workers": (0, None, False),
    "adam_eps": (0.0, FLOAT32_MAX, True),
}  # bucket_divisibility: its range depends on resize (check_bucket_divisibility)


def check_train_config(cfg) -> None:
    """Every TrainConfig field: its declared type (int, float, bool, str, betas), finite, and in TRAIN_RANGES."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, kind = getattr(cfg, f.name), hints.get(f.name)
        lo, hi, lo_open = TRAIN_RANGES.get(f.name, (None, None, False))
        if kind is bool:
            check_bool(f.name, value)
        elif kind is int:
            check_int(f.name, value, lo=lo, hi=hi)
        elif kind is float:
            check_real(f.name, value, lo=lo, hi=hi, lo_open=lo_open)
        elif kind is str:
            if not isinstance(value, (str, os.PathLike)) or not str(value):
                raise TypeError(f"{f.name} must be a non-empty string, got {value!r}")
        elif f.name == "betas":
            if not isinstance(value, (tuple, list)) or len(value) != 2:
                raise ValueError(f"betas must be two numbers in [0, 1), got {value!r}")
            for i, beta in enumerate(value):
                check_real(f"betas[{i}]", beta, lo=0.0, hi=1.0, hi_open=True)
    if cfg.key_dim % cfg.heads:
        raise ValueError(f"key_dim={cfg.key_dim} is not divisible by heads={cfg.heads}")
    check_bucket_divisibility("bucket_divisibility", cfg.bucket_divisibility, cfg.resize)


def check_bucket_divisibility(name: str, value: int, resize: str = "bucket") -> None:
    """An aspect bucket is the size the 2x2 training grid is resized to, so its sides must split into two cells:
    with ``resize="bucket"`` the divisibility must be even (official FLUX.1-Kontext: 16); the long-edge rule does
    not use it (any integer >= 1)."""
    if resize != "bucket":
        check_int(name, value, lo=1)
        return
    check_int(name, value, lo=2)
    if value % 2:
        raise ValueError(f"{name} must be even (bucket sides are the 2x2 grid's, split into two cells), got {value}")


# ----------------------------------------------------------------------------------------- command line
import argparse  # noqa: E402  (kept with the command-line helpers)


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse with its errors on one stderr line (``prog: error: ...``) and exit status 2."""

    def error(self, message: str):
        import sys

        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


#: a Hugging Face Hub repo id, "owner/name" (the pattern ``lora_api.hub_repo_id`` takes for --weights)
HUB_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def names_hub_repo(name) -> bool:
    """Whether ``name`` names a Hugging Face Hub repo rather than a local path (the README's rule): a string shaped
    "owner/name" (``HUB_REPO_ID``) of which nothing exists here and whose owner part is no local folder
    (``models/pipe_typo`` beside a ``models/`` folder is a mistyped local path). ``~`` is not expanded, as nowhere in
    this package: a shell expands an unquoted one, and a quoted one names a folder ``~``."""
    return (names_model_hub_repo(name) and HUB_REPO_ID.fullmatch(name) is not None
            and not os.path.isdir(name.split("/")[0]))


#: a Hugging Face Hub model id as ``--model`` / ``--encoder`` take it: "owner/name" (the name may start with "_")
MODEL_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def names_model_hub_repo(name) -> bool:
    """Whether the model ``name`` (``--model``, ``--encoder``) is a Hub id rather than a local path: "owner/name"
    (``MODEL_HUB_ID``) of which nothing exists here. Unlike ``names_hub_repo`` (``--weights``), a local folder named
    like the owner does not make it a path: the defaults (``openai/clip-vit-large-patch14``, the official base model)
    must load beside a folder named ``openai``. ``~`` is not expanded."""
    return isinstance(name, str) and MODEL_HUB_ID.fullmatch(name) is not None and not os.path.exists(name)


def _hub_cached(repo_id: str, filename: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except Exception:
        return False


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def model_source_problem(name, marker: str) -> Optional[str]:
    """Why the model ``name`` (a local folder or a Hugging Face Hub repo id, ``names_model_hub_repo``) cannot be loaded,
    found without loading it ("does not exist on this machine", "is a file; ...", ...), to follow the name in a
    message; None when it can be tried. ``marker`` is the file a model folder (and a cached hub snapshot) holds. The
    name is used as given (``~`` is not expanded, as the loaders do not expand it)."""
    name = str(name)
    path = Path(name)
    if path.exists():
        if not path.is_dir():
            return "is a file; give a model folder or a hub id"
        if not (path / marker).is_file():
            return f"is not a saved model folder (it has no {marker})"
        return None
    if not names_model_hub_repo(name):
        return "does not exist on this machine" + (" (a quoted ~ is not expanded: leave it unquoted for the shell to "
                                                   "expand, or give the full path)" if name.startswith("~") else "")
    if _offline() and not _hub_cached(name, marker):
        return "is not in the Hugging Face cache and HF_HUB_OFFLINE is set"
    return None


def check_model_source(option: str, name: str, marker: str, *, hint: str = "") -> str:
    """A model given as a local folder or a hub id: an existing path must be a folder holding ``marker``; a name that
    is no hub id (``names_model_hub_repo``) must exist; a hub id must be cached when HF_HUB_OFFLINE is set. UsageError
    "<option> <name> <problem><hint>" (``model_source_problem``) otherwise; returns ``name`` (a str), as given."""
    name = str(name)
    problem = model_source_problem(name, marker)
    if problem is not None:
        raise UsageError(f"{option} {name} {problem}{hint}")
    return name


def check_checkpoint_encoder(encoder_name: str) -> None:
    """``check_model_source`` for the analogy encoder a checkpoint names (its config.yaml or metadata), used when
    no ``--encoder`` is given; the error says to pass one."""
    check_model_source(f"the analogy encoder {encoder_name!r} named in the checkpoint's config/metadata:",
                       encoder_name, "config.json", hint="; pass --encoder")


#: --pipe-arg keys the CLI can pass (JSON values), with their checks; tensor-valued arguments are Python-API only.
CLI_PIPE_ARGS = {
    "prompt_2": lambda k, v: _check_str(k, v), "negative_prompt": lambda k, v: _check_str(k, v),
    "negative_prompt_2": lambda k, v: _check_str(k, v), "true_cfg_scale": lambda k, v: check_real(k, v, lo=0.0),
    "max_sequence_length": lambda k, v: check_int(k, v, lo=1, hi=512),
    "sigmas": lambda k, v: _check_sigma_values(k, _check_list(k, v)),
    "joint_attention_kwargs": lambda k, v: _check_attention_kwargs(k, v),
}


def _check_attention_kwargs(name, value) -> dict:
    """``joint_attention_kwargs`` on the command line: a JSON object whose ``scale`` (the per-call LoRWeB strength,
    e.g. ``{"scale": 0.5}``), if given, is a finite number."""
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a JSON object such as {{\"scale\": 0.5}}, got {value!r}")
    if "scale" in value:
        check_real(f"{name}['scale']", value["scale"])
    return value


def check_cli_pipe_args(pipe_kwargs: Optional[dict]) -> None:
    """The ``--pipe-arg KEY=VALUE`` pairs of a command (JSON values): a key the pipeline sets itself, one that only
    the Python API can pass (tensors, callables) and a value out of its range raise naming the flag (UsageError for
    a key; TypeError / ValueError from ``CLI_PIPE_ARGS``' check for a value)."""
    for key, value in (pipe_kwargs or {}).items():
        if key in PIPELINE_OWNED_ARGS:
            raise UsageError(f"--pipe-arg {key} is set by lorweb-fast itself (use {PIPELINE_OWNED_ARGS[key]})")
        if key not in CLI_PIPE_ARGS:
            raise UsageError(f"--pipe-arg {key}: unknown or unsupported on the command line; supported keys: "
                             f"{', '.join(sorted(CLI_PIPE_ARGS))}")
        CLI_PIPE_ARGS[key](f"--pipe-arg {key}", value)


def _check_sigma_values(name, sigmas) -> list:
    """Every entry of ``sigmas`` a real number in [0, 1] (diffusers' flow-matching noise levels)."""
    return [check_real(f"{name}[{i}]", s, lo=0.0, hi=1.0) for i, s in enumerate(sigmas)]


def _check_str(name, value):
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {value!r}")
    return value


def _check_list(name, value):
    if not isinstance(value, list) or not value:
        raise TypeError(f"{name} must be a non-empty JSON list, got {value!r}")
    return value


#: the official number of denoising steps (inference.py), the default of ``lorweb-fast infer --steps``
DEFAULT_STEPS = 28


def resolve_step_count(steps: Optional[int], pipe_kwargs: Optional[dict]) -> int:
    """The denoising step count of a command with ``--steps`` (None: not given) and ``--pipe-arg`` ``pipe_kwargs``:
    the pipeline runs one step per sigma when ``sigmas`` is given (diffusers' ``retrieve_timesteps`` overrides
    ``num_inference_steps`` with their number), so their count, and a ``--steps`` that differs is refused rather than
    silently overridden; else ``steps``, by default 28 (official)."""
    sigmas = (pipe_kwargs or {}).get("sigmas")
    if isinstance(sigmas, (list, tuple)) and sigmas:
        if steps is not None and steps != len(sigmas):
            raise UsageError(f"--steps {steps} disagrees with --pipe-arg sigmas, which sets {len(sigmas)} steps (one "
                             "per sigma); give one of them, or the same count")
        return len(sigmas)
    return DEFAULT_STEPS if steps is None else steps


def pipeline_grid_multiple(model) -> Optional[int]:
    """What FluxKontextPipeline rounds the generated sides down to (2 x its VAE scale factor, 2 ** (levels - 1) of
    ``vae/config.json`` ``block_out_channels``): 16 for FLUX.1-Kontext. For a local diffusers folder from its VAE
    config; None when that does not read (the pipeline checks the sizes once loaded); 16 for a Hub id."""
    from ._files import loads_json

    folder = Path(str(model))
    if not folder.exists():
        return 16
    try:
        channels = loads_json((folder / "vae" / "config.json").read_text(encoding="utf-8"))["block_out_channels"]
        return 2 * 2 ** (len(channels) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_infer_args(args) -> list:
    """Every path and option of ``lorweb-fast infer``, before any model loads; raises UsageError (one line). The
    options that need no checkpoint are checked first; then a --weights folder or Hugging Face Hub repo id
    (downloaded here) is resolved to its checkpoint file and config, and at the official resolution the control
    grid is checked against the official query crops. Once every check has passed, ``args.weights`` /
    ``args.config`` name those local files (``weight_name`` and ``revision`` cleared), so the run loads exactly what
    was checked, and ``args.steps`` is the step count (None: the length of ``--pipe-arg sigmas``, else 28); a
    refused call leaves ``args`` as it was. Returns the decoded [a, a', b] PIL images."""
    from .flux import CLI_OPTION_NAMES, DEFAULT_MAX_AREA, load_image, official_grid_problem
    from .model import LoRWeBCheckpointError, _config_from_metadata, checkpoint_metadata, resolve_checkpoint_settings
    from .flux import resolve_query_source
    from .lora_api import checkpoint_key_dim, hub_repo_id, resolve_checkpoint
    from .official_config import PATCH_QUERY_MODES, LoRWeBConfigError

    images = []
    try:
        for option, value in (("--a", args.a), ("--a-prime", args.a_prime), ("--b", args.b)):
            if Path(value).is_dir():
                raise UsageError(f"{option} {value} is a folder; give an image file")
            images.append(load_image(value))  # missing: FileNotFoundError, not an image: ValueError, naming it
        # the options that need no checkpoint first: a Hub repo id is downloaded below
        if getattr(args, "max_size", None) is not None:
            check_int("--max-size", args.max_size, lo=MIN_LONG_EDGE)
        if getattr(args, "max_area", None) is not None:
            check_int("--max-area", args.max_area, lo=MIN_MAX_AREA)
        steps = args.steps
        if steps is not None:
            check_int("--steps", steps, lo=1, hi=MAX_STEPS)
        check_real("--guidance-scale", args.guidance_scale, lo=0.0, hi=MAX_GUIDANCE_SCALE)
        if getattr(args, "long_edge", None) is not None:
            check_int("--long-edge", args.long_edge, lo=MIN_LONG_EDGE)
        resolution = getattr(args, "resolution", "official")
        if resolution == "official" and getattr(args, "long_edge", None) is not None:
            raise UsageError("--long-edge applies to --resolution native; the official resolution is set by "
                             "--max-area (and --max-size)")
        if resolution == "native" and (getattr(args, "max_area", None) is not None
                                       or getattr(args, "max_size", None) is not None):
            raise UsageError("--max-area and --max-size apply to --resolution official; the native resolution is "
                             "capped by --long-edge")
        check_int("--seed", args.seed, lo=0, hi=MAX_SEED)
        if getattr(args, "device", None) is not None:
            check_device("--device", args.device)
        check_output_file("--out", args.out, image_suffixes())
        out = Path(args.out).resolve()
        inputs = {Path(value).resolve(): option for option, value in (("--b", args.b), ("--a-prime", args.a_prime),
                                                                      ("--a", args.a))}  # the first named wins
        if out in inputs:
            raise UsageError(f"--out {args.out} is the input image {inputs[out]}: b' would replace it; give another "
                             "file")
        if getattr(args, "coefficients_plot", None):
            check_output_file("--coefficients-plot", args.coefficients_plot, plot_suffixes())
            plot = Path(args.coefficients_plot).resolve()
            if plot == out:
                raise UsageError(f"--coefficients-plot {args.coefficients_plot} is the --out file: the plot would "
                                 "replace b'; give another file")
            if plot in inputs:
                raise UsageError(f"--coefficients-plot {args.coefficients_plot} is the input image {inputs[plot]}: "
                                 "the plot would replace it; give another file")
        check_cli_pipe_args(getattr(args, "pipe_kwargs", None))
        steps = resolve_step_count(steps, getattr(args, "pipe_kwargs", None))
        check_model_source("--model", args.model, "model_index.json")
        if getattr(args, "encoder", None) is not None:
            check_model_source("--encoder", args.encoder, "config.json")
        weights, config = args.weights, getattr(args, "config", None)
        weight_name, revision = getattr(args, "weight_name", None), getattr(args, "revision", None)
        resolved_weights = None
        if config is not None:
            check_input_file("--config", config, {".yaml", ".yml"})
        on_hub = hub_repo_id(weights) is not None
        if revision is not None and not on_hub:
            raise UsageError(f"--revision is for a Hugging Face Hub repo id; --weights {weights} is a local path")
        if weight_name is not None and Path(weights).is_file() and Path(weights).name != weight_name:
            raise UsageError(f"--weight-name picks a checkpoint inside a --weights folder or Hub repo; --weights "
                             f"{weights} is a file (give the folder, or no --weight-name)")
        if Path(weights).is_dir() or on_hub or weight_name is not None:
            # a run or checkpoint folder (its newest complete checkpoint and config.yaml) or a Hub repo (downloaded)
            try:
                weights, found_config = resolve_checkpoint(weights, weight_name, revision=revision)
            except (OSError, ValueError) as exc:
                raise UsageError(f"--weights: {exc}") from None
            config = config if config is not None else found_config
            resolved_weights = (str(weights), None if config is None else str(config))
        else:
            check_input_file("--weights", weights, {".safetensors"})
        try:
            meta = checkpoint_metadata(weights)
            _config_from_metadata(meta)
            explicit = {"encoder": getattr(args, "encoder", None), "query_mode": getattr(args, "query_mode", None),
                        "pooling_type": getattr(args, "pooling_type", None)}
            resolved = resolve_checkpoint_settings(weights, config, explicit)
            key_dim = checkpoint_key_dim(weights)  # from the header: the heads must split it (else the load fails
            if key_dim is not None and key_dim % resolved["heads"]:  # after the base model, minutes for FLUX)
                raise UsageError(f"--weights: heads={resolved['heads']} ({resolved['sources'].get('heads', '?')}) "
                                 f"does not divide the checkpoint's key_dim={key_dim}")
            encoder_name = resolved["encoder"]
            query_source = resolve_query_source(weights, getattr(args, "query_source", None))
        except (LoRWeBCheckpointError, LoRWeBConfigError) as exc:
            raise UsageError(f"--weights: {exc}") from None
        if query_source == "images" and resolved["query_mode"] != "cat-aa'b":
            raise UsageError(f"--query-source images encodes a, a', b separately (query mode \"cat-aa'b\"); the "
                             f"checkpoint's query mode is {resolved['query_mode']!r}")
        if getattr(args, "pooling_type", None) is not None and resolved["query_mode"] not in PATCH_QUERY_MODES:
            source = resolved["sources"].get("query_mode", "official default")
            raise UsageError(f"--pooling-type applies to the patch query modes ({', '.join(PATCH_QUERY_MODES)}), "
                             f"which pool CLIP's patch tokens; query mode {resolved['query_mode']!r} (from "
                             f"{'--query-mode' if source == 'argument' else source}) does not pool")
        if resolution == "official":  # the a of a 2:1 or wider analogy has no b to crop: refused before loading
            problem = official_grid_problem(images[0].size, query_mode=resolved["query_mode"],
                                            query_source=query_source, max_size=getattr(args, "max_size", None),
                                            multiple=pipeline_grid_multiple(args.model),
                                            option_names=CLI_OPTION_NAMES,
                                            max_area=getattr(args, "max_area", None) or DEFAULT_MAX_AREA)
            if problem:
                raise UsageError(f"--a {args.a} is {problem}")
        if getattr(args, "encoder", None) is None and encoder_name:
            check_checkpoint_encoder(encoder_name)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    if resolved_weights is not None:  # every check passed: the run loads exactly the checkpoint checked here
        args.weights, args.config = resolved_weights
        args.weight_name = args.revision = None
    args.steps = steps
    return images


def check_train_args(args) -> None:
    """Paths of ``lorweb-fast train`` before any model loads (TrainConfig.validate checks the numbers)."""
    data = Path(args.data)
    if not data.is_dir():
        raise UsageError(f"--data {data} is not a folder")
    check_output_dir("--out", args.out)  # (an --out inside the data's folders: TrainConfig.validate)
    check_model_source("--model", args.model, "model_index.json")
    check_model_source("--encoder", args.encoder, "config.json")


#: what ``lorweb-fast demo`` writes in its --out folder (cli.run_demo)
DEMO_OUTPUTS = ("models", "data", "train", "loss.png", "b_prime.png", "analogy.png", "coefficients.png",
                "summary.json")


def check_demo_args(args) -> None:
    """``lorweb-fast demo`` options before anything is built; an --out that already holds any of ``DEMO_OUTPUTS``
    (an earlier demo, or files the demo would overwrite or mix with) is refused."""
    try:
        out = check_output_dir("--out", args.out)
        found = [name for name in DEMO_OUTPUTS if (out / name).exists()]
        if found:
            raise UsageError(f"--out {out} already holds {', '.join(found)}, which the demo writes; use another "
                             f"--out, or delete {out} if it is an earlier demo's")
        check_int("--steps", args.steps, lo=1)
        check_int("--samples", args.samples, lo=1)
        check_real("--learning-rate", args.learning_rate, lo=0.0, hi=TRAIN_RANGES["learning_rate"][1], lo_open=True)
        check_int("--inference-steps", args.inference_steps, lo=1, hi=MAX_STEPS)  # the pipeline's range
        check_int("--seed", args.seed, lo=0, hi=2 ** 63 - 1)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def check_data_args(args) -> None:
    """``lorweb-fast data check`` / ``data prepare`` options before any folder is read or written."""
    from ._files import same_or_inside

    try:
        if args.data_command == "check":
            check_int("--long-edge", args.long_edge, lo=MIN_LONG_EDGE)  # the range lorweb-fast train accepts
            check_bucket_divisibility("--bucket-divisibility", args.bucket_divisibility, args.resize)
            if args.dump is not None:
                check_output_dir("--dump", args.dump)
                if same_or_inside(args.dump, args.data):
                    raise UsageError(f"--dump {args.dump} is inside the training folder {args.data}: the dumped "
                                     "images would be read back as samples (or break its control/ and target/ "
                                     "pairs); choose a folder outside it")
            return
        check_prepare_output("out", args.out, args.src)
        check_int("--seed", args.seed, lo=0, hi=MAX_SEED)  # as every other command's --seed
        if args.filter_json is not None:
            check_input_file("--filter-json", args.filter_json)
        for option, lo in (("max_analogies", 1), ("max_samples_per_category", 1),
                           ("min_pairs_per_category", 2)):  # an analogy takes two pairs of one category
            if getattr(args, option) is not None:
                check_int("--" + option.replace("_", "-"), getattr(args, option), lo=lo)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None
