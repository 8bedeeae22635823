"""Argument checks shared by every entry point (functional API, modules, checkpoints, pipeline, training, CLI).

Each helper raises an error naming the argument and the expected range and returns the checked value; they never
modify anything, so a failed check leaves models and files as they were. ``UsageError`` is what the command line
turns into one line on stderr and exit status 2.
"""

from __future__ import annotations

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


# ------------------------------------------------------------------------------------------------- numbers
def _range_text(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi}"
    return "finite"


def check_real(name: str, value, lo: Optional[float] = None, hi: Optional[float] = None, *, lo_open: bool = False,
               hi_open: bool = False) -> float:
    """``value`` as a float: a real number (not bool, not a string, not a tensor with more than one element),
    finite, and within [lo, hi] (open ends with ``lo_open`` / ``hi_open``)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number ({_range_text(lo, hi, lo_open, hi_open)}), got "
                        f"{type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite ({_range_text(lo, hi, lo_open, hi_open)}), got {value}")
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
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_float_tensor(name: str, value, *, dim: Optional[Iterable[int]] = None) -> torch.Tensor:
    """A floating-point tensor (integer, boolean and complex tensors are refused: they would silently truncate or
    break the math), optionally of one of the dimensionalities ``dim``."""
    check_tensor(name, value)
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if dim is not None:
        dims = tuple(dim)
        if value.dim() not in dims:
            raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape "
                             f"{tuple(value.shape)}")
    return value


def check_finite_tensor(name: str, value: torch.Tensor, hint: str = "") -> torch.Tensor:
    """Raise ValueError when ``value`` holds NaN or Inf (one device synchronisation)."""
    if not bool(torch.isfinite(value).all()):
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


def check_input_file(name: str, path, suffixes: Optional[Iterable[str]] = None) -> Path:
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{name} {path} is a folder; give a file")
    if not path.is_file():
        raise UsageError(f"{name} {path} does not exist")
    if suffixes is not None and path.suffix.lower() not in set(suffixes):
        raise UsageError(f"{name} {path} must be a {' / '.join(sorted(set(suffixes)))} file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{name} {path} is not readable")
    return path


def image_suffixes() -> set[str]:
    """File extensions PIL can write."""
    from PIL import Image

    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}


def plot_suffixes() -> set[str]:
    """File extensions matplotlib can write."""
    from matplotlib.backend_bases import FigureCanvasBase

    return {"." + ext for ext in FigureCanvasBase.get_supported_filetypes()}


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
    elif dev.type not in ("cpu", "meta") and not (hasattr(torch, dev.type)
                                                   and getattr(getattr(torch, dev.type), "is_available",
                                                               lambda: False)()):
        raise UsageError(f"{name} {device}: no {dev.type} device on this machine")
    return dev


# ------------------------------------------------------------------------------------------------ warnings
#: Aspect ratios (long side / short side) above this are squashed noticeably by the 2x2 grid.
EXTREME_ASPECT_RATIO = 4.0


def warn_aspect_ratios(a: Sequence, a_prime: Sequence, b: Sequence, *, stacklevel: int = 3) -> None:
    """Warn when the b images of a batch have different aspect ratios (every grid then uses the first one's cell
    shape) or when any image is more elongated than ``EXTREME_ASPECT_RATIO`` (its cell squashes it)."""
    ratios = [im.size[0] / max(1, im.size[1]) for im in b]
    if len(ratios) > 1 and max(ratios) / min(ratios) > 1.01:
        warnings.warn(f"the b images of this batch have different aspect ratios ({', '.join(f'{r:.2f}' for r in ratios)}"
                      "); every grid uses the first analogy's cell shape, so the others are stretched. Run them in "
                      "separate calls to keep their proportions", UserWarning, stacklevel=stacklevel)
    for role, images in (("a", a), ("a_prime", a_prime), ("b", b)):
        for i, im in enumerate(images):
            w, h = im.size
            if max(w, h) > EXTREME_ASPECT_RATIO * max(1, min(w, h)):
                warnings.warn(f"{role}[{i}] is {w}x{h} (aspect ratio {max(w, h) / max(1, min(w, h)):.1f}:1); the "
                              "2x2 analogy grid squashes such extreme shapes. Crop it closer to square for better "
                              "results", UserWarning, stacklevel=stacklevel)
