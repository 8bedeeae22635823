"""The diffusers/peft LoRA API on a transformer carrying LoRWeB layers (``LoRWeBKontextPipeline`` delegates here).

    diffusers / peft name                 lorweb_fast
    pipe.load_lora_weights(dir_or_file)   load_lora_weights(model, dir_file_or_hub_repo, weight_name=None, config=None)
    pipe.unload_lora_weights()            unload_lora_weights(model)       (remove_lorweb: the stock layers back)
    pipe.fuse_lora() / unfuse_lora()      fuse_lora(model, strategy) / unfuse_lora(model)   (merged() kept open)
    pipe.set_adapters(name, weights=s)    set_lorweb_scale(model, s)       (multiplies the mixture)
    pipe.save_lora_weights / save_pretrained   save_pretrained(model, dir, ...)  (weights + config.yaml + README)
    push_to_hub(repo_id)                  push_to_hub(model, repo_id, ...) (huggingface_hub.upload_folder)
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from torch import nn

from .model import (CHECKPOINT_PREFIX, DEFAULT_ENCODER, LoRWeBCheckpointError, _refuse_merged, _require_layers,
                    checkpoint_metadata, load_lorweb_weights, lorweb_layers, remove_lorweb, save_lorweb_weights)
from ._locks import serialized_on_model
from .validation import float_or_inf, names_hub_repo

logger = logging.getLogger(__name__)
#: File names written by ``save_pretrained`` and looked for by ``load_lora_weights`` in a directory.
WEIGHT_NAME = "lorweb.safetensors"
CONFIG_NAME = "config.yaml"
CARD_NAME = "README.md"
_FUSED = "_lorweb_fused"  # model attribute: a _FuseState


def refuse_copy_of_merged_model(*_args):
    """``__deepcopy__`` / ``__reduce_ex__`` of the objects a merged or fused model holds (its fuse state, its
    load_state_dict pre-hook): ``copy.deepcopy`` / ``torch.save`` of such a model raise this instead of
    "cannot pickle 'generator' object" (an open merge cannot be copied, and a copy would hold merged weights with no
    way back)."""
    raise TypeError("a LoRWeB model fused with fuse_lora or inside a merged() block cannot be copied or pickled: its "
                    "weights hold the merged mixture; call unfuse_lora() (or exit the merged() block) first, or "
                    "unload_lora_weights() to bake the mixture into the stock layers")


class _FuseState(tuple):
    """(merged() context, strategy, coefficients at fuse time, {layer name: its LoRWeB weights' dtype at fuse
    time}) of a ``fuse_lora``'d model; refuses to be copied (``refuse_copy_of_merged_model``)."""

    __deepcopy__ = __copy__ = __reduce_ex__ = __reduce__ = refuse_copy_of_merged_model


# -------------------------------------------------------------------------------------------------- fusing
def _fuse_state(model: nn.Module) -> Optional[_FuseState]:
    """The ``_FuseState`` of ``model`` or None; TypeError for what is not a module (a pipeline: pass its
    transformer), as every other function of this module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return getattr(model, _FUSED, None)


def fused_strategy(model: nn.Module) -> Optional[str]:
    """The strategy ``fuse_lora`` used on ``model``, or None when it is not fused."""
    state = _fuse_state(model)
    return None if state is None else state[1]


def scale_fused_strategy(model: nn.Module) -> Optional[str]:
    """The ``fuse_lora`` strategy whose fused weights hold the current strength ("full" / "offload"; "jit" merges at
    every call and follows it), or None: while it is set the strength cannot change."""
    strategy = fused_strategy(model)
    return None if strategy in (None, "jit") else strategy


@serialized_on_model
def fuse_lora(model: nn.Module, strategy: str = "full") -> None:
    """Fold the current analogy's mixture into the weights until ``unfuse_lora``: ``merged(model, strategy)`` kept
    open. With "full"/"offload" the weights hold the analogy set by the last ``set_query``; with "jit" every
    forward merges the coefficients current at that time."""
    from .flux import merged

    if fused_strategy(model) is not None:
        raise RuntimeError(f"the LoRWeB mixture is already fused (strategy={fused_strategy(model)!r}); call "
                           "unfuse_lora() first")
    context = merged(model, strategy)
    context.__enter__()  # validates everything before changing anything
    try:
        layers = lorweb_layers(model)
        coeffs = {n: l.coefficients.detach().clone() for n, l in layers.items()}
        dtypes = {n: l.att_lora_to_q.weight.dtype for n, l in layers.items()}
        setattr(model, _FUSED, _FuseState((context, strategy, coeffs, dtypes)))
    except BaseException:  # out of memory, Ctrl-C: the weights back as they were, nothing left fused
        context.__exit__(None, None, None)
        raise


@serialized_on_model
def unfuse_lora(model: nn.Module) -> None:
    """Restore the weights fused by ``fuse_lora`` bit for bit (a no-op when nothing is fused). ``unload_lora_weights``
    on a fused model keeps the fused weights instead (as diffusers). A layer whose weight cannot go back (out of
    memory) raises after the others are restored; the model stays fused for it, and a later call retries it.
    Offloading enabled while fused that keeps its own copy of a base weight (``_offloaded_copy_problem``) is refused
    before anything changes: the model stays fused."""
    state = _fuse_state(model)
    if state is None:
        return
    problem = None if state[1] == "jit" else _offloaded_copy_problem(model)  # "jit" changed no weight
    if problem is not None:
        raise RuntimeError(f"cannot unfuse: {problem}; the model stays fused. Unfuse before enabling offloading, or "
                           "call unload_lora_weights() to bake the fused mixture into the stock layers")
    try:
        state[0].__exit__(None, None, None)
    except BaseException as exc:
        rest = getattr(exc, "restore_the_rest", None)  # layers whose weights could not go back: kept for a retry
        if rest is None:
            delattr(model, _FUSED)
        else:
            guard = state[0].guard if isinstance(state[0], _RestoreTheRest) else _loads_refused(model)
            setattr(model, _FUSED, _FuseState((_RestoreTheRest(rest, guard), *state[1:])))
        raise
    delattr(model, _FUSED)


def _offloaded_copy_problem(model: nn.Module) -> Optional[str]:
    """Why the fused weights cannot be restored, or None: offloading enabled after the fuse that keeps a copy of a
    base weight of its own, taken while it held the merged mixture (diffusers group offloading to disk or with
    streams, accelerate's offload with a weights_map such as ``cpu_offload``), would bring the merged weight back
    at the next onload over the restored one, and the unmerged forward would add the mixture a second time."""
    from .layer import group_offloading_modes

    modes = group_offloading_modes(model)
    for name, layer in lorweb_layers(model).items():
        base = layer.base_layer
        mode = modes.get(id(getattr(base, "weight", None)))
        if mode in ("disk", "stream"):
            how = "offload_to_disk_path" if mode == "disk" else "use_stream=True"
            return (f"{name}'s base weight is group-offloaded ({how}), enabled while fused: offloading keeps a copy "
                    "of the merged weight and would put it back at every onload")
        hook = base.__dict__.get("_hf_hook")
        if any(getattr(h, "weights_map", None) is not None for h in getattr(hook, "hooks", (hook,))):
            return (f"{name}'s base layer is offloaded by accelerate with a weights_map (e.g. cpu_offload / "
                    "sequential CPU offload), enabled while fused: it keeps a copy of the merged weight and would "
                    "put it back at every forward")
    return None


def _loads_refused(model: nn.Module):
    """``load_state_dict`` refused (before anything loads) on ``model`` and the modules above its layers left
    merged, as inside the fuse; the entered context, for ``__exit__`` once they are restored."""
    from .flux import _refusing_loads

    guard = _refusing_loads(model, {n: l for n, l in lorweb_layers(model).items() if l._merged})
    guard.__enter__()
    return guard


class _RestoreTheRest:
    """The exit of a fuse whose unfuse could not restore every layer: ``__exit__`` retries the layers left, and
    once they are back lets loads in again (``guard``)."""

    def __init__(self, restore_the_rest, guard):
        self.restore_the_rest, self.guard = restore_the_rest, guard

    def __exit__(self, *exc_info):
        self.restore_the_rest()
        self.guard.__exit__(None, None, None)


def check_fused_query(model: nn.Module, query: torch.Tensor) -> None:
    """Raise when the weights were fused ("full"/"offload") for another analogy than ``query`` (B, query_dim).
    The coefficients are computed without being set (``set_query`` is refused inside a merge), so the fused state is
    left as it is. Identical rows (one analogy repeated) are accepted; equality is up to rounding: each row within
    max(1e-4, 2 eps of the LoRWeB weights' dtype) of the fused coefficients, relative to their norm (a model cast to
    fp16 / bf16 after the fuse recomputes them from rounded projections and keys; one fused in fp16 / bf16 and cast
    to fp32 after it compares against coefficients computed in the lower precision: the larger of the two dtypes'
    eps counts)."""
    state = _fuse_state(model)
    if state is None or state[1] == "jit":
        return
    fused, fused_dtypes = state[2], state[3]
    within = defaultdict(list)  # device -> per layer, a bool tensor: every row close to the fused coefficients
    other_shape = False
    for name, layer in lorweb_layers(model).items():
        weight = layer.att_lora_to_q.weight
        now, then = layer.coefficients_from_query(query.to(weight.device, weight.dtype), fp32=True), fused[name]
        # close, not equal: the per-layer computation may round differently from set_query's batched one, and a
        # model cast to fp16 / bf16 after the fuse computes from rounded projections and keys: each row within
        # 2 eps of the weights' dtype, now or at fuse time (at least 1e-4) of the fused coefficients, relative to
        # their norm
        tol = max(1e-4, 2 * torch.finfo(weight.dtype).eps, 2 * torch.finfo(fused_dtypes[name]).eps)
        if now.shape[1] != then.shape[1]:
            other_shape = True
            break
        want = then[:1].to(now.device, torch.float32).expand(now.shape[0], -1)
        error = (now.float() - want).norm(dim=1) / want.norm(dim=1).clamp_min(1e-12)
        within[now.device].append((error <= tol).all())
    # read once per device (one host synchronisation), not once per layer
    if other_shape or not all(bool(torch.stack(flags).all()) for flags in within.values()):
        raise RuntimeError("the LoRWeB mixture is fused for another analogy: call unfuse_lora() before "
                           "generating with a new analogy (or fuse with strategy='jit')")


# ------------------------------------------------------------------------------------------------ strength
@serialized_on_model
def set_lorweb_scale(model: nn.Module, scale: float) -> None:
    """Multiply every layer's mixture by ``scale`` (diffusers' ``set_adapters`` weight, the official network
    multiplier): y = base(x) + scale * (lora_alpha / r) * sum_n alpha[n] B_n^T A_n^T x. 1.0 restores the
    trained strength, 0.0 gives the base model. Not saved with the weights."""
    if isinstance(scale, torch.Tensor) and scale.numel() == 1 and not scale.dtype.is_complex:
        scale = scale.item()  # a 0-dim tensor
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(float_or_inf(scale)):
        raise ValueError(f"scale must be a finite real number (int, float, a numpy or one-element torch scalar), "
                         f"got {scale!r}")
    layers = _require_layers(model)
    strategy = scale_fused_strategy(model)
    if strategy is not None:
        raise RuntimeError(f"the mixture is fused into the weights (strategy={strategy!r}); call unfuse_lora() "
                           "before changing its scale")
    _refuse_merged(layers, "set_lorweb_scale", "the current scale")
    for layer in layers.values():
        layer._lorweb_scale = float(scale)


def get_lorweb_scale(model: nn.Module) -> float:
    """The strength set with ``set_lorweb_scale`` (1.0 by default)."""
    scales = {layer._lorweb_scale for layer in _require_layers(model).values()}
    if len(scales) != 1:
        raise ValueError(f"the LoRWeB layers have different strengths {sorted(scales)}")
    return scales.pop()


# --------------------------------------------------------------------------------------------- load / unload
#: diffusers' ``load_lora_weights`` options for a checkpoint on the Hugging Face Hub (huggingface_hub's own names);
#: ``subfolder`` applies to a local folder too, the others only to a repo id
HUB_OPTIONS = ("revision", "subfolder", "cache_dir", "local_files_only", "token", "force_download")
def hub_repo_id(weights) -> Optional[str]:
    """``weights`` when it is a string naming a Hugging Face Hub repository ("owner/name", e.g. the released
    "hilamanor/lorweb") and not a local path: nothing of that name exists here, and no local folder is named like
    its owner part (``runs/lorweb_v2`` beside a ``runs/`` folder is a mistyped local path); else None."""
    return weights if names_hub_repo(weights) and not weights.lower().endswith(".safetensors") else None


def _no_single_folder(where: str, folders: list[str]) -> FileNotFoundError:
    names = ", ".join(folders[:5])
    return FileNotFoundError(f"{where} holds .safetensors files in {len(folders) or 'no'} folders"
                             f"{': ' + names if folders else ''}; pass weight_name (--weight-name) to pick the "
                             "checkpoint")


def hub_checkpoint_name(repo_id: str, subfolder: str = "", **hub) -> Optional[tuple[str, str]]:
    """(the file ``resolve_checkpoint`` takes from Hub repo ``repo_id`` without ``weight_name``, the folder it was
    picked in), both relative to ``subfolder``, read from the repo's file listing (``huggingface_hub.list_repo_files``,
    one metadata request) so that only that file is downloaded. The rule is the folder rule on names
    (``official_config.pick_checkpoint_name``): the top level, else the one folder holding .safetensors files.
    None when the listing cannot be had (``local_files_only``, ``HF_HUB_OFFLINE``, or a failed request): the caller
    then reads the cached or downloaded snapshot itself, whose own failure names the cause."""
    import huggingface_hub
    import huggingface_hub.constants  # a lazily loaded submodule: not an attribute until imported

    from .official_config import pick_checkpoint_name

    if hub.get("local_files_only") or huggingface_hub.constants.HF_HUB_OFFLINE:
        return None
    try:
        listing = huggingface_hub.list_repo_files(repo_id, revision=hub.get("revision"), token=hub.get("token"))
    except Exception as exc:  # huggingface_hub's errors and its HTTP client's share no base class
        logger.debug("listing Hub repo %s failed (%s: %s); reading its snapshot instead", repo_id,
                     type(exc).__name__, exc)
        return None
    prefix = f"{subfolder}/" if subfolder else ""
    names = [n[len(prefix):] for n in listing if n.startswith(prefix)]
    where = f"Hugging Face Hub repo {repo_id}"
    if not names:
        raise FileNotFoundError(f"LoRWeB checkpoint not found: {where} has no files" +
                                (f" in {subfolder!r}" if subfolder else ""))
    chosen = pick_checkpoint_name(names, where)
    if chosen is not None:
        return chosen, ""
    folders = sorted({n.rsplit("/", 1)[0] if "/" in n else "" for n in names if n.endswith(".safetensors")})
    if len(folders) != 1:
        raise _no_single_folder(where, [prefix + f if f else prefix.rstrip("/") or "." for f in folders])
    chosen = pick_checkpoint_name([n[len(folders[0]) + 1:] for n in names if n.startswith(folders[0] + "/")],
                                  f"{where}, folder {prefix}{folders[0]}")
    if chosen is None:
        raise FileNotFoundError(f"no LoRWeB checkpoint (*.safetensors) in {where}, folder {prefix}{folders[0]}")
    return f"{folders[0]}/{chosen}", folders[0]


def download_checkpoint(repo_id: str, weight_name: Optional[str] = None, *, subfolder: str = "",
                        picked_in: Optional[str] = None, **hub) -> Path:
    """The local copy (huggingface_hub's cache) of ``repo_id``'s top folder, holding its checkpoint files:
    ``subfolder/weight_name`` and the config.yaml beside it, in folder ``picked_in`` (relative to ``subfolder``, when
    ``hub_checkpoint_name`` picked the file) and at the top, or (no ``weight_name``) every .safetensors and .yaml
    file under ``subfolder`` and the top config.yaml. ``hub``: the other ``HUB_OPTIONS``, for
    ``huggingface_hub.snapshot_download``. Any failure (unknown or gated repo, a bad revision, offline without a
    cached copy, a network error) raises FileNotFoundError naming the repo and the cause."""
    import glob

    from huggingface_hub import snapshot_download

    prefix = f"{subfolder}/" if subfolder else ""
    if weight_name is not None:  # escaped: the Hub filters with fnmatch, where [ and ] are pattern characters
        folders = [os.path.dirname(prefix + weight_name)]
        if picked_in is not None:
            folders.append((prefix + picked_in).rstrip("/"))
        patterns = [glob.escape(prefix + weight_name), "config.yaml"] + \
            [glob.escape(f) + "/config.yaml" for f in dict.fromkeys(folders) if f]
    else:
        patterns = [glob.escape(prefix) + "*.safetensors", glob.escape(prefix) + "*.yaml", "config.yaml"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, **hub))
    except Exception as exc:  # huggingface_hub's errors and its HTTP client's share no base class
        raise FileNotFoundError(f"LoRWeB checkpoint {repo_id!r} is no local path, and getting it from the Hugging "
                                f"Face Hub failed ({type(exc).__name__}: {exc})") from exc


def resolve_checkpoint(weights: Union[str, os.PathLike], weight_name: Optional[str] = None,
                       **hub) -> tuple[Path, Optional[Path]]:
    """(checkpoint file, the config.yaml that goes with it or None) of ``weights``:

    - a safetensors file: itself (no config; a ``weight_name`` equal to its file name is accepted, as diffusers
      ignores it for a file, and any other is refused);
    - a folder (``subfolder`` in it when given): ``weight_name`` in it, else its final or newest complete checkpoint
      as ``--weights DIR`` picks it (``official_config.find_checkpoint``: the final file, else the highest
      ``<name>_<step:09d>``, also lorweb_fast run folders), with the config.yaml beside it (else the folder's);
    - a Hugging Face Hub repo id (``hub_repo_id``), downloaded (``download_checkpoint``, options ``hub`` =
      ``HUB_OPTIONS``) and read as a folder; when its top level holds no checkpoint and all its .safetensors files
      lie in one folder (e.g. ``lorweb_model/``), that folder is read the same way, else ``weight_name`` is needed.
      The config falls back to the repo's top config.yaml. Without ``weight_name`` the file is picked from the
      repo's listing (``hub_checkpoint_name``) and only it and its configs are downloaded; where no listing can be
      had (offline, ``local_files_only``), every .safetensors file of the cached snapshot is read.
    """
    from .official_config import config_beside, find_checkpoint

    if not isinstance(weights, (str, os.PathLike)):
        hint = " (a state dict: lf.load_lorweb_weights(model, state_dict, config) takes one)" \
            if isinstance(weights, Mapping) else ""
        raise TypeError(f"the LoRWeB checkpoint must be a safetensors file, a folder or a Hugging Face Hub repo id "
                        f"(a str or path), got {type(weights).__name__}{hint}")
    unknown = sorted(set(hub) - set(HUB_OPTIONS))
    if unknown:
        raise TypeError(f"unknown checkpoint options {unknown}; the Hugging Face Hub options are {list(HUB_OPTIONS)}")
    subfolder = (hub.pop("subfolder", None) or "").strip("/")
    hub = {k: v for k, v in hub.items() if v is not None}
    if weight_name is not None and (os.path.isabs(weight_name) or ".." in Path(weight_name).parts):
        raise ValueError(f"weight_name={weight_name!r} must be a relative path inside the folder or repo")
    repo = hub_repo_id(weights)
    if repo is None and hub:
        raise ValueError(f"{sorted(hub)} are Hugging Face Hub download options, but {weights} is a local path")
    picked = hub_checkpoint_name(repo, subfolder, **hub) if repo is not None and weight_name is None else None
    name = picked[0] if picked else weight_name
    top = Path(weights) if repo is None else \
        download_checkpoint(repo, name, subfolder=subfolder, picked_in=picked and picked[1], **hub)
    where = str(weights) if repo is None else f"Hugging Face Hub repo {repo}"
    base = top / subfolder if subfolder else top
    if name is None and not base.is_dir():
        if subfolder or not base.is_file():
            raise FileNotFoundError(f"LoRWeB checkpoint not found: {base}")
        return base, None
    if not base.is_dir():
        if base.is_file() and repo is None and not subfolder and base.name == weight_name:
            return base, None  # diffusers ignores weight_name for a file: the same file named twice is that file
        raise ValueError(f"weight_name={weight_name!r} is for a folder, but {base} is not a folder"
                         + (f" (it is the file {base.name}; pass the file alone)" if base.is_file() else ""))
    if picked:
        file = base / picked[0]
        if not file.is_file():
            raise FileNotFoundError(f"LoRWeB checkpoint not found: {picked[0]} in {where}, whose listing names it")
        config = config_beside(file, base / picked[1])
    elif weight_name is not None:
        file, config = base / weight_name, None
        if not file.is_file():
            raise FileNotFoundError(f"LoRWeB checkpoint not found: {weight_name} in {where}")
    else:
        try:
            file, config = find_checkpoint(base)
        except FileNotFoundError:
            if repo is None:
                raise
            folders = sorted({p.parent for p in base.rglob("*.safetensors")})
            if len(folders) != 1:
                raise _no_single_folder(where, [f.relative_to(top).as_posix() for f in folders]) from None
            file, config = find_checkpoint(folders[0])
    return file, config or config_beside(file, top)


def resolve_weight_file(path_or_dir: Union[str, os.PathLike], weight_name: Optional[str] = None, **hub) -> Path:
    """The checkpoint file of ``path_or_dir`` (``resolve_checkpoint`` without the config)."""
    return resolve_checkpoint(path_or_dir, weight_name, **hub)[0]


def _header_width(file: Path, suffix: str) -> Optional[int]:
    """The last dimension of the first 2-D LoRWeB tensor whose key ends in ``suffix``, read from the file header
    without loading tensors; None when there is none."""
    from safetensors import safe_open

    with safe_open(os.fspath(file), framework="pt") as f:
        for key in f.keys():
            if key.startswith(CHECKPOINT_PREFIX) and key.endswith(suffix):
                shape = f.get_slice(key).get_shape()
                return int(shape[-1]) if len(shape) == 2 else None
    return None


def checkpoint_query_dim(file: Path) -> Optional[int]:
    """The query width a LoRWeB checkpoint file expects, read from the file header without loading tensors: its
    ``att_lora_to_q`` input features, or for a checkpoint without query projections (``query_projection_type``
    "none", where the query is compared with the keys directly) the keys' width; None when the file holds
    neither."""
    width = _header_width(file, ".att_lora_to_q.weight")  # (key_dim, query_dim)
    return width if width is not None else checkpoint_key_dim(file)


def checkpoint_key_dim(file: Path) -> Optional[int]:
    """The key width (``lora_keys`` (N, key_dim)) of a LoRWeB checkpoint file, read from its header; None when the
    file has no 2-D ``lora_keys``."""
    return _header_width(file, ".lora_keys")


@serialized_on_model
def load_lora_weights(model: nn.Module, path_or_dir: Union[str, os.PathLike], weight_name: Optional[str] = None,
                      config: Union[str, os.PathLike, None] = None, *, query_dim: Optional[int] = None,
                      query_settings: Optional[dict] = None, encoder: Optional[tuple[str, str]] = None,
                      query_source: Optional[str] = None, **hub) -> tuple[Path, list[str]]:
    """Load an official-format LoRWeB checkpoint (file, directory or Hugging Face Hub repo id, see
    ``resolve_checkpoint``; ``hub``: its download options) into ``model`` (``load_lorweb_weights``).

    A directory's ``config.yaml`` (the one beside the chosen file, else the directory's) is used when ``config`` is
    None. ``query_dim``, when given (the analogy encoder's), must match the checkpoint, and ``query_settings``
    (``{"query_mode": ..., "pooling_type": ...}``, the encoder's; the pooling only in the patch modes, the only ones
    that pool) must match what the checkpoint's config.yaml or metadata records, as must the family of ``encoder``
    (``(name, kind)``, kind "clip", "siglip2" or "siglip"; CLIP or SigLIP: the official inference.py builds the
    encoder the checkpoint names, and a CLIP and a SigLIP2 query can have the same width), and ``query_source``
    (the encoder's, "grid" or "images") must match the ``lorweb.query_source`` metadata when the checkpoint records
    one (a query of the same width from other pixels): all are checked before the model changes. Returns
    (checkpoint file, loaded modules).
    """
    from .model import resolve_checkpoint_settings
    from .official_config import PATCH_QUERY_MODES, recorded_encoder_mismatch

    file, found_config = resolve_checkpoint(path_or_dir, weight_name, **hub)
    metadata = checkpoint_metadata(file)  # a corrupt file fails before anything changes
    recorded_source = metadata.get("lorweb.query_source")
    if query_source is not None and recorded_source is not None and recorded_source != query_source:
        raise LoRWeBCheckpointError(f"{file} was trained with query_source={recorded_source!r} (its metadata) but "
                                    f"this pipeline's encoder uses query_source={query_source!r}; build the pipeline "
                                    "with LoRWeBKontextPipeline.from_pretrained for this checkpoint. The model was "
                                    "not changed")
    if query_dim is not None:
        got = checkpoint_query_dim(file)
        if got is not None and got != query_dim:
            raise LoRWeBCheckpointError(f"{file} expects queries of {got} features but the analogy encoder gives "
                                        f"{query_dim}; the model was not changed")
    if config is None:
        config = found_config
    recorded = resolve_checkpoint_settings(file, config) if query_settings or encoder else None
    problem = None if encoder is None else recorded_encoder_mismatch(recorded, encoder[1])
    if problem is not None:
        raise LoRWeBCheckpointError(f"{file} was trained with {problem} but this pipeline's encoder {encoder[0]!r} "
                                    f"is a {encoder[1]} model; build the pipeline with "
                                    "LoRWeBKontextPipeline.from_pretrained for this checkpoint. The model was not "
                                    "changed")
    if query_settings:
        differ = {k: (recorded[k], v) for k, v in query_settings.items()
                  if recorded["sources"].get(k) != "official default" and recorded[k] != v
                  and (k != "pooling_type" or recorded["query_mode"] in PATCH_QUERY_MODES)}
        if differ:
            shown = ", ".join(f"{k}: checkpoint {a!r}, pipeline {b!r}" for k, (a, b) in differ.items())
            raise LoRWeBCheckpointError(f"{file} was trained with other query settings than this pipeline's encoder "
                                        f"({shown}); build the pipeline with LoRWeBKontextPipeline.from_pretrained "
                                        "for this checkpoint. The model was not changed")
    names = load_lorweb_weights(model, file, config)
    return file, names


@serialized_on_model
def unload_lora_weights(model: nn.Module) -> list[str]:
    """Put the stock layers back (``remove_lorweb``). Returns the restored names.

    As diffusers with peft, a mixture fused with ``fuse_lora`` stays in the weights: ``fuse_lora()`` then
    ``unload_lora_weights()`` bakes the fused analogy (at the fused strength) into the stock layers, e.g. before
    the base model's own ``save_pretrained``; call ``unfuse_lora()`` first to get the original weights back. The
    "full" and "offload" strategies keep the weights they already hold (no extra memory); "jit" needs one analogy and
    computes every layer's merged weight before any weight changes (one copy of the adapted weights; layers that
    shared one weight Parameter get their own)."""
    from .flux import merged_weight
    from .layer import decide_one_analogy

    state = getattr(model, _FUSED, None)
    if state is None:
        return remove_lorweb(model)
    layers = lorweb_layers(model)
    baked = {}
    if state[1] == "jit":  # every merged weight first: a failure (one analogy needed, memory) changes nothing
        decide_one_analogy(layers.values())
        for name, layer in layers.items():
            if not layer.holds_one_analogy():
                raise RuntimeError(f"unload_lora_weights() keeps a fused mixture in the weights, but {name} is fused "
                                   "with strategy='jit' for no analogy or a batch of different ones: set one analogy, "
                                   "or unfuse_lora() first to unload without baking")
        with torch.no_grad():
            baked = {name: merged_weight(layer) for name, layer in layers.items()}
    for layer in layers.values():
        layer._keep_merged_on_exit = True
    try:
        unfuse_lora(model)
    finally:
        for layer in layers.values():
            del layer._keep_merged_on_exit
    shared = Counter(id(layers[name].base_layer.weight) for name in baked)
    for name, weight in baked.items():
        base = layers[name].base_layer
        if shared[id(base.weight)] > 1:  # one Parameter on several layers: each gets its own, with its own mixture
            base.weight = nn.Parameter(weight, requires_grad=base.weight.requires_grad)
        else:
            base.weight.data = weight
    return remove_lorweb(model)


# ----------------------------------------------------------------------------------------------- model card
def model_card(model: nn.Module, *, encoder: str = DEFAULT_ENCODER, base_model: Optional[str] = None,
               training: Optional[dict] = None, repo_id: Optional[str] = None, query_mode: str = "cat-aa'b",
               pooling_type: str = "avg", weight_name: str = WEIGHT_NAME) -> str:
    """A README.md model card: base model, encoder, N, r, query mode, training data and steps when known, usage
    (loading ``weight_name``)."""
    layers = _require_layers(model)
    if training is not None and not isinstance(training, dict):
        raise TypeError(f"training must be a dict (e.g. {{'data': ..., 'steps': ...}}) or None, got "
                        f"{type(training).__name__}")
    first = next(iter(layers.values()))
    base = str(base_model or "black-forest-labs/FLUX.1-Kontext-dev")  # a Path too
    training = training or {}
    rows = [("base model", base), ("analogy encoder", encoder), ("basis LoRAs N", first.num_loras),
            ("rank r", first.rank), ("lora_alpha", f"{first.lora_alpha:g}"), ("key_dim", first.key_dim),
            ("query_dim", first.query_dim), ("heads", first.heads), ("activation", first.activation),
            ("reduce", first.reduce), ("query mode", query_mode), ("pooling", pooling_type),
            ("query projection", first.query_projection_type),
            ("adapted layers", len(layers)),
            ("training data", training.get("data", "unknown")), ("training steps", training.get("steps", "unknown"))]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    source = repo_id or "path/to/this/folder"
    import json

    import yaml

    # quoted where YAML needs it (a local folder's ' #', ': ', a leading '[' ...): the Hub parses the front matter
    front = yaml.safe_dump({"base_model": base}, allow_unicode=True, width=float("inf")).rstrip("\n")
    base_literal, weights_literal = (json.dumps(text, ensure_ascii=False)  # Python string literals, any path
                                     for text in (base, f"{source}/{weight_name}"))
    return f"""---
{front}
library_name: diffusers
tags:
- lorweb
- lora
- flux-kontext
- visual-analogy
---

# LoRWeB weights

A LoRWeB adapter (a basis of {first.num_loras} LoRAs of rank {first.rank}, mixed per sample from the analogy
a : a' :: b : ?) for {base}, in the official checkpoint format (`{weight_name}`, `{CONFIG_NAME}`).

| setting | value |
|---|---|
{table}

## Usage

```python
import torch
from lorweb_fast.flux import LoRWeBKontextPipeline

pipe = LoRWeBKontextPipeline.from_pretrained({base_literal}, {weights_literal}, dtype=torch.bfloat16,
                                             device="cuda")
(b_prime,) = pipe("a.png", "a_prime.png", "b.png", "describe the edit")
b_prime.save("b_prime.png")
```
"""


def save_pretrained(model: nn.Module, directory: Union[str, os.PathLike], *, encoder: str = DEFAULT_ENCODER,
                    query_mode: str = "cat-aa'b", pooling_type: str = "avg", base_model: Optional[str] = None,
                    training: Optional[dict] = None, repo_id: Optional[str] = None,
                    query_source: Optional[str] = None, weight_name: str = WEIGHT_NAME) -> Path:
    """Write ``lorweb.safetensors`` (official format; ``weight_name``: another file name ending in .safetensors),
    the official ``config.yaml`` (from the layers plus the encoder, query mode and pooling: what ``from_pretrained``
    and the official inference.py read back) and a README.md model card to ``directory``. Fused weights are not
    saved: the LoRWeB parameters are. ``query_source`` ("grid", official, or "images"), when given, is recorded in
    the metadata (``lorweb.query_source``), where ``from_pretrained`` and ``load_lora_weights`` read it back.

    Everything is checked before anything is written (``directory`` is created by ``save_lorweb_weights`` once the
    tensors and settings have passed): a refused save (e.g. NaN weights, an unknown query mode) leaves no folder
    or file behind. The three files are written to temporary files first and then renamed into place (the weights
    last), so a save that fails while writing leaves the folder's files as they were. A folder that holds other
    checkpoints (e.g. an official run folder) is refused: they would load with the new config.yaml, and two final
    checkpoints make loading the folder ambiguous (save into a folder of its own)."""
    from .official_config import check_query_settings

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory")
    if not isinstance(weight_name, str) or Path(weight_name).name != weight_name \
            or not weight_name.endswith(".safetensors") or weight_name.startswith("."):
        raise ValueError(f"weight_name must be a file name ending in .safetensors (no folder), got {weight_name!r}")
    check_query_settings(query_mode, pooling_type)
    card = model_card(model, encoder=encoder, base_model=base_model, training=training, repo_id=repo_id,
                      query_mode=query_mode, pooling_type=pooling_type,
                      weight_name=weight_name)  # also: the model has LoRWeB layers
    metadata = {"encoder": encoder}
    if query_source is not None:
        metadata["lorweb.query_source"] = query_source
    save_lorweb_weights(model, directory / weight_name, metadata=metadata,
                        config={"encoder": encoder, "query_mode": query_mode, "pooling_type": pooling_type,
                                "model": base_model}, extra_files={CARD_NAME: card})
    return directory


def push_to_hub(model: nn.Module, repo_id: str, *, encoder: str = DEFAULT_ENCODER, query_mode: str = "cat-aa'b",
                pooling_type: str = "avg", base_model: Optional[str] = None, training: Optional[dict] = None,
                private: Optional[bool] = None, query_source: Optional[str] = None,
                token: Optional[str] = None, commit_message: str = "Upload LoRWeB weights"):
    """``save_pretrained`` into a temporary folder, then ``huggingface_hub`` create_repo + upload_folder."""
    import huggingface_hub

    if not isinstance(repo_id, str) or not repo_id.strip():
        raise ValueError(f"repo_id must be a non-empty string, got {repo_id!r}")
    with tempfile.TemporaryDirectory(prefix="lorweb-push-") as tmp:
        save_pretrained(model, tmp, encoder=encoder, query_mode=query_mode, pooling_type=pooling_type,
                        base_model=base_model, training=training, repo_id=repo_id, query_source=query_source)
        huggingface_hub.create_repo(repo_id, private=private, token=token, exist_ok=True)
        return huggingface_hub.upload_folder(repo_id=repo_id, folder_path=tmp, token=token,
                                             commit_message=commit_message)
