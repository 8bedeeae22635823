"""LoRWeBLinear as a drop-in ``nn.Module`` and the model-level injection, used as a peft / diffusers user uses any torch
model (CPU only, tiny models, nothing downloaded).

Every test here states the expected behaviour of a defect this audit found; each failed on the audited commit
(608abfe) and passes since the fortieth session's fix, and accepts either the working behaviour or a clear refusal
naming the cause, where a fix may take either route.
"""

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

import lorweb_fast as lf
from lorweb_fast.layer import LoRWeBLinear
from lorweb_fast.testing import PAIR_QUERY_DIM, one_intra_op_thread, pair_query, tiny_pair_model

QUERY_DIM = PAIR_QUERY_DIM


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_intra_op_thread():
        yield


def inputs(b=1, seed=1):
    return torch.randn(b, 6, generator=torch.Generator().manual_seed(seed))


def layer_with_coefficients(seed=0):
    """A LoRWeBLinear (6 -> 5) over a plain nn.Linear with a non-zero basis and coefficients for a batch of 2."""
    torch.manual_seed(seed)
    base = nn.Linear(6, 5)
    layer = LoRWeBLinear(base, num_loras=3, rank=2, key_dim=4, query_dim=QUERY_DIM)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.set_coefficients(torch.rand(2, 3))
    return layer, base


# ------------------------------------------------------------------------------------------------ merges
@pytest.mark.parametrize("strategy", ["full", "offload"])
def test_merge_into_a_parametrized_base_weight_keeps_the_mixture_or_is_refused(strategy):
    """flux.py ``merged`` (``_mergeable_layers`` / ``_unmergeable_base``, ``_merged_full`` / ``_merged_offload``).
    A base layer under a ``torch.nn.utils.parametrize`` parametrization (here ``parametrizations.weight_norm``, as a
    user applies to any nn.Linear) passes ``has_plain_weight`` (its ``weight`` is a plain tensor computed at every
    access), so "full" / "offload" write the merged weight into that temporary tensor: the merge is lost and, the
    layer being marked merged, its forward returns the base output alone, silently without the mixture (0.15 off
    here). Expected, as for every other base: the merged block computes what the unmerged layer computes, or the
    merge is refused by name (strategy="jit" works)."""
    m, q, x = tiny_pair_model(), pair_query(1), inputs()
    weight_norm(m[0].base_layer)
    with torch.no_grad():
        lf.set_query(m, q)
        want = m(x)
        try:
            with lf.merged(m, strategy):
                got = m(x)
        except (TypeError, ValueError) as exc:
            assert "parametriz" in str(exc), exc
            return
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ["full", "offload"])
def test_merge_leaves_a_module_tied_to_the_base_weight_unchanged_or_is_refused(strategy):
    """flux.py ``_mergeable_layers``: "full" / "offload" put each layer's merged weight in place of (into) its base
    weight; a weight shared between two LoRWeB layers is refused ("shares its weight storage"), but one tied to a
    module that is not adapted (tied input/output projections, an embedding tied to a head) is not: inside the block
    the untargeted module silently computes with the other layer's merged weight (0.35 off here), and the adapted
    layer adds it twice. Expected: the untargeted module computes as before and the model as unmerged, or a refusal
    naming the shared weight (strategy="jit" works)."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Linear(6, 6), nn.Linear(6, 6)
            self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(self.emb(x))

    torch.manual_seed(0)
    m = Tied().eval()
    lf.inject_lorweb(m, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=4, query_dim=QUERY_DIM, target_modules=["head"]))
    with torch.no_grad():
        m.head.lora_B.normal_()
    q, x = pair_query(1), inputs()
    with torch.no_grad():
        lf.set_query(m, q)
        want, want_emb = m(x), m.emb(x)
        try:
            with lf.merged(m, strategy):
                got, got_emb = m(x), m.emb(x)
        except (TypeError, ValueError) as exc:
            assert "shares" in str(exc) or "tied" in str(exc), exc
            return
    torch.testing.assert_close(got_emb, want_emb, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_auto_merge_picks_jit_for_parametrized_or_tied_base_weights():
    """Regression of the two fixes above (found by the session's diff review): ``choose_merge_strategy`` (the
    pipeline's ``merge="auto"``) picked "full", which ``merged`` now refuses for such bases: "auto" must pick "jit",
    which merges them correctly."""
    from lorweb_fast.flux import choose_merge_strategy

    parametrized = tiny_pair_model()
    weight_norm(parametrized[0].base_layer)
    tied = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6))
    tied[2].weight = tied[0].weight
    lf.inject_lorweb(tied, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=4, query_dim=QUERY_DIM,
                                           target_modules=["0", "1"]))
    x = inputs()
    for m in (parametrized, tied):
        with torch.no_grad():
            lf.set_query(m, pair_query(1))
            want = m(x if m is parametrized else x[..., :6])
            assert choose_merge_strategy(m) == "jit"
            with lf.merged(m, "jit"):
                got = m(x if m is parametrized else x[..., :6])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ the "none" query projection
NONE_CONFIG = lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=QUERY_DIM, query_dim=QUERY_DIM,
                              query_projection_type="none", target_modules=r"\d")


def _xavier_linears(module):
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)


def _reset_all(model):
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()


@pytest.mark.parametrize("reinit", [lambda m: m.apply(_xavier_linears), _reset_all],
                         ids=["apply_init_fn", "reset_parameters"])
def test_none_projection_stays_the_identity_through_module_initialisation(reinit):
    """layer.py ``LoRWeBLinear.__init__`` / model.py ``set_query``: with ``query_projection_type="none"`` (the
    official ``nn.Identity``, NVlabs/LoRWeB toolkit/models/AttLoRA.py) the identity is held as the ``weight`` buffer
    of an ``nn.Linear`` named ``att_lora_to_q``. The usual ways of (re)initialising a model, ``model.apply(fn)`` with
    an ``isinstance(m, nn.Linear)`` init and ``reset_parameters()`` of every module (the meta-device / FSDP
    pattern), write random values into it; ``set_query`` then silently projects the query by that random matrix
    (coefficients 0.3 to 0.9 off here), nothing saves it (non-persistent), and only a cast or a load puts the
    identity back. Expected: the "none" projection is the identity whatever initialises the model's nn.Linear
    layers: the coefficients after re-initialisation equal those before (the LoRWeB keys are untouched)."""
    m, q = tiny_pair_model(config=NONE_CONFIG), pair_query(2)
    with torch.no_grad():
        before = {name: c.clone() for name, c in lf.set_query(m, q).items()}
    keys = {name: layer.lora_keys.detach().clone() for name, layer in lf.lorweb_layers(m).items()}
    reinit(m)
    for name, layer in lf.lorweb_layers(m).items():  # (a reset_parameters of the layer itself may redraw them)
        with torch.no_grad():
            layer.lora_keys.copy_(keys[name])
    with torch.no_grad():
        after = lf.set_query(m, q)
    for name, coeffs in before.items():
        torch.testing.assert_close(after[name], coeffs, rtol=0, atol=0)


# ------------------------------------------------------------------------------- hooks and a patched forward
@pytest.mark.parametrize("kind", ["register_full_backward_hook", "register_full_backward_pre_hook"])
def test_backward_hooks_on_the_base_layer_fire_as_on_a_plain_linear(kind):
    """layer.py ``has_forward_hooks`` / ``LoRWeBLinear.forward``: a base layer with forward hooks is called (its hooks
    run), but one with backward hooks only is read by the fused path and never called, so the hooks a user (or a
    gradient-logging / attribution tool) registered on ``layer.base_layer`` silently never fire. Expected, as for the
    nn.Linear before injection: the hook runs once per backward."""
    layer, base = layer_with_coefficients()
    calls = []
    getattr(base, kind)(lambda *args: calls.append(1))
    x = torch.randn(2, 6, requires_grad=True)
    base(x).sum().backward()
    assert len(calls) == 1  # the plain linear: once
    calls.clear()
    layer(x).sum().backward()
    assert len(calls) == 1


def test_a_base_layer_with_its_forward_replaced_on_the_instance_is_called():
    """layer.py ``has_plain_weight`` / ``has_forward_hooks``: whether the base layer may be read rather than called
    looks at ``type(base).forward``, hooks and accelerate's ``_hf_hook``, not at a ``forward`` set on the instance,
    which is how kohya / ai-toolkit (the official trainer's toolkit: ``org_module.forward = self.forward``) and
    LyCORIS networks attach themselves to a linear layer. Such a base layer is read by the fused kernels and its
    forward silently skipped. Expected: the layer computes ``base(x)`` (the instance's forward) plus the mixture."""
    layer, base = layer_with_coefficients()
    x = inputs(2)
    with torch.no_grad():
        delta = layer(x) - base(x)
        original = base.forward
        base.forward = lambda inp: 3.0 * original(inp)
        want = base(x) + delta
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------- model-level calls
def test_remove_lorweb_on_a_bare_layer_is_refused_and_changes_nothing():
    """model.py ``remove_lorweb`` (``_set_submodule`` with the name ""): ``lorweb_layers`` of a bare LoRWeBLinear is
    ``{"": layer}`` (``set_query``, saving and loading accept it), but ``remove_lorweb(layer)`` cannot put a base
    layer in the place of the module it was given: it registers the base layer as a submodule named "" inside the
    LoRWeB layer (``state_dict`` gains ``.weight`` / ``.bias``, the repr an ``(): Linear``) and reports [""] as
    removed. Expected: a ValueError / TypeError saying the model is itself a LoRWeB layer (use ``layer.base_layer``),
    the layer unchanged."""
    layer, _ = layer_with_coefficients()
    keys = list(layer.state_dict())
    with pytest.raises((ValueError, TypeError), match="base_layer|itself"):
        lf.remove_lorweb(layer)
    assert list(layer._modules) == ["base_layer", "att_lora_to_q"]
    assert list(layer.state_dict()) == keys


def test_injecting_into_a_compiled_linear_adapts_it_or_is_refused():
    """model.py ``_find_targets`` / ``inject_lorweb``: a linear wrapped by ``torch.compile`` (an ``OptimizedModule``)
    is found as ``<name>._orig_mod`` and the LoRWeB layer is put in the wrapper's ``_orig_mod``, but the wrapper's
    forward stays bound to the old linear: the adapter is silently unused (the output is the base output). Loading
    a checkpoint into the same model (``load_lorweb_weights``) wraps the compiled module and works. Expected: the
    adapted layer computes base + mixture (as the same model without the compile wrapper), or a refusal naming
    torch.compile."""
    config = lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=4, query_dim=QUERY_DIM, target_modules=r"0(\._orig_mod)?")
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 5))
    torch.manual_seed(0)
    compiled = nn.Sequential(nn.Linear(6, 5))
    compiled[0] = torch.compile(compiled[0], backend="eager")
    lf.inject_lorweb(plain, config)
    with torch.no_grad():
        plain[0].lora_B.normal_()
    try:
        lf.inject_lorweb(compiled, config)
    except (ValueError, TypeError) as exc:
        assert "compile" in str(exc), exc
        return
    (injected,) = lf.lorweb_layers(compiled).values()
    with torch.no_grad():
        for suffix, t in plain[0].lorweb_tensors().items():  # (the base weights are equal: the same seed)
            injected.lorweb_tensors()[suffix].copy_(t)
        q, x = pair_query(1), inputs()
        lf.set_query(plain, q)
        lf.set_query(compiled, q)
        assert not torch.allclose(plain(x), plain[0].base_layer(x))  # the mixture is there
        torch.testing.assert_close(compiled(x), plain(x), rtol=1e-5, atol=1e-5)


def test_injecting_with_list_targets_into_a_compiled_linear_is_refused():
    """Regression (found by the session's diff review): with list targets (peft's suffix rule) the compiled leaf's
    inner name ``0._orig_mod`` matches nothing, so the compiled linear was silently left out; the wrapper's name
    matches the targets, and the injection is refused naming torch.compile, before anything changes."""
    m = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    m[0] = torch.compile(m[0], backend="eager")
    with pytest.raises(ValueError, match="compiled on its own"):
        lf.inject_lorweb(m, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=4, query_dim=QUERY_DIM,
                                            target_modules=["0", "1"]))
    assert lf.lorweb_layers(m) == {}


def test_auto_merge_picks_jit_when_two_adapted_layers_share_a_base_weight():
    """Regression (second diff review): ``choose_merge_strategy`` checked the base weights tied outside the LoRWeB
    layers but not one shared by two of them (tied q / k, both targeted), which ``merged`` refuses for "full" and
    "offload": "auto" must pick "jit" (correct there); the refusal names the sharing."""
    from lorweb_fast.flux import choose_merge_strategy

    m = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    m[1].weight = m[0].weight
    lf.inject_lorweb(m, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=4, query_dim=QUERY_DIM,
                                        target_modules=["0", "1"]))
    x = inputs()[..., :6]
    with torch.no_grad():
        for layer in lf.lorweb_layers(m).values():
            layer.lora_B.normal_()
        lf.set_query(m, pair_query(1))
        want = m(x)
        assert choose_merge_strategy(m) == "jit"
        for strategy in ("full", "offload"):
            with pytest.raises(ValueError, match="1 shares its weight storage with 0"):
                with lf.merged(m, strategy):
                    pass
        with lf.merged(m, "jit"):
            torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)


def test_inject_into_a_compiled_model_with_regex_targets_adapts_the_wrapped_model():
    """Regression (second diff review): ``inject_lorweb(torch.compile(model))`` matched regex targets against the
    wrapper's ``_orig_mod.``-prefixed names and found none; like ``load_lorweb_weights`` it now injects into the
    wrapped model (its own names), and the compiled model computes what the eager one does."""
    config = lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=4, query_dim=QUERY_DIM, target_modules=r"\d")
    eager = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    compiled = torch.compile(nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)), backend="eager")
    compiled._orig_mod.load_state_dict(eager.state_dict())
    assert lf.inject_lorweb(eager, config) == lf.inject_lorweb(compiled, config) == ["0", "1"]
    with torch.no_grad():
        for (_, a), (_, b) in zip(lf.lorweb_layers(eager).items(), lf.lorweb_layers(compiled).items()):
            a.lora_B.normal_()
            for suffix, t in a.lorweb_tensors().items():
                b.lorweb_tensors()[suffix].copy_(t)
        q, x = pair_query(1), inputs()
        lf.set_query(eager, q)
        lf.set_query(compiled, q)
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-6, atol=1e-6)
