"""Adversarial inputs to the Python API (functional ops, LoRWeBLinear, model-level API, checkpoints): each case
asserts the exception type, a message fragment, and that nothing changed (parameters bit-identical, coefficients
kept, files untouched). Issue 16, classes "types", "non-finite inputs", "numeric options", "configuration values",
"stale coefficients", "Python API errors" and the warnings."""

import copy
import math
import os
import re
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorweb_fast as lf
from lorweb_fast import flux, lora_api, model as lmodel, ops, reference
from lorweb_fast.model import LoRWeBCheckpointError
from lorweb_fast.testing import rewrite_safetensors, tiny_lorweb_pair

QUERY_DIM = 6
CONFIG = lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=4, query_dim=QUERY_DIM, target_modules=r"\d")


def tiny_model(seed=0):
    """Two injected linear layers (6 -> 5 -> 4), random non-zero basis."""
    return tiny_lorweb_pair(CONFIG, seed)


def snapshot(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}, {
        n: (None if l.coefficients is None else l.coefficients.detach().clone())
        for n, l in lf.lorweb_layers(m).items()}


def bits(t):
    return t.detach().contiguous().view(torch.uint8)


def assert_unchanged(m, snap):
    """Parameters and buffers bit-identical (NaN included), coefficients identical, nothing left merged."""
    state, coeffs = snap
    now = m.state_dict()
    assert now.keys() == state.keys()
    for k in state:
        assert torch.equal(bits(now[k]), bits(state[k])), k
    for n, layer in lf.lorweb_layers(m).items():
        if coeffs[n] is None:
            assert layer.coefficients is None, n
        else:
            assert torch.equal(layer.coefficients, coeffs[n]), n
    assert not any(layer._merged for layer in lf.lorweb_layers(m).values())


def query(b=1, seed=0):
    return torch.randn(b, QUERY_DIM, generator=torch.Generator().manual_seed(seed))


def prepared(seed=0):
    m = tiny_model(seed)
    with torch.no_grad():
        lf.set_query(m, query())
    return m


# ----------------------------------------------------------------------------------- types: floating tensors only
def _problem():
    g = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(2, 3, 6, generator=g), lora_a=torch.randn(3, 6, 2, generator=g),
                lora_b=torch.randn(3, 2, 5, generator=g), coeffs=torch.rand(2, 3, generator=g),
                weight=torch.randn(5, 6, generator=g), bias=torch.randn(5, generator=g))


def _call_op(fn, **over):
    p = dict(_problem(), **over)
    if fn == "mixed_lora_delta":
        return ops.mixed_lora_delta(p["x"], p["lora_a"], p["lora_b"], p["coeffs"], p.get("scale", 1.0))
    return ops.lorweb_linear(p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"], p["coeffs"],
                             p.get("scale", 1.0))


def _coeff_call(**over):
    g = torch.Generator().manual_seed(0)
    args = dict(query=torch.randn(2, 6, generator=g), to_q_weight=torch.randn(4, 6, generator=g),
                keys=torch.randn(3, 4, generator=g))
    args.update(over)
    return ops.compute_coefficients(args.pop("query"), args.pop("to_q_weight"), args.pop("keys"), **args)


NON_FLOAT = [torch.int64, torch.int32, torch.bool, torch.uint8]


@pytest.mark.parametrize("dtype", NON_FLOAT)
@pytest.mark.parametrize("arg", ["query", "to_q_weight", "keys"])
def test_compute_coefficients_refuses_non_float(arg, dtype):
    g = torch.Generator().manual_seed(0)
    shapes = {"query": (2, 6), "to_q_weight": (4, 6), "keys": (3, 4)}
    bad = (torch.randn(*shapes[arg], generator=g) * 3).to(dtype)
    with pytest.raises(TypeError, match=f"{arg} must be a floating-point tensor"):
        _coeff_call(**{arg: bad})


@pytest.mark.parametrize("dtype", NON_FLOAT)
@pytest.mark.parametrize("fn,arg", [("mixed_lora_delta", "x"), ("mixed_lora_delta", "coeffs"),
                                    ("mixed_lora_delta", "lora_a"), ("lorweb_linear", "weight"),
                                    ("lorweb_linear", "bias"), ("lorweb_linear", "lora_b")])
def test_ops_refuse_non_float(fn, arg, dtype):
    bad = (_problem()[arg] * 3).to(dtype)
    with pytest.raises(TypeError, match=rf"^{arg} (has dtype|must be floating point, got) {re.escape(str(dtype))}"):
        _call_op(fn, **{arg: bad})


@pytest.mark.parametrize("dtype", NON_FLOAT)
@pytest.mark.parametrize("entry", ["set_query", "set_query_per_forward", "set_coefficients"])
def test_model_entry_points_refuse_non_float(entry, dtype):
    m = prepared()
    snap = snapshot(m)
    layer = m[0]
    with pytest.raises(TypeError, match="must be a floating-point tensor"):
        if entry == "set_query":
            lf.set_query(m, (query() * 3).to(dtype))
        elif entry == "set_query_per_forward":
            layer.set_query_per_forward((query() * 3).to(dtype))
        else:
            layer.set_coefficients(torch.ones(1, 3, dtype=dtype))
    assert_unchanged(m, snap)


# ------------------------------------------------------------------------------------- not a tensor at all
@pytest.mark.parametrize("entry,bad", [(e, b) for e in ("set_query", "compute_coefficients", "mixed_lora_delta_x",
                                                        "lorweb_linear_bias")
                                       for b in ([[0.0] * QUERY_DIM], 1.0, None, "query")
                                       if not (e == "lorweb_linear_bias" and b is None)])  # bias=None is valid
def test_not_a_tensor(entry, bad):
    m = prepared()
    snap = snapshot(m)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        if entry == "set_query":
            lf.set_query(m, bad)
        elif entry == "compute_coefficients":
            _coeff_call(query=bad)
        elif entry == "mixed_lora_delta_x":
            _call_op("mixed_lora_delta", x=bad)
        else:
            _call_op("lorweb_linear", bias=bad)
    assert_unchanged(m, snap)


# ------------------------------------------------------------------------- Python API: integers, reals, regexes
BAD_INTS = [(0, ValueError, ">= 1"), (-2, ValueError, ">= 1"), (1.5, TypeError, "must be an integer"),
            (2.0, TypeError, "must be an integer"), (True, TypeError, "must be an integer"),
            ("2", TypeError, "must be an integer"), (None, TypeError, "must be an integer")]


@pytest.mark.parametrize("value,exc,fragment", BAD_INTS)
def test_compute_coefficients_heads(value, exc, fragment):
    with pytest.raises(exc, match=f"heads.*{fragment}"):
        _coeff_call(heads=value)


@pytest.mark.parametrize("value,exc,fragment", BAD_INTS)
@pytest.mark.parametrize("field", ["num_loras", "rank", "key_dim", "query_dim", "heads"])
def test_layer_and_config_integers(field, value, exc, fragment):
    base = nn.Linear(6, 5)
    with pytest.raises(exc, match=f"{field}.*{fragment}"):
        lf.LoRWeBLinear(base, **{field: value})
    m = nn.Sequential(nn.Linear(6, 5))
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(exc, match=f"LoRWeBConfig.{field}.*{fragment}"):
        lf.inject_lorweb(m, lf.LoRWeBConfig(**{field: value}, target_modules=r"\d"))
    assert not lf.lorweb_layers(m) and all(torch.equal(before[k], v) for k, v in m.state_dict().items())


BAD_REALS = [(math.nan, ValueError, "finite"), (math.inf, ValueError, "finite"), (-math.inf, ValueError, "finite"),
             pytest.param(10 ** 400, ValueError, "finite", id="int-1e400"),  # ints beyond the float range
             pytest.param(-10 ** 400, ValueError, "finite", id="int--1e400"),
             ("1.0", TypeError, "real number"), (None, TypeError, "real number"), (1j, TypeError, "real number"),
             (True, TypeError, "real number"), (torch.ones(2), TypeError, "real number")]


@pytest.mark.parametrize("value,exc,fragment", BAD_REALS)
@pytest.mark.parametrize("fn", ["mixed_lora_delta", "lorweb_linear"])
def test_scale_must_be_a_finite_real(fn, value, exc, fragment):
    with pytest.raises(exc, match=f"scale must be .*{fragment}|scale must be a {fragment}"):
        _call_op(fn, scale=value)


def test_unbounded_finite_message_and_peft_layout_hint():
    with pytest.raises(ValueError, match=r"^scale must be finite, got nan$"):
        _call_op("lorweb_linear", scale=math.nan)
    peft_layout = _problem()["lora_a"].transpose(1, 2).contiguous()  # (N, r, in), as peft stores lora_A
    with pytest.raises(ValueError, match=r"lora_a must be \(N, in, r\) = \(N, 6, r\) .* looks like peft's "
                                         r"\(N, r, in\) layout: pass lora_a.transpose\(1, 2\)"):
        _call_op("lorweb_linear", lora_a=peft_layout)


@pytest.mark.parametrize("value,exc", [(math.nan, ValueError), (math.inf, ValueError), (0.0, ValueError),
                                       (-1.0, ValueError), ("4", TypeError)])
def test_lora_alpha(value, exc):
    with pytest.raises(exc, match="lora_alpha"):
        lf.LoRWeBLinear(nn.Linear(6, 5), lora_alpha=value)


@pytest.mark.parametrize("targets,exc,fragment", [("(", ValueError, "not a valid regular expression"),
                                                  ("[a-", ValueError, "not a valid regular expression"),
                                                  ("a**", ValueError, "not a valid regular expression"),
                                                  ([], TypeError, "target_modules"), ([1], TypeError, "target_modules"),
                                                  (3, TypeError, "target_modules")])
def test_target_modules(targets, exc, fragment):
    m = nn.Sequential(nn.Linear(6, 5))
    with pytest.raises(exc, match=fragment):
        lf.inject_lorweb(m, lf.LoRWeBConfig(target_modules=targets))
    assert not lf.lorweb_layers(m)


@pytest.mark.parametrize("field,value", [("activation", "relu"), ("reduce", "max"), ("key_dim", 6)])
def test_config_choices_and_divisibility(field, value):
    m = nn.Sequential(nn.Linear(6, 5))
    with pytest.raises(ValueError, match=field):
        lf.inject_lorweb(m, lf.LoRWeBConfig(heads=4, target_modules=r"\d", **{field: value}))
    assert not lf.lorweb_layers(m)


@pytest.mark.parametrize("settings,fragment", [
    (dict(query_projection_type="conv"), r"query_projection_type must be one of \('linear', 'none'\)"),
    (dict(query_projection_type="none", key_dim=8, query_dim=12),
     r"key_dim must equal query_dim; got key_dim=8, query_dim=12")])
def test_config_query_projection_type(settings, fragment):
    """``LoRWeBConfig.validate`` checks query_projection_type as every other field (it was left to the layers)."""
    config = lf.LoRWeBConfig(target_modules=r"\d", **settings)
    with pytest.raises(ValueError, match=fragment):
        config.validate()
    m = nn.Sequential(nn.Linear(6, 5))
    with pytest.raises(ValueError, match=fragment):
        lf.inject_lorweb(m, config)
    assert not lf.lorweb_layers(m)


@pytest.mark.parametrize("heads,exc", [(0, ValueError), (-1, ValueError), (1.0, TypeError), (True, TypeError)])
def test_reference_coefficients_heads(heads, exc):
    """The float64 oracle refuses heads that are not a positive integer as ``ops.compute_coefficients`` does (0 was
    a ZeroDivisionError); a numpy integer passes."""
    with pytest.raises(exc, match="heads must be an integer"):
        reference.compute_coefficients(torch.randn(2, 4), torch.randn(4, 4), torch.randn(3, 4), heads=heads)
    q, w, keys = torch.randn(2, 4), torch.randn(4, 4), torch.randn(3, 4)
    assert reference.compute_coefficients(q, w, keys, heads=np.int64(2)).shape == (2, 3)


# --------------------------------------------------------------------------------------------- non-finite inputs
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("per_forward", [False, True])
def test_non_finite_query(value, per_forward):
    m = prepared()
    snap = snapshot(m)
    q = query()
    q[0, 2] = value
    with pytest.raises(ValueError, match="query holds 1 NaN or Inf"):
        lf.set_query(m, q, per_forward=per_forward)
    assert_unchanged(m, snap)


@pytest.mark.parametrize("per_forward", [False, True])
def test_check_finite_false_skips_the_finiteness_check(per_forward):
    """set_query(check_finite=False) (no device synchronisation) sets what it computed, NaN included."""
    m = prepared()
    q = query()
    q[0, 2] = math.nan
    lf.set_query(m, q, per_forward=per_forward, check_finite=False)
    for layer in lf.lorweb_layers(m).values():
        if per_forward:
            assert torch.isnan(layer._query).any()
        else:
            assert torch.isnan(layer._coefficients[0]).all() and torch.isfinite(layer._coefficients[1:]).all()


@pytest.mark.parametrize("value", [math.nan, 3e38])  # NaN, and finite values whose logits overflow to NaN
@pytest.mark.parametrize("param", ["lora_keys", "att_lora_to_q.weight"])
def test_non_finite_coefficients_are_refused_and_old_ones_kept(param, value):
    m = prepared()
    with torch.no_grad():
        layer = m[1]
        t = layer.lora_keys if param == "lora_keys" else layer.att_lora_to_q.weight
        t.fill_(value)
    snap = snapshot(m)
    with pytest.raises(ValueError, match="coefficients of 1 layers .*1.* hold NaN or Inf"):
        lf.set_query(m, query(seed=3))
    assert_unchanged(m, snap)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_set_coefficients_refuses_non_finite(value):
    m = prepared()
    snap = snapshot(m)
    c = torch.full((1, 3), 1 / 3)
    c[0, 1] = value
    with pytest.raises(ValueError, match="coefficients holds 1 NaN or Inf"):
        m[0].set_coefficients(c)
    assert_unchanged(m, snap)


def test_set_query_checks_finiteness_once_per_call(monkeypatch):
    """One finiteness check for the query and one per configuration group, not one per layer or per forward."""
    m = prepared()
    calls = []
    real = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: calls.append(1) or real(t))
    lf.set_query(m, query())
    assert len(calls) == 2  # the query, then the stacked coefficients of the single group
    m(torch.randn(1, 6))
    m(torch.randn(1, 6))
    assert len(calls) == 2


# ------------------------------------------------------------------------------------------ stale coefficients
def _other_weights(tmp_path):
    other = tiny_model(seed=5)
    path = tmp_path / "other.safetensors"
    lf.save_lorweb_weights(other, path)
    return path, other


@pytest.mark.parametrize("how", ["load_lorweb_weights", "load_lorweb_weights_dict", "load_state_dict"])
def test_loading_new_parameters_drops_old_coefficients(tmp_path, how):
    m = prepared()
    path, other = _other_weights(tmp_path)
    if how == "load_lorweb_weights":
        lf.load_lorweb_weights(m, path)
    elif how == "load_lorweb_weights_dict":
        lf.load_lorweb_weights(m, load_file(str(path)))
    else:
        m.load_state_dict(other.state_dict())
    assert lf.get_coefficients(m) == {}
    with pytest.raises(RuntimeError, match="no coefficients"):
        m(torch.randn(1, 6))
    expected = other
    if how != "load_state_dict":  # only the LoRWeB tensors were loaded: m's base layers with other's basis
        expected = tiny_model(seed=0)
        lf.load_lorweb_weights(expected, path)
    with torch.no_grad():  # a fresh set_query gives the new parameters' result
        lf.set_query(m, query())
        lf.set_query(expected, query())
        x = torch.randn(1, 6)
        assert torch.equal(m(x), expected(x))


def test_load_state_dict_inside_merged_leaves_every_module_untouched(tmp_path):
    """The root refuses before anything loads: modules before the first LoRWeB layer are not modified either."""
    m = nn.Sequential(nn.Linear(6, 6), tiny_model())
    with torch.no_grad():
        lf.set_query(m, query())
    other = copy.deepcopy(m)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    snap = snapshot(m)
    with flux.merged(m):
        with pytest.raises(RuntimeError, match="load_state_dict inside a merged\\(\\) block"):
            m.load_state_dict(other.state_dict())
    assert_unchanged(m, snap)
    m.load_state_dict(other.state_dict())  # outside: allowed, and the coefficients are dropped
    assert lf.get_coefficients(m) == {}


def test_load_state_dict_on_a_submodule_inside_merged_changes_nothing():
    """load_state_dict on a module above a merged layer (not the root) is refused by that module itself, before
    its first tensor loads: the modules loaded before the layer in its recursion are not modified either."""
    m = nn.Sequential(nn.Sequential(nn.LayerNorm(6), tiny_model()))
    with torch.no_grad():
        lf.set_query(m, query())
    sub = m[0]
    other = {k: v + 1.0 for k, v in sub.state_dict().items()}
    snap = snapshot(m)
    for strategy in ("full", "offload"):
        with flux.merged(m, strategy):
            for target in (sub, sub[1], sub[1][0]):
                part = {k[len(prefix):]: v for k, v in other.items() for prefix in [_prefix(sub, target)]
                        if k.startswith(prefix)}
                with pytest.raises(RuntimeError, match="load_state_dict inside a merged\\(\\) block"):
                    target.load_state_dict(part)
        assert_unchanged(m, snap)


def _prefix(root, module):
    return next(f"{name}." if name else "" for name, mod in root.named_modules() if mod is module)


def test_tied_weights_are_not_merged_in_place():
    """Two adapted layers sharing one weight tensor would need two merged weights in one tensor: "full" and
    "offload" refuse (naming both layers) and leave the model untouched; "jit" serves it."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    m[1].weight = m[0].weight
    lf.inject_lorweb(m, CONFIG)
    with torch.no_grad():
        for layer in lf.lorweb_layers(m).values():
            layer.lora_B.normal_()
        lf.set_query(m, query())
    snap = snapshot(m)
    x = torch.randn(1, 6)
    with torch.no_grad():
        want = m(x)
    for strategy in ("full", "offload"):
        with pytest.raises(ValueError, match=f"1 shares its weight storage with 0: strategy='{strategy}'"):
            with flux.merged(m, strategy):
                pass
        assert_unchanged(m, snap)
    with torch.no_grad(), flux.merged(m, "jit"):
        torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-6)


def test_jit_merge_takes_the_batches_the_unmerged_forward_takes():
    """Coefficients for one analogy and an input batch of two: refused alike unmerged and under merged("jit") (the
    pipeline's merge="auto" picks between them), not broadcast silently by one of them."""
    m = prepared()
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match="coefficients are set for batch size 1 but the input has batch size 2"):
        m(x)
    with flux.merged(m, "jit"), pytest.raises(ValueError, match="coefficients are set for batch size 1 but the "
                                                               "input has batch size 2"):
        m(x)


@pytest.mark.parametrize("strategy", ["full", "offload", "jit"])
def test_remove_lorweb_is_refused_while_merged(strategy):
    """Under every strategy, inside merged() and on a fuse_lora()'d model ("jit" included: the removal left the
    model marked fused with no LoRWeB layers, and a later fuse_lora raised "already fused")."""
    m = prepared()
    snap = snapshot(m)
    with flux.merged(m, strategy):
        with pytest.raises(RuntimeError, match="remove_lorweb inside a merged\\(\\) block or on a fuse_lora"):
            lf.remove_lorweb(m)
    assert_unchanged(m, snap)
    assert len(lf.lorweb_layers(m)) == 2
    lora_api.fuse_lora(m, strategy)
    with pytest.raises(RuntimeError, match="remove_lorweb inside a merged\\(\\) block or on a fuse_lora"):
        lf.remove_lorweb(m)
    assert len(lf.lorweb_layers(m)) == 2 and lora_api.fused_strategy(m) == strategy
    lora_api.unfuse_lora(m)
    assert_unchanged(m, snap)
    assert lf.remove_lorweb(m) and not lf.lorweb_layers(m)


def test_load_state_dict_of_other_modules_keeps_coefficients():
    m = prepared()
    snap = snapshot(m)
    m.load_state_dict({}, strict=False)
    assert_unchanged(m, snap)


@pytest.mark.parametrize("call", ["set_query", "clear_query", "set_coefficients", "set_query_per_forward",
                                  "load_lorweb_weights", "load_state_dict"])
def test_changing_the_analogy_inside_merged_raises(tmp_path, call):
    m = prepared()
    path, other = _other_weights(tmp_path)
    snap = snapshot(m)
    with flux.merged(m), torch.no_grad():
        merged_out = m(torch.randn(1, 6, generator=torch.Generator().manual_seed(1)))
        with pytest.raises(RuntimeError, match="inside a merged\\(\\) block"):
            if call == "set_query":
                lf.set_query(m, query(seed=9))
            elif call == "clear_query":
                lf.clear_query(m)
            elif call == "set_coefficients":
                m[0].set_coefficients(torch.full((1, 3), 1 / 3))
            elif call == "set_query_per_forward":
                m[0].set_query_per_forward(query(seed=9))
            elif call == "load_lorweb_weights":
                lf.load_lorweb_weights(m, path)
            else:
                m.load_state_dict(other.state_dict())
        assert torch.equal(m(torch.randn(1, 6, generator=torch.Generator().manual_seed(1))), merged_out)
    assert_unchanged(m, snap)


# ------------------------------------------------------------------------------- configuration values on load
def _saved(tmp_path):
    m = tiny_model()
    path = tmp_path / "w.safetensors"
    lf.save_lorweb_weights(m, path)
    return path


BAD_METADATA = [
    ({"lorweb.lora_alpha_over_rank": "nan"}, "lora_alpha_over_rank='nan'"),
    ({"lorweb.lora_alpha_over_rank": "inf"}, "lora_alpha_over_rank='inf'"),
    ({"lorweb.lora_alpha_over_rank": "-inf"}, "lora_alpha_over_rank='-inf'"),
    ({"lorweb.lora_alpha_over_rank": "0"}, "lora_alpha_over_rank='0'"),
    ({"lorweb.lora_alpha_over_rank": "-1.5"}, "lora_alpha_over_rank='-1.5'"),
    ({"lorweb.lora_alpha_over_rank": "one"}, "lora_alpha_over_rank='one'"),
    ({"lorweb.heads": "0"}, "lorweb.heads='0'"),
    ({"lorweb.heads": "-2"}, "lorweb.heads='-2'"),
    ({"lorweb.heads": "1.5"}, "lorweb.heads='1.5'"),
    ({"lorweb.heads": "two"}, "lorweb.heads='two'"),
    ({"lorweb.heads": "3"}, "does not divide key_dim=4"),
    ({"lorweb.activation": "relu"}, "lorweb.activation='relu'"),
    ({"lorweb.reduce": "max"}, "lorweb.reduce='max'"),
]


@pytest.mark.parametrize("meta,fragment", BAD_METADATA)
@pytest.mark.parametrize("into", ["fresh", "injected"])
def test_bad_metadata_is_refused_and_model_unchanged(tmp_path, meta, fragment, into):
    bad = rewrite_safetensors(_saved(tmp_path), tmp_path / "bad.safetensors", meta=meta)
    m = prepared() if into == "injected" else nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    snap = snapshot(m) if into == "injected" else ({k: v.clone() for k, v in m.state_dict().items()}, {})
    with pytest.raises(LoRWeBCheckpointError, match=fragment.replace(".", r"\.").replace("[", r"\[")):
        lf.load_lorweb_weights(m, bad)
    assert_unchanged(m, snap)


@pytest.mark.parametrize("case", ["query_dim_differs", "zero_loras"])
def test_inconsistent_or_empty_shapes_are_refused(tmp_path, case):
    path = _saved(tmp_path)
    state = load_file(str(path))
    if case == "query_dim_differs":
        key = "transformer.1.att_lora_to_q.weight"
        tensors = {key: torch.randn(4, QUERY_DIM + 1)}
        fragment = "inconsistent query_dim"
    else:
        tensors = {f"transformer.1.{s}": state[f"transformer.1.{s}"][:0]
                   for s in ("lora_A", "lora_B", "lora_keys")}
        fragment = "N and r must be at least 1"
    bad = rewrite_safetensors(path, tmp_path / "bad.safetensors", tensors=tensors)
    m = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(LoRWeBCheckpointError, match=fragment):
        lf.load_lorweb_weights(m, bad)
    assert not lf.lorweb_layers(m) and all(torch.equal(before[k], v) for k, v in m.state_dict().items())


# ------------------------------------------------------------------------------- configuration values on save
@pytest.mark.parametrize("key", ["lorweb.heads", "lorweb.lora_alpha_over_rank", "lorweb.activation", "lorweb.reduce",
                                 "lorweb.anything_new", "format"])
def test_metadata_may_not_override_our_keys(tmp_path, key):
    m = tiny_model()
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"previous content")
    with pytest.raises(ValueError, match=f"metadata may not set \\['{key}'\\]"):
        lf.save_lorweb_weights(m, path, metadata={key: "2"})
    assert path.read_bytes() == b"previous content"
    assert os.listdir(tmp_path) == ["w.safetensors"]


@pytest.mark.parametrize("param,value", [("lora_A", math.nan), ("lora_B", math.inf), ("lora_keys", -math.inf),
                                         ("att_lora_to_q.weight", math.nan)])
def test_never_write_a_file_the_loader_refuses(tmp_path, param, value):
    m = tiny_model()
    with torch.no_grad():
        m[0].lorweb_tensors()[param].view(-1)[0] = value
    path = tmp_path / "w.safetensors"
    with pytest.raises(LoRWeBCheckpointError, match=f"refusing to save .*transformer.0.{param}"):
        lf.save_lorweb_weights(m, path)
    assert not path.exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("metadata,exc,fragment", [({"encoder": ""}, ValueError, "encoder'] is empty"),
                                                   (["encoder"], TypeError, "metadata must be a dict")])
def test_bad_user_metadata(tmp_path, metadata, exc, fragment):
    with pytest.raises(exc, match=fragment):
        lf.save_lorweb_weights(tiny_model(), tmp_path / "w.safetensors", metadata=metadata)
    assert os.listdir(tmp_path) == []


def test_save_to_a_folder_is_refused(tmp_path):
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(IsADirectoryError, match="it is a folder"):
        lf.save_lorweb_weights(tiny_model(), tmp_path / "dir.safetensors")
    assert os.listdir(tmp_path) == ["dir.safetensors"]


def test_saved_file_round_trips_with_every_value_checked(tmp_path):
    """The positive control: what we save, we load (same outputs)."""
    m = prepared()
    lf.save_lorweb_weights(m, tmp_path / "w.safetensors", metadata={"encoder": "x/y", "note": "ok"})
    fresh = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    for i in range(2):
        fresh[i].load_state_dict(m[i].base_layer.state_dict())
    lf.load_lorweb_weights(fresh, tmp_path / "w.safetensors")
    with torch.no_grad():
        lf.set_query(fresh, query())
    x = torch.randn(1, 6)
    assert torch.equal(fresh(x), m(x))


# -------------------------------------------------------------------------------------------------- warnings
@pytest.mark.parametrize("strategy", ["full", "offload", "jit"])
def test_backward_inside_merged_warns_once(strategy):
    """Every strategy folds the mixture into a weight the LoRWeB parameters do not reach: one warning per block
    (and again in the next block)."""
    m = prepared()
    for p in m.parameters():
        p.requires_grad_(True)
    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with flux.merged(m, strategy=strategy):
                m(torch.randn(1, 6)).sum().backward()
                m(torch.randn(1, 6)).sum().backward()
        msgs = [str(w.message) for w in caught if "get no gradient" in str(w.message)]
        assert len(msgs) == 1
        assert all(p.grad is None for layer in lf.lorweb_layers(m).values() for p in layer.lorweb_tensors().values())


@pytest.mark.parametrize("strategy", ["full", "offload", "jit"])
def test_no_warning_inside_merged_without_autograd(strategy):
    m = prepared()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with flux.merged(m, strategy=strategy), torch.no_grad():
            m(torch.randn(1, 6))


def test_autograd_history_at_inference_warns_and_no_grad_does_not():
    m = tiny_model()
    with pytest.warns(UserWarning, match="carry autograd history"):
        lf.set_query(m, query())
    with pytest.raises(RuntimeError):  # what the warning is about
        copy.deepcopy(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            lf.set_query(m, query())
        copy.deepcopy(m)
        m.train()
        lf.set_query(m, query())  # training: history wanted, no warning


@pytest.mark.parametrize("per_forward", [False, True])
def test_a_query_or_coefficients_on_the_meta_device_are_refused_by_name(per_forward):
    """A meta tensor holds no values: set_query (either mode, with or without the finiteness check) and
    set_coefficients name it instead of failing inside torch ("Cannot copy out of meta tensor", "Tensor.item()
    cannot be called on meta tensors"), and leave the model as it was."""
    m = prepared()
    snap = snapshot(m)
    for check_finite in (True, False):
        with pytest.raises(ValueError, match="query is on the meta device: it holds no values"), torch.no_grad():
            lf.set_query(m, torch.randn(1, QUERY_DIM, device="meta"), per_forward=per_forward,
                         check_finite=check_finite)
        assert_unchanged(m, snap)
    with pytest.raises(ValueError, match="coefficients is on the meta device: it holds no values"):
        m[0].set_coefficients(torch.rand(1, CONFIG.num_loras, device="meta"))
    assert_unchanged(m, snap)


@pytest.mark.parametrize("per_forward", [False, True])
def test_deepcopy_of_coefficients_with_autograd_history_names_them(per_forward):
    """Training (autograd on) keeps the coefficients' (or the per-forward query's) history: copy.deepcopy of the model
    (e.g. an EMA copy) is refused naming them and the way out, not with torch's "Only Tensors created explicitly by
    the user (graph leaves)..." error; cleared or set under no_grad, the copy works and computes the same."""
    m = tiny_model().train()
    lf.set_query(m, query() * torch.ones((), requires_grad=True), per_forward=per_forward)
    what = "per-forward query" if per_forward else "coefficients"
    with pytest.raises(RuntimeError, match=f"holding {what} with autograd history.*clear_query"):
        copy.deepcopy(m)
    with torch.no_grad():
        lf.set_query(m, query())
    other = copy.deepcopy(m)
    x = torch.randn(2, QUERY_DIM)
    with torch.no_grad():
        lf.set_query(m, query(2))
        lf.set_query(other, query(2))
    assert torch.equal(other(x), m(x)) and other[0].lora_A is not m[0].lora_A


# ------------------------------------------------------------------------------------- weights files, devices
@pytest.mark.parametrize("kind,exc,fragment", [("folder", IsADirectoryError, "is a folder; give its .safetensors"),
                                               ("torch pickle", LoRWeBCheckpointError, "not a safetensors file"),
                                               ("empty", LoRWeBCheckpointError, "not a safetensors file"),
                                               ("missing", FileNotFoundError, "not found")])
def test_weights_that_are_not_a_safetensors_file(tmp_path, kind, exc, fragment):
    path = tmp_path / "w.safetensors"
    if kind == "folder":
        path.mkdir()
    elif kind == "torch pickle":
        path = tmp_path / "w.bin"
        torch.save(lf.lorweb_state_dict(tiny_model()), path)
    elif kind == "empty":
        path.write_bytes(b"")
    m = prepared()
    snap = snapshot(m)
    with pytest.raises(exc, match=fragment):
        lf.load_lorweb_weights(m, path)
    with pytest.raises(exc, match=fragment):
        lmodel.checkpoint_metadata(path)
    assert_unchanged(m, snap)


@pytest.mark.parametrize("name", ["w.pt", "w.bin", "w", "w.safetensors.tmp"])
def test_save_needs_the_safetensors_extension(tmp_path, name):
    with pytest.raises(ValueError, match="must end in .safetensors"):
        lf.save_lorweb_weights(tiny_model(), tmp_path / name)
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_pipeline_from_pretrained_cuda_without_gpu(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    monkeypatch.setattr(flux, "load_kontext_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    lf.save_lorweb_weights(tiny_model(), tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        flux.LoRWeBKontextPipeline.from_pretrained(tmp_path, tmp_path / "w.safetensors", device="cuda")


@pytest.mark.parametrize("entry", ["inject_lorweb", "set_query", "load_lorweb_weights", "lorweb_layers"])
def test_model_must_be_a_module(tmp_path, entry):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        if entry == "inject_lorweb":
            lf.inject_lorweb({"not": "a model"}, CONFIG)
        elif entry == "set_query":
            lf.set_query("model", query())
        elif entry == "load_lorweb_weights":
            lf.load_lorweb_weights(None, tmp_path / "w.safetensors")
        else:
            lf.lorweb_layers([nn.Linear(2, 2)])


def test_empty_query_batch():
    m = prepared()
    snap = snapshot(m)
    with pytest.raises(ValueError, match="B >= 1"):
        lf.set_query(m, torch.zeros(0, QUERY_DIM))
    assert_unchanged(m, snap)


@pytest.mark.parametrize("kwargs,exc,fragment", [({"sample": 1}, ValueError, "sample must be an integer in [0, 0]"),
                                                 ({"sample": -1}, ValueError, "sample must be"),
                                                 ({"sample": 0.0}, TypeError, "sample must be an integer"),
                                                 ({"name": "c.xyz"}, ValueError, "unknown file extension"),
                                                 ({"name": "dir"}, ValueError, "is a folder")])
def test_plot_coefficients_arguments(tmp_path, kwargs, exc, fragment):
    m = prepared()
    (tmp_path / "dir").mkdir()
    path = tmp_path / kwargs.pop("name", "c.png")
    with pytest.raises(exc, match=re.escape(fragment)):
        lf.plot_coefficients(m, path, **kwargs)
    assert sorted(os.listdir(tmp_path)) == ["dir"]


@pytest.mark.parametrize("field,value", [("query_dim", 7), ("heads", 2), ("activation", "tanh"), ("reduce", "sum"),
                                         ("lora_alpha", 3.0)])
def test_save_refuses_layers_with_inconsistent_configuration(tmp_path, field, value):
    m = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    kwargs = dict(num_loras=3, rank=2, key_dim=4, query_dim=QUERY_DIM)
    m[0] = lf.LoRWeBLinear(m[0], **kwargs)
    m[1] = lf.LoRWeBLinear(m[1], **dict(kwargs, **{field: value}))
    with pytest.raises(ValueError, match="layer 1 has"):
        lf.save_lorweb_weights(m, tmp_path / "w.safetensors")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("dtype", NON_FLOAT + [torch.complex64])
def test_layer_forward_refuses_non_float_inputs(dtype):
    m = prepared()
    snap = snapshot(m)
    x = (torch.randn(1, 6) * 3).to(dtype)
    with pytest.raises(TypeError, match="x has dtype"):
        m(x)
    assert_unchanged(m, snap)


@pytest.mark.parametrize("case,exc,fragment", [("nan lora_A", LoRWeBCheckpointError, "refusing to save"),
                                               ("query mode", ValueError, "query_mode must be one of"),
                                               ("pooling", ValueError, "pooling_type must be one of"),
                                               ("training", TypeError, "training must be a dict")])
def test_refused_save_pretrained_creates_nothing(tmp_path, case, exc, fragment):
    """save_pretrained validates before it creates the folder: a refused save leaves no (empty) folder behind, and
    no weights without their model card."""
    from lorweb_fast import lora_api

    m = tiny_model()
    kwargs = {"query mode": {"query_mode": "bogus"}, "pooling": {"pooling_type": "bogus"},
              "training": {"training": 5}}.get(case, {})
    if case == "nan lora_A":
        with torch.no_grad():
            m[0].lora_A.view(-1)[0] = math.nan
    with pytest.raises(exc, match=fragment):
        lora_api.save_pretrained(m, tmp_path / "out" / "weights", **kwargs)
    assert os.listdir(tmp_path) == []
    lora_api.save_pretrained(tiny_model(), tmp_path / "out" / "weights")  # positive control
    assert sorted(os.listdir(tmp_path / "out" / "weights")) == ["README.md", "config.yaml", "lorweb.safetensors"]


def test_a_save_refused_for_its_config_writes_nothing(tmp_path):
    """save_lorweb_weights checks a config that contradicts the layers before it creates the folder or its
    temporary file; encoder=None means "not given" (the official default is written, not the string "None")."""
    model = prepared()
    target = tmp_path / "new" / "w.safetensors"
    for config, fragment in (({"num_loras": 99}, "contradicts the model's layers"),
                             ({"query_mode": "bogus"}, "query_mode must be one of"),
                             ({"pooling_type": "median"}, "pooling_type must be one of"),
                             ({"encoder": " "}, r"config\['encoder'\] is empty")):
        with pytest.raises(ValueError, match=fragment):
            lf.save_lorweb_weights(model, target, config=config)
        assert not (tmp_path / "new").exists()
    lf.save_lorweb_weights(model, target, metadata={"encoder": None}, config={"encoder": None})
    from lorweb_fast.model import DEFAULT_ENCODER, checkpoint_metadata

    assert checkpoint_metadata(target)["encoder"] == DEFAULT_ENCODER


def test_a_query_of_the_wrong_width_is_named():
    """compute_coefficients blames the query (another encoder or query mode), not the layer's projection."""
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"query has 5 features but to_q_weight \(4, 6\) expects query_dim=6"):
        ops.compute_coefficients(torch.randn(2, 5, generator=g), torch.randn(4, 6, generator=g),
                                 torch.randn(3, 4, generator=g))


def test_a_plain_lora_checkpoint_is_named_as_such(tmp_path):
    """A peft/diffusers (lora_A.weight / lora_B.weight) or kohya (lora_down / lora_up / alpha) checkpoint is not a
    LoRWeB basis: the error says so (not a list of unexpected keys), and the model is unchanged."""
    from safetensors.torch import save_file

    m = prepared()
    snap = snapshot(m)
    for keys in (("transformer.0.lora_A.weight", "transformer.0.lora_B.weight"),
                 ("lora_unet_0.lora_down.weight", "lora_unet_0.lora_up.weight", "lora_unet_0.alpha")):
        save_file({k: torch.randn(2, 2) for k in keys}, tmp_path / "plain.safetensors")
        with pytest.raises(lf.LoRWeBCheckpointError, match=r"plain LoRA checkpoint .*does not stack"):
            lf.load_lorweb_weights(m, tmp_path / "plain.safetensors")
        assert_unchanged(m, snap)
    save_file({"transformer.0.lora_A.weight": torch.randn(2, 2), "something.else": torch.randn(2)},
              tmp_path / "mixed.safetensors")
    with pytest.raises(lf.LoRWeBCheckpointError, match="unexpected key something.else"):
        lf.load_lorweb_weights(m, tmp_path / "mixed.safetensors")


@pytest.mark.parametrize("target", ["fresh", "injected"])
def test_values_finite_in_the_file_but_not_in_the_layers_dtype_are_refused(tmp_path, target):
    """An fp32 checkpoint with values beyond fp16's range (65504) passes the file's NaN/Inf check but would turn into
    Inf in an fp16 model (and every output into NaN): refused naming the tensor, its largest value and the dtype, the
    model unchanged. Values inside the range load (positive control)."""
    source = nn.Sequential(nn.Linear(4, 3))
    lf.inject_lorweb(source, lf.LoRWeBConfig(num_loras=2, rank=1, key_dim=2, query_dim=3, target_modules=r"\d"))
    state = lf.lorweb_state_dict(source)
    key_b = next(k for k in state if k.endswith("lora_B"))
    fits = dict(state, **{key_b: torch.full_like(state[key_b], 6.0e4)})
    overflows = dict(state, **{key_b: torch.full_like(state[key_b], 1.0e6)})

    def fp16_model():
        model = nn.Sequential(nn.Linear(4, 3)).half()
        if target == "injected":
            lf.inject_lorweb(model, lf.LoRWeBConfig(num_loras=2, rank=1, key_dim=2, query_dim=3,
                                                    target_modules=r"\d"))
        return model

    model = fp16_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoRWeBCheckpointError, match=r"0\.lora_B holds values up to 1e\+06, which overflow the "
                                                    r"layer's float16 \(largest finite 6\.55e\+04\)"):
        lf.load_lorweb_weights(model, overflows)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model = fp16_model()
    lf.load_lorweb_weights(model, fits)
    assert model[0].lora_B.dtype == torch.float16 and bool((model[0].lora_B == 6.0e4).all())
