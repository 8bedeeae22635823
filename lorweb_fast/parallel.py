"""Multi-GPU inference with diffusers' parallelism: context parallelism works, tensor parallelism is refused.

Context parallelism (``ContextParallelConfig``) splits the token sequence across ranks: every LoRWeB layer sees
(B, S/k, in) with the whole batch, so its per-sample coefficients (B, N) apply unchanged and the LoRWeB weights stay
replicated. Tensor-parallel plans (``TensorParallelConfig``, a model's ``_tp_plan``) shard the weights of the linear
layers that LoRWeB wraps, while the basis (lora_A, lora_B) would stay whole: the result would be wrong, so
``enable_parallelism`` here raises before anything is sharded when a tensor-parallel config comes with a model
``_tp_plan`` that reaches a LoRWeB layer, and a LoRWeB layer whose base weight is sharded refuses to run.
"""

from __future__ import annotations

import re
from typing import Optional

from torch import nn

from .model import checkpoint_module_name, lorweb_layers, unwrapped_model


class TensorParallelNotSupportedError(NotImplementedError):
    """A tensor-parallel plan would shard a layer that LoRWeB wraps (or a LoRWeB parameter)."""


def _plan_regex(pattern: str) -> re.Pattern:
    return re.compile(re.escape(pattern).replace(r"\*", r"\d+"))


def lorweb_layers_in_plan(model: nn.Module, tp_plan: dict) -> list[str]:
    """Names of LoRWeB layers (or modules inside them) that the entries of ``tp_plan`` (diffusers' ``_tp_plan``
    format: module paths with at most one ``*`` for a ModuleList index) would shard."""
    # names without the wrapper levels (blocks compiled one by one hold their layers under ``<block>._orig_mod.``),
    # as the plan names the modules
    layers = [checkpoint_module_name(n) for n in lorweb_layers(model)]
    names = {checkpoint_module_name(n) for n, _ in model.named_modules()}
    hits = []
    for pattern in tp_plan:
        rx = _plan_regex(pattern)
        for name in names:
            if rx.fullmatch(name) and any(name == n or name.startswith(n + ".") for n in layers):
                hits.append(name)
    return sorted(set(hits))


def check_tensor_parallel(model: nn.Module, tp_plan: Optional[dict] = None) -> None:
    """Raise TensorParallelNotSupportedError when ``tp_plan`` (default: the model's ``_tp_plan``) shards any layer
    that LoRWeB wraps."""
    model = unwrapped_model(model)  # a torch.compile'd transformer: the plan names the modules inside the wrapper
    plan = getattr(model, "_tp_plan", None) if tp_plan is None else tp_plan
    if not plan or not lorweb_layers(model):
        return
    hits = lorweb_layers_in_plan(model, plan)
    if hits:
        raise TensorParallelNotSupportedError(
            f"tensor parallelism is not supported with LoRWeB layers yet: the plan shards {len(hits)} layers that "
            f"LoRWeB wraps (e.g. {hits[:3]}) while the LoRA basis and the coefficients stay whole, which would give "
            "wrong results. Use context parallelism (diffusers ContextParallelConfig) instead, or "
            "remove_lorweb / unload_lora_weights before sharding.")


def enable_parallelism(model: nn.Module, config, cp_plan: Optional[dict] = None) -> None:
    """``model.enable_parallelism(config=..., cp_plan=...)`` after checking that it does not shard LoRWeB layers:
    context parallelism is accepted; a tensor-parallel config (a TensorParallelConfig, or a ParallelConfig with a
    ``tensor_parallel_config``) raises TensorParallelNotSupportedError (model unchanged) when the model's
    ``_tp_plan`` shards a LoRWeB layer (``check_tensor_parallel``); otherwise the call is passed on as it is."""
    tp = None
    try:
        from diffusers.models._modeling_parallel import TensorParallelConfig

        tp = config if isinstance(config, TensorParallelConfig) else getattr(config, "tensor_parallel_config", None)
    except ImportError:  # a diffusers without tensor parallelism
        pass
    if tp is not None:
        check_tensor_parallel(model)
    kwargs = {} if cp_plan is None else {"cp_plan": cp_plan}
    model.enable_parallelism(config=config, **kwargs)
