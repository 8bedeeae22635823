"""Model-level API: inject LoRWeB layers, set the analogy query once, and read/write official-format checkpoints."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import stat
import tempfile
import weakref
from collections import defaultdict
from pathlib import Path
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Union

import torch
from torch import nn

from . import ops
from ._files import (missing_folders, naming_the_file, remove_empty_folders, temporary_file, temporary_prefix,
                     write_temporary_text)
from . import _locks
from ._locks import holding_analogy, serialized_on_model
from .layer import (LoRWeBLinear, default_adapter_dtype, group_offloading_members, group_offloading_modes,
                    linear_dims, refuse_disk_group_offloading, replaced_query_projection_error, rows_identical,
                    uninitialised_lorweb_tensors)
from .reference import ACTIVATIONS, REDUCTIONS
from .validation import (all_finite, check_choice, check_finite_tensor, check_float_tensor, check_has_values, check_int,
                         check_real, check_regex, refuse_finiteness_check_under_vmap, warn)

#: The official targets: every nn.Linear inside the double and single FLUX blocks (494 layers in FLUX.1).
DEFAULT_TARGET_MODULES = r"(transformer_blocks|single_transformer_blocks)\.\d+\..+"
#: Prefix of every key in the official checkpoint format.
CHECKPOINT_PREFIX = "transformer."
PARAM_SUFFIXES = ("lora_A", "lora_B", "lora_keys", "att_lora_to_q.weight")
DEFAULT_ENCODER = "openai/clip-vit-large-patch14"


class LoRWeBCheckpointError(ValueError):
    """A checkpoint does not match the model, is partial, corrupt or holds non-finite values."""


@dataclass
class LoRWeBConfig:
    """Hyper-parameters of a LoRWeB injection (defaults: the official FLUX.1-Kontext release).

    target_modules: a regex (full match against the module name, like peft) or a list of names, each matching a
    module whose name equals it or ends with ``"." + name`` (like peft). Only ``nn.Linear`` modules (and subclasses,
    e.g. bitsandbytes' quantized linears) are wrapped. The other fields are ``LoRWeBLinear``'s arguments (lora_alpha
    None: rank, i.e. scale 1).
    """

    num_loras: int = 32
    rank: int = 4
    lora_alpha: Optional[float] = None
    key_dim: int = 128
    query_dim: int = 2304
    heads: int = 1
    activation: str = "softmax"
    reduce: str = "mean"
    query_projection_type: str = "linear"
    target_modules: Union[str, list[str]] = field(default=DEFAULT_TARGET_MODULES)

    def validate(self) -> "LoRWeBConfig":
        """Raise TypeError / ValueError naming the first field out of range (called by ``inject_lorweb``)."""
        for name in ("num_loras", "rank", "key_dim", "query_dim", "heads"):
            check_int(f"LoRWeBConfig.{name}", getattr(self, name), lo=1)
        if self.key_dim % self.heads:
            raise ValueError(f"LoRWeBConfig.key_dim={self.key_dim} is not divisible by heads={self.heads}")
        if self.lora_alpha is not None:
            check_real("LoRWeBConfig.lora_alpha", self.lora_alpha, lo=0.0, lo_open=True)
        check_choice("LoRWeBConfig.activation", self.activation, ACTIVATIONS)
        check_choice("LoRWeBConfig.reduce", self.reduce, REDUCTIONS)
        check_choice("LoRWeBConfig.query_projection_type", self.query_projection_type, ("linear", "none"))
        if self.query_projection_type == "none" and self.key_dim != self.query_dim:
            raise ValueError(f"LoRWeBConfig.query_projection_type='none' feeds the query to the keys directly, so "
                             f"key_dim must equal query_dim; got key_dim={self.key_dim}, query_dim={self.query_dim}")
        targets = self.target_modules
        if isinstance(targets, str):
            check_regex("LoRWeBConfig.target_modules", targets)
        elif not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(t, str) and t
                                                                              for t in targets):
            raise TypeError("LoRWeBConfig.target_modules must be a regex string or a non-empty list of module "
                            f"names, got {targets!r}")
        return self

    def layer_kwargs(self) -> dict:
        """The keyword arguments of ``LoRWeBLinear`` for this configuration (all fields but target_modules)."""
        return dict(num_loras=self.num_loras, rank=self.rank, lora_alpha=self.lora_alpha, key_dim=self.key_dim,
                    query_dim=self.query_dim, heads=self.heads, activation=self.activation, reduce=self.reduce,
                    query_projection_type=self.query_projection_type)


def matches_target(name: str, target_modules: Union[str, Iterable[str]]) -> bool:
    """peft's rule: a string is a regex that must match the whole name; a list matches by name or dotted suffix."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def lorweb_layers(model: nn.Module) -> dict[str, LoRWeBLinear]:
    """``{module name: LoRWeBLinear}`` for every injected layer of ``model``, in module order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRWeBLinear)}


def unwrapped_model(model: nn.Module) -> nn.Module:
    """``model`` without the wrappers that put a level into its module names: ``torch.compile``'s OptimizedModule
    (``_orig_mod.``) and ``DistributedDataParallel`` (``module.``). Checkpoint keys are the wrapped model's names
    (a file saved from ``torch.compile(model)`` loads into ``model``, and the other way round)."""
    from torch.nn.parallel import DistributedDataParallel

    while True:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, DistributedDataParallel):
            model = model.module
        else:
            return model


#: The module-name levels that wrappers put in front of the module they wrap: ``torch.compile``'s OptimizedModule and
#: torch's ``checkpoint_wrapper`` (accelerate's FSDP activation checkpointing wraps each block in place)
WRAPPER_LEVELS = ("_orig_mod", "_checkpoint_wrapped_module")


def checkpoint_module_name(name: str) -> str:
    """A module name as checkpoint keys name it: without the ``_orig_mod`` levels of ``torch.compile`` wrappers
    (blocks compiled one by one and put back hold their layers under ``<block>._orig_mod.``) and the
    ``_checkpoint_wrapped_module`` levels of activation-checkpoint wrappers (as torch's own state_dict hooks drop
    them); module lookups through either wrapper reach the same module without them."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_LEVELS)


def _checkpoint_key(name: str, suffix: str) -> str:
    """The checkpoint key of the LoRWeB tensor ``suffix`` of the layer named ``name`` (``lorweb_layers``' name)."""
    return f"{CHECKPOINT_PREFIX}{checkpoint_module_name(name)}.{suffix}"


def _parent_and_child(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(the module holding the submodule ``name``, the attribute it holds it under)."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    setattr(*_parent_and_child(model, name), module)


def _refuse_incompatible_modules(model: nn.Module, what: str) -> None:
    """Refuse, before anything changes, models whose layers LoRWeB would adapt without effect or break:
    diffusers attention with fused projections (``fuse_qkv_projections()``: the attention runs ``to_qkv`` /
    ``to_added_qkv``, not the ``to_q/k/v`` and ``add_*_proj`` layers LoRWeB adapts and the official checkpoints
    hold), and peft adapter layers (their base layers and adapter internals are linear layers too)."""
    inside_lorweb = None  # the name of the LoRWeB layer whose submodules the walk is in
    peft_layer = peft_inside = None  # the first peft layer, and the first inside a LoRWeB layer (with that layer)
    for name, module in model.named_modules():
        if isinstance(module, LoRWeBLinear):
            inside_lorweb = name
        elif inside_lorweb is not None and not name.startswith(inside_lorweb + "."):
            inside_lorweb = None
        if getattr(module, "fused_projections", False) is True:
            raise ValueError(f"{what}: {name or type(model).__name__} has fused QKV projections "
                             "(fuse_qkv_projections()): its attention runs to_qkv / to_added_qkv, not the to_q / to_k "
                             "/ to_v (add_*_proj) layers LoRWeB adapts, whose adapters would be silently unused; call "
                             "unfuse_qkv_projections() first")
        if hasattr(module, "adapter_layer_names") and hasattr(module, "get_base_layer"):  # peft's BaseTunerLayer
            peft_layer = peft_layer or (name, module)
            if inside_lorweb and peft_inside is None:
                peft_inside = (name, module, inside_lorweb)
    if peft_inside is not None:
        # diffusers' unload skips module paths holding "lora" (att_lora_to_q): only remove_lorweb gets them out
        name, module, layer = peft_inside
        raise ValueError(f"{what}: {name} is a peft adapter layer ({type(module).__name__}) inside the LoRWeB layer "
                         f"{layer}: a peft / diffusers LoRA was added after LoRWeB with target modules that reach "
                         "into LoRWeB's layers (e.g. target_modules='all-linear'), some of which diffusers' unload "
                         "leaves in them (att_lora_to_q); take LoRWeB out with lf.remove_lorweb(model) (the peft "
                         "layers stay), unload the peft adapter (transformer.unload_lora()), then inject or load "
                         "LoRWeB again")
    if peft_layer is not None:
        name, module = peft_layer
        raise ValueError(f"{what}: {name} is a peft adapter layer ({type(module).__name__}); LoRWeB does not stack "
                         "with peft adapters: unload them first with diffusers' own calls (transformer.unload_lora(), "
                         "or the stock pipeline's unload_lora_weights(): pipe.pipe.unload_lora_weights() on a "
                         "LoRWeBKontextPipeline, whose own unload_lora_weights() removes LoRWeB)")


def _refuse_new_layers_under_group_offloading(model: nn.Module, names, what: str) -> None:
    """LoRWeB layers wrapped at ``names`` after diffusers' group offloading was enabled: fine under in-memory
    block-level offloading (the block, moved whole, takes them along), refused where they would belong to no group
    (leaf-level offloading) or miss the tables a disk or stream group fixed when it was enabled."""
    fixed, members = group_offloading_members(model)
    if not names or (not fixed and not members):
        return

    def moved_whole(name: str) -> bool:  # a proper ancestor of the wrapped layer is an in-memory group's module
        parts = name.split(".")
        return any(id(model.get_submodule(".".join(parts[:depth]))) in members for depth in range(len(parts)))

    if fixed or not all(moved_whole(name) for name in names):
        raise RuntimeError(f"{what}: {type(model).__name__} has group offloading enabled, whose groups were built "
                           "before the LoRWeB layers existed and would not hold them (leaf-level, disk or stream "
                           "offloading); load the LoRWeB adapter first, then enable group offloading")


def _keep_query_projection_out_of_layerwise_casting(model: nn.Module) -> None:
    """diffusers' ``enable_layerwise_casting`` stores every nn.Linear outside its skip patterns in a low-precision
    dtype; ``set_query`` reads ``att_lora_to_q``'s weight directly (one batched product for all layers), so that
    layer is added to the model's skip patterns, as diffusers skips peft's adapter layers by default. The base layers
    are cast as usual (a base layer with hooks is called, not read: ``layer.has_forward_hooks``)."""
    if not hasattr(model, "enable_layerwise_casting"):
        return
    patterns = list(getattr(model, "_skip_layerwise_casting_patterns", None) or [])
    if "att_lora_to_q" not in patterns:
        model._skip_layerwise_casting_patterns = patterns + ["att_lora_to_q"]


def _find_targets(model: nn.Module, target_modules, *, refuse_aliases: bool = True) -> list[str]:
    """The names of the nn.Linear modules of ``model`` that ``target_modules`` matches (outside LoRWeB layers).
    A targeted linear reachable under several names (one module assigned to two attributes) is refused with a
    ValueError naming them: a LoRWeB layer swapped in under one name would leave the others calling the bare base
    layer, silently without the adapter (``named_modules()`` lists such a module once)."""
    inside_lorweb = [n + "." for n in lorweb_layers(model)]
    modules, names_of = _modules_with_every_name(model)
    names = [name for name, module in modules.items()
             if name and not any(name.startswith(p) for p in inside_lorweb) and isinstance(module, nn.Linear)
             and matches_target(name, target_modules)]
    shared = [names_of[id(modules[n])] for n in names if len(names_of[id(modules[n])]) > 1]
    if shared and refuse_aliases:
        raise ValueError(f"the targeted linear layer {shared[0][0]!r} is one module reachable under several names "
                         f"{shared[0]}: a LoRWeB layer swapped in under one of them would leave the others "
                         "without the adapter; give the module one name (or leave it out of target_modules)")
    return names


def _modules_with_every_name(model: nn.Module) -> tuple[dict, dict]:
    """``({name: module}, {id(module): [its names]})`` over every name a module is reachable under
    (``named_modules()`` lists a module assigned to two attributes once)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    names_of: dict[int, list] = {}
    for name, module in modules.items():
        names_of.setdefault(id(module), []).append(name)
    return modules, names_of


def _read_not_called(model: nn.Module, name: str) -> Optional[str]:
    """Why the linear ``name`` cannot carry a LoRWeB layer because its parent reads its weight instead of calling
    it (``nn.MultiheadAttention`` passes ``out_proj.weight`` to ``F.multi_head_attention_forward`` and never calls
    ``out_proj``: the adapter would be silently unused, and the parent's forward fails on the missing ``weight``);
    None when it can."""
    parent, child = _parent_and_child(model, name)
    if isinstance(parent, nn.MultiheadAttention):
        return (f"{name} is the {child} of an nn.MultiheadAttention, which reads its weight directly and never calls "
                "it, so its LoRWeB adapter would be silently unused")
    return None


def _refuse_targets_read_not_called(model: nn.Module, names, what: str) -> None:
    """Refuse, before anything changes, targets whose parent reads their weight instead of calling them."""
    for name in names:
        why = _read_not_called(model, name)
        if why:
            raise ValueError(f"{what}: {why}; leave it out of target_modules")


def _freeze_base_model(model: nn.Module) -> None:
    """Every parameter of ``model`` that is not a LoRWeB tensor of one of its LoRWeBLinear layers stops requiring
    grad: as peft's injection (``inject_adapter_in_model``, diffusers' ``add_adapter``) leaves only the adapters
    trainable (peft ``BaseTuner._mark_only_adapters_as_trainable``), and as the official trainer freezes the
    transformer."""
    # the layer's own parameters, not its base layer's: a parametrized LoRWeB tensor's stored original included
    keep = {id(p) for layer in lorweb_layers(model).values() for name, p in layer.named_parameters()
            if not name.startswith("base_layer.")}
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)


@serialized_on_model
def inject_lorweb(model: nn.Module, config: Optional[LoRWeBConfig] = None, *,
                  dtype: Optional[torch.dtype] = None, freeze_base_model: bool = True) -> list[str]:
    """Wrap every targeted linear layer of ``model`` in a ``LoRWeBLinear``, in place.

    Args:
        dtype: the dtype in which the LoRWeB parameters (lora_A, lora_B, lora_keys, att_lora_to_q) are created and
            initialised; None (default): each base layer's weight dtype (its compute dtype under diffusers'
            layerwise casting; fp32 for bases without a plain weight of 16 bits or more, e.g. bitsandbytes, float8).
            Training passes float32: fp32 master weights whose initial values are not rounded to a bf16 base's dtype.
        freeze_base_model: True (default, as peft's injection): every parameter of ``model`` other than the LoRWeB
            tensors stops requiring grad, so an optimizer built from ``p.requires_grad`` trains LoRWeB only; False:
            only the wrapped base layers are frozen, the model's other parameters are left as they were.
            ``remove_lorweb`` does not unfreeze them (as peft's unload).

    Returns:
        The injected module names.
    """
    config = config or LoRWeBConfig()
    if not isinstance(config, LoRWeBConfig):
        raise TypeError(f"config must be a LoRWeBConfig, got {type(config).__name__}")
    config.validate()
    model = unwrapped_model(model)  # torch.compile(model) / DDP: the targets are the wrapped model's names
    already = [n for n, m in lorweb_layers(model).items() if matches_target(n, config.target_modules)]
    _refuse_incompatible_modules(model, "inject_lorweb")
    if already:
        raise ValueError(f"LoRWeB is already injected into {len(already)} targeted modules, e.g. {already[:3]}; "
                         "call remove_lorweb(model) first")
    names = _find_targets(model, config.target_modules)
    compiled = [n for n in names if n.endswith("._orig_mod") or n == "_orig_mod"] + [
        n for n, m in model.named_modules() if isinstance(m, torch._dynamo.eval_frame.OptimizedModule)
        and isinstance(m._orig_mod, nn.Linear) and matches_target(n, config.target_modules)]
    if compiled:  # the wrapper's compiled code calls the linear it was compiled with: a layer swapped in is unused
        raise ValueError(f"inject_lorweb: the targeted linear {compiled[0]!r} is compiled on its own (a torch.compile "
                         "wrapper holds it): a LoRWeB layer swapped in behind the wrapper would never run; inject "
                         "before compiling (or compile the model or its blocks afterwards)")
    _refuse_targets_read_not_called(model, names, "inject_lorweb")
    _refuse_new_layers_under_group_offloading(model, names, "inject_lorweb")
    if not names:
        raise ValueError(f"target_modules={config.target_modules!r} matches no linear layer of "
                         f"{type(model).__name__}")
    _swap_in_layers(model, lambda: {name: LoRWeBLinear(model.get_submodule(name), dtype=dtype,
                                                        **config.layer_kwargs()) for name in names},
                    freeze_base_model)
    return names


def finished_through_interrupt(work) -> Optional[BaseException]:
    """Run ``work()``; a Ctrl-C (a BaseException that is no Exception) during it runs ``work()`` once more, whole, and
    is returned for the caller to raise once the rest of its own work is done (an idempotent step that must not stop
    half way: a checkpoint's copy, a weight's restore). None when nothing interrupted it; an Exception propagates."""
    try:
        work()
    except Exception:
        raise
    except BaseException as exc:
        work()
        return exc
    return None


@contextlib.contextmanager
def global_rng_kept():
    """torch's process-wide random states (the CPU generator and, once CUDA is initialised, every CUDA device's)
    put back after the block: initial values drawn in it (layers whose tensors a checkpoint overwrites at once, or
    the trainer's seeded initial basis) leave the caller's own later draws as they were, as diffusers' and
    transformers' loaders do."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield


def _swap_in_layers(model: nn.Module, build, freeze_base_model: bool, fill=None) -> dict:
    """The layers ``build()`` makes ({name: LoRWeBLinear} around the model's modules) swapped into ``model``, the
    query projections kept out of layerwise casting and, with ``freeze_base_model``, the rest frozen; then
    ``fill()`` (if given: writing values into the layers). Undone whatever interrupts it, ``fill()`` included
    (Ctrl-C, out of memory; building a layer freezes its base): the modules, every ``requires_grad`` flag and the
    model's layerwise-casting skip patterns as they were. The new layers are built outside inference mode (their
    tensors are never inference tensors, which only inference mode may write: a load under ``torch.inference_mode()``
    left the model unable to take the next one) and each takes the train / eval mode of the layer it wraps. Returns
    the new layers."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    skip_patterns = model.__dict__.get("_skip_layerwise_casting_patterns", _ABSENT)  # (an instance attribute)
    guards = {name: model.__dict__.get(name, _ABSENT) for name in GUARDED_WHILE_INJECTED}
    new_layers, swapped_in, replaced = {}, [], {}
    try:
        with _locks.LOADING, torch.inference_mode(False):  # modules built while another thread loads a model
            new_layers = build()  # would get its meta parameters
        for layer in new_layers.values():
            layer.train(layer.base_layer.training)  # an eval model stays in eval mode
        for name, layer in new_layers.items():  # all built: swapping in cannot fail half way
            # what the attribute held: the base layer, or a torch.compile wrapper around it (put back as it was)
            replaced[name] = getattr(*_parent_and_child(model, name))
            swapped_in.append(name)  # first: undone even when the interrupt comes right after the swap
            _set_submodule(model, name, layer)
        if new_layers:
            _keep_query_projection_out_of_layerwise_casting(model)
            _guard_methods_while_injected(model)
            if freeze_base_model:
                _freeze_base_model(model)
        if fill is not None:
            fill()
    except BaseException:
        for name in reversed(swapped_in):
            _set_submodule(model, name, replaced[name])
        for param, flag in flags:
            if param.requires_grad != flag:  # (an inference tensor's flag can be read but not set outside the mode)
                param.requires_grad_(flag)
        if skip_patterns is _ABSENT:
            model.__dict__.pop("_skip_layerwise_casting_patterns", None)
        else:
            model._skip_layerwise_casting_patterns = skip_patterns
        for name, guard in guards.items():
            if guard is _ABSENT:
                model.__dict__.pop(name, None)
        raise
    return new_layers


_ABSENT = object()

#: the projections diffusers' ``fuse_projections`` concatenates into to_qkv / to_added_qkv
FUSED_PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


def _save_pretrained_refusal(model: nn.Module) -> Optional[str]:
    """Why the model's own ``save_pretrained`` (diffusers' ``ModelMixin``) cannot save it now, or None."""
    layers = lorweb_layers(model)
    if not layers:
        return None
    return (f"{type(model).__name__}.save_pretrained() of a model holding {len(layers)} LoRWeB layers (e.g. "
            f"{next(iter(layers))}) would store their base weights as *.base_layer.weight beside the LoRWeB tensors, "
            "keys a stock from_pretrained does not map back (weights left on the meta device, or random): save the "
            "LoRWeB adapter with lorweb_fast.save_lorweb_weights (pipe.save_lora_weights) and the base model before "
            "injecting, or bake one analogy in first (pipe.fuse_lora(), then pipe.unload_lora_weights()), or call "
            "lorweb_fast.remove_lorweb(model)")


def _fuse_qkv_refusal(model: nn.Module) -> Optional[str]:
    """Why diffusers' ``fuse_qkv_projections`` cannot fuse the model's attention now (a projection it concatenates
    is a LoRWeB layer, which it would bypass, and it fuses attention by attention, stopping half way), or None."""
    wrapped = [f"{name}.{child}" if name else child for name, module in model.named_modules()
               if callable(getattr(module, "fuse_projections", None))
               for child in FUSED_PROJECTIONS if isinstance(getattr(module, child, None), LoRWeBLinear)]
    if not wrapped:
        return None
    return (f"{type(model).__name__}.fuse_qkv_projections() with {len(wrapped)} attention projections that are "
            f"LoRWeB layers (e.g. {wrapped[0]}): the fused to_qkv / to_added_qkv would bypass their mixture; "
            "remove LoRWeB first (lorweb_fast.remove_lorweb(model), or pipe.unload_lora_weights()) or keep the "
            "projections unfused")


def _refusing(why):
    """A ``GUARDED_WHILE_INJECTED`` guard that raises ``TypeError(why(model))`` when ``why`` gives a reason, and
    else calls the stock method."""
    def guard(model: nn.Module, call):
        reason = why(model)
        if reason is not None:
            raise TypeError(reason)
        return call()
    return guard


def _keeping_frozen_layers_frozen(model: nn.Module, call):
    """diffusers' ``dequantize()`` puts new modules (``nn.Linear`` with trainable weights) in place of the quantized
    layers (GGUF, bitsandbytes, torchao), the base layers the LoRWeB layers wrap and the model's other layers alike:
    with ``inject_lorweb``'s frozen base they would get gradients (trained by an optimizer built from
    ``requires_grad``). A module whose own parameters were all frozen before the call has them frozen after it."""
    frozen = {name for name, module in model.named_modules()
              if any(True for _ in module.parameters(recurse=False))
              and not any(p.requires_grad for p in module.parameters(recurse=False))}
    try:
        return call()
    finally:
        for name, module in model.named_modules():
            if name in frozen:
                for param in module.parameters(recurse=False):
                    param.requires_grad_(False)


#: stock methods of the model that cannot work as they are while it holds LoRWeB layers: {name: guard(model, call)},
#: ``call()`` being the stock method with the caller's arguments
GUARDED_WHILE_INJECTED = {"save_pretrained": _refusing(_save_pretrained_refusal),
                          "fuse_qkv_projections": _refusing(_fuse_qkv_refusal),
                          "dequantize": _keeping_frozen_layers_frozen}


class _GuardedWhileInjected:
    """An instance attribute ``inject_lorweb`` sets over one of the model's own methods (``GUARDED_WHILE_INJECTED``):
    a call goes through the method's guard (which raises ``TypeError`` naming LoRWeB and the ways out while the
    model holds LoRWeB layers that the method cannot handle, or mends what the method does to them) around the
    class's method. Holds the model weakly (no reference cycle); deep copies and pickles are bound to the copy."""

    def __init__(self, model: nn.Module, name: str):
        self._model, self.name = weakref.ref(model), name

    def __call__(self, *args, **kwargs):
        model = self._model()
        return GUARDED_WHILE_INJECTED[self.name](model, lambda: getattr(type(model), self.name)(model, *args,
                                                                                               **kwargs))

    def __deepcopy__(self, memo):
        model = self._model()
        return type(self)(memo.get(id(model), model), self.name)  # (the copy: in memo before its attributes)

    def __reduce__(self):
        return type(self), (self._model(), self.name)


#: the guard's name before the thirty-eighth session: whole-model pickles (``torch.save(model)``) made then load
_RefusedWhileInjected = _GuardedWhileInjected


def _guard_methods_while_injected(model: nn.Module) -> None:
    """Set the ``GUARDED_WHILE_INJECTED`` guards on ``model`` (those its class has, not set yet)."""
    for name in GUARDED_WHILE_INJECTED:
        if callable(getattr(type(model), name, None)) and name not in model.__dict__:
            model.__dict__[name] = _GuardedWhileInjected(model, name)


def _drop_method_guards(model: nn.Module) -> None:
    """Remove the ``_guard_methods_while_injected`` guards (the model holds no LoRWeB layer any more)."""
    for name in GUARDED_WHILE_INJECTED:
        if isinstance(model.__dict__.get(name), _GuardedWhileInjected):
            del model.__dict__[name]


@serialized_on_model
def remove_lorweb(model: nn.Module) -> list[str]:
    """Put the original base layers back in place of every LoRWeBLinear. Returns the restored names. Refused while
    the layers are merged (a merged() block or fuse_lora(), any strategy): the stock layers would keep the merged
    weights, or the block or fuse state would outlive the layers ("jit")."""
    layers = lorweb_layers(model)
    if "" in layers:  # the layer itself: there is no parent to put its base layer back into
        raise TypeError("remove_lorweb takes the model that holds LoRWeB layers, got a LoRWeBLinear itself: use its "
                        "base_layer (layer.base_layer) in its place")
    _refuse_merged(layers, "remove_lorweb", jit=True)
    for name, layer in layers.items():
        _set_submodule(model, name, layer.base_layer)
    _drop_method_guards(model)
    return list(layers)


@serialized_on_model
def set_backend(model: nn.Module, backend: Optional[str]) -> None:
    """Run every LoRWeB layer of ``model`` on ``backend`` (None: the best available per call, ``ops.DEFAULT_ORDER``;
    "torch", "triton" or "cuda"), as ``LoRWeBLinear(..., backend=...)`` does for one layer. Only the name is
    checked here: a named backend that cannot run on the layers' tensors raises ``BackendUnavailableError`` at the
    forward, naming why (the model may still move to another device)."""
    if backend is not None and backend not in ops.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {ops.BACKENDS} or None")
    for layer in _require_layers(model).values():
        layer.backend = backend


def _require_layers(model: nn.Module) -> dict[str, LoRWeBLinear]:
    layers = lorweb_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRWeB layers: call inject_lorweb or load_lorweb_weights "
                         "first")
    return layers


#: bytes of att_lora_to_q weights that set_query stacks for one batched coefficient computation
QUERY_STACK_BYTES = 16 * 2 ** 20


@serialized_on_model
def set_query(model: nn.Module, query: torch.Tensor, *, per_forward: bool = False,
              check_finite: bool = True) -> dict[str, torch.Tensor]:
    """Compute every layer's coefficients from the analogy query and cache them until the next ``set_query``.

    Layers with the same configuration are computed together in batched computations (one group for the official
    setup; ``QUERY_STACK_BYTES`` of query projections stacked at a time), once per call: never per forward or per
    denoising step. With autograd enabled the coefficients
    stay differentiable with respect to every layer's ``att_lora_to_q`` and ``lora_keys`` (training).

    Args:
        query: (B, query_dim) analogy queries, one per sample, B >= 1; any floating dtype and device (moved to each
            layer's device and cast to its att_lora_to_q dtype).
        per_forward: instead, hand the query to every layer, which computes its own coefficients inside its own
            forward (``LoRWeBLinear.set_query_per_forward``). Training under FSDP needs this: sharded LoRWeB
            parameters are only gathered inside the forward of the module that holds them.
        check_finite: refuse a non-finite query or non-finite coefficients (nothing is set then). The check is one
            device synchronisation (per configuration group, one in the official setup); False skips it, for
            callers that check elsewhere or capture CUDA graphs.

    Returns:
        ``{name: (B, N)}`` as ``get_coefficients``, fp32 (float64 for float64 LoRWeB weights) on each layer's
        device (empty with ``per_forward``).
    """
    layers = _require_layers(model)
    check_float_tensor("query", query)
    if query.dim() != 2 or query.shape[0] < 1:
        raise ValueError(f"query must be a (B, query_dim) tensor with B >= 1, got shape {tuple(query.shape)}")
    check_has_values("query", query)  # whatever check_finite says: the coefficients are computed from its values
    _refuse_merged(layers, "set_query")
    if not torch.compiler.is_compiling():
        refuse_disk_group_offloading(layers, group_offloading_modes(model), "set_query")
    groups: dict[tuple, list[tuple[str, LoRWeBLinear]]] = defaultdict(list)
    for name, layer in layers.items():
        if layer.query_dim != query.shape[1]:
            raise ValueError(f"query has {query.shape[1]} features but layer {name} expects query_dim="
                             f"{layer.query_dim}")
        replaced = replaced_query_projection_error(name, layer)
        if replaced:
            raise ValueError(replaced)
        w = layer.att_lora_to_q.weight
        if any(t.device.type == "meta" for t in (w, layer.lora_A, layer.lora_B, layer.lora_keys)):
            # per_forward too: the layer's forward reads att_lora_to_q's weight directly (and the basis)
            raise ValueError(f"layer {name} has its LoRWeB weights on the meta device (e.g. sequential CPU offload, "
                             "which keeps weights only inside each module's forward): the coefficients cannot be "
                             "computed from them (here, or per forward); use enable_model_cpu_offload or block-level "
                             "group offloading instead")
        key = (layer.num_loras, layer.key_dim, layer.heads, layer.activation, layer.reduce, w.dtype, w.device)
        groups[key].append((name, layer))
    query_hint = "the analogy query must be finite (check the encoder inputs)"
    if per_forward:
        if check_finite:
            check_finite_tensor("query", query, query_hint)
        for layer in layers.values():
            layer.set_query_per_forward(query, check_finite=False)  # checked once above
        return {}
    computed = []
    for (_, _, heads, activation, reduce, dtype, device), members in groups.items():
        group_query = query.to(device)
        # stacked QUERY_STACK_BYTES of att_lora_to_q weights at a time: never a copy of all of them
        per_chunk = max(1, QUERY_STACK_BYTES // members[0][1].att_lora_to_q.weight.nbytes)
        coeffs = torch.cat([ops.compute_coefficients(
            group_query, torch.stack([layer.query_projection_weight() for _, layer in chunk]),  # (L', key_dim, qd)
            torch.stack([layer.lora_keys for _, layer in chunk]),  # (L', N, key_dim)
            heads=heads, activation=activation, reduce=reduce)
            for chunk in (members[i:i + per_chunk] for i in range(0, len(members), per_chunk))])  # (L, B, N)
        # one synchronisation per group for the query and the coefficients together (and, for B > 1, whether each
        # layer's rows are one analogy, which merges and "jit" forwards need); the query is named first
        finite, one_analogy = True, None
        if check_finite:
            # (the coefficients: batched when a LoRWeB tensor is, with an unbatched query)
            refuse_finiteness_check_under_vmap("the query or the coefficients", group_query, coeffs)
            flags = (torch.isfinite(group_query).all() & torch.isfinite(coeffs).all()).reshape(1)
            if query.shape[0] > 1:
                flags = torch.cat([flags, rows_identical(coeffs)])
            finite, *one_analogy = flags.tolist()
        if not finite:
            check_finite_tensor("query", query, query_hint)
            bad = [name for i, (name, _) in enumerate(members) if not bool(torch.isfinite(coeffs[i]).all())]
            raise ValueError(f"the coefficients of {len(bad)} layers (e.g. {bad[0]}) hold NaN or Inf: their "
                             f"att_lora_to_q / lora_keys are not finite, or the query projected by att_lora_to_q "
                             f"(in {str(dtype).removeprefix('torch.')}, as officially) or the fp32 logits overflow "
                             f"(the query's largest magnitude is {float(query.detach().abs().max()):.3g}); the "
                             "previous coefficients are kept unchanged")
        computed.append((members, coeffs, one_analogy or None))
    # warned before anything is set: a warning raised as an error (-W error) leaves the previous coefficients
    if torch.is_grad_enabled() and not model.training and any(c.requires_grad for _, c, _ in computed):
        warn("set_query on a model in eval mode with autograd enabled: the coefficients carry autograd "
             "history (copy.deepcopy of the model then fails and the graph is kept alive); call it under "
             "torch.no_grad() for inference, or model.train() for training")
    # computed without autograd history: a training forward with them warns (once for all layers)
    routing_gradient_warning = None if any(c.requires_grad for _, c, _ in computed) else [False]
    # everything checked: set all layers; storing copies a view (an allocation): failing at a later layer puts the
    # earlier ones back, never a model mixing two analogies
    with analogy_restored_on_error(model):
        for members, coeffs, one_analogy in computed:
            for i, (_, layer) in enumerate(members):
                layer.set_coefficients(coeffs[i], check_finite=False)
                layer.record_coefficient_sources(routing_gradient_warning)
                if one_analogy is not None:
                    layer.remember_one_analogy(one_analogy[i])
    coefficients = {n: l.coefficients for n, l in layers.items() if l.coefficients is not None}
    if not torch.compiler.is_compiling():
        try:
            # published whole, after every layer holds its own
            _SET_QUERY_COEFFICIENTS[model] = {name: weakref.ref(t) for name, t in coefficients.items()}
        except TypeError:  # cannot be weakly referenced
            pass
    return dict(coefficients)


def _refuse_merged(layers: Mapping[str, LoRWeBLinear], what: str,
                   built_from: str = "the current coefficients", *, jit: bool = False) -> None:
    """Raise when a layer is merged ("full"/"offload"; with ``jit`` also under the "jit" strategy, whose merged
    weight is rebuilt every forward but whose block or fuse state would outlive the layers)."""
    inside = [n for n, layer in layers.items() if layer._merged or (jit and layer._merge_jit)]
    if inside:
        raise RuntimeError(f"{what} inside a merged() block or on a fuse_lora()'d model ({inside[0]} is merged): "
                           f"the merged weights were built from {built_from} and would silently stay in use; exit "
                           "the merged() block (or unfuse_lora()) first")


@contextlib.contextmanager
def analogy_restored_on_error(model: nn.Module):
    """Every layer's coefficients (and per-forward query) are put back as they were on entry when the block raises:
    a call that set a new analogy and then failed leaves the previous one in place."""
    layers = lorweb_layers(model)
    kept = {name: (layer._coefficients, layer._query, layer._coefficient_sources) for name, layer in layers.items()}
    try:
        yield
    except BaseException:
        for name, layer in layers.items():
            layer._coefficients, layer._query, layer._coefficient_sources = kept[name]
            layer._forget_coefficient_memos()
        raise


@serialized_on_model
def clear_query(model: nn.Module) -> None:
    """Drop the cached coefficients of every layer (a following forward raises until ``set_query``)."""
    _refuse_merged(lorweb_layers(model), "clear_query")
    for layer in lorweb_layers(model).values():
        layer.set_coefficients(None)  # also drops a per-forward query


#: model -> {layer name: weak reference to the coefficients} as its last ``set_query`` set them (one dict, replaced
#: whole; weak: the coefficients and their autograd graph live only as long as the layers hold them)
_SET_QUERY_COEFFICIENTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def get_coefficients(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: (B, N) coefficients}`` for every LoRWeB layer whose coefficients are set: one analogy's, never half
    of another thread's ``set_query``. When the layers hold exactly what the last ``set_query`` set, that is
    returned without waiting for the model's analogy lock (a pipeline call's step callback may hand the read to a
    worker thread); otherwise the layers are read under the lock."""
    layers = lorweb_layers(model)
    try:
        published = _SET_QUERY_COEFFICIENTS.get(model)
    except TypeError:  # cannot be weakly referenced: read under no lock (holding_analogy refuses nothing either)
        published = None
    if published is not None and published.keys() <= layers.keys():
        coefficients = {name: ref() for name, ref in published.items()}  # (None: collected, no longer held)
        if (None not in coefficients.values()
                and all(layer._coefficients is coefficients.get(name) for name, layer in layers.items())):
            return coefficients
    with holding_analogy(model):
        return {n: l.coefficients for n, l in lorweb_layers(model).items() if l.coefficients is not None}


# ------------------------------------------------------------------------------------------------ checkpoints
#: Metadata keys written by save_lorweb_weights from the layers themselves; user metadata may not override them.
RESERVED_METADATA = ("format", "lorweb.heads", "lorweb.activation", "lorweb.reduce", "lorweb.lora_alpha_over_rank",
                     "lorweb.query_projection_type", "lorweb.layers")
#: ``lorweb.*`` metadata keys that describe the analogy query (not the layers): callers (training) may set them, and
#: their values are checked against the allowed choices.
QUERY_METADATA = ("lorweb.query_mode", "lorweb.pooling_type", "lorweb.query_source")


def _layer_metadata(layers: Mapping[str, LoRWeBLinear]) -> dict[str, str]:
    first = next(iter(layers.values()))
    meta = {"format": "pt", "lorweb.heads": str(first.heads), "lorweb.activation": first.activation,
            "lorweb.reduce": first.reduce, "lorweb.lora_alpha_over_rank": repr(first.scale),
            "lorweb.query_projection_type": first.query_projection_type}
    key = (lambda l: (l.heads, l.activation, l.reduce, l.scale, l.query_projection_type))
    for name, layer in layers.items():
        if key(layer) != key(first):
            raise ValueError(f"layer {name} has a configuration different from the others; one checkpoint stores "
                             "one heads/activation/reduce/scale/query_projection_type setting")
        if layer.query_dim != first.query_dim:
            raise ValueError(f"layer {name} has query_dim={layer.query_dim} but others {first.query_dim}: one analogy "
                             "query feeds every layer, so the loader would refuse this checkpoint")
    meta["lorweb.layers"] = str(len(layers))  # a file holding fewer layers is partial: the loader refuses it
    return meta


@serialized_on_model
def lorweb_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRWeB parameters of ``model`` under the official keys ``transformer.<module>.<param>``: lora_A (N, in, r),
    lora_B (N, r, out), lora_keys (N, key_dim) and att_lora_to_q.weight (key_dim, query_dim) (none for
    ``query_projection_type="none"``), in the layers' dtype.

    Parameters sharded by FSDP2 (DTensors) are gathered one at a time to full CPU tensors; this is then a collective
    call that every rank must make. Other parameters are returned as they are (detached, not copied).
    """
    from torch.distributed.tensor import DTensor

    state = {}
    model = unwrapped_model(model)  # the keys of torch.compile(model) are model's
    layers = _require_layers(model)
    refuse_disk_group_offloading(layers, group_offloading_modes(model), "lorweb_state_dict / save_lorweb_weights")
    for name, layer in layers.items():
        replaced = replaced_query_projection_error(name, layer)
        if replaced:
            raise ValueError(replaced)
    for name, layer in layers.items():
        for suffix, t in layer.lorweb_tensors().items():
            if t.device.type == "meta":
                raise ValueError(f"layer {name} has its LoRWeB tensor {suffix} on the meta device (no values: "
                                 "injected under torch.device('meta') / init_empty_weights, or offloaded by "
                                 "sequential CPU offload); load or materialize the weights before saving them")
            t = t.detach()
            state[_checkpoint_key(name, suffix)] = t.full_tensor().cpu() if isinstance(t, DTensor) else t
    return state


def _sort_safetensors_metadata(path: str, values: Optional[Mapping[str, str]] = None) -> None:
    """Rewrite, in place, the JSON header of the safetensors file ``path`` with its ``__metadata__`` entries in
    sorted order, ``values`` replacing entries of the same length (placeholders: ai-toolkit's hashes of the written
    data). safetensors writes the metadata in its hash map's order, which changes from call to call: the same model
    and metadata saved twice gave files with other bytes (another SHA-256, which ``eval generate`` records to check
    a resumed run's checkpoint). The tensors' entries keep their (deterministic) order; the header keeps its length
    (the same JSON, entries reordered; padded with spaces as safetensors pads it), so the data is not moved."""
    import struct

    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted({**header["__metadata__"], **(values or {})}.items()))
        header = {"__metadata__": header.pop("__metadata__"), **header}
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > length:  # the same entries, compact: never longer than what safetensors wrote
            raise RuntimeError(f"{path}: its safetensors header ({length} bytes) could not be rewritten in sorted "
                               f"order in place ({len(text)} bytes)")
        f.seek(8)
        f.write(text + b" " * (length - len(text)))


@serialized_on_model
def save_lorweb_weights(model: nn.Module, path: Union[str, os.PathLike], metadata: Optional[dict] = None, *,
                        state_dict: Optional[Mapping[str, torch.Tensor]] = None,
                        dtype: Optional[torch.dtype] = None, config: Optional[Mapping] = None,
                        aitk_hashes: bool = False, extra_files: Optional[Mapping[str, str]] = None) -> None:
    """Write the official safetensors format atomically (temporary file, then rename).

    The configuration (heads, activation, reduce, scale, query_projection_type) and ``encoder`` go into the
    safetensors metadata; ``metadata`` adds entries (values written with ``str``, None values left out) and may
    override ``encoder``; the keys written from the layers (RESERVED_METADATA, and any ``lorweb.*`` key but
    QUERY_METADATA) raise ValueError (training adds the query settings and ai-toolkit's
    name/version/software/training_info keys). ``state_dict`` is ``lorweb_state_dict(model)`` when
    already gathered (sharded training gathers on every rank, then one rank writes); by default it is computed here.
    ``dtype`` casts every tensor (the official trainer saves float16, ``save: dtype: float16``); None keeps them.
    ``config`` (a mapping, may be empty) also writes an official ``config.yaml`` beside the file (what the official
    inference.py requires): the layers give num_loras, rank, lora_alpha, key_dim, heads, activation, reduce and the
    projection type; ``config`` gives query_mode, pooling_type and encoder (official defaults when absent) and may
    not contradict the layers; its ``model`` entry names the base model in config.yaml (default: the official hub id).
    ``aitk_hashes`` adds the ``sshs_model_hash`` / ``sshs_legacy_hash`` entries ai-toolkit writes into every network
    file it saves (``official_config.aitk_model_hashes``; training sets it). ``extra_files`` ({file name: text})
    are written beside the file (``save_pretrained``'s README.md card).

    ``state_dict``, when given, must hold exactly the model's LoRWeB tensors in their shapes; every layer must have
    the settings above in common (and, with ``config``, one N, r and key_dim); the metadata records the layer count
    (``lorweb.layers``), so that a partial file is refused on load.

    Every file is first written to a temporary file in the target folder, then they are renamed into place one after
    another (the weights last): a refused call, or one that fails while writing or renaming, leaves the folder's files
    as they were (a file already renamed gets its previous contents back: each replaced file is kept as a hidden
    ``.<name>.<random>.kept`` hard link until the last rename, or a copy where the file system has no hard links) and
    removes every folder it created. With ``config``, a folder that holds other checkpoints (any other ``*.safetensors``
    there, which would load with this config.yaml) is refused (LoRWeBConfigError naming them): save into a folder of its
    own.
    """
    from safetensors.torch import save_file

    model = unwrapped_model(model)  # the keys of torch.compile(model) are model's
    layers = _require_layers(model)
    meta = _layer_metadata(layers)
    meta["encoder"] = DEFAULT_ENCODER
    if metadata is not None and not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict of strings, got {type(metadata).__name__}")
    user = {str(k): str(v) for k, v in (metadata or {}).items() if v is not None}  # None: not given
    reserved = sorted(k for k in user
                      if k in RESERVED_METADATA or (k.startswith("lorweb.") and k not in QUERY_METADATA))
    if reserved:
        raise ValueError(f"metadata may not set {reserved}: these keys describe the layers and are written from them "
                         "(change the layers' configuration instead)")
    from .official_config import POOLING_TYPES, QUERY_MODES, QUERY_SOURCES

    for key, allowed in zip(QUERY_METADATA, (QUERY_MODES, POOLING_TYPES, QUERY_SOURCES)):
        if key in user and user[key] not in allowed:
            raise ValueError(f"metadata[{key!r}] must be one of {allowed}, got {user[key]!r}")
    meta.update(user)
    if not meta["encoder"].strip():
        raise ValueError("metadata['encoder'] is empty; give the analogy encoder's hub id or folder")
    _config_from_metadata(meta)  # never write a file our own loader would refuse
    if state_dict is None:
        state_dict = lorweb_state_dict(model)
    else:
        _check_state_dict_matches_layers(state_dict, layers)
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    bad = [k for k, v in state_dict.items() if not v.is_floating_point() or not all_finite(v)]
    if bad:
        raise LoRWeBCheckpointError(f"refusing to save {len(bad)} LoRWeB tensors that are not finite floating-point "
                                    f"values (e.g. {bad[0]}); the loader would refuse the file")
    state = {k: (v if dtype is None else v.to(dtype)).contiguous().cpu() for k, v in state_dict.items()}
    overflow = [k for k, v in state.items() if not all_finite(v)]  # finite before the cast: it overflowed
    if overflow:
        largest = state_dict[overflow[0]].detach().abs().max().item()
        raise LoRWeBCheckpointError(f"refusing to save with dtype={dtype}: {len(overflow)} LoRWeB tensors hold values "
                                    f"beyond its largest finite value {torch.finfo(dtype).max:.6g} (e.g. "
                                    f"{overflow[0]}, up to {largest:.4g}), which the cast makes Inf; save with "
                                    "dtype=torch.bfloat16 or torch.float32 (or None, the layers' dtype)")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot save LoRWeB weights to {path}: it is a folder; give a .safetensors file")
    if not path.lower().endswith(".safetensors"):
        raise ValueError(f"cannot save LoRWeB weights to {path}: the file name must end in .safetensors (the format "
                         "written; the command line refuses other extensions)")
    directory = os.path.dirname(os.path.abspath(path))
    texts = {}  # file name -> text, written beside the weights
    if config is not None:
        from .official_config import CONFIG_NAME, LoRWeBConfigError, check_query_settings, config_yaml_text

        first = next(iter(layers.values()))
        sizes = (lambda l: (l.num_loras, l.rank, l.key_dim))
        for name, layer in layers.items():  # each layer loads from its own shapes, but config.yaml holds one
            if sizes(layer) != sizes(first):
                raise ValueError(f"layer {name} has (num_loras, rank, key_dim) = {sizes(layer)} but others "
                                 f"{sizes(first)}: one config.yaml describes one basis size; save this model "
                                 "without config (its file loads, every layer from its own tensor shapes)")
        settings = {"num_loras": first.num_loras, "rank": first.rank, "lora_alpha": first.lora_alpha,
                    "key_dim": first.key_dim, "heads": first.heads, "activation": first.activation,
                    "reduce": first.reduce, "query_projection_type": first.query_projection_type,
                    "encoder": meta["encoder"], "query_mode": meta.get("lorweb.query_mode"),
                    "pooling_type": meta.get("lorweb.pooling_type")}
        for key, value in config.items():
            if value is None and key in ("encoder", "query_mode", "pooling_type"):
                continue  # not given: the layers' metadata or the official default
            if settings.get(key) is not None and key not in ("encoder", "query_mode", "pooling_type") \
                    and value != settings[key]:
                raise LoRWeBConfigError(f"config {key}={value!r} contradicts the model's layers ({settings[key]!r})")
            settings[key] = value
        for key in ("query_mode", "pooling_type"):  # recorded in both places, so they can never disagree
            if settings.get(key) is not None:
                meta[f"lorweb.{key}"] = str(settings[key])
        meta["encoder"] = str(settings["encoder"])
        check_query_settings(settings.get("query_mode") or "cat-aa'b", settings.get("pooling_type") or "avg",
                             settings["query_projection_type"])
        if not meta["encoder"].strip():
            raise ValueError("config['encoder'] is empty; give the analogy encoder's hub id or folder")
        _config_from_metadata(meta)  # the merged metadata too: never write a file our own loader would refuse
        _refuse_folder_with_other_checkpoints(directory, os.path.basename(path))
        texts[CONFIG_NAME] = config_yaml_text(settings, name=os.path.splitext(os.path.basename(path))[0],
                                              model=settings.pop("model", None))
    for name, text in (extra_files or {}).items():
        if os.path.basename(name) != name or name in texts or name == os.path.basename(path):
            raise ValueError(f"extra_files: {name!r} is not a plain file name of its own beside {path}")
        if os.path.isdir(os.path.join(directory, name)):
            raise IsADirectoryError(f"cannot write {os.path.join(directory, name)}: it is a folder")
        texts[name] = text
    if aitk_hashes:  # placeholders of the same length, replaced by the hashes of the written file
        from .official_config import AITK_HASH_PLACEHOLDERS, aitk_model_hashes

        meta.update(AITK_HASH_PLACEHOLDERS)
    created = missing_folders(directory)  # the folders this call makes (removed again when it fails)
    # the files of one save replaced together: another thread saving into this folder waits (never one save's
    # config.yaml beside the other's weights)
    with _locks.folder_files_lock(directory):
        if config is not None:  # again under the lock: another thread's save may have finished meanwhile
            _refuse_folder_with_other_checkpoints(directory, os.path.basename(path))
        temps: list[tuple[str, str]] = []  # (temporary file, final path), renamed in this order: the weights last
        replaced: list[tuple[str, Optional[str]]] = []  # (final path, a copy of what it held, None if it was absent)
        try:
            os.makedirs(directory, exist_ok=True)  # everything checked: nothing is written for a refused call
            for name, text in texts.items():
                with naming_the_file(os.path.join(directory, name)):
                    temps.append((write_temporary_text(directory, name, text), os.path.join(directory, name)))
            tmp = temporary_file(directory, ".lorweb-", ".safetensors.tmp")
            temps.append((tmp, path))
            plain_mode = stat.S_IMODE(os.stat(tmp).st_mode)  # what open gives here (umask or the folder's ACL)
            with naming_the_file(path):  # a full disk names the file it could not take
                save_file(state, tmp, metadata=meta)
                _sort_safetensors_metadata(tmp, aitk_model_hashes(tmp, meta) if aitk_hashes else None)
            with contextlib.suppress(OSError):  # safetensors' own mode (it writes the file anew) would survive the
                os.chmod(tmp, plain_mode)      # rename; best effort where chmod is refused (vfat)
            for tmp, final in temps:
                kept = _keep_copy(final)
                try:
                    os.replace(tmp, final)
                except BaseException:
                    if kept is not None:
                        os.unlink(kept)
                    raise
                replaced.append((final, kept))
        except BaseException:
            for final, kept in reversed(replaced):  # a failed rename: every file renamed before it goes back
                with contextlib.suppress(OSError):
                    if kept is not None:
                        os.replace(kept, final)
                    else:  # absent before: written by this call
                        os.unlink(final)
            for tmp, _ in temps:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            remove_empty_folders(created)
            raise
    for _, kept in replaced:  # everything is in place: a copy that cannot be removed is no failure of the save
        if kept is not None:
            with contextlib.suppress(OSError):
                os.unlink(kept)


def _keep_copy(path: str) -> Optional[str]:
    """A hidden copy ``.<name>.<random>.kept`` of ``path`` beside it (a hard link where the file system has them),
    for putting it back when a later step of the save fails; None when ``path`` does not exist."""
    if not os.path.isfile(path):
        return None
    directory = os.path.dirname(path)
    fd, kept = tempfile.mkstemp(prefix=temporary_prefix(Path(path), reserve=len("12345678.kept")), suffix=".kept",
                                dir=directory)  # cut to the folder's name limit, as every temporary name
    os.close(fd)
    os.unlink(kept)
    try:
        os.link(path, kept)
    except OSError:
        try:
            shutil.copy2(path, kept)
        except BaseException:
            if os.path.exists(kept):
                os.unlink(kept)
            raise
    return kept


def _check_state_dict_matches_layers(state_dict: Mapping[str, torch.Tensor],
                                     layers: Mapping[str, LoRWeBLinear]) -> None:
    """``save_lorweb_weights(state_dict=...)``: exactly the LoRWeB keys of ``layers`` (``lorweb_state_dict``'s),
    each a tensor of the layer's shape; anything else would write a file the loader refuses."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of LoRWeB tensors, got {type(state_dict).__name__}")
    want = {_checkpoint_key(name, suffix): tuple(t.shape)
            for name, layer in layers.items() for suffix, t in layer.lorweb_tensors().items()}
    missing = sorted(set(want) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(want))
    if missing or unexpected:
        raise LoRWeBCheckpointError(
            f"state_dict does not hold the model's LoRWeB tensors ({len(want)} keys): "
            + "; ".join(part for part in (f"missing {len(missing)} (e.g. {missing[0]})" if missing else "",
                                          f"unexpected {len(unexpected)} (e.g. {unexpected[0]})" if unexpected else "")
                        if part) + "; nothing was written")
    for key, shape in want.items():
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            raise LoRWeBCheckpointError(f"state_dict[{key!r}] is a {type(value).__name__}, not a tensor; nothing was "
                                        "written")
        if tuple(value.shape) != shape:
            raise LoRWeBCheckpointError(f"state_dict[{key!r}] has shape {tuple(value.shape)} but the layer's tensor "
                                        f"has {shape}; nothing was written")
        if value.device.type == "meta":
            raise LoRWeBCheckpointError(f"state_dict[{key!r}] is on the meta device (no values); nothing was written")
        if value.layout != torch.strided:
            raise LoRWeBCheckpointError(f"state_dict[{key!r}] has layout {value.layout}: give dense tensors (e.g. "
                                        ".to_dense()); nothing was written")


def _refuse_folder_with_other_checkpoints(directory: str, weights_name: str) -> None:
    """LoRWeBConfigError when ``directory`` holds other checkpoints (``*.safetensors`` files besides
    ``weights_name``): a config.yaml written there would describe them too (the loader reads the folder's
    config.yaml for each of them), and a second final checkpoint makes loading the folder ambiguous."""
    from .official_config import LoRWeBConfigError

    if not os.path.isdir(directory):
        return
    others = sorted(n for n in os.listdir(directory)
                    if n.lower().endswith(".safetensors") and n != weights_name
                    and os.path.isfile(os.path.join(directory, n)))
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise LoRWeBConfigError(f"refusing to save {weights_name} with a config.yaml into {directory}: it holds other "
                                f"checkpoints ({shown}), which load with the folder's config.yaml and would make "
                                "loading the folder ambiguous; save into a folder of its own")


def read_checkpoint(path_or_state_dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) from a safetensors file or an in-memory mapping; corrupt files raise
    LoRWeBCheckpointError naming the file."""
    if isinstance(path_or_state_dict, Mapping):
        state = dict(path_or_state_dict)
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise LoRWeBCheckpointError(f"state dict entry {key!r} is a {type(value).__name__}, not a torch.Tensor")
            if value.device.type == "meta":
                raise LoRWeBCheckpointError(f"state dict tensor {key!r} is on the meta device: it holds no values")
            if value.layout != torch.strided:
                raise LoRWeBCheckpointError(f"state dict tensor {key!r} has layout {value.layout}: give dense "
                                            "tensors (e.g. .to_dense())")
        return state, {}
    return _read_safetensors(path_or_state_dict, tensors=True)


def _new_parameters_on_meta() -> Optional[str]:
    """Where a new LoRWeBLinear's tensors would hold no values, or None: the default device is meta (a
    ``torch.device('meta')`` context), or accelerate's ``init_empty_weights()`` moves every parameter a new module
    registers to meta (a patched ``register_parameter``, whatever the default device: a probe parameter shows it)."""
    if torch.get_default_device().type == "meta":
        return "the default device (a torch.device('meta') context) is"
    probe = nn.Module()  # a parameter registered as a layer registers its own (no random initial values drawn)
    probe.register_parameter("weight", nn.Parameter(torch.empty(0)))
    if probe.weight.device.type == "meta":
        return "every new parameter (inside accelerate's init_empty_weights()) is"
    return None


def _unloadable_lorweb_tensors(layer: LoRWeBLinear) -> Optional[str]:
    """Why the LoRWeB tensors of an injected layer cannot take a checkpoint's values in place, or None: outside
    ``torch.inference_mode``, inference tensors created inside it (``_writable_outside_inference_mode``; the identity
    buffer of ``query_projection_type="none"`` included), or tensors sharded by FSDP2 (DTensors; a load is not a
    collective)."""
    from torch.distributed.tensor import DTensor

    tensors = layer.lorweb_tensors()
    if any(isinstance(t, DTensor) for t in tensors.values()):
        return ("the layer's LoRWeB tensors are sharded by FSDP2 (DTensors): load the checkpoint before fully_shard "
                "(as lorweb-fast train does), or into the unsharded model")
    written = [*tensors.values(), layer.att_lora_to_q.weight]  # the identity buffer of "none" is written in again
    if not torch.is_inference_mode_enabled() and any(not _writable_outside_inference_mode(t) for t in written):
        return ("the layer's LoRWeB tensors are inference tensors created inside torch.inference_mode(), which "
                "nothing outside inference mode may write: load inside torch.inference_mode(), or into a freshly "
                "built model")
    return None


def _writable_outside_inference_mode(t: torch.Tensor) -> bool:
    """Whether an in-place write into ``t`` outside inference mode works: not an inference tensor, or a parameter
    whose data an inference-mode ``module.to()`` replaced (it keeps its version counter, and writes into it work);
    a tensor created inside inference mode has no version counter, and torch refuses the write."""
    if not t.is_inference():
        return True
    try:
        t._version  # (reading it changes nothing)
    except RuntimeError:
        return False
    return True


def _on_meta_device(module: nn.Module, new_parameters_on_meta: Optional[str]) -> Optional[str]:
    """What of a load target would hold no values: the LoRWeB tensors of a LoRWeBLinear, or, for a plain linear
    layer, the default device its new LoRWeBLinear creates its tensors on when the base weight is on the meta device
    (real, so a meta base filled later with load_state_dict(assign=True) works); None when they are real."""
    if isinstance(module, LoRWeBLinear):
        if any(t.device.type == "meta" for t in module.lorweb_tensors().values()):
            return "the injected layer's LoRWeB tensors are"
        return None
    # a new LoRWeBLinear over a meta base creates its tensors on the default device: real, unless that is meta
    return new_parameters_on_meta


def checkpoint_metadata(path: Union[str, os.PathLike]) -> dict[str, str]:
    """The safetensors metadata of a checkpoint file, without reading its tensors (errors as read_checkpoint)."""
    return _read_safetensors(path, tensors=False)[1]


def _read_safetensors(path, *, tensors: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"LoRWeB checkpoint {path} is a folder; give its .safetensors file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRWeB checkpoint not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except Exception as exc:
        raise LoRWeBCheckpointError(f"cannot read LoRWeB checkpoint {path}: it is not a safetensors file, or it is "
                                    f"corrupt or truncated ({type(exc).__name__}: {exc})") from exc
    return state, meta


def _config_from_metadata(meta: Mapping[str, str]) -> dict:
    """The layer configuration stored in checkpoint metadata, every value checked (type, finite, range)."""
    heads_text = meta.get("lorweb.heads", "1")
    scale_text = meta.get("lorweb.lora_alpha_over_rank", "1.0")
    try:
        heads = int(heads_text)
    except ValueError:
        raise LoRWeBCheckpointError(f"invalid LoRWeB metadata lorweb.heads={heads_text!r}: expected a positive "
                                    "integer") from None
    try:
        scale = float(scale_text)
    except ValueError:
        raise LoRWeBCheckpointError(f"invalid LoRWeB metadata lorweb.lora_alpha_over_rank={scale_text!r}: expected a "
                                    "finite number > 0") from None
    if heads < 1:
        raise LoRWeBCheckpointError(f"invalid LoRWeB metadata lorweb.heads={heads_text!r}: expected a positive "
                                    "integer")
    if not math.isfinite(scale) or scale <= 0:
        raise LoRWeBCheckpointError(f"invalid LoRWeB metadata lorweb.lora_alpha_over_rank={scale_text!r}: expected a "
                                    "finite number > 0")
    cfg = {"heads": heads, "activation": meta.get("lorweb.activation", "softmax"),
           "reduce": meta.get("lorweb.reduce", "mean"), "scale": scale}
    if cfg["activation"] not in ACTIVATIONS or cfg["reduce"] not in REDUCTIONS:
        raise LoRWeBCheckpointError(f"invalid LoRWeB metadata: lorweb.activation={cfg['activation']!r} (one of "
                                    f"{ACTIVATIONS}), lorweb.reduce={cfg['reduce']!r} (one of {REDUCTIONS})")
    return cfg


#: Keys of ordinary (single) LoRA checkpoints: peft/diffusers ``lora_A[.adapter].weight``, kohya ``lora_down`` /
#: ``lora_up`` / ``alpha``, DoRA magnitudes and diffusers' full-weight ``diff`` / ``diff_b``.
_PLAIN_LORA_KEY = re.compile(r"(\.lora_[AB](\.[\w-]+)?\.weight|\.lora_(down|up)\.weight|\.alpha"
                             r"|\.lora_magnitude_vector(\.[\w-]+)?|\.diff(_b)?)$")


def _group_checkpoint(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    unexpected = []
    for key, tensor in state.items():
        for suffix in PARAM_SUFFIXES:
            if key.startswith(CHECKPOINT_PREFIX) and key.endswith("." + suffix):
                groups[key[len(CHECKPOINT_PREFIX):-len(suffix) - 1]][suffix] = tensor
                break
        else:
            unexpected.append(key)
    return groups, unexpected


def _check_module_tensors(name: str, tensors: Mapping[str, torch.Tensor], in_f: int, out_f: int) -> list[str]:
    """Problems (shape mismatches) of one module's tensors against a linear layer in_f -> out_f
    (``att_lora_to_q.weight`` may be absent: ``query_projection_type="none"``)."""
    a, b, k = (tensors[s] for s in PARAM_SUFFIXES[:3])
    q = tensors.get("att_lora_to_q.weight")
    p = f"{CHECKPOINT_PREFIX}{name}."
    problems = []
    if a.dim() != 3:
        return [f"{p}lora_A has shape {tuple(a.shape)}, expected (N, in, r)"]
    n, a_in, r = a.shape
    if n < 1 or r < 1:
        return [f"{p}lora_A has shape {tuple(a.shape)}: N and r must be at least 1"]
    if a_in != in_f:
        problems.append(f"{p}lora_A has shape {tuple(a.shape)}, but the layer has in_features={in_f}")
    if tuple(b.shape) != (n, r, out_f):
        problems.append(f"{p}lora_B has shape {tuple(b.shape)}, expected {(n, r, out_f)}")
    if k.dim() != 2 or k.shape[0] != n:
        problems.append(f"{p}lora_keys has shape {tuple(k.shape)}, expected ({n}, key_dim)")
    elif k.shape[1] < 1:
        problems.append(f"{p}lora_keys has shape {tuple(k.shape)}: key_dim must be >= 1")
    elif q is not None and (q.dim() != 2 or q.shape[0] != k.shape[1]):
        problems.append(f"{p}att_lora_to_q.weight has shape {tuple(q.shape)}, expected ({k.shape[1]}, query_dim)")
    elif q is not None and min(q.shape) < 1:
        problems.append(f"{p}att_lora_to_q.weight has shape {tuple(q.shape)}: key_dim and query_dim must be >= 1")
    return problems


def resolve_checkpoint_settings(path_or_state_dict, config=None, settings: Optional[Mapping] = None) -> dict:
    """The configuration of a checkpoint: explicit ``settings`` > ``config`` (an official config.yaml path; by
    default the ``config.yaml`` beside a weights file, when present) > the safetensors metadata > the official
    defaults (``lorweb_fast.official_config``). Conflicting sources raise LoRWeBConfigError naming both values.
    Returns the settings plus ``"sources"`` and ``"config_path"``."""
    from .official_config import CONFIG_NAME, read_config_yaml, resolve_settings, settings_from_metadata

    meta = {}
    config_path = None if config is None else Path(config)
    if not isinstance(path_or_state_dict, Mapping):
        meta = checkpoint_metadata(path_or_state_dict)
        beside = Path(path_or_state_dict).parent / CONFIG_NAME
        if config_path is None and beside.is_file():
            config_path = beside
    recorded_scale = None
    if "lorweb.lora_alpha_over_rank" in meta:  # our own file: config.yaml's linear_alpha agreeing with it is no news
        try:
            recorded_scale = float(meta["lorweb.lora_alpha_over_rank"])
        except ValueError:
            pass  # load_lorweb_weights names the bad value
    yaml_settings = read_config_yaml(config_path, recorded_scale=recorded_scale) if config_path is not None else {}
    out = resolve_settings(settings, yaml_settings, settings_from_metadata(meta),
                           yaml_name=str(config_path) if config_path else "config.yaml")
    out["config_path"] = config_path
    return out


def _overflow_problems(name: str, tensors: dict, module: nn.Module) -> list[str]:
    """The checkpoint tensors of ``name`` (floating point and finite in the file) that are not finite once cast to
    the dtype the layer holds them in (an fp32 file with values beyond 65504 loaded into an fp16 model): they would
    turn into Inf there."""
    if isinstance(module, LoRWeBLinear):
        held = {s: t.dtype for s, t in module.lorweb_tensors().items()}
    else:  # the dtype a new LoRWeBLinear creates its tensors in (the base weight's, fp32 for a quantized base)
        held = dict.fromkeys(tensors, default_adapter_dtype(module))
    problems = []
    for suffix, t in tensors.items():
        target = held.get(suffix)
        if target is None or not target.is_floating_point or torch.finfo(target).max >= torch.finfo(t.dtype).max:
            continue
        if not all_finite(t.to(target)):
            problems.append(f"{CHECKPOINT_PREFIX}{name}.{suffix} holds values up to {t.abs().max().item():.4g}, "
                            f"which overflow the layer's {str(target).removeprefix('torch.')} (largest finite "
                            f"{torch.finfo(target).max:.4g})")
    return problems


@serialized_on_model
def load_lorweb_weights(model: nn.Module, path_or_state_dict, config: Union[str, os.PathLike, None] = None, *,
                        settings: Optional[Mapping] = None, freeze_base_model: bool = True) -> list[str]:
    """Load an official-format LoRWeB checkpoint, injecting the layers that are missing (when it injects any,
    ``freeze_base_model`` is applied as by ``inject_lorweb``).

    N, r, key_dim and query_dim come from the tensor shapes (query_dim = key_dim when the checkpoint has no
    ``att_lora_to_q`` weights: ``query_projection_type="none"``). heads, activation, reduce and the projection type
    come from, in this order: ``settings`` (explicit values, lorweb_fast names), the official ``config.yaml``
    (``config``, or the one beside the weights file), our safetensors metadata, the official defaults; lora_alpha
    from ``settings``, else our metadata, else the rank (scale 1: config.yaml's ``linear_alpha`` is not applied, as
    the official FLUX network does not; a value other than ``linear`` is warned about). Two sources that disagree, or
    a config whose rank / loras_num / lora_keys_dim contradicts the tensor shapes, raise ``LoRWeBConfigError`` (a
    ValueError) naming both values. Float16 / bfloat16 files load (the values are cast to
    the layers' dtype).

    Everything is validated before anything changes: a checkpoint with missing or unexpected keys, wrong shapes, fewer
    layers than its ``lorweb.layers`` metadata records, a configuration different from already-injected layers,
    non-finite values, a target on the meta device (nothing could be copied into it), or a corrupt file raises
    LoRWeBCheckpointError naming the offending keys, and the model is left exactly as it was. An official-format file
    (no ``lorweb.layers`` count) loaded into a model without LoRWeB layers that adapts fewer of its transformer-block
    linears than the official LoRWeB does loads with a UserWarning naming how many run without an adapter.

    Returns:
        The names of the loaded modules.
    """
    model = unwrapped_model(model)  # torch.compile(model) loads the keys of model
    _refuse_merged(lorweb_layers(model), "load_lorweb_weights")
    _refuse_incompatible_modules(model, "load_lorweb_weights")
    refuse_disk_group_offloading(lorweb_layers(model), group_offloading_modes(model), "load_lorweb_weights")
    from .official_config import LoRWeBConfigError

    if settings is not None and not isinstance(settings, Mapping):
        raise TypeError(f"settings must be a dict of LoRWeB settings, got {type(settings).__name__}")
    state, meta = read_checkpoint(path_or_state_dict)
    groups, unexpected = _group_checkpoint(state)
    if not groups and unexpected and all(_PLAIN_LORA_KEY.search(k) for k in unexpected):
        raise LoRWeBCheckpointError(
            f"this is a plain LoRA checkpoint (peft / diffusers / kohya keys such as {unexpected[0]}), not a LoRWeB "
            f"basis (keys {CHECKPOINT_PREFIX}<module>.lora_A (N, in, r), .lora_B (N, r, out), .lora_keys, "
            ".att_lora_to_q.weight); LoRWeB does not stack with plain LoRAs: load it into a stock pipeline with "
            "diffusers' load_lora_weights. The model was not changed")
    cfg = _config_from_metadata(meta)
    resolved = resolve_checkpoint_settings(path_or_state_dict, config, settings)
    where = resolved["sources"]
    problems = [f"unexpected key {k}" for k in unexpected]
    if not groups and not problems:
        problems.append("the checkpoint holds no LoRWeB tensors")
    with_q = {n for n, t in groups.items() if "att_lora_to_q.weight" in t}
    # "none" when no module has att_lora_to_q weights; when only some have them, the others are missing keys below
    projection = "linear" if with_q or not groups else "none"
    if where["query_projection_type"] != "official default" and resolved["query_projection_type"] != projection \
            and groups:
        raise LoRWeBConfigError(f"conflicting query_projection_type: {where['query_projection_type']} says "
                                f"{resolved['query_projection_type']!r} but the checkpoint tensors say {projection!r} "
                                f"({'with' if projection == 'linear' else 'without'} att_lora_to_q weights)")
    # the settings the tensors do not determine; scale = lora_alpha / rank
    cfg.update(heads=int(resolved["heads"]), activation=resolved["activation"], reduce=resolved["reduce"])
    # scale = lora_alpha / rank: from an explicit lora_alpha, else our metadata, else 1 (the official network has
    # alpha = r whatever config.yaml's linear_alpha says; read_config_yaml does not read it)
    # the rank from a module with an (N, in, r) lora_A: a stray, incomplete or misshapen one is reported below
    tensor_rank = next((int(t["lora_A"].shape[-1]) for t in groups.values()
                        if "lora_A" in t and t["lora_A"].dim() == 3), None)
    rank = int(resolved["rank"]) if where["rank"] != "official default" else tensor_rank
    if where["lora_alpha"] != "official default" and rank:  # none or 0: refused below (missing key, zero-sized r)
        scale = float(resolved["lora_alpha"]) / rank
        if "lorweb.lora_alpha_over_rank" in meta and scale != cfg["scale"]:
            raise LoRWeBConfigError(f"conflicting lora_alpha / rank: {where['lora_alpha']} gives {scale!r} but the "
                                    f"checkpoint metadata says {cfg['scale']!r}")
        cfg["scale"] = scale
    # module names as the checkpoint keys them (checkpoint_module_name: a block compiled and put back is reached
    # through its wrapper, the inner module winning the name); lookups and swaps by these names go through it
    existing = {checkpoint_module_name(n): layer for n, layer in lorweb_layers(model).items()}
    differs_from_injected = False  # a problem only because the model already holds LoRWeB layers of other shapes
    modules, names_of = _modules_with_every_name(model)
    modules = {checkpoint_module_name(n): module for n, module in modules.items()}
    names_of = {key: sorted({checkpoint_module_name(n) for n in names}) for key, names in names_of.items()}
    new_parameters_on_meta = _new_parameters_on_meta()
    for name in sorted(groups):
        tensors = groups[name]
        module = modules.get(name)  # first: keys of a module the model lacks are unexpected, not incomplete
        if module is None:
            problems.append(f"unexpected keys {CHECKPOINT_PREFIX}{name}.*: the model has no module {name!r}")
            continue
        if not isinstance(module, (LoRWeBLinear, nn.Linear)):
            problems.append(f"unexpected keys {CHECKPOINT_PREFIX}{name}.*: module {name!r} is a "
                            f"{type(module).__name__}, not a linear layer")
            continue
        if not isinstance(module, LoRWeBLinear) and len(names_of[id(module)]) > 1:
            problems.append(f"{CHECKPOINT_PREFIX}{name}.*: module {name!r} is one linear layer reachable under "
                            f"several names {names_of[id(module)]}: a LoRWeB layer swapped in under one of them "
                            "would leave the others without the adapter")
            continue
        if any(name.startswith(e + ".") for e in existing):
            problems.append(f"unexpected keys {CHECKPOINT_PREFIX}{name}.*: {name!r} is inside a LoRWeB layer")
            continue
        replaced = replaced_query_projection_error(name, module) if isinstance(module, LoRWeBLinear) else None
        if replaced:
            problems.append(replaced)
            continue
        why = None if isinstance(module, LoRWeBLinear) else _read_not_called(model, name)
        if why:
            problems.append(f"unexpected keys {CHECKPOINT_PREFIX}{name}.*: {why}")
            continue
        parametrized = _parametrized_lorweb_tensors(module) if isinstance(module, LoRWeBLinear) else []
        if parametrized:
            problems.append(f"{CHECKPOINT_PREFIX}{name}.*: {', '.join(parametrized)} parametrized "
                            "(torch.nn.utils.parametrize): a copy into the parametrization's output would change "
                            "nothing; remove the parametrization (parametrize.remove_parametrizations) first")
            continue
        held = _unloadable_lorweb_tensors(module) if isinstance(module, LoRWeBLinear) else None
        if held:
            problems.append(f"{CHECKPOINT_PREFIX}{name}.*: {held}")
            continue
        on_meta = _on_meta_device(module, new_parameters_on_meta)
        if on_meta:
            problems.append(f"{CHECKPOINT_PREFIX}{name}.*: {on_meta} on the meta device (no values: injected "
                            "under torch.device('meta'), or offloaded by sequential CPU offload after injection); "
                            "loading into it would change nothing. Materialize the LoRWeB tensors (to_empty) or "
                            "load before enabling sequential offload (or use enable_model_cpu_offload)")
            continue
        needed = PARAM_SUFFIXES if projection == "linear" else PARAM_SUFFIXES[:3]
        missing = [s for s in needed if s not in tensors]
        if missing:
            problems += [f"missing key {CHECKPOINT_PREFIX}{name}.{s}" for s in missing]
            continue
        n, _, r = tensors["lora_A"].shape if tensors["lora_A"].dim() == 3 else (None, None, None)
        key_dim = tensors["lora_keys"].shape[-1] if tensors["lora_keys"].dim() == 2 else None  # else: below
        for key, value in (("rank", r), ("num_loras", n), ("key_dim", key_dim)):
            if value is not None and where[key] != "official default" and int(resolved[key]) != int(value):
                raise LoRWeBConfigError(f"conflicting {key}: {where[key]} says {resolved[key]!r} but the checkpoint "
                                        f"tensors of {CHECKPOINT_PREFIX}{name} have {key}={value}")
        finite = {}  # the float tensors without NaN or Inf: the ones whose range the layer's dtype must hold
        for s, t in tensors.items():
            if not t.is_floating_point():
                problems.append(f"{CHECKPOINT_PREFIX}{name}.{s} has non-float dtype {t.dtype}")
            elif not all_finite(t):
                problems.append(f"{CHECKPOINT_PREFIX}{name}.{s} holds NaN or Inf values")
            else:
                finite[s] = t
        in_f, out_f = linear_dims(module)
        shape_problems = _check_module_tensors(name, tensors, in_f, out_f)
        problems += shape_problems
        problems += _overflow_problems(name, finite, module)
        if isinstance(module, LoRWeBLinear) and not shape_problems:
            k = tensors["lora_keys"]
            q_shape = tuple(tensors["att_lora_to_q.weight"].shape) if projection == "linear" else (k.shape[1],) * 2
            want = (tuple(module.lora_A.shape), tuple(module.lora_keys.shape),
                    tuple(module.att_lora_to_q.weight.shape), module.heads, module.activation, module.reduce,
                    module.scale, module.query_projection_type)
            got = (tuple(tensors["lora_A"].shape), tuple(k.shape), q_shape, cfg["heads"], cfg["activation"],
                   cfg["reduce"], cfg["scale"], projection)
            if want != got:
                differs_from_injected = True
                problems.append(f"{CHECKPOINT_PREFIX}{name}.*: (lora_A, lora_keys, att_lora_to_q shapes, heads, "
                                f"activation, reduce, scale, query_projection_type) = {got} but the injected layer "
                                f"has {want}")
    recorded = meta.get("lorweb.layers")  # our files record their layer count: fewer groups is a partial file
    if recorded is not None and (not (recorded.isascii() and recorded.isdigit()) or int(recorded) != len(groups)):
        problems.append(f"the checkpoint metadata records lorweb.layers={recorded!r} but the file holds "
                        f"{len(groups)} LoRWeB layers: a partial or edited file")
    not_covered = [n for n in existing if n not in groups]
    problems += [f"missing keys {CHECKPOINT_PREFIX}{n}.* for the injected layer {n!r}" for n in not_covered]
    differs_from_injected = differs_from_injected or bool(not_covered)
    # one analogy query feeds every layer: query_dim must agree across the checkpoint and the injected layers
    query_dims = {name: int(t["att_lora_to_q.weight"].shape[-1]) for name, t in groups.items()
                  if "att_lora_to_q.weight" in t and t["att_lora_to_q.weight"].dim() == 2}
    query_dims.update({n: layer.query_dim for n, layer in existing.items() if n not in groups})
    if len(set(query_dims.values())) > 1:
        by_dim = defaultdict(list)
        for n, d in query_dims.items():
            by_dim[d].append(n)
        problems.append("inconsistent query_dim across layers (one query feeds them all): " + ", ".join(
            f"{d} in {len(ns)} layers (e.g. {ns[0]})" for d, ns in sorted(by_dim.items())))
    for name, t in groups.items():  # lora_keys (N, key_dim) exists for every projection type
        if "lora_keys" in t and t["lora_keys"].dim() == 2 and t["lora_keys"].shape[1] % cfg["heads"]:
            problems.append(f"heads={cfg['heads']} ({where['heads']}) does not divide "
                            f"key_dim={t['lora_keys'].shape[1]} of {CHECKPOINT_PREFIX}{name}")
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        count = f"{len(problems)} problem" + ("s" if len(problems) != 1 else "")
        error = LoRWeBCheckpointError(f"LoRWeB checkpoint does not match {type(model).__name__} ({count}); the "
                                      f"model was not changed:\n  {shown}")
        error.differs_from_injected = differs_from_injected  # the pipeline's unload_lora_weights() hint
        raise error

    _refuse_new_layers_under_group_offloading(model, [name for name in groups if name not in existing],
                                              "load_lorweb_weights")
    # an official-format file (no lorweb.layers count; not a state dict, which never records one) loaded into a stock
    # model (no LoRWeB layers yet), adapting fewer of its linear layers than the official LoRWeB adapts (every linear
    # of the transformer blocks): loaded, but the others run without an adapter
    official_targets = [] if recorded is not None or isinstance(path_or_state_dict, Mapping) or existing else \
        [checkpoint_module_name(n) for n in _find_targets(model, DEFAULT_TARGET_MODULES, refuse_aliases=False)
         if _read_not_called(model, n) is None]
    uncovered = [n for n in official_targets if n not in groups]
    if uncovered and len(uncovered) < len(official_targets):  # some adapted, not all
        warn(f"the checkpoint adapts {len(official_targets) - len(uncovered)} of the {len(official_targets)} "
             f"linear layers of {type(model).__name__}'s transformer blocks that the official LoRWeB adapts; "
             f"{len(uncovered)} (e.g. {uncovered[0]!r}) run without an adapter: a checkpoint for a smaller "
             "model or trained with other target modules?")

    # Everything is validated. Building and swapping in the new layers, and staging the checkpoint's tensors for the
    # copy, are undone whatever interrupts them (Ctrl-C, out of memory): the model is as it was. A tensor on its
    # layer's device is copied as it is (copy_ converts in place); one on another device is staged in the layer's
    # dtype, contiguous, on its own device (a conversion allocates there, never a rollback copy on the GPU), so the
    # copy into the layers allocates nothing: only a device fault can stop it half way. A Ctrl-C during the copy is
    # held until it is finished (copied once more, whole; then the interrupt is raised): the model then holds the
    # whole checkpoint, never a mix
    def build() -> dict:
        new_layers = {}
        with uninitialised_lorweb_tensors():  # the checkpoint overwrites them all: no values computed or drawn
            for name, tensors in groups.items():
                if name in existing:
                    continue
                n, _, r = tensors["lora_A"].shape
                key_dim = tensors["lora_keys"].shape[1]
                query_dim = tensors["att_lora_to_q.weight"].shape[1] if projection == "linear" else key_dim
                new_layers[name] = LoRWeBLinear(modules[name], num_loras=n, rank=r, lora_alpha=cfg["scale"] * r,
                                                key_dim=key_dim, query_dim=query_dim, heads=cfg["heads"],
                                                activation=cfg["activation"], reduce=cfg["reduce"],
                                                query_projection_type=projection)
        return new_layers

    interrupted = []

    def stage_and_copy():
        layers = {name: model.get_submodule(name) for name in groups}
        staged = _staged_for_copy(layers, groups)
        for layer in layers.values():  # "none": no checkpoint holds it (to_empty may have cleared it); always eye
            layer.refill_identity_projection()

        def copy_checkpoint():
            with torch.no_grad():
                for name, layer in layers.items():
                    layer._drop_coefficients()  # from the old parameters: a forward raises until set_query
                    for param, values in staged[name]:
                        param.copy_(values)

        interrupted.append(finished_through_interrupt(copy_checkpoint))

    _swap_in_layers(model, build, freeze_base_model, fill=stage_and_copy)
    if interrupted[0] is not None:
        raise interrupted[0]
    return sorted(groups)


def _parametrized_lorweb_tensors(layer: LoRWeBLinear) -> list[str]:
    """The LoRWeB tensors of ``layer`` under a ``torch.nn.utils.parametrize`` parametrization (reading them gives
    the parametrization's output, a new tensor: a copy into it is lost)."""
    from torch.nn.utils import parametrize

    names = [n for n in ("lora_A", "lora_B", "lora_keys") if parametrize.is_parametrized(layer, n)]
    return names + (["att_lora_to_q.weight"] if parametrize.is_parametrized(layer.att_lora_to_q, "weight") else [])


def _copies_in_place(param: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether ``param.copy_(values)`` allocates nothing whatever the dtypes and strides: a dense tensor on the
    parameter's CPU or CUDA device (ATen's copy kernels convert and follow strides there, ``Copy.cpp`` /
    ``cuda/Copy.cu``: "we never require temporaries for copies on the same GPU"); across devices, and on other
    device types, a copy may go through temporaries."""
    return (values.device == param.device and param.device.type in ("cpu", "cuda")
            and values.layout == torch.strided and type(values) is torch.Tensor)


def _staged_for_copy(layers: Mapping[str, LoRWeBLinear], groups: Mapping[str, Mapping[str, torch.Tensor]]) -> dict:
    """{name: [(parameter, values)]} such that ``parameter.copy_(values)`` allocates nothing: a checkpoint tensor of
    ``groups`` ({name: {suffix: tensor}}) on its parameter's device is taken as it is (``copy_`` converts the dtype
    and follows the strides in place, no temporary); one on another device is converted to the parameter's dtype
    and made contiguous on its own device first (a cross-device copy would otherwise convert through a temporary on
    the CPU or the source GPU, or go through a contiguous one). Only those cross-device conversions allocate here:
    never a whole converted copy of a checkpoint that is already on the layers' device."""
    staged = {}
    for name, layer in layers.items():
        pairs = []
        for suffix, param in layer.lorweb_tensors().items():
            values = groups[name][suffix].detach()
            if not _copies_in_place(param, values):
                values = values.to(dtype=param.dtype).contiguous()
            pairs.append((param, values))
        staged[name] = pairs
    return staged
