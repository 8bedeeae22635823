"""FLUX.1-Kontext integration: analogy grids, the batch-1 merged fast path and coefficient plots.

Works on diffusers' own ``FluxTransformer2DModel`` / ``FluxKontextPipeline`` after ``inject_lorweb`` /
``load_lorweb_weights``: the analogy encoder, grids, ``LoRWeBKontextPipeline``, the batch-1 ``merged()`` fast path
and coefficient plots. Training lives in ``lorweb_fast.training``, the command line in ``lorweb_fast.cli``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import lora_api
from . import _locks
from ._files import loads_json, recorded_location, save_figure_atomically
from ._locks import holding, holding_analogy, serialized_on_transformer
from .layer import (LoRWeBLinear, decide_one_analogy, group_offloading_modes, has_forward_hooks, has_plain_weight,
                    refuse_disk_group_offloading, refuse_sharded_weight)
from .model import DEFAULT_ENCODER, LoRWeBCheckpointError, analogy_restored_on_error, checkpoint_metadata, \
    finished_through_interrupt, get_coefficients, load_lorweb_weights, lorweb_layers, resolve_checkpoint_settings, \
    set_query
from .validation import MIN_LONG_EDGE, MIN_MAX_AREA, all_finite, check_device, check_generation_options, check_int, \
    check_pipe_call, check_pipe_kwargs, check_real, diffusers_classes, warn, warn_aspect_ratios, \
    warn_grid_sizes


# ----------------------------------------------------------------------------------------------------- grids
def _cell_size(images, long_edge: int, multiple: int = 16) -> tuple[int, int]:
    """(width, height) of one grid cell: the aspect ratio of b, the grid's long edge capped at ``long_edge`` and
    both sides multiples of ``multiple`` (FLUX latents are packed 2x2 after the 8x VAE)."""
    w, h = images[-1].size
    scale = min(1.0, long_edge / (2 * max(w, h)))
    cw = max(multiple, int(w * scale) // multiple * multiple)
    ch = max(multiple, int(h * scale) // multiple * multiple)
    return cw, ch


def load_image(image, name: Optional[str] = None):
    """An RGB PIL image from a PIL image or a path, opened as the official inference.py opens its inputs
    (``Image.open(path).convert("RGB")``: no EXIF orientation applied). Errors name the input: a missing file
    (FileNotFoundError); a folder, a URL (nothing is downloaded), a file that is not a complete image, one over
    Pillow's decompression-bomb limit, or an image without pixels (ValueError). ``name`` (e.g. ``"a_prime[1]"``)
    names a PIL input in the warnings (a path names itself)."""
    from PIL import Image

    from ._files import image_read_error_message, image_read_errors

    if isinstance(image, Image.Image):
        _warn_high_bit_depth(image, name or "an image")
        im = image.convert("RGB")
        where = "the image"
    else:
        if not isinstance(image, (str, os.PathLike)):
            raise TypeError(f"expected a PIL image or a path, got {type(image).__name__}")
        if isinstance(image, str) and image.lower().startswith(("http://", "https://")):
            raise ValueError(f"{image} is a URL: lorweb_fast does not download images; download it and pass its "
                             "path, or a PIL image")
        path = Path(image)
        if path.is_dir():
            raise ValueError(f"{path} is a folder; give an image file")
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        try:
            with Image.open(path) as opened:
                _warn_high_bit_depth(opened, str(path))
                im = opened.convert("RGB")
        except image_read_errors() as exc:
            raise ValueError(image_read_error_message(path, exc)) from exc
        where = str(path)
    if im.width == 0 or im.height == 0:
        raise ValueError(f"{where} has no pixels ({im.width}x{im.height})")
    return im


def _load_images(role: str, images) -> list:
    """``load_image`` of one image or a list of them, each named in warnings as ``role`` (one) or ``role[i]``."""
    images = _as_list(images)
    return [load_image(image, role if len(images) == 1 else f"{role}[{i}]") for i, image in enumerate(images)]


def _warn_high_bit_depth(image, where: str) -> None:
    """Warn when ``image`` has more than 8 bits per channel: its conversion to RGB (as the official inference.py
    reads its inputs, kept) clips every value above 255, so a 16-bit image comes out nearly white."""
    from .data import HIGH_BIT_DEPTH_MODES

    if image.mode in HIGH_BIT_DEPTH_MODES:
        warn(f"{where} has more than 8 bits per channel (mode {image.mode}); the conversion to RGB, as in the "
             "official inference.py, clips its values above 255 (a 16-bit image reads nearly white): save it as an "
             "8-bit image")


def make_grid(top_left, top_right, bottom_left, bottom_right, *, long_edge: int = 512,
              cell_size: Optional[tuple[int, int]] = None):
    """A 2x2 PIL grid [top_left top_right; bottom_left bottom_right] of equal cells: b's aspect ratio, the grid's
    long edge capped at ``long_edge``, sides multiples of 16; or ``cell_size`` (width, height) when given."""
    from PIL import Image

    cells = [im.convert("RGB") for im in (top_left, top_right, bottom_left, bottom_right)]
    cw, ch = cell_size or _cell_size(cells[2:3], long_edge)
    grid = Image.new("RGB", (2 * cw, 2 * ch))
    for i, im in enumerate(cells):
        grid.paste(im.resize((cw, ch), Image.BICUBIC), ((i % 2) * cw, (i // 2) * ch))
    return grid


def control_grid(a, a_prime, b, *, long_edge: int = 512):
    """The conditioning grid [a a'; b b] (METHOD.md)."""
    return make_grid(a, a_prime, b, b, long_edge=long_edge)


def target_grid(a, a_prime, b, b_prime, *, long_edge: int = 512):
    """The training target grid [a a'; b b']."""
    return make_grid(a, a_prime, b, b_prime, long_edge=long_edge)


def official_control_grid(a, a_prime, b, *, max_size: Optional[int] = None):
    """The official inference grid [a a'; b b] (inference.py ``process_control_image_with_replace``): every cell at
    a's size (a' and b resized with bicubic), no rounding; with ``max_size``, a grid whose side exceeds it is
    resized (bicubic) so that its long edge is ``max_size`` (the official ``-m``; cell width > height decides the
    long edge, the other side truncated)."""
    from PIL import Image

    a, a_prime, b = (load_image(x) for x in (a, a_prime, b))
    w, h = a.size
    grid = Image.new("RGB", (2 * w, 2 * h))
    grid.paste(a, (0, 0))
    grid.paste(a_prime.resize((w, h), Image.BICUBIC), (w, 0))
    cell_b = b.resize((w, h), Image.BICUBIC)
    grid.paste(cell_b, (0, h))
    grid.paste(cell_b, (w, h))
    size = official_grid_size(a.size, max_size)
    return grid if size == grid.size else grid.resize(size, Image.BICUBIC)


def official_grid_size(a_size: tuple, max_size: Optional[int] = None) -> tuple:
    """(width, height) of ``official_control_grid`` for an a of ``a_size`` (w, h): (2w, 2h), or with ``max_size``
    and a side above it, the long edge (cell width > height decides it) at ``max_size``, the other side truncated."""
    w, h = a_size
    if max_size is None:
        return 2 * w, 2 * h
    if max_size < 2:
        raise ValueError(f"max_size must be at least 2 pixels, got {max_size}")
    if 2 * w > max_size or 2 * h > max_size:
        return (max_size, int(h * max_size / w)) if w > h else (int(w * max_size / h), max_size)
    return 2 * w, 2 * h


#: how official_grid_problem names the options, in the Python API (default) and on the command line
API_OPTION_NAMES = {"native": "resolution='native'", "max_size": "max_size", "max_area": "max_area"}
CLI_OPTION_NAMES = {"native": "--resolution native", "max_size": "--max-size", "max_area": "--max-area"}


def official_generation_size(grid_size: tuple, max_area: int, multiple: int) -> tuple:
    """(width, height) FluxKontextPipeline generates at for a control grid of ``grid_size`` at the official
    resolution (``max_area``, ``_auto_resize=True``; diffusers ``FluxKontextPipeline.__call__``): the grid's aspect
    ratio at about ``max_area`` pixels, each side rounded, then floored to ``multiple`` (2 * vae_scale_factor)."""
    aspect = grid_size[0] / grid_size[1]
    return (round((max_area * aspect) ** 0.5) // multiple * multiple,
            round((max_area / aspect) ** 0.5) // multiple * multiple)


def official_control_size(grid_size: tuple, multiple: int) -> tuple:
    """(width, height) FluxKontextPipeline resizes a control grid of ``grid_size`` (sides at least ``multiple``) to
    at the official resolution (``_auto_resize=True``): the preferred Kontext resolution nearest the aspect ratio of
    its sides floored to ``multiple``, floored to ``multiple`` (diffusers ``FluxKontextPipeline.__call__``)."""
    from diffusers.pipelines.flux import pipeline_flux_kontext

    w, h = (side - side % multiple for side in grid_size)  # VaeImageProcessor.get_default_height_width
    _, pw, ph = min((abs(w / h - pw / ph), pw, ph) for pw, ph in pipeline_flux_kontext.PREFERRED_KONTEXT_RESOLUTIONS)
    return pw // multiple * multiple, ph // multiple * multiple


def official_grid_problem(a_size: tuple, *, query_mode: str, query_source: str = "grid",
                          max_size: Optional[int] = None, multiple: Optional[int] = 16,
                          option_names: Optional[dict] = None, max_area: Optional[int] = None) -> Optional[str]:
    """Why the official-resolution control grid of an analogy image a of ``a_size`` (``official_grid_size`` with
    ``max_size``) cannot be generated from, or None: a side that the pipeline rounds down to 0 (sides multiples of
    ``multiple``, 16 for FLUX; None: not checked), with ``max_area`` a side of the generated image
    (``official_generation_size``) rounded down to 0, or, for ``query_source="grid"``, a grid with nothing to cut for
    the official inference crops of ``query_mode`` (an a of aspect ratio 2:1 or wider). The text starts with a's size
    ("WxH: ...") and names the remedy with ``option_names`` (``API_OPTION_NAMES`` or ``CLI_OPTION_NAMES``)."""
    names = option_names or API_OPTION_NAMES
    (aw, ah), (gw, gh) = a_size, official_grid_size(a_size, max_size)
    if multiple is not None and min(gw, gh) < multiple:
        full = (2 * aw, 2 * ah)  # the grid of four cells at a's size
        if (gw, gh) != full:  # max_size scaled it down: a itself may be large enough
            cause = (f"the {full[0]}x{full[1]} control grid of cells at a's size is scaled to {gw}x{gh} by "
                     f"{names['max_size']}={max_size}")
            remedy = f"use a less elongated a or a larger {names['max_size']}"
        else:
            cause = f"the control grid of cells at a's size is {gw}x{gh}"
            remedy = f"use a larger a (at least {multiple // 2} px on a side)"
        return (f"{aw}x{ah}: at the official resolution {cause}, and the pipeline rounds its sides down to multiples "
                f"of {multiple}, to 0 here; {remedy} or {names['native']}")
    if multiple is not None and max_area is not None:
        gen_w, gen_h = official_generation_size((gw, gh), max_area, multiple)
        if min(gen_w, gen_h) == 0:
            return (f"{aw}x{ah}: at the official resolution the pipeline generates the {gw}x{gh} grid's shape at "
                    f"about {names['max_area']}={max_area} pixels, {gen_w}x{gen_h} after rounding its sides down to "
                    f"multiples of {multiple}; use a larger {names['max_area']}, a less elongated a or "
                    f"{names['native']}")
    if query_source == "grid":
        problem = query_crop_problem(gw, gh, query_mode, "inference")
        if problem:
            return (f"{aw}x{ah}: at the official resolution the cells take a's shape, and {problem}; use "
                    f"{names['native']} (cells at b's shape) or a narrower a")
    return None


def bottom_right_cell(grid):
    """b' from a generated grid."""
    w, h = grid.size
    return grid.crop((w // 2, h // 2, w, h))


# ------------------------------------------------------------------------------------------ merged fast path
def _coefficient_rows(coeffs: torch.Tensor) -> str:
    """What (B, N) coefficients that are not one analogy hold, for an error: an empty batch or B analogies."""
    if coeffs.shape[0] == 0:
        return "coefficients for an empty batch (0 samples)"
    return f"coefficients for {coeffs.shape[0]} samples that are not all one analogy"


def merged_weight(layer: LoRWeBLinear) -> torch.Tensor:
    """``W + scale * sum_n alpha[n] (A_n B_n)^T`` computed in fp32 and rounded once to W's dtype. (out, in).
    ``scale`` includes the strength of ``set_lorweb_scale``."""
    coeffs = layer.coefficients
    if coeffs is None:
        raise RuntimeError("cannot merge a LoRWeBLinear without coefficients: call set_query first")
    if not layer.holds_one_analogy():
        raise ValueError(f"merging needs one analogy (batch size 1), got {_coefficient_rows(coeffs)}")
    return layer.merged_weight_for(coeffs[0])


#: Strategies of ``merged``; "none" in the pipeline and CLI means the unmerged (fused) path.
MERGE_STRATEGIES = ("full", "offload", "jit")
#: diffusers' name of the one LoRWeB adapter a pipeline holds, unless ``load_lora_weights(adapter_name=...)``.
DEFAULT_ADAPTER_NAME = "lorweb"


def _base_description(base: nn.Module) -> str:
    """A base layer's class and its weight's type for error messages: ``GGUFLinear (weight GGUFParameter)``."""
    return f"{type(base).__name__} (weight {type(getattr(base, 'weight', None)).__name__})"


def _unmergeable_base(base: nn.Module) -> Optional[str]:
    """Why no merge strategy can merge into the base layer ``base`` (the end of a sentence starting "its base
    layer"), or None: a quantized or replaced weight, or forward hooks."""
    if not has_plain_weight(base):
        return f"{_base_description(base)} has no plain tensor weight (quantized layers run unmerged)"
    if has_forward_hooks(base):
        return ("has forward hooks or backward hooks, or a forward of its own (offloading or layerwise casting keep "
                "its weight elsewhere or in a storage dtype outside its forward, where a merge would be lost or "
                "rounded; hooks and a replaced forward must run)")
    return None


def _mergeable_layers(model: nn.Module, strategy: str) -> dict[str, LoRWeBLinear]:
    """The LoRWeB layers of ``model`` after checking, before anything changes, that ``strategy`` can merge them."""
    if strategy not in MERGE_STRATEGIES:
        raise ValueError(f"strategy must be one of {MERGE_STRATEGIES}, got {strategy!r}")
    layers = lorweb_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRWeB layers to merge")
    modes = group_offloading_modes(model)
    refuse_disk_group_offloading(layers, modes, f"merged(strategy={strategy!r})")
    decide_one_analogy(layers.values())  # one host synchronisation per device, not one (or two) per layer
    for name, layer in layers.items():
        refuse_sharded_weight(layer.base_layer)  # tensor parallelism, named (not "no plain weight": quantized)
        if strategy != "jit" and modes.get(id(layer.base_layer.weight)) == "stream":
            raise TypeError(f"cannot merge into {name} with strategy={strategy!r}: group offloading with "
                            "use_stream=True swaps its weight for the CPU copy taken when offloading was enabled at "
                            "every offload and onload, where a merge outside the forward is lost ('full') or "
                            "untested ('offload'); use strategy='jit' or run unmerged (merge='none')")
        if hasattr(layer.base_layer, "adapter_layer_names") and hasattr(layer.base_layer, "get_base_layer"):
            raise TypeError(f"cannot merge into {name}: its base layer is a peft adapter layer "
                            f"({type(layer.base_layer).__name__}, a peft / diffusers LoRA added after LoRWeB); "
                            "LoRWeB does not stack with peft adapters: unload it (transformer.unload_lora()) or run "
                            "unmerged (merge='none')")
        why = _unmergeable_base(layer.base_layer)
        if why:
            raise TypeError(f"cannot merge into {name}: its base layer {why}; run it unmerged (merge='none')")
        if layer._merged or layer._merge_jit:
            raise RuntimeError(f"{name} is already merged (nested merged() blocks)")
        coeffs = layer.coefficients
        if coeffs is None and layer._query is not None:
            raise RuntimeError(f"cannot merge {name}: its coefficients are computed inside every forward "
                               "(set_query(..., per_forward=True)); merging needs fixed coefficients: call "
                               "set_query(model, query) without per_forward")
        if coeffs is None:
            raise RuntimeError(f"cannot merge {name} without coefficients: call set_query first")
        if strategy != "jit" and not layer.holds_one_analogy():
            raise ValueError(f"strategy={strategy!r} merges one analogy (batch size 1), got "
                             f"{_coefficient_rows(coeffs)}; strategy='jit' merges per sample")
    problem = in_place_merge_problem(model, layers, strategy)
    if problem is not None:
        raise problem
    return layers


def in_place_merge_problem(model: nn.Module, layers: dict[str, LoRWeBLinear], strategy: str) -> Optional[Exception]:
    """Why ``strategy`` ("full" / "offload", which put the merged weight in place of the base weight; None for
    "jit") cannot merge ``layers``, as the error to raise, or None:

    * a parametrized base weight (``torch.nn.utils.parametrize``, e.g. weight_norm): computed from other tensors at
      every access, a merged weight written into it is lost;
    * a base weight shared by two LoRWeB layers (one weight cannot hold two layers' mixtures), or tied to a module
      outside the LoRWeB layers (e.g. an output projection tied to an embedding): that module would compute with
      the mixture inside the block. "full" swaps the Parameter's tensor, so only the same Parameter counts;
      "offload" writes into the storage, so any tensor of that storage counts."""
    if strategy not in ("full", "offload"):
        return None
    for name, layer in layers.items():
        if parametrize.is_parametrized(layer.base_layer, "weight"):
            return TypeError(f"cannot merge into {name} with strategy={strategy!r}: its base weight is parametrized "
                             "(torch.nn.utils.parametrize, e.g. weight_norm): it is computed from other tensors at "
                             "every access, so a merged weight written into it would be lost; use strategy='jit' or "
                             "run unmerged (merge='none')")
    bases = {id(layer.base_layer) for layer in layers.values()}
    held = {}  # id(Parameter) ("full") or storage address ("offload") -> layer name
    for name, layer in layers.items():
        weight = layer.base_layer.weight
        key = id(weight) if strategy == "full" else _storage_address(weight)
        if key in held:
            return ValueError(f"{name} shares its weight storage with {held[key]}: strategy={strategy!r} puts each "
                              "layer's merged weight in place of its base weight; use strategy='jit'")
        if key:
            held[key] = name
    for module_name, module in model.named_modules():
        if id(module) in bases or isinstance(module, LoRWeBLinear):
            continue
        for tensor_name, tensor in itertools.chain(module._parameters.items(), module._buffers.items()):
            if not isinstance(tensor, torch.Tensor):
                continue
            name = held.get(id(tensor) if strategy == "full" else _storage_address(tensor))
            if name is not None:
                return ValueError(f"{name}'s base weight is tied to {module_name or 'the model'}.{tensor_name}: "
                                  f"strategy={strategy!r} would change that module's weight too; use strategy='jit' "
                                  "or run unmerged (merge='none')")
    return None


def _storage_address(tensor: torch.Tensor) -> int:
    """The address of ``tensor``'s storage; 0 for a meta or empty tensor, or a subclass without one storage."""
    if tensor.device.type == "meta":
        return 0
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return 0


@contextlib.contextmanager
def merged(model: nn.Module, strategy: str = "full") -> Iterator[nn.Module]:
    """Run every LoRWeB layer with the current analogy's mixture merged into its base weight.

    Every strategy computes the merged weight ``merged_weight`` in fp32 and rounds it once, and restores the
    original weights bit for bit on exit (also on error): nothing is ever subtracted. (``unload_lora_weights`` on a
    model fused with ``fuse_lora`` is the one exit that keeps the merged weights, as diffusers does.) Base layers
    with forward hooks (offloading, layerwise casting) are refused: their weight lives elsewhere or in a storage
    dtype outside their forward.

    Args:
        strategy:
            ``"full"``: on entry every base weight is replaced by its merged weight and the original tensors are
            kept untouched until exit. A denoising step costs what the base model costs. Extra memory: one copy of
            every adapted weight, on the model's device.
            ``"offload"``: layer by layer, the original weight is copied to host memory (pinned when the weight is
            on a GPU) and the merged weight written into the weight's own storage, which is copied back on exit.
            Extra device memory: one layer's merge temporaries; extra host memory: one copy of the adapted weights.
            ``"jit"``: no weight changes. Each layer builds its merged weight inside its forward and frees it
            (``LoRWeBLinear.jit_merged_forward``): extra memory is one layer's merged weight, at the price of one
            (in x N*r x out) product per layer and forward. A batch of different analogies runs with one merged
            weight per sample and a batched matmul.

    ``"full"`` and ``"offload"`` need coefficients for a single analogy (``set_query`` with one query, or identical
    rows); every strategy needs plain (non-quantized) base weights.
    """
    # entering and leaving hold the model's analogy lock (they wait for another thread's running pipeline call);
    # the block itself does not, so the forwards inside may run in any thread
    stack = contextlib.ExitStack()
    with holding_analogy(model):
        try:
            layers = _mergeable_layers(model, strategy)
            if strategy == "full":
                stack.enter_context(_refusing_loads(model, layers))
                stack.enter_context(_merged_full(layers))
            elif strategy == "offload":
                stack.enter_context(_refusing_loads(model, layers))
                stack.enter_context(_merged_offload(layers))
            else:
                stack.enter_context(_merged_jit(layers))
        except BaseException:
            stack.close()
            raise
    exc_info = (None, None, None)
    try:
        yield model
    except BaseException:
        exc_info = sys.exc_info()  # handed to the inner contexts: an error of theirs keeps the block's as context
        raise
    finally:
        _leave_merged(model, stack, exc_info)


def _leave_merged(model: nn.Module, stack: contextlib.ExitStack, exc_info: tuple) -> None:
    """Undo a ``merged`` block (``stack``) holding the model's analogy lock; interrupted while waiting for the lock
    (Ctrl-C), undone without it rather than left merged."""
    lock = holding_analogy(model)
    try:
        lock.__enter__()
    except BaseException:
        stack.__exit__(*exc_info)
        raise
    try:
        stack.__exit__(*exc_info)
    finally:
        lock.__exit__(None, None, None)


@contextlib.contextmanager
def _merged_jit(layers: dict[str, LoRWeBLinear]):
    grad_warning = [False]  # one warning per block, as the other strategies (_refusing_loads)
    try:
        for layer in layers.values():
            layer._merge_jit = True
            layer._merged_grad_warned = grad_warning
        yield
    finally:
        for layer in layers.values():
            layer._merge_jit = False


@contextlib.contextmanager
def _merged_full(layers: dict[str, LoRWeBLinear]):
    merged_weights = {name: merged_weight(layer) for name, layer in layers.items()}  # all or nothing
    originals = {}
    try:
        for name, layer in layers.items():
            weight = layer.base_layer.weight
            originals[name] = weight.data
            weight.data = merged_weights.pop(name)
            layer._merged = True
        yield
    finally:
        _restore_layers(layers, originals, _swap_back)


def _refuse_restore_into_a_replaced_weight(layer: LoRWeBLinear) -> None:
    """The base layer was quantized or replaced while merged (e.g. torchao's ``quantize_`` after ``fuse_lora``): its
    weight now holds the merged values in a form the original cannot be put back into (an assignment to ``.data``
    of a quantized tensor changes nothing), so the restore fails and the layer stays marked merged (unmerged, its
    forward would add the mixture a second time)."""
    if not has_plain_weight(layer.base_layer):
        raise TypeError(f"its base layer {_base_description(layer.base_layer)} was quantized or replaced while "
                        "merged: the original weight cannot be put back; it keeps the merged weight (rebuild the "
                        "model, or quantize it only after unfusing)")


def _swap_back(layer: LoRWeBLinear, original: torch.Tensor) -> None:
    """"full": the original tensor back in place of the merged one. The model may have moved or been cast while
    merged (fuse_lora, then pipe.to(...)): the original goes back where and as the weight is now (bit for bit when
    nothing moved)."""
    _refuse_restore_into_a_replaced_weight(layer)
    weight = layer.base_layer.weight
    if original.device != weight.device or original.dtype != weight.dtype:
        original = original.to(device=weight.device, dtype=weight.dtype)
    weight.data = original


def _copy_back(layer: LoRWeBLinear, host_copy: torch.Tensor) -> None:
    """"offload": the host copy written back into the weight's own storage (copy_ casts and moves)."""
    _refuse_restore_into_a_replaced_weight(layer)
    with torch.no_grad():  # on the tensor, not .data: its version counter moves, so a backward through a forward
        layer.base_layer.weight.copy_(host_copy)  # of the merged block refuses instead of using W alone


def _restore_layers(layers: dict[str, LoRWeBLinear], originals: dict, restore) -> None:
    """On leaving a merge: ``restore(layer, original)`` for every layer that holds one (not those whose merge
    ``unload_lora_weights`` bakes). A layer restored is unmerged; one whose restore fails stays marked merged, since
    its weight still holds the mixture (unmerged, its forward would add the mixture a second time), and the others
    are still restored; then a RuntimeError names the failures. A Ctrl-C (any BaseException but an Exception)
    during a layer's restore does not stop it: that layer is restored again and the others after it, and the
    interrupt is raised at the end (else the layers left would hold the merged weights for good). ``originals`` is
    left holding the failed layers' originals only; the RuntimeError's ``restore_the_rest()`` tries them again
    (``unfuse_lora`` keeps it: a retry, once memory is free, restores them)."""
    failed, interrupt = [], None
    for name, original in list(originals.items()):
        layer = layers[name]
        if not getattr(layer, "_keep_merged_on_exit", False):  # set by unload_lora_weights: bake, not restore
            try:  # a Ctrl-C: this layer once more, then the rest, then the interrupt
                interrupted = finished_through_interrupt(lambda: restore(layer, original))
                interrupt = interrupt or interrupted
            except BaseException as exc:  # the restore failed (its retry too, after a Ctrl-C: its context)
                failed.append(f"{name}: {type(exc).__name__}: {exc}")
                ctrl_c = exc if not isinstance(exc, Exception) else exc.__context__
                if ctrl_c is not None and not isinstance(ctrl_c, Exception):
                    interrupt = interrupt or ctrl_c
                continue
        layer._merged = False
        del originals[name]
    if interrupt is not None and not failed:
        raise interrupt
    if failed:
        error = RuntimeError(f"could not restore the original weights of {len(failed)} layers: they keep the merged "
                             "weights and stay marked merged (set_query and loads into them are refused; after "
                             "fuse_lora, unfuse_lora() again retries them, else reload the model): "
                             f"{failed[:3]}{' ...' if len(failed) > 3 else ''}")
        error.restore_the_rest = functools.partial(_restore_layers, layers, originals, restore)
        raise error from interrupt


class _RefuseLoad:
    """The load_state_dict pre-hook of a merged model: it runs before the called module loads anything, so the model
    stays untouched. It also refuses to be copied (``lora_api.refuse_copy_of_merged_model``)."""

    def __call__(self, *args, **kwargs):
        raise RuntimeError("load_state_dict inside a merged() block (or on a fuse_lora()'d model): the merged "
                           "weights would be overwritten or silently stay in use; exit the merged() block (or "
                           "unfuse_lora()) first")

    __deepcopy__ = __copy__ = __reduce_ex__ = __reduce__ = lora_api.refuse_copy_of_merged_model


@contextlib.contextmanager
def _refusing_loads(model: nn.Module, layers: dict[str, LoRWeBLinear]):
    """While the weights hold a merged mixture: ``load_state_dict`` on ``model`` is refused before anything loads,
    and a backward warns once for the whole block that the LoRWeB parameters get no gradient."""
    grad_warning = [False]
    for layer in layers.values():
        layer._merged_grad_warned = grad_warning

    refuse_load = _RefuseLoad()
    # on the model and every module above a merged layer (and the layers): whichever of them load_state_dict is
    # called on refuses before its own first tensor loads
    holders = {id(model): model}
    for name in layers:
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            module = model.get_submodule(".".join(parts[:depth]))
            holders.setdefault(id(module), module)
    hooks = [module.register_load_state_dict_pre_hook(refuse_load) for module in holders.values()]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


@contextlib.contextmanager
def _merged_offload(layers: dict[str, LoRWeBLinear]):
    host = {}
    try:
        for name, layer in layers.items():
            weight = layer.base_layer.weight
            new = merged_weight(layer)
            copy = torch.empty(weight.shape, dtype=weight.dtype, device="cpu", pin_memory=weight.is_cuda)
            copy.copy_(weight.detach())
            host[name] = copy
            with torch.no_grad():  # on the tensor (see _copy_back): autograd sees the weight change
                weight.copy_(new)
            del new
            layer._merged = True
        yield
    finally:
        _restore_layers(layers, host, _copy_back)


def adapted_weight_bytes(model: nn.Module) -> int:
    """Bytes of the base weights wrapped by LoRWeB layers: the extra memory of ``merged(strategy="full")``."""
    return sum(layer.base_layer.weight.numel() * layer.base_layer.weight.element_size()
               for layer in lorweb_layers(model).values() if has_plain_weight(layer.base_layer))


def free_memory_bytes(device: torch.device) -> int:
    """Free memory of ``device``: ``torch.cuda.mem_get_info`` on CUDA, available host memory (psutil) on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        import psutil

        return int(psutil.virtual_memory().available)
    raise ValueError(f"cannot read the free memory of a {device.type} device; pass merge= explicitly")


def choose_merge_strategy(model: nn.Module, *, free_bytes: Optional[int] = None,
                          host_free_bytes: Optional[int] = None, headroom: float = 0.25) -> str:
    """The merge strategy for one analogy, from the free memory.

    "full" when one copy of the adapted weights fits in the free memory of the weights' device with ``headroom``
    (a fraction of the free memory) left for activations; else "offload" when the weights are on a GPU and the copy
    fits in free host memory; else "jit" (also when the base weights cannot take an in-place merge:
    ``in_place_merge_problem``). ``free_bytes`` / ``host_free_bytes`` override the measured values. A model
    with a layer no strategy merges (a quantized base, or one with offload or casting hooks) is refused with the
    ``TypeError`` ``merged`` would raise: run it unmerged.
    """
    layers = lorweb_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRWeB layers")
    for name, layer in layers.items():
        why = _unmergeable_base(layer.base_layer)
        if why:
            raise TypeError(f"no merge strategy for {type(model).__name__}: the base layer of {name} {why}, which "
                            "no strategy merges into; run it unmerged")
    need = adapted_weight_bytes(model)
    device = next(iter(layers.values())).base_layer.weight.device
    free = free_memory_bytes(device) if free_bytes is None else int(free_bytes)
    if need <= (1.0 - headroom) * free and in_place_merge_problem(model, layers, "full") is None:
        return "full"
    if device.type == "cuda" and in_place_merge_problem(model, layers, "offload") is None:
        host = free_memory_bytes(torch.device("cpu")) if host_free_bytes is None else int(host_free_bytes)
        if need <= (1.0 - headroom) * host:
            return "offload"
    return "jit"  # (also for parametrized or tied base weights: in_place_merge_problem)


# -------------------------------------------------------------------------------------------- analogy encoder
def _official_training_levels() -> list:
    """The 8-bit level at which each level k of a training control grid reaches the official image processor.

    The official trainer hands the processor floats: SDTrainer.py ``before_unet_predict`` passes
    ``control_tensor / 2 + 0.5`` with ``do_rescale=False``, where the control tensor is the grid through
    ``ToTensor`` (k / 255 in float32) and ``RescaleTransform`` (``x * 2 - 1``; toolkit/data_loader.py). The slow
    CLIP and SigLIP2 processors resize through PIL, converting floats in [0, 1] to 8 bits by ``x * 255`` (float64,
    stored as float32) and ``astype(uint8)`` (transformers ``image_transforms.to_pil_image`` / ``rescale``), which
    truncates: for k = 1..63 the float32 round trip lands just below k / 255, so those levels arrive as k - 1."""
    import numpy as np

    x = torch.arange(256, dtype=torch.uint8).float().div(255)  # ToTensor
    x = (x * 2 - 1) / 2 + 0.5  # RescaleTransform, then before_unet_predict
    return (x.numpy().astype(np.float64) * 255).astype(np.float32).astype(np.uint8).tolist()


#: ``_official_training_levels()``: a 256-entry table for ``PIL.Image.point`` (per channel).
OFFICIAL_TRAINING_LEVELS = _official_training_levels()


def exception_first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type's name when it has none (a loader's multi-line error)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_complete_pretrained(cls, model: Union[str, Path], dtype: torch.dtype):
    """``cls.from_pretrained(model, dtype=dtype)``; ValueError naming the weights the checkpoint lacks, which
    transformers would initialise at random and only log (e.g. a CLIPVisionModel folder, which has no
    ``visual_projection``, loaded as CLIPVisionModelWithProjection)."""
    loaded, info = cls.from_pretrained(model, dtype=dtype, output_loading_info=True)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ValueError(f"{model} lacks {len(missing)} weight(s) of a {cls.__name__} ({', '.join(missing[:3])}"
                         f"{', ...' if len(missing) > 3 else ''}); loading it would fill them with random values")
    return loaded


def _official_processor(kind: str, model: Union[str, Path], image_size: Optional[int] = None):
    """The image processor the official code uses: the slow (PIL) ``CLIPImageProcessor`` with size and crop at the
    encoder's image size, or the NaFlex ``Siglip2ImageProcessor``. transformers >= 5 names the slow classes
    ``*ImageProcessorPil`` and would otherwise pick the torchvision ("fast") one."""
    import transformers

    name = {"clip": "CLIPImageProcessor", "siglip2": "Siglip2ImageProcessor"}[kind]
    cls = getattr(transformers, name + "Pil", None) or getattr(transformers, name)
    if kind == "clip":
        return cls.from_pretrained(model, size=image_size, crop_size=image_size)
    return cls.from_pretrained(model)


#: ``query_from_grid`` crops: the official inference (PIL) and training (tensor) paths, and the grid's own cells
QUERY_CROPS = ("inference", "training", "cells")
#: query modes that encode the grid with its bottom-right cell zeroed
ZEROED_QUERY_MODES = ("caa'b", "paa'b", "paa'b3")


def query_crop_problem(width: int, height: int, query_mode: str, crops: str = "inference") -> Optional[str]:
    """Why a ``width`` x ``height`` control grid has nothing to cut for the crops of ``query_mode``, or None.

    ``crops="inference"`` (side s = W // 2, PIL crops padded past the edge): the modes that crop b need a bottom
    row, H > s (the modes that zero the bottom-right cell encode the whole grid when it has none: the official
    ``paste(0, (s, s, W, H))`` then paints nothing). ``crops="training"`` (side s = H // 2, tensor slices): the
    modes that crop a' need W > s. ``crops="cells"``: any grid of at least 2 x 2 pixels."""
    if crops == "cells":
        return None if width >= 2 and height >= 2 else f"a {width}x{height} grid has no 2x2 cells"
    if crops == "inference":
        s = width // 2
        cuts_bottom = query_mode == "ca'-ca+cb" or query_mode.startswith("cat-")
        if s < 1 or (cuts_bottom and height - s < 1):
            return (f"a {width}x{height} grid is too wide for the official crops of query mode {query_mode!r}: the "
                    f"bottom row (0, {s}, {width}, {height}) is empty (the grid's height must exceed half its width)")
        return None
    s = height // 2
    cuts_a_prime = query_mode not in ("aa'bb'", "caa'bb'", "caa'", *ZEROED_QUERY_MODES)
    if s < 1 or (cuts_a_prime and width - s < 1):
        return (f"a {width}x{height} grid is too tall for the official training crops: a' = [:{s}, {s}:{width}] is "
                "empty (the grid's width must exceed half its height)")
    return None


def _check_three_layer_depth(name: str, query_mode: str, layers: int) -> None:
    """The "...3" query modes read the vision model's hidden states -16, -8 and -1: at least 16 layers."""
    if layers < 16:
        raise ValueError(f"query mode {query_mode!r} uses the hidden states -16, -8 and -1 of the vision model; the "
                         f"analogy encoder {name!r} has only {layers} layers")


class AnalogyEncoder:
    """Frozen image encoder turning analogies into LoRWeB queries, the official way by default.

    ``query_from_grid(grids)`` computes the query from the control grid [a a'; b b] as the official
    ``get_external_query`` (extensions_built_in/flux_kontext.py) in ``query_mode`` (``official_config.QUERY_MODES``;
    default "cat-aa'b": concat(embed(a), embed(a'), embed(b)) of the crops of side W/2 at inference, H/2 in training,
    as the official code). ``model`` is a hub id or a
    local directory holding a CLIP checkpoint (``CLIPVisionModelWithProjection``, the unnormalized
    ``image_embeds``, slow ``CLIPImageProcessor`` at the model's image size) or a SigLIP2 NaFlex checkpoint
    (``Siglip2VisionModel`` with the NaFlex ``Siglip2ImageProcessor``, ``pooler_output``). SigLIP-format checkpoints
    (SigLIP v1, and the SigLIP2 FixRes ones such as the official id google/siglip2-base-patch16-224, which the
    official code loads into ``Siglip2VisionModel`` with randomly re-initialised mismatched weights) load as stored:
    the vision tower's ``pooler_output``.

    ``query_source="images"`` (not official: lorweb_fast's first behaviour) makes ``query(...)`` encode the original
    a, a', b files instead, each through the processor: concat of three embeddings, as "cat-aa'b".
    """

    @holding(_locks.LOADING)  # model loads are serialized per process (see _locks)
    def __init__(self, model: Union[str, Path] = DEFAULT_ENCODER, *, device=None,
                 dtype: torch.dtype = torch.float32, query_mode: str = "cat-aa'b", pooling_type: str = "avg",
                 query_source: str = "grid"):
        """Load ``model`` frozen (eval mode, no grad) on ``device`` (default CPU) in ``dtype``; ``query_mode``,
        ``pooling_type`` and ``query_source`` are checked here (ValueError) and used by ``query`` /
        ``query_from_grid``."""
        from transformers import AutoConfig

        from .official_config import PATCH_QUERY_MODES, QUERY_SOURCES, check_query_settings

        check_query_settings(query_mode, pooling_type)
        if query_source not in QUERY_SOURCES:
            raise ValueError(f"query_source must be one of {QUERY_SOURCES}, got {query_source!r}")
        if query_source == "images" and query_mode != "cat-aa'b":
            raise ValueError(f"query_source='images' encodes a, a', b separately (like \"cat-aa'b\"); it cannot "
                             f"be combined with query_mode={query_mode!r}")
        self.name = str(model)
        #: how a saved checkpoint records this encoder: a local folder by its absolute path (usable from any working
        #: directory), a hub id as given
        self.location = recorded_location(model)
        if isinstance(model, Path) or str(model).startswith(("/", ".", os.sep)):
            if not Path(model).is_dir():  # a local folder, not a hub id: named, not the hub's error
                raise FileNotFoundError(f"analogy encoder folder not found: {model}")
        try:
            config = AutoConfig.from_pretrained(model)
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"cannot load the analogy encoder {self.name!r} (a CLIP or SigLIP2 checkpoint: hub id or "
                             f"folder): {exc}") from exc
        model_type = config.model_type
        if not model_type.startswith(("clip", "siglip")):
            raise ValueError(f"unsupported analogy encoder {self.name!r} (model_type {model_type!r}): use a CLIP or "
                             "SigLIP2 checkpoint")
        if model_type.endswith("_text_model"):  # e.g. a FLUX pipeline's text_encoder/ folder
            raise ValueError(f"the analogy encoder {self.name!r} is a text model (model_type {model_type!r}); the "
                             "analogy encoder encodes images: give a CLIP or SigLIP2 checkpoint with its vision "
                             "model (e.g. openai/clip-vit-large-patch14)")
        if query_mode in PATCH_QUERY_MODES and not model_type.startswith("clip"):
            raise ValueError(f"query_mode={query_mode!r} uses CLIP patch tokens; the official code has no patch "
                             f"queries for {model_type} ({self.name})")
        layers = getattr(getattr(config, "vision_config", config), "num_hidden_layers", None)
        if query_mode.endswith("3") and layers is not None:
            _check_three_layer_depth(self.name, query_mode, layers)
        try:
            if model_type.startswith("clip"):
                from transformers import CLIPVisionModelWithProjection

                vision = load_complete_pretrained(CLIPVisionModelWithProjection, model, dtype)
                self.processor = _official_processor("clip", model, int(vision.config.image_size))
                self.embed_dim = int(vision.config.projection_dim)
                self.kind = "clip"
            elif model_type.startswith("siglip2"):
                from transformers import Siglip2VisionModel

                vision = load_complete_pretrained(Siglip2VisionModel, model, dtype)
                self.processor = _official_processor("siglip2", model)
                self.embed_dim = int(vision.config.hidden_size)
                self.kind = "siglip2"
            else:  # siglip v1 (full model or vision tower): not an official encoder
                from transformers import AutoImageProcessor, AutoModel

                vision = load_complete_pretrained(AutoModel, model, dtype)
                vision = getattr(vision, "vision_model", vision)
                self.processor = AutoImageProcessor.from_pretrained(model)
                self.embed_dim = int(vision.config.hidden_size)
                self.kind = "siglip"
        except (OSError, RuntimeError, ValueError, KeyError) as exc:  # missing or mismatched weights, processor
            raise ValueError(f"cannot load the analogy encoder {self.name!r} ({model_type}): "
                             f"{exception_first_line(exc)}") from exc
        self.model_type = model_type
        self.query_mode, self.pooling_type, self.query_source = query_mode, pooling_type, query_source
        self.model = vision.eval().requires_grad_(False)
        if device is not None:
            self.model.to(device)

    # ----------------------------------------------------------------------------------------------- sizes
    def __repr__(self) -> str:
        """The model, its kind, query settings, width, device and dtype, on one line."""
        from .official_config import PATCH_QUERY_MODES

        pooling = f", pooling_type={self.pooling_type!r}" if self.query_mode in PATCH_QUERY_MODES else ""
        weight = next(self.model.parameters(), None)
        where = "" if weight is None else f", device={weight.device}, dtype={weight.dtype}"
        return (f"AnalogyEncoder({self.name!r}, kind={self.kind!r}, query_mode={self.query_mode!r}{pooling}, "
                f"query_source={self.query_source!r}, query_dim={self.query_dim}{where})")

    @property
    def hidden_size(self) -> int:
        """Width of the vision tower's tokens (the patch modes' features)."""
        return int(self.model.config.hidden_size)

    def query_dim_for(self, query_mode: Optional[str] = None) -> int:
        """Query features of ``query_mode`` with this encoder (jobs/process/BaseSDTrainProcess.py: projection_dim,
        or hidden_size for the patch modes; times 3 for the "cat-" modes, toolkit/models/AttLoRA.py)."""
        from .official_config import PATCH_QUERY_MODES, check_query_settings

        mode = query_mode or self.query_mode
        check_query_settings(mode)
        per_image = self.hidden_size if mode in PATCH_QUERY_MODES else self.embed_dim
        return 3 * per_image if mode.startswith("cat-") else per_image

    @property
    def query_dim(self) -> int:
        """Features of this encoder's queries, (B, query_dim), in its ``query_mode``."""
        return self.query_dim_for(self.query_mode)

    # --------------------------------------------------------------------------------------------- encoding
    def _inputs(self, images) -> dict:
        inputs = self.processor(images=list(images), return_tensors="pt")
        param = next(self.model.parameters())
        return {k: (v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device))
                for k, v in inputs.items()}

    @torch.no_grad()
    def embed(self, images) -> torch.Tensor:
        """(B, embed_dim) fp32 global embeddings of a list of PIL images (official ``encode_image`` without a
        query mode: CLIP ``image_embeds``, SigLIP2 ``pooler_output``)."""
        out = self.model(**self._inputs(images))
        emb = out.image_embeds if self.kind == "clip" else out.pooler_output
        return emb.float()

    @torch.no_grad()
    def patch_tokens(self, images, *, three_layers: bool = False) -> torch.Tensor:
        """(B, T, hidden) fp32 CLIP tokens (class + patches) of the last encoder layer before the final layer norm,
        or with ``three_layers`` the hidden states -16, -8 and -1 concatenated along the tokens, (B, 3T, hidden)
        (official ``encode_image`` with a "p" query mode)."""
        if self.kind != "clip":
            raise ValueError(f"patch tokens need a CLIP encoder, {self.name} is {self.model_type}")
        pixels = self._inputs(images)["pixel_values"]
        states = self.model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states
        if three_layers:
            _check_three_layer_depth(self.name, self.query_mode, len(states) - 1)
            return torch.cat([states[-16], states[-8], states[-1]], dim=1).float()
        return states[-1].float()

    def _pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.mean(dim=1) if self.pooling_type == "avg" else tokens.amax(dim=1)

    def _encode(self, images, mode: str) -> torch.Tensor:
        """(B, D) per image: the global embedding, or the pooled patch tokens in a patch mode."""
        from .official_config import PATCH_QUERY_MODES

        if mode in PATCH_QUERY_MODES:
            return self._pool(self.patch_tokens(images, three_layers=mode.endswith("3")))
        return self.embed(images)

    @torch.no_grad()
    def query_from_grid(self, grids, query_mode: Optional[str] = None, *, crops: str = "inference") -> torch.Tensor:
        """(B, query_dim) queries from B control grids [a a'; b b] (PIL images or paths), as the official
        ``get_external_query``.

        ``crops="inference"`` (the PIL path of inference.py): with ``s = W // 2``, a = crop (0, 0, s, s),
        a' = (s, 0, W, s), b = (0, s, s, H) (squares of side W/2 even when the cells are not; PIL pads crops past the
        edge with black, as the official PIL path); "aa'bb'"/"caa'bb'" the whole grid; "caa'b"/"paa'b*" the grid
        with (s, s, W, H) black; "caa'" the top band (0, 0, W, s); "ca'-ca" a' - a; "ca'-ca+cb" a' - a + b;
        "cat-*" concat(a, a', b).

        ``crops="training"`` (the tensor path of SDTrainer.py ``before_unet_predict``, which passes the batch's
        (B, 3, H, W) control tensor): the same boxes with ``s = H // 2`` (the tensor's ``shape[2]``), cut as tensor
        slices, so boxes stop at the grid's edge instead of being padded: a = [:s, :s], a' = [:s, s:],
        b = [s:, :s], the zeroed region [s:, s:], "caa'" = [:s, :]. For square cells both paths give the same crops.
        The grid's 8-bit levels are first mapped through ``OFFICIAL_TRAINING_LEVELS`` (levels 1..63 arrive one
        lower through the official float round trip, see there). Not reproduced: a crop holding only pure black and
        pure white pixels, which the official processor takes for 0..255 values (it then resizes it at levels 0/1).

        ``crops="cells"`` (not official; the native resolution, whose cells are not square when b is not): the
        boxes of the grid's own cells, split at (W // 2, H // 2): a = (0, 0, W/2, H/2), a' = (W/2, 0, W, H/2),
        b = (0, H/2, W/2, H), the zeroed region (W/2, H/2, W, H), "caa'" = (0, 0, W, H/2). Square cells give the
        official crops.

        Patch modes (p...) pool the CLIP tokens with ``pooling_type`` to the official query_dim (hidden_size, x3
        for "cat-"); the official code reshapes the tokens to one long vector there instead, which does not fit its
        own ``att_lora_to_q`` (in_features = hidden_size): pooling is lorweb_fast's reading.
        """
        from PIL import Image

        if crops not in QUERY_CROPS:
            raise ValueError(f"crops must be one of {QUERY_CROPS}, got {crops!r}")
        mode = query_mode or self.query_mode
        grids = [load_image(g) for g in _as_list(grids)]
        if not grids:
            raise ValueError("query_from_grid needs at least one grid")
        if crops == "training":  # the 8-bit levels the official tensor path hands to the image processor
            grids = [grid.point(OFFICIAL_TRAINING_LEVELS * 3) for grid in grids]
        sizes = []  # (w, h, s): s is the cell side of the official crops
        for grid in grids:
            w, h = grid.size
            problem = query_crop_problem(w, h, mode, crops)
            if problem:
                raise ValueError(problem)
            # (x, y) of the split: squares of side s on the official paths, the cell corner for "cells"
            sizes.append((w, h) + {"inference": (w // 2,) * 2, "training": (h // 2,) * 2,
                                   "cells": (w // 2, h // 2)}[crops])

        def clip_box(box, w, h):  # tensor slices stop at the edge; PIL crops pad with black
            return box if crops == "inference" else (box[0], box[1], min(box[2], w), min(box[3], h))

        def cut(box):  # only the crops the mode needs (this runs on every training step)
            return [grid.crop(clip_box(box(w, h, x, y), w, h)) for grid, (w, h, x, y) in zip(grids, sizes)]

        if mode in ("aa'bb'", "caa'bb'"):
            return self._encode(grids, mode)
        if mode in ZEROED_QUERY_MODES:  # the grid with b' zeroed
            zeroed = []
            for grid, (w, h, x, y) in zip(grids, sizes):
                z = grid.copy()
                if w > x and h > y:  # a grid without a bottom row: nothing to zero (the official paste paints none)
                    z.paste(Image.new("RGB", (w - x, h - y)), (x, y))
                zeroed.append(z)
            return self._encode(zeroed, mode)
        if mode == "caa'":
            return self._encode(cut(lambda w, h, x, y: (0, 0, w, y)), mode)
        ea = self._encode(cut(lambda w, h, x, y: (0, 0, x, y)), mode)
        ea2 = self._encode(cut(lambda w, h, x, y: (x, 0, w, y)), mode)
        # the differences in the encoder's dtype, rounded after each operation as the official code computes them on
        # its (bf16) embeddings (get_external_query); then fp32 like every query
        dtype = next(self.model.parameters()).dtype
        if mode == "ca'-ca":
            return (ea2.to(dtype) - ea.to(dtype)).float()
        eb = self._encode(cut(lambda w, h, x, y: (0, y, x, h)), mode)
        if mode == "ca'-ca+cb":
            return (ea2.to(dtype) - ea.to(dtype) + eb.to(dtype)).float()
        return torch.cat([ea, ea2, eb], dim=1)  # cat-aa'b, cat-paa'b, cat-paa'b3

    def query(self, grids=None, a=None, a_prime=None, b=None, *, crops: str = "inference") -> torch.Tensor:
        """(B, query_dim) by ``query_source``: from the control ``grids`` ("grid", official; ``crops`` as in
        ``query_from_grid``) or from the original ``a``, ``a_prime``, ``b`` images ("images")."""
        if self.query_source == "grid":
            if grids is None:
                raise ValueError("query_source='grid' needs the control grids")
            return self.query_from_grid(grids, crops=crops)
        if a is None or a_prime is None or b is None:
            raise ValueError("query_source='images' needs a, a_prime and b")
        return self(a, a_prime, b)

    def __call__(self, a, a_prime, b) -> torch.Tensor:
        """Queries (B, 3 * embed_dim) from the original images (``query_source="images"``, not official); each
        argument is an image or a list of B images."""
        groups = [x if isinstance(x, (list, tuple)) else [x] for x in (a, a_prime, b)]
        if len({len(g) for g in groups}) != 1:
            raise ValueError(f"a, a_prime and b must hold the same number of images, got {[len(g) for g in groups]}")
        return torch.cat([self.embed(g) for g in groups], dim=1)


def grid_cells(grid):
    """(a, a', b) cut from a 2x2 analogy grid (top-left, top-right, bottom-left cells)."""
    w, h = grid.size
    cw, ch = w // 2, h // 2
    return grid.crop((0, 0, cw, ch)), grid.crop((cw, 0, 2 * cw, ch)), grid.crop((0, ch, cw, 2 * ch))


# ----------------------------------------------------------------------------------------------- pipeline
def _as_list(x, n: Optional[int] = None) -> list:
    items = list(x) if isinstance(x, (list, tuple)) else [x]
    if n is not None and len(items) == 1 and n > 1:
        items = items * n
    return items


@holding(_locks.LOADING)
def load_kontext_pipeline(model: Union[str, Path], dtype: Optional[torch.dtype] = None):
    """``FluxKontextPipeline.from_pretrained`` (hub id or local directory) in ``dtype`` (None: float32, whatever
    torch's default dtype, which diffusers would follow), passed as ``dtype=``: every diffusers we admit (0.40 on)
    takes it and warns that ``torch_dtype=`` is deprecated."""
    (FluxKontextPipeline,) = diffusers_classes("FluxKontextPipeline")  # a broken package it imports: one line
    dtype = torch.float32 if dtype is None else dtype
    return base_model_loaded(model, lambda: FluxKontextPipeline.from_pretrained(model, dtype=dtype))


def base_model_loaded(model: Union[str, Path], load):
    """``load()``, with the OSError diffusers raises for a base model it cannot fetch or read (offline, the gated
    official repo without a token, a mistyped id, an incomplete folder) turned into a ValueError that names the model
    and what to do (the command line prints it as one line)."""
    index = Path(str(model)) / "model_index.json"
    if index.is_file():  # a broken index fails inside diffusers with a KeyError or a JSON traceback
        try:
            components = loads_json(index.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load the FLUX.1-Kontext model {str(model)!r}: {index} is not valid JSON "
                             f"({exc})") from None
        if not isinstance(components, dict) or "_class_name" not in components:
            raise ValueError(f"cannot load the FLUX.1-Kontext model {str(model)!r}: {index} names no pipeline class "
                             "(_class_name); is it a diffusers pipeline folder?")
    try:
        return load()
    except OSError as exc:
        raise ValueError(f"cannot load the FLUX.1-Kontext model {str(model)!r} (a diffusers folder or Hugging Face "
                         "Hub id; the official black-forest-labs/FLUX.1-Kontext-dev is gated: accept its license "
                         "and log in with `hf auth login`, or pass a local copy with --model): "
                         f"{exc}") from exc


RESOLUTIONS = ("official", "native")
DEFAULT_SEED = 50
#: the keyword options of LoRWeBKontextPipeline.from_pretrained beyond its named parameters (others are refused)
FROM_PRETRAINED_OPTIONS = ("resolution", "max_area", "max_size", "long_edge", "weight_name", "weights_hub_options",
                           "torch_dtype")
#: official resolution: the pipeline generates about this many pixels (FluxKontextPipeline's max_area default)
DEFAULT_MAX_AREA = 1024 ** 2
#: native resolution: the control grid's long-edge cap
DEFAULT_LONG_EDGE = 1024


def _query_width_error(encoder: "AnalogyEncoder", expected: str) -> ValueError:
    """The error for an analogy encoder whose query width is not the ``expected`` one (the layers' or a file's)."""
    mode = encoder.query_mode if encoder.query_source == "grid" else "query_source='images'"
    return ValueError(f"the analogy encoder {encoder.name!r} gives queries of {encoder.query_dim} features in query "
                      f"mode {mode}, but {expected}: the checkpoint was trained with another query mode or encoder")


def _check_resolution_options(resolution: str, *, long_edge=None, max_area=None, max_size=None) -> None:
    """The resolution options' values, and an option of the other resolution mode refused instead of ignored:
    ``long_edge`` is the native mode's cap, ``max_area`` and ``max_size`` are the official mode's."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution!r}")
    if long_edge is not None:
        check_int("long_edge", long_edge, lo=MIN_LONG_EDGE)
    if max_area is not None:
        check_int("max_area", max_area, lo=MIN_MAX_AREA)
    if max_size is not None:
        check_int("max_size", max_size, lo=MIN_LONG_EDGE)
    if resolution == "official" and long_edge is not None:
        raise ValueError("long_edge applies to resolution='native'; the official resolution is set by max_area "
                         "(and max_size)")
    if resolution == "native":
        given = [name for name, value in (("max_area", max_area), ("max_size", max_size)) if value is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} apply to resolution='official'; the native resolution is "
                             "capped by long_edge")


class _instance_call_only:
    """A method that, looked up on the class and called (whatever its arguments), raises TypeError(``message``)
    instead of Python's "missing 'self'" error or a wrong ``self``; on an instance, the method itself."""

    def __init__(self, message: str):
        self.message = message

    def __call__(self, function):
        self.function = function
        functools.update_wrapper(self, function)
        return self

    def __get__(self, instance, owner=None):
        if instance is not None:
            return self.function.__get__(instance, owner)
        message = self.message

        @functools.wraps(self.function)
        def refused(*args, **kwargs):
            raise TypeError(message)
        return refused


class LoRWeBKontextPipeline:
    """Visual analogies with a stock diffusers ``FluxKontextPipeline`` whose transformer carries LoRWeB layers.

    ``pipe(a, a_prime, b, prompt)`` builds each control grid [a a'; b b], computes the analogy queries with the
    encoder (``AnalogyEncoder.query_from_grid`` on the grids, the official query) and calls ``set_query`` once per
    generation (all denoising steps reuse the coefficients), runs the stock pipeline on the batch of grids, and
    returns the b' images (the generated grids' bottom-right quarters). A batch of different analogies runs in one
    call with per-sample coefficients. Batch-1 generation runs inside ``merged()`` when every base weight is a plain
    tensor (``merge="auto"``).

    ``resolution="official"`` (default, as inference.py): the grid has every cell at a's size (``max_size`` caps
    its long edge like the official ``-m``), the pipeline generates at about ``max_area`` pixels with the grid's
    aspect ratio (sides multiples of 16) and snaps the control image to the nearest preferred Kontext resolution
    (``_auto_resize=True``). ``resolution="native"`` (lorweb_fast's first behaviour): cells at b's aspect ratio,
    the grid's long edge capped at ``long_edge`` (1024), sides multiples of 16, generated at the grid's own size,
    never upscaled. An option of the other mode (``long_edge`` with "official"; ``max_area`` / ``max_size`` with
    "native") raises instead of being ignored, here and in the call.

    Attributes: ``pipe`` (the FluxKontextPipeline), ``encoder`` (AnalogyEncoder), ``transformer``.
    """

    def __init__(self, pipe, encoder: AnalogyEncoder, *, resolution: str = "official",
                 max_area: Optional[int] = None, max_size: Optional[int] = None, long_edge: Optional[int] = None):
        """Wrap ``pipe`` (its transformer must hold LoRWeB layers whose query_dim is ``encoder.query_dim``);
        the resolution options as in the class docstring (ValueError for one of the other mode)."""
        layers = lorweb_layers(pipe.transformer)
        if not layers:
            raise ValueError("the pipeline's transformer has no LoRWeB layers: load weights with "
                             "load_lorweb_weights (or LoRWeBKontextPipeline.from_pretrained)")
        _check_resolution_options(resolution, long_edge=long_edge, max_area=max_area, max_size=max_size)
        if resolution == "official":
            max_area = DEFAULT_MAX_AREA if max_area is None else max_area
        else:
            long_edge = DEFAULT_LONG_EDGE if long_edge is None else long_edge
        query_dims = {layer.query_dim for layer in layers.values()}
        if query_dims != {encoder.query_dim}:
            raise _query_width_error(encoder, f"the LoRWeB layers expect query_dim {sorted(query_dims)}")
        self.pipe, self.encoder = pipe, encoder
        self.resolution, self.max_area, self.max_size, self.long_edge = resolution, max_area, max_size, long_edge
        self._disabled_scale: Optional[float] = None  # the strength to restore after disable_lora
        self._fuse_scales: Optional[tuple] = None  # (strength before fuse_lora, strength it set), see unfuse_lora
        self._adapter_name = DEFAULT_ADAPTER_NAME  # diffusers' adapter name (load_lora_weights(adapter_name=...))
        self._base_model_location: Optional[str] = None  # set by from_pretrained (see _base_model_name)

    def __repr__(self) -> str:
        """The adapter (name, layer count, N, r, strength, fused state), the resolution, the encoder and the inner
        pipeline's class: one line (the stock pipeline's components: ``pipe.pipe``)."""
        layers = list(lorweb_layers(self.transformer).values())
        if not layers:
            adapter = "no adapter (unloaded)"
        else:
            sizes = sorted({(layer.num_loras, layer.rank) for layer in layers})
            shape = ", ".join(f"N={n}, r={r}" for n, r in sizes)
            strengths = sorted({layer._lorweb_scale for layer in layers})
            fused = lora_api.fused_strategy(self.transformer)
            adapter = (f"adapter={self._adapter_name!r} ({len(layers)} layers, {shape}, strength="
                       f"{strengths[0] if len(strengths) == 1 else strengths}"
                       f"{', disabled' if self._disabled_scale is not None else ''}"
                       f"{'' if fused is None else f', fused={fused!r}'})")
        size = (f"max_area={self.max_area}" + (f", max_size={self.max_size}" if self.max_size else "")
                if self.resolution == "official" else f"long_edge={self.long_edge}")
        return (f"LoRWeBKontextPipeline({adapter}, resolution={self.resolution!r} ({size}), encoder={self.encoder!r}, "
                f"pipe={type(self.pipe).__name__})")

    @property
    def transformer(self) -> nn.Module:
        """The inner pipeline's transformer, which holds the LoRWeB layers."""
        return self.pipe.transformer

    @classmethod
    @holding(_locks.LOADING)
    def from_pretrained(cls, model: Union[str, Path], weights: Union[str, Path], *,
                        encoder: Union[str, Path, None] = None, config: Union[str, Path, None] = None,
                        query_mode: Optional[str] = None, pooling_type: Optional[str] = None,
                        query_source: Optional[str] = None, dtype: Optional[torch.dtype] = None, device=None,
                        encoder_dtype: Optional[torch.dtype] = None, **options) -> "LoRWeBKontextPipeline":
        """Load a FluxKontextPipeline (hub id or local directory), a LoRWeB checkpoint and its analogy encoder.

        ``weights`` is a safetensors file, a folder (``official_config.find_checkpoint``: the final or newest
        complete checkpoint, with its config.yaml) or a Hugging Face Hub repo id such as the released
        "hilamanor/lorweb" (``lora_api.resolve_checkpoint``; ``weight_name`` picks the file, and
        ``weights_hub_options`` = {revision, subfolder, cache_dir, local_files_only, token, force_download} reach the
        download of the weights only, not of ``model`` or the encoder). The encoder, query mode and pooling come
        from ``encoder`` /
        ``query_mode`` / ``pooling_type`` when given, else the official ``config.yaml`` (``config`` or the one
        beside the weights), else the checkpoint's metadata, else the official defaults; sources that disagree
        raise; an ``encoder`` of another family (CLIP, SigLIP) than the one the checkpoint records is refused. The
        checkpoint is validated before anything is loaded into the transformer. The encoder runs in
        ``encoder_dtype``, by default the transformer's dtype (official inference.py: both in bfloat16). ``options``:
        ``resolution``, ``max_area``, ``max_size``, ``long_edge`` (see the class); ``torch_dtype`` is accepted as
        diffusers' name for ``dtype``. Unknown options and bad values are refused before anything loads.
        """
        if "torch_dtype" in options:
            torch_dtype = options.pop("torch_dtype")
            if dtype is not None and torch_dtype != dtype:
                raise ValueError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree; pass one of them")
            dtype = torch_dtype
        weight_name = options.pop("weight_name", None)
        hub = dict(options.pop("weights_hub_options", None) or {})
        unknown = sorted(set(options) - set(FROM_PRETRAINED_OPTIONS))
        if unknown:
            raise TypeError(f"LoRWeBKontextPipeline.from_pretrained got unexpected options {unknown}; the options "
                            f"are {', '.join(FROM_PRETRAINED_OPTIONS)} "
                            "(FluxKontextPipeline arguments go to the call, pipe(..., **kwargs))")
        _check_resolution_options(options.get("resolution", "official"), long_edge=options.get("long_edge"),
                                  max_area=options.get("max_area"), max_size=options.get("max_size"))
        for name, value in (("dtype", dtype), ("encoder_dtype", encoder_dtype)):
            if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
                raise TypeError(f"{name} must be a floating point torch.dtype, got {value!r}")
        if device is not None:
            check_device("device", device)  # e.g. cuda without a GPU: before any model loads
        weights, found_config = lora_api.resolve_checkpoint(weights, weight_name, **hub)
        config = config if config is not None else found_config
        explicit = {"encoder": None if encoder is None else str(encoder), "query_mode": query_mode,
                    "pooling_type": pooling_type}
        settings = resolve_checkpoint_settings(weights, config, explicit)  # fails before any model loads
        query_source = resolve_query_source(weights, query_source)
        # the encoder (far smaller than the transformer) first: its query width is checked against the checkpoint
        # before the pipeline loads; it runs in the pipeline's dtype (diffusers' fp32 when dtype is None)
        enc = AnalogyEncoder(settings["encoder"], device=device, dtype=encoder_dtype or dtype or torch.float32,
                             query_mode=settings["query_mode"], pooling_type=settings["pooling_type"],
                             query_source=query_source)
        expected = lora_api.checkpoint_query_dim(Path(weights))
        if expected is not None and expected != enc.query_dim:
            raise _query_width_error(enc, f"{weights} expects {expected}")
        if encoder is not None:  # a local copy of the checkpoint's encoder, say: it must be of the same family
            from .official_config import recorded_encoder_mismatch

            problem = recorded_encoder_mismatch(resolve_checkpoint_settings(weights, config,
                                                                            {**explicit, "encoder": None}), enc.kind)
            if problem is not None:
                raise LoRWeBCheckpointError(f"{weights} was trained with {problem} but encoder={str(encoder)!r} is a "
                                            f"{enc.kind} model")
        pipe = load_kontext_pipeline(model, dtype)
        load_lorweb_weights(pipe.transformer, weights, config, settings=explicit)
        if device is not None:
            pipe.to(device)
        wrapper = cls(pipe, enc, **options)
        wrapper._base_model_location = recorded_location(model)  # taken now: the working directory may change
        return wrapper

    # ------------------------------------------------------------- the diffusers/peft LoRA API (lora_api)
    @serialized_on_transformer
    def set_analogy(self, a, a_prime, b) -> dict:
        """Compute the queries of the analogies and ``set_query`` them (e.g. before ``fuse_lora``); returns
        ``{layer: (B, N) coefficients}``."""
        self._require_adapter()
        a, a_prime, b = (_load_images(role, x) for role, x in (("a", a), ("a_prime", a_prime), ("b", b)))
        query = self._query(self.control_grids(a, a_prime, b), a, a_prime, b)
        with torch.no_grad():
            return set_query(self.transformer, query)

    def _require_adapter(self) -> None:
        """Raise, naming ``load_lora_weights``, when the transformer holds no LoRWeB layers (after
        ``unload_lora_weights`` / ``delete_adapters``): an analogy has no coefficients to set then."""
        if not lorweb_layers(self.transformer):
            raise ValueError("this pipeline holds no LoRWeB adapter (unload_lora_weights() or delete_adapters() "
                             "removed it): load one with pipe.load_lora_weights(path_or_dir) first; the stock "
                             "pipeline without LoRWeB is pipe.pipe")

    def _refuse_while_fused(self, what: str) -> None:
        """RuntimeError naming ``what`` when the mixture is fused into the weights by "full" / "offload" (the
        strength is baked into them; "jit" merges at every call and follows it)."""
        strategy = lora_api.scale_fused_strategy(self.transformer)
        if strategy is not None:
            raise RuntimeError(f"{what}() while the mixture is fused into the weights (fuse_lora(strategy="
                               f"{strategy!r})): call unfuse_lora() first")

    @serialized_on_transformer
    def load_lora_weights(self, path_or_dir: Union[str, Path], weight_name: Optional[str] = None,
                          config: Union[str, Path, None] = None, *, adapter_name: Optional[str] = None,
                          **kwargs) -> list[str]:
        """diffusers' ``load_lora_weights``: an official LoRWeB checkpoint file, a directory holding one (and
        its ``config.yaml``) or a Hugging Face Hub repo id (``kwargs``: diffusers' Hub options ``revision``,
        ``subfolder``, ``cache_dir``, ``local_files_only``, ``token``, ``force_download``; see
        ``lora_api.resolve_checkpoint``), loaded into the transformer (injecting the layers when it is stock).
        The checkpoint's query_dim, query mode, pooling (patch modes) and encoder family are checked against the
        analogy encoder first.
        LoRWeB is one adapter: a checkpoint loaded over layers of the same shapes replaces their weights (another
        basis size needs ``unload_lora_weights()`` first); ``adapter_name`` names it (``get_active_adapters``).
        Returns the loaded modules."""
        if isinstance(weight_name, str) and not weight_name.endswith(".safetensors"):  # diffusers: adapter_name
            raise ValueError(f"weight_name={weight_name!r} is no .safetensors file name (LoRWeB checkpoints are "
                             "safetensors): this pipeline's second positional argument is the weights file's name, "
                             f"where diffusers' is adapter_name; pass adapter_name={weight_name!r}")
        unused = sorted(set(kwargs) - set(lora_api.HUB_OPTIONS))
        if unused:
            raise TypeError(f"load_lora_weights got options a LoRWeB checkpoint does not use: {unused} (it takes "
                            f"path_or_dir, weight_name, config, adapter_name and {', '.join(lora_api.HUB_OPTIONS)})")
        if adapter_name is not None and not isinstance(adapter_name, str):
            raise TypeError(f"adapter_name must be a string, got {type(adapter_name).__name__}")
        if adapter_name is not None and not adapter_name.strip():
            raise ValueError("adapter_name must be a non-empty name (None: 'lorweb')")
        if isinstance(path_or_dir, Mapping):
            raise TypeError("load_lora_weights takes a checkpoint file, a folder or a Hugging Face Hub repo id, not a "
                            "state dict: the LoRWeB settings (heads, activation, query mode, ...) live in the file's "
                            "metadata and config.yaml; for a state dict call lorweb_fast.load_lorweb_weights("
                            "pipe.transformer, state_dict, config)")
        had_layers = bool(lorweb_layers(self.transformer))
        try:
            _, names = lora_api.load_lora_weights(self.transformer, path_or_dir, weight_name, config,
                                                  query_dim=self.encoder.query_dim,
                                                  query_settings={"query_mode": self.encoder.query_mode,
                                                                  "pooling_type": self.encoder.pooling_type},
                                                  encoder=(self.encoder.name, self.encoder.kind),
                                                  query_source=self.encoder.query_source, **kwargs)
        except LoRWeBCheckpointError as exc:
            if not had_layers or not getattr(exc, "differs_from_injected", False):
                raise
            raise LoRWeBCheckpointError(f"{exc}\n(the transformer already holds a LoRWeB adapter, which a checkpoint "
                                        "replaces only with the same shapes: call unload_lora_weights() first to "
                                        "load another basis)") from exc
        # a loaded adapter starts as diffusers' does: under its own name ("lorweb" by default), at strength 1.0 and
        # enabled, whatever the adapter it replaces was set to (under a "jit" fuse, unfuse_lora then keeps 1.0)
        self._adapter_name = DEFAULT_ADAPTER_NAME if adapter_name is None else adapter_name
        self._disabled_scale = None
        lora_api.set_lorweb_scale(self.transformer, 1.0)
        if self._fuse_scales is not None:
            self._fuse_scales = (1.0, 1.0)
        return names

    @serialized_on_transformer
    def unload_lora_weights(self) -> list[str]:
        """diffusers' ``unload_lora_weights``: the stock transformer layers go back; a mixture fused with
        ``fuse_lora`` stays in their weights, as with diffusers/peft (``lora_api.unload_lora_weights``)."""
        names = lora_api.unload_lora_weights(self.transformer)  # may refuse: the pipeline's state stays then
        self._fuse_scales = self._disabled_scale = None
        self._adapter_name = DEFAULT_ADAPTER_NAME  # as diffusers: the unloaded adapter's name is gone
        return names

    @serialized_on_transformer
    def fuse_lora(self, strategy: str = "full", *, lora_scale: float = 1.0, components=None,
                  adapter_names=None, safe_fusing: bool = False) -> None:
        """diffusers' ``fuse_lora``: merge the current analogy (``set_analogy`` or the last call) into the weights
        with ``merged(strategy)`` until ``unfuse_lora``. Calls with the same analogy then run at base cost; another
        analogy raises (strategy "jit" follows every new analogy instead). ``lora_scale`` multiplies the fused
        mixture (the strength from before comes back on ``unfuse_lora``); ``components`` must include
        "transformer" (the only component LoRWeB adapts); ``adapter_names`` may name only this adapter;
        ``safe_fusing=True`` checks the fused weights ("full" / "offload") and unfuses and raises if one is not
        finite.

        The strength the fuse set (the one from before times ``lora_scale``) goes back to the one from before on
        ``unfuse_lora``, unless it was changed meanwhile (strategy "jit" allows ``set_lorweb_scale`` and
        ``disable_lora`` while fused): a strength set meanwhile stays, and a ``disable_lora`` meanwhile stays
        disabled, with ``enable_lora`` then restoring the strength from before the fuse."""
        if components is not None and "transformer" not in components:
            raise ValueError(f"LoRWeB adapts the transformer only; components={components!r} leaves it out")
        self._require_adapter()
        if adapter_names is not None and list(_as_list(adapter_names)) != [self._adapter_name]:
            raise ValueError(f"unknown adapter names {adapter_names!r}: this pipeline holds one LoRWeB adapter, "
                             f"{self._adapter_name!r}")
        layers = lorweb_layers(self.transformer)
        if layers and lora_api.fused_strategy(self.transformer) is None and all(
                layer.coefficients is None and layer._query is None for layer in layers.values()):
            raise RuntimeError("no analogy to fuse: call pipe.set_analogy(a, a_prime, b) first (or run the "
                               "pipeline once)")
        lora_scale = check_real("lora_scale", lora_scale)
        if lora_api.fused_strategy(self.transformer) is not None:
            lora_api.fuse_lora(self.transformer, strategy)  # raises: already fused
        before = lora_api.get_lorweb_scale(self.transformer)
        fused_scale = before * lora_scale
        if lora_scale != 1.0:
            lora_api.set_lorweb_scale(self.transformer, fused_scale)
        try:
            lora_api.fuse_lora(self.transformer, strategy)
        except BaseException:  # Ctrl-C too
            if not any(layer._merged for layer in lorweb_layers(self.transformer).values()):
                lora_api.set_lorweb_scale(self.transformer, before)  # not fused: the strength can go back
            raise  # (a layer left merged by a failed restore: that error, not set_lorweb_scale's refusal)
        self._fuse_scales = (before, fused_scale)
        if safe_fusing and strategy in ("full", "offload"):
            try:
                bad = [name for name, layer in lorweb_layers(self.transformer).items()
                       if not all_finite(layer.base_layer.weight)]
            except BaseException:  # the check itself failed (it allocates; Ctrl-C): not fused, as it found nothing
                self.unfuse_lora()
                raise
            if bad:
                self.unfuse_lora()
                raise ValueError(f"safe_fusing: the fused weights of {bad[:3]}{' ...' if len(bad) > 3 else ''} "
                                 "are not finite; the pipeline was left unfused")

    @serialized_on_transformer
    def unfuse_lora(self, components=None) -> None:
        """diffusers' ``unfuse_lora``: the original weights back, bit for bit, and the strength from before
        ``fuse_lora(lora_scale=...)``."""
        if components is not None and "transformer" not in components:
            raise ValueError(f"LoRWeB adapts the transformer only; components={components!r} leaves it out")
        scales = self._fuse_scales
        # a weight that could not go back raises, its layer still merged and fused: the strength is kept for the
        # retry (unfuse_lora() again) that restores it
        interrupt = None
        try:
            lora_api.unfuse_lora(self.transformer)
        except Exception:
            if lora_api.fused_strategy(self.transformer) is None:
                self._fuse_scales = None
            raise
        except BaseException as exc:  # Ctrl-C: every weight went back all the same (_restore_layers), so the strength
            interrupt = exc  # goes back too, then the interrupt is raised
        self._fuse_scales = None
        layers = lorweb_layers(self.transformer).values()
        if scales is not None and layers and not any(layer._merged for layer in layers):
            self._restore_fused_strength(*scales)
        if interrupt is not None:
            raise interrupt

    def _restore_fused_strength(self, before: float, fused_scale: float) -> None:
        """After unfuse_lora: the strength from before fuse_lora(lora_scale=...), unless changed meanwhile."""
        if self._disabled_scale is not None:  # disabled while fused ("jit"): enable_lora restores the pre-fuse one
            if self._disabled_scale == fused_scale:
                self._disabled_scale = before
        elif lora_api.get_lorweb_scale(self.transformer) == fused_scale:  # not changed meanwhile
            lora_api.set_lorweb_scale(self.transformer, before)

    def _call_strength(self, attention_kwargs: Optional[dict]):
        """diffusers' per-call LoRA scale, ``joint_attention_kwargs={"scale": s}`` (checked by check_pipe_call), as a
        context manager: the mixture's strength times ``s`` inside it, given back after (diffusers' own
        ``scale_lora_layers`` reaches only peft layers; it still scales those). A no-op without a scale or at 1."""
        scale = None if attention_kwargs is None else attention_kwargs.get("scale")
        if scale is None or float(scale) == 1.0:
            return contextlib.nullcontext()
        strategy = lora_api.scale_fused_strategy(self.transformer)
        if strategy is not None:
            raise RuntimeError(f"joint_attention_kwargs['scale'] cannot change the strength of a mixture fused into "
                               f"the weights (strategy={strategy!r}); call unfuse_lora() first, or fuse with "
                               "lora_scale")
        return _strength_times(self.transformer, float(scale))

    @serialized_on_transformer
    def set_lorweb_scale(self, scale: float) -> None:
        """Strength of the mixture (diffusers' ``set_adapters`` weight, the official multiplier). While the adapter
        is disabled (``disable_lora``) the output stays the base model's and the strength is kept for
        ``enable_lora``."""
        self._require_adapter()
        lora_api.set_lorweb_scale(self.transformer, scale)  # validates; refused while fused
        if self._disabled_scale is not None:
            self._disabled_scale = float(scale)
            lora_api.set_lorweb_scale(self.transformer, 0.0)

    # diffusers' adapter bookkeeping: LoRWeB is one adapter
    def get_active_adapters(self) -> list[str]:
        """diffusers' ``get_active_adapters``: the LoRWeB adapter's name while it is loaded and enabled."""
        return [self._adapter_name] if lorweb_layers(self.transformer) and self._disabled_scale is None else []

    def get_list_adapters(self) -> dict[str, list[str]]:
        """diffusers' ``get_list_adapters``: ``{"transformer": [name]}`` while a LoRWeB adapter is loaded."""
        return {"transformer": [self._adapter_name]} if lorweb_layers(self.transformer) else {}

    @property
    def fused_loras(self) -> set:
        """diffusers' ``fused_loras``: the LoRWeB adapter's name while it is fused (``fuse_lora``)."""
        return {self._adapter_name} if lora_api.fused_strategy(self.transformer) is not None else set()

    @property
    def num_fused_loras(self) -> int:
        """diffusers' ``num_fused_loras``: 1 while the LoRWeB adapter is fused, else 0."""
        return len(self.fused_loras)

    def set_lora_device(self, adapter_names, device) -> None:
        """diffusers' ``set_lora_device`` moves one adapter's tensors apart from the model; refused: the LoRWeB
        tensors serve every layer's forward and the analogy's ``set_analogy`` on the transformer's device, so they
        move with it (``pipe.to(device)``, ``enable_model_cpu_offload``)."""
        raise TypeError("set_lora_device: the LoRWeB adapter's tensors move with the transformer (pipe.to(device), "
                        "pipe.enable_model_cpu_offload()); they cannot live on another device than the layers they "
                        "adapt")

    def enable_lora_hotswap(self, **kwargs) -> None:
        """diffusers' ``enable_lora_hotswap``; refused, as ``load_lora_weights(hotswap=True)`` is: a LoRWeB checkpoint
        of the same shapes already replaces the weights in place (no recompile of a compiled transformer)."""
        raise TypeError("enable_lora_hotswap: LoRWeB needs no hotswap preparation: load_lora_weights with a checkpoint "
                        "of the same shapes replaces the weights in place (a compiled transformer is not recompiled); "
                        "another basis size needs unload_lora_weights() first")

    @serialized_on_transformer
    def delete_adapters(self, adapter_names) -> None:
        """diffusers' ``delete_adapters``: naming this pipeline's adapter unloads it (``unload_lora_weights``)."""
        loaded = bool(lorweb_layers(self.transformer))
        unknown = [n for n in _as_list(adapter_names) if n != self._adapter_name or not loaded]
        if unknown:
            raise ValueError(f"unknown adapter names {unknown}: this pipeline holds "
                             + (f"one LoRWeB adapter, {self._adapter_name!r}" if loaded else "no LoRWeB adapter"))
        self.unload_lora_weights()

    @_instance_call_only("save_lora_weights saves the LoRWeB adapter from a pipeline instance's transformer: call "
                         "pipe.save_lora_weights(directory) (or lorweb_fast.lora_api.save_pretrained(transformer, "
                         "directory)), not LoRWeBKontextPipeline.save_lora_weights(...) on the class")
    def save_lora_weights(self, save_directory: Union[str, Path, None] = None, *, weight_name: Optional[str] = None,
                          is_main_process: bool = True, safe_serialization: bool = True, **kwargs) -> Optional[Path]:
        """diffusers' ``save_lora_weights`` for the LoRWeB adapter: ``save_pretrained(save_directory)`` (weights,
        config.yaml, model card). ``weight_name`` names the weights file (default ``lorweb.safetensors``;
        ``load_lora_weights(save_directory, weight_name)`` reads it back); ``is_main_process=False`` writes nothing
        (returns None), as diffusers; ``safe_serialization`` must be True (LoRWeB checkpoints are safetensors).
        Layer dicts such as ``transformer_lora_layers`` and ``save_function`` are refused: the adapter is saved
        from the transformer, as safetensors. Called on the class (diffusers' classmethod, as its training scripts
        call it with layer dicts, the folder positional or ``save_directory=``) it is refused naming the instance
        call."""
        if save_directory is None:
            raise TypeError("save_lora_weights needs save_directory (the folder to write the adapter into)")
        if kwargs:
            raise TypeError(f"save_lora_weights saves the LoRWeB adapter from the transformer and takes no "
                            f"{sorted(kwargs)}; call pipe.save_lora_weights(directory) (options: weight_name, "
                            "is_main_process, safe_serialization=True)")
        if safe_serialization is not True:
            raise ValueError("safe_serialization=False: LoRWeB checkpoints are written as safetensors only (the "
                             "official format)")
        if not isinstance(is_main_process, bool):
            raise TypeError(f"is_main_process must be True or False, got {is_main_process!r}")
        if not is_main_process:
            return None
        return self.save_pretrained(save_directory, weight_name=weight_name)

    def save_pretrained(self, directory: Union[str, Path], *, base_model: Optional[str] = None,
                        training: Optional[dict] = None, weight_name: Optional[str] = None) -> Path:
        """Write ``lorweb.safetensors`` (or ``weight_name``), ``config.yaml`` and a README model card
        (``lora_api.save_pretrained``)."""
        self._require_adapter()
        return lora_api.save_pretrained(self.transformer, directory, encoder=self.encoder.location,
                                        query_mode=self.encoder.query_mode, pooling_type=self.encoder.pooling_type,
                                        base_model=base_model or self._base_model_name(), training=training,
                                        query_source=self.encoder.query_source,
                                        weight_name=weight_name or lora_api.WEIGHT_NAME)

    def push_to_hub(self, repo_id: str, **kwargs):
        """``save_pretrained`` into a temporary folder uploaded with huggingface_hub's ``upload_folder``. The encoder
        and base model are named as they were given (a local folder is not published by its absolute path, which
        would name this machine's folders and serve no one else)."""
        self._require_adapter()
        kwargs.setdefault("base_model", self._base_model_name(as_given=True))
        kwargs.setdefault("query_mode", self.encoder.query_mode)
        kwargs.setdefault("pooling_type", self.encoder.pooling_type)
        kwargs.setdefault("query_source", self.encoder.query_source)
        return lora_api.push_to_hub(self.transformer, repo_id, encoder=self.encoder.name, **kwargs)

    def enable_model_cpu_offload(self, *args, **kwargs):
        """diffusers' model CPU offload of the wrapped pipeline; LoRWeB coefficients follow each layer's device."""
        return self.pipe.enable_model_cpu_offload(*args, **kwargs)

    @serialized_on_transformer
    def set_adapters(self, adapter_names=None, adapter_weights=None) -> None:
        """diffusers' ``set_adapters``: LoRWeB is one adapter, so one weight (a number, diffusers' per-component
        ``{"transformer": number}``, or a list of one) sets the mixture's strength (``set_lorweb_scale``); None
        means 1.0. ``adapter_names`` may name only this adapter
        (None: it), as diffusers refuses names it does not hold. While disabled, the strength is kept for
        ``enable_lora``, as in diffusers."""
        self._require_adapter()
        if adapter_names is not None and list(_as_list(adapter_names)) != [self._adapter_name]:
            raise ValueError(f"unknown adapter names {adapter_names!r}: this pipeline holds one LoRWeB adapter, "
                             f"{self._adapter_name!r}")
        weights = adapter_weights if isinstance(adapter_weights, (list, tuple)) else [adapter_weights]
        if len(weights) != 1:
            raise ValueError(f"LoRWeB is one adapter: give one adapter weight, got {len(weights)}")
        weight = weights[0]
        if isinstance(weight, Mapping):  # diffusers' per-component form, {"transformer": s}
            others = sorted(str(k) for k in weight if k != "transformer")
            if others:
                raise ValueError(f"adapter_weights names components {others}: LoRWeB adapts the transformer only "
                                 "(give {'transformer': weight} or a number)")
            weight = weight.get("transformer")
        self.set_lorweb_scale(1.0 if weight is None else weight)

    @serialized_on_transformer
    def disable_lora(self) -> None:
        """diffusers' ``disable_lora``: the base model's output (strength 0) until ``enable_lora``. Refused while
        the mixture is fused into the weights ("full" / "offload"; "jit" follows it)."""
        self._require_adapter()
        if self._disabled_scale is None:
            self._refuse_while_fused("disable_lora")
            before = lora_api.get_lorweb_scale(self.transformer)
            lora_api.set_lorweb_scale(self.transformer, 0.0)
            self._disabled_scale = before

    @serialized_on_transformer
    def enable_lora(self) -> None:
        """diffusers' ``enable_lora``: the strength from before ``disable_lora``, or the one set meanwhile."""
        if self._disabled_scale is not None:
            self._refuse_while_fused("enable_lora")
            lora_api.set_lorweb_scale(self.transformer, self._disabled_scale)
            self._disabled_scale = None

    def to(self, *args, **kwargs) -> "LoRWeBKontextPipeline":
        """diffusers' ``to``: the wrapped pipeline moved (and cast) as ``DiffusionPipeline.to`` does, the analogy
        encoder moved to the same device (its dtype is kept: ``encoder_dtype``); returns this pipeline."""
        self.pipe.to(*args, **kwargs)
        self.encoder.model.to(next(self.transformer.parameters()).device)
        return self

    @property
    def device(self) -> torch.device:
        """The inner pipeline's device (diffusers' ``DiffusionPipeline.device``)."""
        return self.pipe.device

    @property
    def dtype(self) -> torch.dtype:
        """The inner pipeline's dtype (diffusers' ``DiffusionPipeline.dtype``)."""
        return self.pipe.dtype

    def __getattr__(self, name: str):
        """Everything else a diffusers pipeline has (``vae``, ``scheduler``, ``components``,
        ``set_progress_bar_config``, ...) comes from the wrapped ``FluxKontextPipeline``."""
        if name.startswith("__") or name in ("pipe", "encoder"):
            raise AttributeError(name)
        try:
            return getattr(self.__dict__["pipe"], name)
        except (KeyError, AttributeError):
            raise AttributeError(f"{type(self).__name__} (and its FluxKontextPipeline) has no attribute "
                                 f"{name!r}") from None

    def __dir__(self) -> list:
        """This class's names and those forwarded from the wrapped pipeline (tab completion in IPython)."""
        inner = self.__dict__.get("pipe")
        forwarded = [] if inner is None else [n for n in dir(inner) if not n.startswith("__")]
        return sorted(set(super().__dir__()) | set(forwarded))

    def _base_model_name(self, *, as_given: bool = False) -> Optional[str]:
        """The base model a saved checkpoint records: the one ``from_pretrained`` loaded (a local folder by its
        absolute path), else the wrapped pipeline's ``_name_or_path`` (a local one made absolute); ``as_given``: the
        wrapped pipeline's ``_name_or_path`` as it is (``push_to_hub``)."""
        if self._base_model_location is not None and not as_given:
            return self._base_model_location
        name = getattr(getattr(self.pipe, "config", None), "_name_or_path", None)
        return None if not name else str(name) if as_given else recorded_location(name)

    def merge_strategy(self, merge: Union[bool, str], batch_size: int) -> str:
        """The strategy ``__call__`` runs for ``merge`` and ``batch_size`` samples: one of MERGE_STRATEGIES or
        "none"."""
        if merge is True:
            return "full"
        if merge is False or merge == "none":
            return "none"
        if merge in MERGE_STRATEGIES:
            return merge
        if merge != "auto":
            raise ValueError(f"merge must be 'auto', 'none', one of {MERGE_STRATEGIES}, True or False; got {merge!r}")
        layers = lorweb_layers(self.transformer)
        if batch_size != 1 or not all(has_plain_weight(l.base_layer) and not has_forward_hooks(l.base_layer)
                                      for l in layers.values()):
            return "none"
        modes = group_offloading_modes(self.transformer)
        if any(modes.get(id(l.base_layer.weight)) in ("disk", "stream") for l in layers.values()):
            return "none"  # the merge would be lost at the next onload (refused by merged())
        if any(l._merged or l._merge_jit for l in layers.values()):
            return "none"  # already fused (fuse_lora)
        return choose_merge_strategy(self.transformer)

    def _size_multiple(self) -> int:
        """What FluxKontextPipeline rounds the generated and control sizes down to: 2 * vae_scale_factor."""
        return 2 * int(getattr(self.pipe, "vae_scale_factor", 8))

    def _query(self, grids: list, a: list, a_prime: list, b: list) -> torch.Tensor:
        """(B, query_dim) analogy queries of the control grids. Official resolution: the official inference crops
        (squares of side W/2, inference.py); an a of aspect ratio 2:1 or wider leaves no b to crop in the modes that
        crop it, and raises naming it. Native resolution (not official), whose cells take b's shape: the grid's own
        cells (``crops="cells"``), so a non-square b does not get squares of side W/2 cut across the cells. Training
        (official or ours) queries grids of the same cell geometry with squares of side H/2 (``crops="training"``):
        for non-square cells the native query therefore differs from the training one too (square cells: all
        agree)."""
        if self.resolution == "native":
            return self.encoder.query(grids=grids, a=a, a_prime=a_prime, b=b, crops="cells")
        multiple = self._size_multiple()
        for i in range(len(grids)):
            problem = official_grid_problem(a[i].size, query_mode=self.encoder.query_mode,
                                            query_source=self.encoder.query_source, max_size=self.max_size,
                                            multiple=multiple, max_area=self.max_area)
            if problem:
                raise ValueError(f"a[{i}] is {problem}")
        return self.encoder.query(grids=grids, a=a, a_prime=a_prime, b=b, crops="inference")

    def control_grids(self, a, a_prime, b, *, long_edge: Optional[int] = None) -> list:
        """One control grid per analogy. Official: each at its a's size (``max_size`` cap); native: all of the
        first analogy's cell size (b's aspect, ``long_edge`` cap)."""
        a, a_prime, b = (_as_list(x) for x in (a, a_prime, b))
        if not len(a) == len(a_prime) == len(b):
            raise ValueError(f"a, a_prime and b must hold the same number of images, got {len(a)}, {len(a_prime)}, "
                             f"{len(b)}")
        _check_resolution_options(self.resolution, long_edge=long_edge)
        if not a:
            raise ValueError("no analogies given: a, a_prime and b are empty")
        if self.resolution == "official":
            return [official_control_grid(x, y, z, max_size=self.max_size) for x, y, z in zip(a, a_prime, b)]
        long_edge = long_edge or self.long_edge
        cell = _cell_size([b[0]], long_edge)
        return [make_grid(x, y, z, z, long_edge=long_edge, cell_size=cell) for x, y, z in zip(a, a_prime, b)]

    @contextlib.contextmanager
    def _progress_for_call(self, progress: Optional[bool]):
        """The wrapped pipeline's progress bar shown (True) or hidden (False) inside the block, its other
        ``set_progress_bar_config`` settings kept, and all of them given back after it; None changes nothing."""
        if progress is None:
            yield
            return
        bar_config = getattr(self.pipe, "_progress_bar_config", None) or {}
        self.pipe.set_progress_bar_config(**{**bar_config, "disable": not progress})
        try:
            yield
        finally:
            self.pipe.set_progress_bar_config(**bar_config)

    @serialized_on_transformer
    def __call__(self, a, a_prime, b, prompt, *, merge: Union[bool, str] = "auto", num_inference_steps: int = 28,
                 guidance_scale: float = 2.5, generator=None, seed: int = DEFAULT_SEED,
                 long_edge: Optional[int] = None, output_type: str = "pil", progress: Optional[bool] = None,
                 **pipe_kwargs) -> list:
        """b' for each analogy (a[i] : a_prime[i] :: b[i] : ?). Images are PIL images or paths (see load_image).

        Args:
            a, a_prime, b: one image each, or lists of B images.
            prompt: one edit description, or B of them.
            merge: "auto", "full", "offload", "jit" or "none" (True = "full", False = "none"); see ``merged``.
                "auto": for a single analogy with plain base weights, ``choose_merge_strategy`` picks from the
                free memory; a batch of different analogies runs unmerged (the fused path). "jit" also serves a
                batch of different analogies (one merged weight per sample and layer, batched matmul).
            generator: a torch.Generator, or B of them (one per analogy: the result then matches one-by-one runs);
                by default one seeded with ``seed`` (50, as inference.py) on the pipeline's execution device.
            output_type: "pil" (PIL images) or "np" (float arrays in [0, 1], (H, W, 3)).
            progress: True / False shows / hides the denoising progress bar for this call (the other settings of
                ``pipe.set_progress_bar_config(...)`` kept, all of them given back after the call); None (default)
                leaves the settings of ``pipe.set_progress_bar_config(...)`` as they are.
            pipe_kwargs: passed to FluxKontextPipeline.__call__ (e.g. ``true_cfg_scale``, ``negative_prompt``).
        """
        # seed is used (and so checked) only without a generator, as before: generator=g, seed=None is a call
        check_generation_options(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                 long_edge=long_edge, merge=merge, output_type=output_type,
                                 seed=seed if generator is None else DEFAULT_SEED, progress=progress)
        self._require_adapter()
        check_pipe_kwargs(pipe_kwargs, type(self.pipe).__call__)
        a, a_prime, b = (_load_images(role, x) for role, x in (("a", a), ("a_prime", a_prime), ("b", b)))
        stretched = warn_aspect_ratios(a, a_prime, b, cells_from="a" if self.resolution == "official" else "b")
        grids = self.control_grids(a, a_prime, b, long_edge=long_edge)
        if self.resolution == "native" and not stretched:  # the same shapes, other sizes (said once, not twice;
            # the official resolution is set by the shape alone): the grid each analogy gets in a call of its own
            cells = [_cell_size([image], long_edge or self.long_edge) for image in b]
            warn_grid_sizes([(2 * w, 2 * h) for w, h in cells])
        count = len(grids)
        per_prompt = int(pipe_kwargs.get("num_images_per_prompt") or 1)
        if per_prompt > 1 and count > 1:
            raise ValueError("num_images_per_prompt > 1 is supported for a single analogy only; pass the analogy "
                             "several times instead")
        if "num_images_per_prompt" in pipe_kwargs:
            pipe_kwargs["num_images_per_prompt"] = per_prompt  # None is diffusers' 1 too, but it cannot take None
        # prompts and the other per-analogy arguments, generators, latents, sigmas, callbacks, IP adapter: checked
        # here, before any model runs (diffusers checks some only after the encoders ran, some never)
        prompts = check_pipe_call(pipe_kwargs, prompt, generator, count=count,
                                  callback_tensor_inputs=getattr(self.pipe, "_callback_tensor_inputs", None),
                                  has_ip_adapter=getattr(self.transformer, "encoder_hid_proj", None) is not None)
        call_strength = self._call_strength(pipe_kwargs.get("joint_attention_kwargs"))
        attention_kwargs = pipe_kwargs.get("joint_attention_kwargs")
        if attention_kwargs and "scale" in attention_kwargs and not _peft_backend():
            # applied by call_strength; diffusers without peft would only warn that it is ineffective (it is not)
            pipe_kwargs["joint_attention_kwargs"] = {k: v for k, v in attention_kwargs.items() if k != "scale"}
        if generator is None:
            generator = torch.Generator(device=self.pipe._execution_device).manual_seed(seed)
        elif isinstance(generator, tuple):  # diffusers takes one generator or a list (a tuple failed inside it)
            generator = list(generator)
        strategy = self.merge_strategy(merge, count * per_prompt)
        query = self._query(grids, a, a_prime, b).repeat_interleave(per_prompt, dim=0)  # checks the grid sizes
        if self.resolution == "official" and not stretched:  # shapes within warn_aspect_ratios' tolerance
            multiple = self._size_multiple()
            warn_grid_sizes([official_generation_size(g.size, self.max_area, multiple)
                             + official_control_size(g.size, multiple) for g in grids], official=True)
        fused = lora_api.fused_strategy(self.transformer)
        if fused is not None:
            strategy = "none"
        width, height = grids[0].size
        if self.resolution == "official":
            size_kwargs = dict(max_area=self.max_area, _auto_resize=True)
        else:
            size_kwargs = dict(max_area=width * height, _auto_resize=False)
        # a call that fails (a merge strategy that cannot serve this batch, an error inside the pipeline) leaves the
        # layers' analogy as it was before the call, and no cache state computed with this call's analogy
        with self._progress_for_call(progress), analogy_restored_on_error(self.transformer), call_strength, \
                _stateful_hooks_reset_on_error(self.transformer):
            with torch.no_grad():  # inference: no autograd history on the coefficients
                if fused in ("full", "offload"):  # fuse_lora(): the mixture is in the weights; the analogy must match
                    lora_api.check_fused_query(self.transformer, query)
                else:
                    set_query(self.transformer, query)  # once per generation; checks query and coefficients
            context = contextlib.nullcontext() if strategy == "none" else merged(self.transformer, strategy)
            with context:
                prompt_arg = None if prompts is None else prompts if count > 1 else prompts[0]
                out = self.pipe(image=grids if count > 1 else grids[0], prompt=prompt_arg,
                                height=height, width=width, num_inference_steps=num_inference_steps,
                                guidance_scale=guidance_scale, generator=generator, output_type=output_type,
                                **size_kwargs, **pipe_kwargs).images
        if output_type == "np":
            h, w = out.shape[1] // 2, out.shape[2] // 2
            return [img[h:, w:] for img in out]
        return [bottom_right_cell(img) for img in out]


@contextlib.contextmanager
def _stateful_hooks_reset_on_error(transformer: nn.Module):
    """A failed pipeline call resets the transformer's stateful diffusers hooks (``enable_cache``'s residuals,
    attention outputs, Taylor factors), as diffusers does at the end of a successful call
    (``maybe_free_model_hooks``): otherwise the next call, of another analogy, reuses what this one computed."""
    try:
        yield
    except BaseException:
        reset = getattr(transformer, "_reset_stateful_cache", None)
        if callable(reset):
            reset()
        raise


def _peft_backend() -> bool:
    """diffusers' USE_PEFT_BACKEND: whether it scales peft LoRA layers by ``joint_attention_kwargs["scale"]``."""
    from diffusers.utils import USE_PEFT_BACKEND

    return bool(USE_PEFT_BACKEND)


@contextlib.contextmanager
def _strength_times(model: nn.Module, factor: float):
    """Every LoRWeB layer's strength (``set_lorweb_scale``) times ``factor`` inside the block, as it was after."""
    layers = list(lorweb_layers(model).values())
    kept = [layer._lorweb_scale for layer in layers]
    try:
        for layer, strength in zip(layers, kept):
            layer._lorweb_scale = strength * factor
        yield
    finally:
        for layer, strength in zip(layers, kept):
            layer._lorweb_scale = strength


def resolve_query_source(weights: Union[str, Path], query_source: Optional[str] = None) -> str:
    """The query source of a checkpoint: the one training recorded in the metadata (``lorweb.query_source``), else
    "grid" (official). An explicit ``query_source`` that contradicts the recorded one raises, naming both."""
    recorded = checkpoint_metadata(weights).get("lorweb.query_source")
    if query_source is not None and recorded is not None and query_source != recorded:
        raise ValueError(f"conflicting query_source: argument says {query_source!r} but the checkpoint metadata says "
                         f"{recorded!r}")
    return query_source or recorded or "grid"


# ------------------------------------------------------------------------------------------------------ plots
@holding(_locks.DRAWING)
def plot_coefficients(model: nn.Module, path: Union[str, Path], *, sample: int = 0) -> Path:
    """Heat map (layers x basis LoRAs) of the (B, N) coefficients the current analogy selected, for sample
    ``sample`` (0 <= sample < B), written atomically to ``path`` (a format matplotlib writes: .png, .pdf, .svg, ...);
    returns ``path``. RuntimeError when no coefficients are set (``set_query`` first)."""
    from matplotlib.figure import Figure  # not pyplot: no global figure registry, the caller's backend untouched

    from .validation import check_output_file, plot_suffixes

    check_output_file("path", path, plot_suffixes())
    coeffs = get_coefficients(model)
    if not coeffs:
        raise RuntimeError("no coefficients to plot: call set_query first")
    batch = next(iter(coeffs.values())).shape[0]
    check_int("sample", sample, lo=0, hi=batch - 1)
    names = list(coeffs)
    data = torch.stack([coeffs[n][sample].detach().float().cpu() for n in names]).numpy()
    fig = Figure(figsize=(max(6, data.shape[1] * 0.25 + 3), max(4, len(names) * 0.12 + 2)))
    ax = fig.subplots()
    im = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("basis LoRA n")
    ax.set_ylabel("layer")
    step = max(1, len(names) // 40)
    ax.set_yticks(range(0, len(names), step))
    ax.set_yticklabels(names[::step], fontsize=5)
    ax.set_title(f"LoRWeB coefficients (sample {sample})")
    fig.colorbar(im, ax=ax, label="alpha")
    fig.tight_layout()
    return save_figure_atomically(fig, path, dpi=120)
