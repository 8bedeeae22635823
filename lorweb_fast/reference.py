"""Float64 reference of the LoRWeB math (../shared/METHOD.md). The oracle for every fast path.

The official layer is NVlabs/LoRWeB toolkit/network_mixins.py ``attlora_forward``: the coefficients through
``att_lora_to_q``, a head split, ``scaled_dot_product_attention`` with identity values (softmax) or tanh, and a mean
or clamped sum over heads; the delta as the einsum "b s i, n i r, b n, n r o -> b s o" times the scale.
tests/test_reference.py checks this module against a transcription of that function
(``test_coefficients_match_the_official_attlora_forward``) and against explicit per-LoRA loops.

Everything here is plain PyTorch, written for clarity, and computes in float64 whatever the input dtype. It is not
meant to be fast.
"""

from __future__ import annotations

import math

import torch

ACTIVATIONS = ("softmax", "tanh")
REDUCTIONS = ("mean", "sum")


def compute_coefficients(
    query: torch.Tensor,
    to_q_weight: torch.Tensor,
    keys: torch.Tensor,
    *,
    heads: int = 1,
    activation: str = "softmax",
    reduce: str = "mean",
) -> torch.Tensor:
    """Mixing coefficients of the N basis LoRAs for each sample.

    Args:
        query: (B, query_dim) analogy query, e.g. concat of the CLIP image embeddings of a, a' and b.
        to_q_weight: (key_dim, query_dim) weight of the query projection ``att_lora_to_q``.
        keys: (N, key_dim) one learned key per basis LoRA.
        heads: number of heads; key_dim must be divisible by it (ValueError otherwise).
        activation: "softmax" (over the N LoRAs) or "tanh".
        reduce: "mean" over heads, or "sum" over heads followed by the official clamp
            ([0, 1] for softmax, [-1, 1] for tanh).

    Returns:
        (B, N) float64 coefficients.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    from .validation import check_positive_int

    heads = check_positive_int("heads", heads)  # as ops.compute_coefficients: numpy integers pass
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if query.dim() != 2 or to_q_weight.dim() != 2 or keys.dim() != 2:
        raise ValueError(f"query (B, query_dim), to_q_weight (key_dim, query_dim) and keys (N, key_dim) must be 2-D, "
                         f"got {tuple(query.shape)}, {tuple(to_q_weight.shape)}, {tuple(keys.shape)}")
    if to_q_weight.shape[1] != query.shape[1] or keys.shape[1] != to_q_weight.shape[0]:
        raise ValueError(f"shapes do not chain: query {tuple(query.shape)}, to_q_weight {tuple(to_q_weight.shape)} "
                         f"(key_dim, query_dim), keys {tuple(keys.shape)} (N, key_dim)")
    q = query.double()
    w = to_q_weight.double()
    k = keys.double()
    num_loras, key_dim = k.shape
    if key_dim % heads:
        raise ValueError(f"key_dim={key_dim} is not divisible by heads={heads}")
    d = key_dim // heads
    p = q @ w.T  # (B, key_dim)
    p = p.view(-1, heads, d)  # (B, H, d)
    kh = k.view(num_loras, heads, d)  # (N, H, d)
    logits = torch.einsum("bhd,nhd->bhn", p, kh) / math.sqrt(d)  # (B, H, N)
    c = torch.softmax(logits, dim=-1) if activation == "softmax" else torch.tanh(logits)
    if reduce == "mean":
        return c.mean(dim=1)
    lo = 0.0 if activation == "softmax" else -1.0
    return c.sum(dim=1).clamp(lo, 1.0)


def mixed_lora_delta(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    coeffs: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The LoRWeB update ``scale * sum_n coeffs[b, n] * B_n^T (A_n^T x)`` for every token of sample b.

    This is the official einsum formulation, evaluated in float64.

    Args:
        x: (B, S, in) or (B, in) inputs.
        lora_a: (N, in, r) down projections.
        lora_b: (N, r, out) up projections.
        coeffs: (B, N) per-sample mixing coefficients.
        scale: lora_alpha / r.

    Returns:
        (B, S, out) or (B, out) float64 delta, matching the rank of ``x``.
    """
    # checked here, not broadcast by einsum: the oracle must refuse what the fast paths refuse
    if x.dim() not in (2, 3) or lora_a.dim() != 3 or lora_b.dim() != 3 or coeffs.dim() != 2:
        raise ValueError(f"x (B, S, in) / (B, in), lora_a (N, in, r), lora_b (N, r, out) and coeffs (B, N) expected, "
                         f"got {tuple(x.shape)}, {tuple(lora_a.shape)}, {tuple(lora_b.shape)}, {tuple(coeffs.shape)}")
    num_loras, in_features, rank = lora_a.shape
    if (x.shape[-1] != in_features or tuple(lora_b.shape[:2]) != (num_loras, rank)
            or tuple(coeffs.shape) != (x.shape[0], num_loras)):
        raise ValueError(f"shapes do not match: x {tuple(x.shape)}, lora_a {tuple(lora_a.shape)} (N, in, r), "
                         f"lora_b {tuple(lora_b.shape)} (N, r, out), coeffs {tuple(coeffs.shape)} (B, N)")
    xd, a, b, c = x.double(), lora_a.double(), lora_b.double(), coeffs.double()
    if x.dim() == 2:
        return torch.einsum("bi,nir,bn,nro->bo", xd, a, c, b) * scale
    return torch.einsum("bsi,nir,bn,nro->bso", xd, a, c, b) * scale


def lorweb_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    coeffs: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``x W^T + bias + mixed_lora_delta(...)`` in float64. weight: (out, in), bias: (out,) or None; the rest as in
    ``mixed_lora_delta``. Returns (B, S, out) or (B, out) float64, matching the rank of ``x``."""
    delta = mixed_lora_delta(x, lora_a, lora_b, coeffs, scale)  # checks x, the basis and the coefficients first
    # checked as the fast paths check them (a bias that merely broadcasts is refused there)
    out_features = lora_b.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1] or weight.shape[0] != out_features:
        raise ValueError(f"weight must be (out, in) = ({out_features}, {x.shape[-1]}), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must be (out,) = ({out_features},), got {tuple(bias.shape)}")
    y = x.double() @ weight.double().T
    if bias is not None:
        y = y + bias.double()
    return y + delta
