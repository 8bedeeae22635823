"""Dtype / device / module-conversion guards, exercised as a diffusers / accelerate user would (CPU only).

Casts (``.to(dtype)``, ``.half()``, ``.float()``, ``.double()``, ``.to("meta")``, ``.to_empty``) after LoRWeB is
injected and an analogy set; ``state_dict`` / ``torch.save`` / ``copy.deepcopy`` / ``pickle``; accelerate's
``init_empty_weights`` and ``set_module_tensor_to_device``; ``torch.autocast``; a linear layer reachable under two
names; a fused pipeline cast with ``pipe.to(dtype)``. Every forward is checked against a float64 reference computed
from the layers' own weights. Each case either works (numerically checked) or fails before anything changes with an
error naming the problem.
"""

import copy
import io
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import lorweb_fast as lf
from lorweb_fast import lora_api
from lorweb_fast.model import LoRWeBCheckpointError, lorweb_state_dict
from lorweb_fast.testing import one_intra_op_thread, tiny_lorweb_pair

QUERY_DIM = 6
CONFIG = lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=4, query_dim=QUERY_DIM, target_modules=r"\d")
# query_projection_type="none": the identity projection is a non-persistent buffer (key_dim == query_dim)
NONE_CONFIG = lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=QUERY_DIM, query_dim=QUERY_DIM,
                              query_projection_type="none", target_modules=r"\d")
# largest error allowed against the float64 reference, relative to max(1, |reference|): the rounding of each dtype
# over two layers (a stale or garbage mixture is off by > 0.1)
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 4e-3, torch.float32: 1e-5, torch.float64: 1e-6}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_intra_op_thread():
        yield


def tiny_model(seed=0, config=CONFIG):
    """Two injected linear layers (6 -> 5 -> 4), random non-zero basis, spread-out keys, eval mode."""
    return tiny_lorweb_pair(config, seed, key_std=2.0)


def query(b=2, seed=0):
    return torch.randn(b, QUERY_DIM, generator=torch.Generator().manual_seed(seed))


def inputs(b=2, seed=1):
    return torch.randn(b, 6, generator=torch.Generator().manual_seed(seed))


def reference(m, x, q):
    """The model's output in float64 from its current weights: coefficients recomputed from ``q``."""
    y = x.double()
    for layer in lf.lorweb_layers(m).values():
        c = lf.compute_coefficients(q.double(), layer.att_lora_to_q.weight.double(), layer.lora_keys.double(),
                                    heads=layer.heads, activation=layer.activation, reduce=layer.reduce)
        base = layer.base_layer
        delta = torch.einsum("bi,nir,nro,bn->bo", y, layer.lora_A.double(), layer.lora_B.double(), c)
        y = y @ base.weight.double().T + base.bias.double() + layer.scale * delta
    return y


def assert_matches_reference(y, m, x, q, dtype):
    want = reference(m, x, q)
    err = (y.double() - want).abs().max().item()
    assert err <= TOLERANCE[dtype] * max(1.0, want.abs().max().item()), f"{dtype}: error {err:.3g}"
    # and the mixture matters at this size: without it the output is visibly different
    assert (y.double() - reference_without_lorweb(m, x)).abs().max() > 0.1


def reference_without_lorweb(m, x):
    y = x.double()
    for layer in lf.lorweb_layers(m).values():
        y = y @ layer.base_layer.weight.double().T + layer.base_layer.bias.double()
    return y


def fill_like_uninitialised(m, value=0.5):
    """What ``to_empty`` leaves is arbitrary memory: made deterministic here (every tensor filled with ``value``)."""
    with torch.no_grad():
        for t in [*m.parameters(), *m.buffers()]:
            t.fill_(value)


def copy_base_weights(dst, src):
    with torch.no_grad():
        for name, layer in lf.lorweb_layers(src).items():
            target = dst.get_submodule(name)
            target = getattr(target, "base_layer", target)
            target.weight.copy_(layer.base_layer.weight)
            target.bias.copy_(layer.base_layer.bias)


# ------------------------------------------------------------------------------------------------ casts
@pytest.mark.parametrize("cast", ["bfloat16", "half", "float", "double"])
def test_cast_after_set_query_keeps_correct_forward(cast):
    """The cached coefficients (fp32, not a parameter or buffer) stay fp32 through a cast and the forward in the new
    dtype matches the float64 reference of the cast weights."""
    m, q, x = tiny_model(), query(), inputs()
    with torch.no_grad():
        lf.set_query(m, q)
    {"bfloat16": lambda: m.to(torch.bfloat16), "half": m.half, "float": m.float, "double": m.double}[cast]()
    dtype = m[0].lora_A.dtype
    assert m[0].base_layer.weight.dtype == m[0].att_lora_to_q.weight.dtype == dtype
    assert all(c.dtype == torch.float32 for c in lf.get_coefficients(m).values())
    with torch.no_grad():
        y = m(x.to(dtype))
    assert y.dtype == dtype
    assert_matches_reference(y, m, x.to(dtype), q.to(dtype), dtype)
    with torch.no_grad():  # a new analogy after the cast: computed from the cast weights
        lf.set_query(m, q.flip(0))
        y = m(x.to(dtype))
    assert_matches_reference(y, m, x.to(dtype), q.flip(0).to(dtype), dtype)


def test_per_forward_query_follows_a_cast():
    m, q, x = tiny_model(), query(), inputs()
    with torch.no_grad():
        lf.set_query(m, q, per_forward=True)
    m.to(torch.bfloat16)
    with torch.no_grad():
        y = m(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert_matches_reference(y, m, x.bfloat16(), q.bfloat16(), torch.bfloat16)


def test_meta_forward_after_to_meta_and_to_empty_then_load_drops_coefficients(tmp_path):
    """``.to("meta")``: a meta forward gives a meta output of the right shape; ``to_empty`` then
    ``load_lorweb_weights`` drops the coefficients computed from the old weights (the forward names set_query), and
    after set_query the model computes what the source computes."""
    src, q, x = tiny_model(), query(), inputs()
    path = tmp_path / "lorweb.safetensors"
    lf.save_lorweb_weights(src, path)
    m = copy.deepcopy(src)
    with torch.no_grad():
        lf.set_query(m, q)
    m.to("meta")
    y = m(x.to("meta"))
    assert y.device.type == "meta" and y.shape == (2, 4)
    m.to_empty(device="cpu")
    fill_like_uninitialised(m)
    copy_base_weights(m, src)
    lf.load_lorweb_weights(m, path)
    assert lf.get_coefficients(m) == {}
    with pytest.raises(RuntimeError, match="set_query"):
        m(x)
    with torch.no_grad():
        lf.set_query(m, q)
        assert_matches_reference(m(x), src, x, q, torch.float32)


def test_merged_then_cast_inside_and_after_exit():
    m, q, x = tiny_model(), query(1), inputs(1)
    with torch.no_grad():
        lf.set_query(m, q)
        with lf.merged(m):
            m.double()
            y = m(x.double())
        assert_matches_reference(y, m, x.double(), q.double(), torch.float64)
        assert_matches_reference(m(x.double()), m, x.double(), q.double(), torch.float64)


# ---------------------------------------------------------------------------------------------- autocast, fp16
def test_autocast_around_set_query_and_forward():
    m, q, x = tiny_model(), query(), inputs()
    plain = tiny_model()
    with torch.no_grad():
        want = lf.set_query(plain, q)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = lf.set_query(m, q)
            y = m(x)
    for name in want:  # autocast is disabled inside the coefficient computation: fp32, bit for bit
        assert got[name].dtype == torch.float32 and torch.equal(got[name], want[name])
    assert y.dtype == torch.bfloat16  # as F.linear under autocast
    assert_matches_reference(y, m, x, q, torch.bfloat16)


def test_fp16_model_on_cpu():
    m, q, x = tiny_model().half(), query().half(), inputs().half()
    with torch.no_grad():
        lf.set_query(m, q)
        y = m(x)
    assert y.dtype == torch.float16
    assert_matches_reference(y, m, x, q, torch.float16)


# ------------------------------------------------------------------------------- state dicts, copies, pickling
def test_state_dict_names_counts_and_torch_save_round_trip():
    src, q, x = tiny_model(), query(), inputs()
    names = [n for n, _ in src.named_parameters()]
    per_layer = ["lora_A", "lora_B", "lora_keys", "base_layer.weight", "base_layer.bias", "att_lora_to_q.weight"]
    assert names == [f"{i}.{s}" for i in (0, 1) for s in per_layer]
    assert len(list(src.parameters())) == 12 and list(src.state_dict()) == names
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    m = tiny_model(seed=5)
    with torch.no_grad():
        lf.set_query(m, q)
    m.load_state_dict(state)
    assert lf.get_coefficients(m) == {}  # computed from the replaced weights: dropped
    with torch.no_grad():
        lf.set_query(m, q)
        lf.set_query(src, q)
        assert torch.equal(m(x), src(x))


def test_query_projection_none_state_dict_holds_no_identity():
    m = tiny_model(config=NONE_CONFIG)
    assert not any("att_lora_to_q" in k for k in m.state_dict())
    assert not any("att_lora_to_q" in n for n, _ in m.named_parameters())
    assert not any("att_lora_to_q" in k for k in lorweb_state_dict(m))


def test_deepcopy_and_pickle_keep_no_grad_coefficients():
    m, q, x = tiny_model(), query(), inputs()
    with torch.no_grad():
        lf.set_query(m, q)
        want = m(x)
        twin = copy.deepcopy(m)
        assert twin[0].coefficients is not m[0].coefficients
        assert torch.equal(twin(x), want)
        layer = pickle.loads(pickle.dumps(m[0]))
        assert torch.equal(layer(x), m[0](x))


# -------------------------------------------------------------------------------------------------- accelerate
def test_init_empty_weights_inject_then_load_is_refused_unchanged(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    src = tiny_model()
    path = tmp_path / "lorweb.safetensors"
    lf.save_lorweb_weights(src, path)
    with accelerate.init_empty_weights():
        m = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
        lf.inject_lorweb(m, CONFIG)
    assert all(p.device.type == "meta" for p in m.parameters())
    with pytest.raises(LoRWeBCheckpointError, match="meta device"):
        lf.load_lorweb_weights(m, path)
    assert all(p.device.type == "meta" for p in m.parameters())


def test_load_inside_init_empty_weights_does_not_report_a_load_into_meta_tensors(tmp_path):
    """Fixed: ``load_lorweb_weights`` called inside ``accelerate.init_empty_weights()`` on a real (materialised) model
    injects new LoRWeB layers whose parameters accelerate's patched ``register_parameter`` puts on the meta device,
    copies the checkpoint into them (a no-op on meta) and returns the names as loaded. Its docstring promises a
    LoRWeBCheckpointError for a target on the meta device, with the model left as it was."""
    accelerate = pytest.importorskip("accelerate")
    src = tiny_model()
    path = tmp_path / "lorweb.safetensors"
    lf.save_lorweb_weights(src, path)
    m = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    try:
        with accelerate.init_empty_weights():
            lf.load_lorweb_weights(m, path)
    except LoRWeBCheckpointError:
        assert lf.lorweb_layers(m) == {}  # refused before anything changed
        return
    for name, layer in lf.lorweb_layers(m).items():  # or loaded for real
        for suffix, t in layer.lorweb_tensors().items():
            assert t.device.type != "meta", f"{name}.{suffix} was 'loaded' into a meta tensor"
            assert torch.equal(t, src.get_submodule(name).lorweb_tensors()[suffix])


def test_set_module_tensor_to_device_moves_lorweb_tensors():
    utils = pytest.importorskip("accelerate.utils")
    m, q, x = tiny_model(), query(), inputs()
    value = m[0].lora_B.detach().clone() * 2
    utils.set_module_tensor_to_device(m, "0.lora_B", "cpu", value=value)
    assert torch.equal(m[0].lora_B, value) and isinstance(m[0].lora_B, nn.Parameter)
    with torch.no_grad():
        lf.set_query(m, q)
        assert_matches_reference(m(x), m, x, q, torch.float32)
    utils.set_module_tensor_to_device(m, "0.lora_A", "meta")
    with pytest.raises(ValueError, match="lora_a is on meta"):
        m(x)


def test_to_empty_then_load_restores_the_identity_query_projection(tmp_path):
    """Fixed: with ``query_projection_type="none"`` the identity query projection is a non-persistent buffer that no
    checkpoint holds. ``to_empty`` (which the meta-device error of ``load_lorweb_weights`` itself recommends:
    "Materialize the LoRWeB tensors (to_empty)") leaves it uninitialised and neither ``load_lorweb_weights`` nor
    ``load_state_dict`` restores it: the coefficients are then computed from arbitrary memory, silently."""
    src, q, x = tiny_model(config=NONE_CONFIG), query(), inputs()
    path = tmp_path / "lorweb.safetensors"
    lf.save_lorweb_weights(src, path)
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
        lf.inject_lorweb(m, NONE_CONFIG)
    m.to_empty(device="cpu")
    fill_like_uninitialised(m)
    copy_base_weights(m, src)
    lf.load_lorweb_weights(m, path)
    with torch.no_grad():
        lf.set_query(m, q)
        lf.set_query(src, q)
        torch.testing.assert_close(m(x), src(x))


def test_to_empty_then_load_state_dict_restores_the_identity_query_projection():
    """Fixed (as above, via ``load_state_dict`` of the full module state after ``to("meta").to_empty(...)``)."""
    src, q, x = tiny_model(config=NONE_CONFIG), query(), inputs()
    m = copy.deepcopy(src)
    m.to("meta")
    m.to_empty(device="cpu")
    fill_like_uninitialised(m)
    m.load_state_dict(src.state_dict())
    with torch.no_grad():
        lf.set_query(m, q)
        lf.set_query(src, q)
        torch.testing.assert_close(m(x), src(x))


# ------------------------------------------------------------------------------------------ requires_grad
def test_requires_grad_true_then_inject_more_layers_refreezes_the_base():
    m = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4), nn.Linear(4, 4))
    lf.inject_lorweb(m, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=4, query_dim=6, target_modules=["0"]))
    m.requires_grad_(True)
    with pytest.raises(ValueError, match="already injected"):
        lf.inject_lorweb(m, CONFIG)
    lf.inject_lorweb(m, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=4, query_dim=6, target_modules=["1", "2"]))
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    assert flags == {n: "base_layer" not in n for n in flags}


# --------------------------------------------------------------------------------- shared (tied) linear layers
class Aliased(nn.Module):
    """One nn.Linear reachable under two names (``a`` and ``b``), called twice."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = self.a

    def forward(self, x):
        return self.b(self.a(x))


def test_shared_linear_under_two_names_is_adapted_everywhere_or_refused():
    """Fixed: ``inject_lorweb`` walks ``named_modules()``, which lists a shared module once, under its first name: a
    linear reachable as ``a`` and ``b`` (both targeted) is wrapped at ``a`` only, while ``b`` keeps pointing at the
    now frozen base layer. The forward then silently runs half of the calls without the adapter (and targeting
    ``b`` alone says it "matches no linear layer")."""
    torch.manual_seed(0)
    m = Aliased()
    config = lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=4, query_dim=QUERY_DIM, target_modules=["a", "b"])
    try:
        lf.inject_lorweb(m, config)
    except ValueError as exc:  # refused: nothing changed, and the error names the alias ('b')
        assert "'b'" in str(exc) and type(m.a) is nn.Linear and m.b is m.a
        return
    assert m.b is m.a, f"m.a is a {type(m.a).__name__} but m.b is a {type(m.b).__name__}: b runs without LoRWeB"


def test_a_checkpoint_for_a_shared_linear_is_refused_unchanged(tmp_path):
    """The load path of the same case: a checkpoint holding ``a`` (and ``b``) for a model whose ``a`` and ``b`` are
    one linear is refused before anything changes, naming both names (it used to adapt ``a`` only)."""
    torch.manual_seed(0)
    distinct = Aliased()
    distinct.b = nn.Linear(6, 6)
    config = lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=4, query_dim=QUERY_DIM, target_modules=["a", "b"])
    lf.inject_lorweb(distinct, config)
    lf.save_lorweb_weights(distinct, tmp_path / "ab.safetensors")
    m = Aliased()
    with pytest.raises(lf.LoRWeBCheckpointError, match=r"module 'a' is one linear layer reachable under several "
                                                        r"names \['a', 'b'\]"):
        lf.load_lorweb_weights(m, tmp_path / "ab.safetensors")
    assert type(m.a) is nn.Linear and m.b is m.a and m.a.weight.requires_grad


def test_shared_weight_between_two_linears_saves_and_loads(tmp_path):
    """Two distinct linears sharing one weight Parameter: both are wrapped, each with its own basis; a save and a
    load into a fresh copy give the same outputs."""

    class TiedWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    torch.manual_seed(0)
    config = lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=4, query_dim=QUERY_DIM, target_modules=["a", "b"])
    src = TiedWeight()
    assert lf.inject_lorweb(src, config) == ["a", "b"]
    with torch.no_grad():
        for layer in lf.lorweb_layers(src).values():
            layer.lora_B.normal_()
    path = tmp_path / "lorweb.safetensors"
    lf.save_lorweb_weights(src, path)
    torch.manual_seed(0)
    dst = TiedWeight()  # the same base weights as src
    assert lf.load_lorweb_weights(dst, path) == ["a", "b"]
    q, x = query(), inputs()
    with torch.no_grad():
        lf.set_query(src, q)
        lf.set_query(dst, q)
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ fused, then cast
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_model_cast_accepts_the_fused_analogy(dtype):
    """Fixed: README: "A model cast or moved while fused (``fuse_lora()``, then ``pipe.to(...)``) gets its original
    weights back in its current dtype", and calls with the fused analogy run at base cost. After the cast,
    ``check_fused_query`` recomputes the coefficients from the cast (rounded) att_lora_to_q / lora_keys and compares
    them with the fused fp32 ones at rtol 1e-4 (fp32 rounding): the same analogy is refused as "another analogy"."""
    m, q, x = tiny_model(), query(1), inputs(1)
    unfused = copy.deepcopy(m).to(dtype)  # the reference's weights (fused, the base weight holds the mixture)
    with torch.no_grad():
        lf.set_query(m, q)
    lora_api.fuse_lora(m, "full")
    try:
        m.to(dtype)
        lora_api.check_fused_query(m, q)  # the analogy it was fused with
        with torch.no_grad():
            assert_matches_reference(m(x.to(dtype)), unfused, x.to(dtype), q.to(dtype), dtype)
        with pytest.raises(RuntimeError, match="another analogy"):
            lora_api.check_fused_query(m, query(1, seed=7))
    finally:
        lora_api.unfuse_lora(m)


def test_pipeline_fused_then_cast_to_float16_generates_the_fused_analogy(tmp_path):
    """Fixed (user-visible form of the above): ``set_analogy`` + ``fuse_lora()`` then ``pipe.to(torch.float16)``; a
    call with that same analogy raises "the LoRWeB mixture is fused for another analogy"."""
    from lorweb_fast import demo
    from lorweb_fast.testing import random_analogy, tiny_lorweb_kontext_pipeline

    wrapper = tiny_lorweb_kontext_pipeline(tmp_path)
    a, a_prime, b = random_analogy(0)
    wrapper.set_analogy(a, a_prime, b)
    wrapper.fuse_lora()
    try:
        wrapper.to(torch.float16)
        assert wrapper.transformer.dtype == torch.float16
        out = wrapper(a, a_prime, b, "edit", num_inference_steps=1, generator=torch.Generator().manual_seed(0),
                      output_type="np", max_sequence_length=demo.DEMO_MAX_SEQUENCE_LENGTH)[0]
        assert np.isfinite(np.asarray(out)).all()
    finally:
        wrapper.unfuse_lora()
