"""lorweb_fast: fast LoRWeB (a per-sample mixture of a LoRA basis) for FLUX.1-Kontext visual analogies.

Functional API: ``compute_coefficients``, ``mixed_lora_delta``, ``lorweb_linear`` (each with
``backend=None | "torch" | "triton" | "cuda"``, the names in ``BACKENDS``) and ``backend_status``. Module:
``LoRWeBLinear``. Model-level: ``LoRWeBConfig``, ``inject_lorweb``, ``remove_lorweb``, ``lorweb_layers``,
``set_query``, ``set_backend``, ``clear_query``, ``get_coefficients``, ``plot_coefficients``, ``set_lorweb_scale``
/ ``get_lorweb_scale`` (the strength), ``merged`` (the mixture merged into the base weights for a block),
``lorweb_state_dict``, ``save_lorweb_weights``, ``load_lorweb_weights``. Errors: ``BackendUnavailableError`` (a named
backend that cannot run), ``LoRWeBCheckpointError`` (a checkpoint that does not fit), ``LoRWeBConfigError`` (settings
sources that disagree; a ValueError). Warnings: ``LoRWeBWarning`` (a ``UserWarning``), attributed to the caller's
line. The FLUX.1-Kontext pipeline is in ``lorweb_fast.flux``, training in ``lorweb_fast.training``, the evaluation
in ``lorweb_fast.evaluation``.
"""

from .flux import merged, plot_coefficients
from .layer import LoRWeBLinear
from .lora_api import get_lorweb_scale, set_lorweb_scale
from .official_config import LoRWeBConfigError
from .model import (
    LoRWeBCheckpointError,
    LoRWeBConfig,
    clear_query,
    get_coefficients,
    inject_lorweb,
    load_lorweb_weights,
    lorweb_layers,
    lorweb_state_dict,
    remove_lorweb,
    save_lorweb_weights,
    set_backend,
    set_query,
)
from .ops import (
    BACKENDS,
    BackendUnavailableError,
    backend_status,
    compute_coefficients,
    lorweb_linear,
    mixed_lora_delta,
)
from .validation import LoRWeBWarning

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "BackendUnavailableError", "LoRWeBCheckpointError", "LoRWeBConfig", "LoRWeBConfigError", "LoRWeBLinear",
    "LoRWeBWarning",
    "backend_status", "clear_query", "compute_coefficients", "get_coefficients", "get_lorweb_scale", "inject_lorweb",
    "load_lorweb_weights", "lorweb_layers", "lorweb_linear", "lorweb_state_dict", "mixed_lora_delta",
    "merged", "plot_coefficients", "remove_lorweb", "save_lorweb_weights", "set_backend", "set_lorweb_scale",
    "set_query",
]
