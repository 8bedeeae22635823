"""Model-level API on a tiny FLUX transformer built locally (never downloaded)."""

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorweb_fast as lf
from lorweb_fast import model as lmodel
from lorweb_fast import ops
from lorweb_fast.testing import tiny_flux_config, tiny_flux_inputs

diffusers = pytest.importorskip("diffusers")
QUERY_DIM = 12
CONFIG = lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=8, query_dim=QUERY_DIM)
OFFICIAL_DOUBLE = ["norm1.linear", "norm1_context.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                   "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj",
                   "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
OFFICIAL_SINGLE = ["norm.linear", "proj_mlp", "proj_out", "attn.to_q", "attn.to_k", "attn.to_v"]


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory):
    """A tiny random FluxTransformer2DModel written with save_pretrained (the real loading path reads it)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_flux")
    diffusers.FluxTransformer2DModel(**tiny_flux_config()).save_pretrained(path)
    return path


def load_base(path):
    return diffusers.FluxTransformer2DModel.from_pretrained(path).eval()


flux_inputs = tiny_flux_inputs  # (batch, seed) -> one forward's random inputs


def randomize_lorweb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lf.lorweb_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


def injected(path):
    m = load_base(path)
    lf.inject_lorweb(m, CONFIG)
    randomize_lorweb(m)
    return m


def snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: type(m) for n, m in model.named_modules()})


def assert_unchanged(model, snap):
    state, types = snap
    now_state, now_types = snapshot(model)
    assert now_types == types
    assert now_state.keys() == state.keys()
    assert all(torch.equal(now_state[k], state[k]) for k in state)


def test_inject_targets_the_official_layers(saved_base):
    m = load_base(saved_base)
    names = lf.inject_lorweb(m, CONFIG)
    want = [f"transformer_blocks.0.{n}" for n in OFFICIAL_DOUBLE] + \
           [f"single_transformer_blocks.0.{n}" for n in OFFICIAL_SINGLE]
    assert sorted(names) == sorted(want)
    assert sorted(lf.lorweb_layers(m)) == sorted(want)
    with pytest.raises(ValueError, match="already injected"):
        lf.inject_lorweb(m, CONFIG)
    assert lf.remove_lorweb(m) and not lf.lorweb_layers(m)


def test_target_modules_match_like_peft(saved_base):
    m = load_base(saved_base)
    names = lf.inject_lorweb(m, lf.LoRWeBConfig(num_loras=2, rank=1, key_dim=4, query_dim=QUERY_DIM,
                                                target_modules=["to_q", "proj_mlp"]))
    assert sorted(names) == ["single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp",
                             "transformer_blocks.0.attn.to_q"]
    with pytest.raises(ValueError, match="matches no linear layer"):
        lf.inject_lorweb(load_base(saved_base), lf.LoRWeBConfig(target_modules=r"nothing\..*"))


def test_norm_layers_get_2d_inputs_and_forward_runs(saved_base):
    m = injected(saved_base)
    dims = {}
    hooks = [layer.register_forward_pre_hook(lambda mod, args, n=n: dims.__setitem__(n, args[0].dim()))
             for n, layer in lf.lorweb_layers(m).items()]
    lf.set_query(m, torch.randn(2, QUERY_DIM))
    out = m(**flux_inputs()).sample
    for h in hooks:
        h.remove()
    assert out.shape == (2, 6, 8) and torch.isfinite(out).all()
    assert dims["transformer_blocks.0.norm1.linear"] == 2 and dims["single_transformer_blocks.0.norm.linear"] == 2
    assert dims["transformer_blocks.0.attn.to_q"] == 3
    lf.clear_query(m)
    with pytest.raises(RuntimeError, match="no coefficients"):
        m(**flux_inputs())


def test_set_query_computes_coefficients_once(saved_base, monkeypatch):
    m = injected(saved_base)
    calls = []
    real = ops.compute_coefficients
    monkeypatch.setattr(ops, "compute_coefficients", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    coeffs = lf.set_query(m, torch.randn(2, QUERY_DIM))
    assert len(calls) == 1 and calls[0][0] == 20  # one batched computation for all 20 layers
    for _ in range(3):  # e.g. three denoising steps
        m(**flux_inputs())
    assert len(calls) == 1
    got = lf.get_coefficients(m)
    assert got.keys() == coeffs.keys() and all(got[k] is coeffs[k] for k in got)
    assert all(c.shape == (2, 3) for c in got.values())
    lf.set_query(m, torch.randn(2, QUERY_DIM))
    assert len(calls) == 2
    # The batched coefficients equal each layer's own computation.
    q = torch.randn(2, QUERY_DIM)
    batched = lf.set_query(m, q)
    for n, layer in lf.lorweb_layers(m).items():
        torch.testing.assert_close(batched[n], layer.coefficients_from_query(q))


def test_training_gradients_reach_keys_and_projection(saved_base):
    m = injected(saved_base)
    m.requires_grad_(False)
    for layer in lf.lorweb_layers(m).values():
        for p in (layer.lora_A, layer.lora_B, layer.lora_keys, layer.att_lora_to_q.weight):
            p.requires_grad_(True)
    lf.set_query(m, torch.randn(2, QUERY_DIM))
    m(**flux_inputs()).sample.square().mean().backward()
    for n, layer in lf.lorweb_layers(m).items():
        for p in (layer.lora_A, layer.lora_B, layer.lora_keys, layer.att_lora_to_q.weight):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert all(p.grad is None for n, p in m.named_parameters() if "base_layer" in n)


def test_per_forward_query_matches_set_query_in_outputs_and_gradients(saved_base):
    """set_query(per_forward=True) (for sharded training) computes the same coefficients inside each layer's
    forward: same outputs and same gradients as the batched once-per-call computation."""
    q = torch.randn(2, QUERY_DIM)
    results = []
    for per_forward in (False, True):
        torch.manual_seed(0)  # the same basis, keys and projections for both runs
        m = injected(saved_base)
        m.requires_grad_(False)
        params = [p for layer in lf.lorweb_layers(m).values() for p in layer.lorweb_tensors().values()]
        for p in params:
            p.requires_grad_(True)
        coeffs = lf.set_query(m, q, per_forward=per_forward)
        assert (coeffs == {}) == per_forward
        assert all((layer.coefficients is None) == per_forward for layer in lf.lorweb_layers(m).values())
        out = m(**flux_inputs()).sample
        out.square().mean().backward()
        results.append((out.detach(), [p.grad for p in params]))
    (out0, grads0), (out1, grads1) = results
    # identical math in a different grouping (one stacked matmul vs one per layer): fp32 rounding only
    torch.testing.assert_close(out1, out0, rtol=1e-5, atol=1e-6)
    for g0, g1 in zip(grads0, grads1):
        assert g0 is not None and g1 is not None
        torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6)
    m = injected(saved_base)
    lf.set_query(m, q, per_forward=True)
    lf.clear_query(m)
    with pytest.raises(RuntimeError, match="no coefficients"):
        m(**flux_inputs())


def test_save_load_into_fresh_copy_gives_identical_outputs(saved_base, tmp_path):
    m = injected(saved_base)
    q = torch.randn(2, QUERY_DIM)
    lf.set_query(m, q)
    with torch.no_grad():
        want = m(**flux_inputs()).sample
    path = tmp_path / "lorweb.safetensors"
    lf.save_lorweb_weights(m, path, metadata={"encoder": "tiny-clip"})
    state = load_file(path)
    assert set(state) == {f"transformer.{n}.{s}" for n in lf.lorweb_layers(m) for s in lmodel.PARAM_SUFFIXES}
    assert state["transformer.transformer_blocks.0.attn.to_q.lora_A"].shape == (3, 32, 2)
    fresh = load_base(saved_base)
    loaded = lf.load_lorweb_weights(fresh, path)
    assert sorted(loaded) == sorted(lf.lorweb_layers(m))
    lf.set_query(fresh, q)
    with torch.no_grad():
        assert torch.equal(fresh(**flux_inputs()).sample, want)
    # Loading again into the now-injected model works too.
    lf.load_lorweb_weights(fresh, path)


def test_metadata_hyperparameters_are_used(saved_base, tmp_path):
    m = load_base(saved_base)
    lf.inject_lorweb(m, lf.LoRWeBConfig(num_loras=3, rank=2, lora_alpha=4.0, key_dim=8, query_dim=QUERY_DIM,
                                        heads=2, activation="tanh", reduce="sum"))
    path = tmp_path / "w.safetensors"
    lf.save_lorweb_weights(m, path)
    fresh = load_base(saved_base)
    lf.load_lorweb_weights(fresh, path)
    layer = fresh.get_submodule("transformer_blocks.0.attn.to_q")
    assert (layer.heads, layer.activation, layer.reduce, layer.scale) == (2, "tanh", "sum", 2.0)
    # Without metadata (an official file) the official defaults apply.
    official = tmp_path / "official.safetensors"
    save_file({k: v.contiguous() for k, v in load_file(path).items()}, official)
    fresh2 = load_base(saved_base)
    lf.load_lorweb_weights(fresh2, official)
    layer2 = fresh2.get_submodule("transformer_blocks.0.attn.to_q")
    assert (layer2.heads, layer2.activation, layer2.reduce, layer2.scale) == (1, "softmax", "mean", 1.0)


def _bad_checkpoints(good: dict, path_dir):
    key_a = "transformer.transformer_blocks.0.attn.to_q.lora_A"
    missing = dict(good)
    del missing["transformer.single_transformer_blocks.0.proj_mlp.lora_keys"]
    extra = dict(good, **{"transformer.transformer_blocks.0.attn.to_q.lora_C": torch.zeros(1)})
    unknown_module = dict(good, **{k.replace("attn.to_q", "attn.to_z"): v for k, v in good.items()
                                   if ".attn.to_q." in k and "single" not in k})
    wrong_shape = dict(good, **{key_a: torch.randn(3, 31, 2)})
    wrong_b = dict(good, **{"transformer.transformer_blocks.0.ff.net.2.lora_B": torch.randn(3, 2, 5)})
    nan = dict(good, **{key_a: good[key_a].clone().index_fill_(0, torch.tensor([1]), float("nan"))})
    inf = dict(good, **{"transformer.transformer_blocks.0.attn.to_k.lora_keys": torch.full((3, 8), float("inf"))})
    full = path_dir / "good.safetensors"
    save_file(good, full)
    blob = full.read_bytes()
    truncated = path_dir / "truncated.safetensors"
    truncated.write_bytes(blob[: len(blob) - 100])
    corrupt = path_dir / "corrupt.safetensors"
    corrupt.write_bytes(b"\x93 not a safetensors file" * 10)
    return {
        "missing key": (missing, "missing key transformer.single_transformer_blocks.0.proj_mlp.lora_keys"),
        "unexpected key": (extra, "unexpected key transformer.transformer_blocks.0.attn.to_q.lora_C"),
        "unknown module": (unknown_module, "no module 'transformer_blocks.0.attn.to_z'"),
        "wrong lora_A shape": (wrong_shape, "to_q.lora_A has shape"),
        "wrong lora_B shape": (wrong_b, "ff.net.2.lora_B has shape"),
        "nan": (nan, "to_q.lora_A holds NaN"),
        "inf": (inf, "to_k.lora_keys holds NaN or Inf"),
        "truncated file": (truncated, "corrupt or truncated"),
        "corrupt file": (corrupt, "corrupt or truncated"),
        "empty": ({}, "no LoRWeB tensors"),
    }


@pytest.mark.parametrize("target", ["fresh model", "injected model"])
def test_bad_checkpoints_raise_and_leave_the_model_untouched(saved_base, tmp_path, target):
    good = {k: v.clone() for k, v in lf.lorweb_state_dict(injected(saved_base)).items()}
    for case, (ckpt, match) in _bad_checkpoints(good, tmp_path).items():
        m = load_base(saved_base) if target == "fresh model" else injected(saved_base)
        snap = snapshot(m)
        with pytest.raises(lf.LoRWeBCheckpointError, match=match) as info:
            lf.load_lorweb_weights(m, ckpt)
        assert "model was not changed" in str(info.value) or "corrupt" in str(info.value), case
        assert_unchanged(m, snap)


def test_checkpoint_for_other_config_is_rejected_by_injected_model(saved_base, tmp_path):
    other = load_base(saved_base)
    lf.inject_lorweb(other, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=8, query_dim=QUERY_DIM, heads=2))
    path = tmp_path / "heads2.safetensors"
    lf.save_lorweb_weights(other, path)
    m = injected(saved_base)
    snap = snapshot(m)
    with pytest.raises(lf.LoRWeBCheckpointError, match="heads"):
        lf.load_lorweb_weights(m, path)
    assert_unchanged(m, snap)
    # A checkpoint covering fewer layers than are injected is partial: rejected, model unchanged.
    partial = {k: v for k, v in lf.lorweb_state_dict(other).items() if "single_transformer_blocks" not in k}
    with pytest.raises(lf.LoRWeBCheckpointError, match="missing keys transformer.single_transformer_blocks"):
        lf.load_lorweb_weights(m, partial)
    assert_unchanged(m, snap)


def test_missing_file_is_a_clear_error(saved_base, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        lf.load_lorweb_weights(load_base(saved_base), tmp_path / "nope.safetensors")


def test_save_is_atomic(saved_base, tmp_path, monkeypatch):
    m = injected(saved_base)
    path = tmp_path / "w.safetensors"
    lf.save_lorweb_weights(m, path)
    before = path.read_bytes()
    import safetensors.torch as st

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        lf.save_lorweb_weights(m, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
    copy.deepcopy(m)  # injected models stay deep-copyable (used by accelerate/FSDP wrappers)


# ------------------------------------------------------------------------- stock diffusers / peft / accelerate
def injected_and_its_output(path):
    """(an injected tiny transformer, the query set on it, inputs, its output for them), without autograd."""
    m = injected(path)
    query = torch.randn(2, QUERY_DIM)
    inputs = flux_inputs()
    with torch.no_grad():
        lf.set_query(m, query)
        return m, query, inputs, m(**inputs).sample


def test_fused_qkv_projections_are_refused_before_anything_changes(saved_base, tmp_path):
    """After fuse_qkv_projections() the attention runs to_qkv / to_added_qkv: LoRWeB on to_q/k/v (and add_*_proj)
    would be silently unused, so injecting and loading are refused naming the fix; unfused, both work."""
    m = injected(saved_base)
    lf.save_lorweb_weights(m, tmp_path / "w.safetensors")
    base = load_base(saved_base)
    base.fuse_qkv_projections()
    snap = snapshot(base)
    for call in (lambda: lf.inject_lorweb(base, CONFIG),
                 lambda: lf.load_lorweb_weights(base, tmp_path / "w.safetensors")):
        with pytest.raises(ValueError, match=r"fused QKV projections .*unfuse_qkv_projections\(\) first"):
            call()
        assert_unchanged(base, snap)
    base.unfuse_qkv_projections()
    assert len(lf.load_lorweb_weights(base, tmp_path / "w.safetensors")) == 20


def test_peft_adapter_layers_are_refused_before_anything_changes(saved_base):
    """A peft LoRA on the transformer: its layers' internals (base_layer, lora_A.default, ...) are linear layers
    the default targets would wrap; injecting is refused naming the peft layer instead."""
    pytest.importorskip("peft")
    from peft import LoraConfig

    m = load_base(saved_base)
    m.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    snap = snapshot(m)
    with pytest.raises(ValueError, match=r"attn.to_q is a peft adapter layer .*unload them first"):
        lf.inject_lorweb(m, CONFIG)
    assert_unchanged(m, snap)


def test_a_peft_lora_beside_lorweb_unloads_with_diffusers_own_unload(saved_base, tmp_path):
    """LoRWeB first, then a peft LoRA on layers LoRWeB does not wrap (the embedders; peft accepts it): diffusers'
    own ``unload_lora()`` (``recurse_remove_peft_layers`` replaces every module with a ``base_layer`` by its
    ``get_base_layer()``) removes the peft layers and their config and leaves the LoRWeB layers in place, so the
    output is LoRWeB's alone again and a LoRWeB checkpoint loads (refused while the peft layers were there)."""
    pytest.importorskip("peft")
    from peft import LoraConfig

    m, query, inputs, want = injected_and_its_output(saved_base)
    lf.save_lorweb_weights(m, tmp_path / "w.safetensors")
    m.add_adapter(LoraConfig(r=2, target_modules=["x_embedder", "context_embedder"]), adapter_name="emb")
    with torch.no_grad():
        for name, param in m.named_parameters():
            if ".lora_B." in name:
                param.normal_()
        assert not torch.allclose(m(**inputs).sample, want)  # the peft LoRA changes the output
    with pytest.raises(ValueError, match=r"_embedder is a peft adapter layer .*transformer.unload_lora\(\)"):
        lf.load_lorweb_weights(m, tmp_path / "w.safetensors")
    m.unload_lora()
    assert not any(hasattr(mod, "adapter_layer_names") for mod in m.modules())
    assert not getattr(m, "peft_config", None)
    assert len(lf.lorweb_layers(m)) == 20
    with torch.no_grad():
        torch.testing.assert_close(m(**inputs).sample, want, rtol=0, atol=0)
    assert len(lf.load_lorweb_weights(m, tmp_path / "w.safetensors")) == 20


@pytest.mark.parametrize("merge", [True, False])
def test_a_peft_model_around_lorweb_merges_and_unloads_its_own_lora(saved_base, merge):
    """peft's ``get_peft_model`` around an injected transformer, its LoRA on the embedders: ``merge_and_unload()``
    (peft's ``_unload_and_optionally_merge`` calls ``merge`` on every module with a ``base_layer``, which crashed on
    the first LoRWeB layer) folds the peft LoRA into the embedders and keeps the LoRWeB layers, so the output stays
    the one with both; ``unload()`` drops the peft LoRA and gives LoRWeB's own output back exactly."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    m, query, inputs, want = injected_and_its_output(saved_base)
    peft_model = get_peft_model(m, LoraConfig(r=2, target_modules=["x_embedder", "context_embedder"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_B." in name:
                param.normal_()
        with_both = m(**inputs).sample
    assert not torch.allclose(with_both, want)
    out = peft_model.merge_and_unload() if merge else peft_model.unload()
    assert out is m and not any(hasattr(mod, "adapter_layer_names") for mod in m.modules())
    assert len(lf.lorweb_layers(m)) == 20
    with torch.no_grad():
        got = m(**inputs).sample
    if merge:
        torch.testing.assert_close(got, with_both, rtol=1e-4, atol=1e-5)
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_peft_lora_reaching_into_lorweb_layers_is_named_by_set_query(saved_base, tmp_path):
    """A peft LoRA added after LoRWeB with all-linear targets wraps the LoRWeB layers' query projections before peft
    itself refuses LoRWeBLinear: set_query then names the peft layer and the way out (remove_lorweb), not a
    quantization, and so does merged() for the peft layers it wrapped around the LoRWeB base layers; loading a
    checkpoint names the way out too, which works."""
    pytest.importorskip("peft")
    from peft import LoraConfig

    m, query, inputs, want = injected_and_its_output(saved_base)
    lf.save_lorweb_weights(m, tmp_path / "w.safetensors")
    with pytest.raises(Exception):  # peft's own refusal of LoRWeBLinear, after wrapping what it could
        m.add_adapter(LoraConfig(r=2, target_modules="all-linear"))
    with pytest.raises(ValueError, match=r"att_lora_to_q is a peft adapter layer .*lf.remove_lorweb\(model\)"):
        lf.set_query(m, query)
    with pytest.raises(TypeError, match=r"cannot merge into .*: its base layer is a peft adapter layer"):
        with lf.merged(m):
            pass
    # loading names the route that works (diffusers' unload skips the "...att_lora_to_q" paths), and it does
    with pytest.raises(ValueError, match=r"is a peft adapter layer .* inside the LoRWeB layer .*"
                                         r"lf.remove_lorweb\(model\)"):
        lf.load_lorweb_weights(m, tmp_path / "w.safetensors")
    lf.remove_lorweb(m)
    m.unload_lora()
    assert not any(hasattr(mod, "adapter_layer_names") for mod in m.modules())
    assert len(lf.load_lorweb_weights(m, tmp_path / "w.safetensors")) == 20
    with torch.no_grad():
        lf.set_query(m, query)
        torch.testing.assert_close(m(**inputs).sample, want, rtol=0, atol=0)


def test_hooked_base_layers_are_called_sequential_cpu_offload(saved_base):
    """A base layer with hooks (accelerate's sequential CPU offload keeps its weight on the meta device outside its
    forward) is called, not read by the fused path: the offloaded model gives the same output. set_query refuses
    meta weights (per-forward too), naming the offload modes that work."""
    import accelerate

    m, query, inputs, want = injected_and_its_output(saved_base)
    with torch.no_grad():
        accelerate.cpu_offload(m, execution_device=torch.device("cpu"))
        assert all(p.device.type == "meta" for p in m.parameters())
        torch.testing.assert_close(m(**inputs).sample, want, rtol=0, atol=0)
    for per_forward in (False, True):
        with pytest.raises(ValueError, match="meta device .*enable_model_cpu_offload or block-level group"):
            lf.set_query(m, query, per_forward=per_forward)


def test_a_forward_hook_on_a_base_layer_runs():
    """Any forward (pre-)hook on the base layer runs: the layer calls it (y = base(x) + mixture) instead of reading
    its weight, and the result equals the unhooked one when the hook changes nothing."""
    base = torch.nn.Linear(8, 6)
    layer = lf.LoRWeBLinear(base, num_loras=2, rank=2, key_dim=4, query_dim=6)
    torch.nn.init.normal_(layer.lora_B)
    layer.set_coefficients(torch.rand(2, 2))
    x = torch.randn(2, 3, 8)
    want = layer(x)
    calls = []
    handle = base.register_forward_pre_hook(lambda module, args: calls.append(1))
    assert lf.layer.has_forward_hooks(base)
    torch.testing.assert_close(layer(x), want)
    assert calls == [1]
    handle.remove()
    assert not lf.layer.has_forward_hooks(base)


def test_layerwise_casting_keeps_the_query_projection(saved_base):
    """diffusers' enable_layerwise_casting stores the linear layers in float8 but not att_lora_to_q (added to the
    model's skip patterns at injection, as diffusers skips peft's layers): set_query and the forward run, close to
    the uncast model (float8 storage of the base weights is the only difference)."""
    m, query, inputs, want = injected_and_its_output(saved_base)
    m.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    layer = m.transformer_blocks[0].attn.to_q
    assert layer.att_lora_to_q.weight.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.float8_e4m3fn
    with torch.no_grad():
        lf.set_query(m, query)
        got = m(**inputs).sample
    assert torch.isfinite(got).all() and (got - want).norm() < 0.1 * want.norm()


@pytest.mark.parametrize("storage, compute", [(torch.float8_e4m3fn, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_injecting_after_layerwise_casting_creates_the_basis_in_the_compute_dtype(saved_base, tmp_path, storage,
                                                                                compute):
    """enable_layerwise_casting first, then inject_lorweb / load_lorweb_weights: the LoRWeB tensors are created in
    the casting's compute dtype (they were created in the storage dtype: float8 failed inside torch's normal_ with no
    layer named, and bf16 storage with fp32 compute gave bf16 tensors); the layers diffusers leaves uncast (the
    norms) take their weight's dtype as before; set_query and the forward run, close to injecting before the
    casting."""
    m, query, inputs, want = injected_and_its_output(saved_base)
    path = tmp_path / "w.safetensors"
    lf.save_lorweb_weights(m, path)
    for load in (False, True):
        late = load_base(saved_base)
        late.enable_layerwise_casting(storage_dtype=storage, compute_dtype=compute)
        lf.load_lorweb_weights(late, path) if load else lf.inject_lorweb(late, CONFIG)
        for name, layer in lf.lorweb_layers(late).items():  # the layers diffusers skips (norms) keep fp32 storage
            cast = lf.layer.has_forward_hooks(layer.base_layer)
            assert cast == (layer.base_layer.weight.dtype == storage), name
            want_dtype = compute if cast else layer.base_layer.weight.dtype
            assert {t.dtype for t in layer.lorweb_tensors().values()} == {want_dtype}, name
        with torch.no_grad():
            lf.set_query(late, query)
        if load and compute == torch.float32:  # the fp32 inputs run through a model computing in fp32
            with torch.no_grad():
                got = late(**inputs).sample
            assert torch.isfinite(got).all() and (got.float() - want).norm() < 0.1 * want.norm()


def test_quantizing_after_injection_is_refused_by_name(saved_base, tmp_path):
    """optimum-quanto's quantize() over a model that holds LoRWeB layers turns each att_lora_to_q into a QLinear
    (fp8 weight): set_query computed the coefficients from it silently and saving failed inside safetensors ("invalid
    python storage"). set_query, save_lorweb_weights and load_lorweb_weights now name the layer and say to quantize
    first; nothing is written or changed."""
    quanto = pytest.importorskip("optimum.quanto")
    m, query, inputs, _ = injected_and_its_output(saved_base)
    path = tmp_path / "w.safetensors"
    lf.save_lorweb_weights(m, path)
    quanto.quantize(m, weights=quanto.qfloat8)
    quanto.freeze(m)
    fragment = r"att_lora_to_q is a QLinear, not a plain nn.Linear .*quantize the base before injecting LoRWeB"
    with pytest.raises(ValueError, match=fragment):
        lf.set_query(m, query)
    with pytest.raises(ValueError, match=fragment):
        lf.save_lorweb_weights(m, tmp_path / "other.safetensors")
    assert not (tmp_path / "other.safetensors").exists()
    snap = snapshot(m)
    with pytest.raises(lf.LoRWeBCheckpointError, match=fragment):
        lf.load_lorweb_weights(m, path)
    assert_unchanged(m, snap)


def test_hooked_base_layers_are_not_merged(saved_base):
    """merged() refuses base layers with forward hooks (layerwise casting would round the merged weight to its
    float8 storage, offloading would reload the original): the error names the layer and merge='none'."""
    m, _, _, _ = injected_and_its_output(saved_base)
    with torch.no_grad():
        lf.set_query(m, torch.randn(1, QUERY_DIM))  # one analogy: every strategy could merge it but for the hooks
    m.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    snap = {n: p.clone() for n, p in m.state_dict().items()}
    for strategy in ("full", "offload", "jit"):
        with pytest.raises(TypeError, match=r"cannot merge into .*forward hooks .*merge='none'"):
            with lf.merged(m, strategy):
                pass
    assert all(torch.equal(p, snap[n]) for n, p in m.state_dict().items())


def test_stock_methods_refused_while_injected_follow_the_model(saved_base, tmp_path, monkeypatch):
    """inject_lorweb sets guards over the transformer's own ``save_pretrained`` / ``fuse_qkv_projections``
    (``model.GUARDED_WHILE_INJECTED``): refused by name while LoRWeB layers are in, the stock methods again after
    ``remove_lorweb``; a deep copy's and an unpickled copy's guards follow the copy (removing LoRWeB from the copy
    frees the copy's methods, not the original's); the guard holds no reference cycle; an injection that fails
    half way leaves no guard."""
    import io
    import weakref

    model = injected(saved_base)
    assert set(lmodel.GUARDED_WHILE_INJECTED) <= set(model.__dict__)
    with pytest.raises(TypeError, match=r"save_pretrained\(\) of a model holding \d+ LoRWeB layers .*base_layer"):
        model.save_pretrained(tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    with pytest.raises(TypeError, match=r"fuse_qkv_projections\(\) with \d+ attention projections that are LoRWeB"):
        model.fuse_qkv_projections()
    assert not any(getattr(m, "fused_projections", False) for m in model.modules())
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for twin in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        lf.remove_lorweb(twin)
        twin.save_pretrained(tmp_path / "twin")  # the copy's guard is bound to the copy
        with pytest.raises(TypeError, match="LoRWeB"):
            model.save_pretrained(tmp_path / "refused")
    ref = weakref.ref(model)
    del model, twin
    assert ref() is None  # freed without a garbage collection: no cycle through the guards
    model = injected(saved_base)
    lf.remove_lorweb(model)
    assert not set(lmodel.GUARDED_WHILE_INJECTED) & set(model.__dict__)
    model.save_pretrained(tmp_path / "stock")
    model.fuse_qkv_projections()  # the stock method again
    model.unfuse_qkv_projections()
    fresh = load_base(saved_base)
    monkeypatch.setattr(lmodel, "_freeze_base_model", lambda m: (_ for _ in ()).throw(RuntimeError("interrupted")))
    with pytest.raises(RuntimeError, match="interrupted"):
        lf.inject_lorweb(fresh, CONFIG)
    assert not lf.lorweb_layers(fresh) and not set(lmodel.GUARDED_WHILE_INJECTED) & set(fresh.__dict__)
