"""``LoRWeBLinear``: a drop-in wrapper adding a per-sample mixture of a LoRA basis to any linear-like layer."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from . import ops
from .reference import ACTIVATIONS, REDUCTIONS


def linear_dims(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like module (nn.Linear and its subclasses, e.g. bitsandbytes)."""
    try:
        return int(base.in_features), int(base.out_features)
    except AttributeError:
        raise TypeError(f"{type(base).__name__} is not linear-like: it has no in_features/out_features") from None


def has_plain_weight(base: nn.Module) -> bool:
    """True when ``base(x)`` is exactly ``F.linear(x, base.weight, base.bias)`` on an ordinary tensor weight, so the
    fused kernels may read the weight directly. False for bitsandbytes (quantized weight, own forward)."""
    return (isinstance(base, nn.Linear) and type(base).forward is nn.Linear.forward
            and type(base.weight) in (nn.Parameter, torch.Tensor) and base.weight.is_floating_point())


class LoRWeBLinear(nn.Module):
    """``y = base(x) + scale * sum_n alpha_b[n] B_n^T A_n^T x`` with alpha_b computed per sample from a query.

    Parameters (official names and layout, see METHOD.md):
        lora_A: (N, in, r), lora_B: (N, r, out), lora_keys: (N, key_dim), att_lora_to_q.weight: (key_dim, query_dim).

    The base layer is kept as ``base_layer`` and is neither copied nor unfrozen. Coefficients are set with
    ``set_coefficients`` (usually by ``lorweb_fast.set_query`` for the whole model) and stay until replaced or
    cleared; a forward without them raises.

    Inputs: (B, S, in) or (B, in); coefficients: (B, N).
    """

    def __init__(self, base: nn.Module, *, num_loras: int = 32, rank: int = 4, lora_alpha: Optional[float] = None,
                 key_dim: int = 128, query_dim: int = 2304, heads: int = 1, activation: str = "softmax",
                 reduce: str = "mean", backend: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                 query_projection_type: str = "linear"):
        super().__init__()
        if isinstance(base, LoRWeBLinear):
            raise TypeError("base is already a LoRWeBLinear")
        in_features, out_features = linear_dims(base)
        for name, value in (("num_loras", num_loras), ("rank", rank), ("key_dim", key_dim),
                            ("query_dim", query_dim), ("heads", heads)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if key_dim % heads:
            raise ValueError(f"key_dim={key_dim} is not divisible by heads={heads}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
        if query_projection_type not in ("linear", "none"):
            raise ValueError(f"query_projection_type must be 'linear' or 'none', got {query_projection_type!r}")
        if query_projection_type == "none" and key_dim != query_dim:
            raise ValueError(f"query_projection_type='none' feeds the query to the keys directly, so key_dim must "
                             f"equal query_dim; got key_dim={key_dim}, query_dim={query_dim}")
        if backend is not None and backend not in ops.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {ops.BACKENDS} or None")
        self.base_layer = base
        self.in_features, self.out_features = in_features, out_features
        self.num_loras, self.rank, self.key_dim, self.query_dim = num_loras, rank, key_dim, query_dim
        self.heads, self.activation, self.reduce, self.backend = heads, activation, reduce, backend
        self.lora_alpha = float(rank if lora_alpha is None else lora_alpha)
        self.scale = self.lora_alpha / rank
        weight = getattr(base, "weight", None)
        if dtype is None:
            dtype = weight.dtype if has_plain_weight(base) else torch.float32
        device = weight.device if isinstance(weight, torch.Tensor) and weight.device.type != "meta" else None
        factory = {"dtype": dtype, "device": device}
        self.lora_A = nn.Parameter(torch.empty(num_loras, in_features, rank, **factory))
        self.lora_B = nn.Parameter(torch.zeros(num_loras, rank, out_features, **factory))
        self.lora_keys = nn.Parameter(torch.randn(num_loras, key_dim, **factory))
        self.att_lora_to_q = nn.Linear(query_dim, key_dim, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        # "none" (official nn.Identity): a frozen identity projection, not trained and not saved
        self.query_projection_type = query_projection_type
        if query_projection_type == "none":
            with torch.no_grad():
                self.att_lora_to_q.weight.copy_(torch.eye(key_dim, **factory))
            self.att_lora_to_q.weight.requires_grad_(False)
        self._coefficients: Optional[torch.Tensor] = None
        self._query: Optional[torch.Tensor] = None  # per-forward mode, see set_query_per_forward
        self._merged = False  # set by lorweb_fast.merged(): the mixture is folded into the base weight

    def lorweb_tensors(self) -> dict[str, nn.Parameter]:
        """The LoRWeB parameters under their official checkpoint suffixes, in checkpoint order (without
        ``att_lora_to_q.weight`` when ``query_projection_type == "none"``: the official layer then has none)."""
        tensors = {"lora_A": self.lora_A, "lora_B": self.lora_B, "lora_keys": self.lora_keys}
        if self.query_projection_type == "linear":
            tensors["att_lora_to_q.weight"] = self.att_lora_to_q.weight
        return tensors

    # ------------------------------------------------------------------------------------------ coefficients
    @property
    def coefficients(self) -> Optional[torch.Tensor]:
        """(B, N) coefficients in use, or None."""
        return self._coefficients

    def set_coefficients(self, coeffs: Optional[torch.Tensor]) -> None:
        """Use ``coeffs`` (B, N) for every following forward, until replaced; None clears them."""
        if coeffs is not None:
            if not isinstance(coeffs, torch.Tensor) or coeffs.dim() != 2 or coeffs.shape[1] != self.num_loras:
                shape = tuple(coeffs.shape) if isinstance(coeffs, torch.Tensor) else type(coeffs).__name__
                raise ValueError(f"coefficients must be (B, N={self.num_loras}), got {shape}")
        self._coefficients = coeffs
        self._query = None

    def set_query_per_forward(self, query: Optional[torch.Tensor]) -> None:
        """Keep the (B, query_dim) query and compute this layer's coefficients inside every forward.

        For sharded training (FSDP): the LoRWeB parameters are then only used inside this module's own forward,
        where the wrapper has gathered them. Costs one (B x query_dim x key_dim) product per forward; inference
        should use ``set_coefficients`` / ``lorweb_fast.set_query`` instead (once per generation). None clears.
        """
        if query is not None and (not isinstance(query, torch.Tensor) or query.dim() != 2
                                  or query.shape[1] != self.query_dim):
            shape = tuple(query.shape) if isinstance(query, torch.Tensor) else type(query).__name__
            raise ValueError(f"query must be (B, query_dim={self.query_dim}), got {shape}")
        self._coefficients = None
        self._query = query

    def coefficients_from_query(self, query: torch.Tensor) -> torch.Tensor:
        """(B, query_dim) -> (B, N) for this layer alone (``set_query`` batches this over all layers)."""
        return ops.compute_coefficients(query, self.att_lora_to_q.weight, self.lora_keys, heads=self.heads,
                                        activation=self.activation, reduce=self.reduce)

    # ----------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._merged:
            return self.base_layer(x)
        coeffs = self._coefficients
        if coeffs is None and self._query is not None:
            weight = self.att_lora_to_q.weight
            coeffs = self.coefficients_from_query(self._query.to(weight.device, weight.dtype))
        if coeffs is None:
            raise RuntimeError(
                "LoRWeBLinear has no coefficients: call lorweb_fast.set_query(model, query) with the analogy query "
                "(or layer.set_coefficients(coeffs)) before the forward pass")
        if x.dim() not in (2, 3):
            raise ValueError(f"LoRWeBLinear takes (B, S, in) or (B, in) inputs, got shape {tuple(x.shape)}")
        if coeffs.shape[0] != x.shape[0]:
            raise ValueError(f"coefficients are set for batch size {coeffs.shape[0]} but the input has batch size "
                             f"{x.shape[0]}; call set_query with one query per sample")
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        else:
            dtype = x.dtype
        lora_a, lora_b = self.lora_A.to(dtype), self.lora_B.to(dtype)
        coeffs = coeffs.to(x.device)
        base = self.base_layer
        if has_plain_weight(base):
            bias = None if base.bias is None else base.bias.to(dtype)
            return ops.lorweb_linear(x.to(dtype), base.weight.to(dtype), bias, lora_a, lora_b, coeffs, self.scale,
                                     backend=self.backend)
        y = base(x)
        return ops.mixed_lora_delta(x.to(dtype), lora_a, lora_b, coeffs, self.scale, add_to=y.to(dtype),
                                    backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, num_loras={self.num_loras}, "
                f"rank={self.rank}, lora_alpha={self.lora_alpha:g}, key_dim={self.key_dim}, "
                f"query_dim={self.query_dim}, heads={self.heads}, activation={self.activation!r}, "
                f"reduce={self.reduce!r}, backend={self.backend!r}"
                + ("" if self.query_projection_type == "linear" else ", query_projection_type='none'"))
