"""The diffusers/peft API on LoRWeBKontextPipeline (lora_api): load/unload, fuse/unfuse, set_lorweb_scale,
save_pretrained / push_to_hub folders, merge strategies in the pipeline and the CLI's --merge, and offloading hooks."""


import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import lorweb_fast as lf
from lorweb_fast.testing import build_tiny_lorweb_assets, random_analogy
from lorweb_fast import cli, demo, flux, lora_api

pytest.importorskip("diffusers")
STEPS = 2
FP32_IMAGE_ATOL = 1e-4  # see test_flux_pipeline.py


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    build_tiny_lorweb_assets(root)
    return root


@pytest.fixture()
def pipe(assets):
    return flux.LoRWeBKontextPipeline.from_pretrained(assets / "pipe", assets / "lorweb.safetensors",
                                                      resolution="native", long_edge=64)




def run(pipe, analogies, prompts, *, merge="none", seeds=None):
    a, a2, b = (list(x) for x in zip(*analogies))
    generators = [torch.Generator().manual_seed(s) for s in (seeds or range(len(a)))]
    return pipe(a, a2, b, prompts, num_inference_steps=STEPS, generator=generators, merge=merge,
                output_type="np", max_sequence_length=demo.DEMO_MAX_SEQUENCE_LENGTH, progress=False)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------------ merging
def test_merge_strategy_resolution(pipe):
    assert pipe.merge_strategy(True, 1) == "full" and pipe.merge_strategy(False, 1) == "none"
    assert pipe.merge_strategy("auto", 1) == "full"  # tiny model, plenty of free memory
    assert pipe.merge_strategy("auto", 2) == "none"  # batches of analogies: the fused path by default
    assert pipe.merge_strategy("jit", 2) == "jit"
    with pytest.raises(ValueError, match="merge must be"):
        pipe.merge_strategy("fast", 1)


def test_every_strategy_matches_the_unmerged_pipeline_and_jit_serves_batches(pipe):
    x = [random_analogy(3)]
    plain = run(pipe, x, ["flip"], merge="none")[0]
    before = params(pipe.transformer)
    for strategy in flux.MERGE_STRATEGIES:
        got = run(pipe, x, ["flip"], merge=strategy)[0]
        np.testing.assert_allclose(got, plain, rtol=0, atol=FP32_IMAGE_ATOL)
    after = params(pipe.transformer)
    assert all(torch.equal(before[n], after[n]) for n in before)
    pair, prompts = [random_analogy(0), random_analogy(1)], ["mirror", "swap"]
    fused = run(pipe, pair, prompts, merge="none", seeds=[5, 6])
    jit = run(pipe, pair, prompts, merge="jit", seeds=[5, 6])  # per-sample merged weights, batched matmul
    for got, want in zip(jit, fused):
        np.testing.assert_allclose(got, want, rtol=0, atol=FP32_IMAGE_ATOL)
    assert np.abs(jit[0] - jit[1]).max() > 100 * FP32_IMAGE_ATOL


def test_cli_merge_option(assets, tmp_path, monkeypatch):
    seen = []
    real_call = flux.LoRWeBKontextPipeline.__call__
    monkeypatch.setattr(flux.LoRWeBKontextPipeline, "__call__",
                        lambda self, *a, **k: seen.append(k["merge"]) or real_call(self, *a, **k))
    a, a2, b = random_analogy(0)
    for i, im in enumerate((a, a2, b)):
        im.save(tmp_path / f"{i}.png")
    base = ["infer", "--a", str(tmp_path / "0.png"), "--a-prime", str(tmp_path / "1.png"), "--b",
            str(tmp_path / "2.png"), "--prompt", "flip", "--weights", str(assets / "lorweb.safetensors"),
            "--model", str(assets / "pipe"), "--steps", "1", "--resolution", "native", "--long-edge", "64",
            "--dtype", "fp32",
            "--device", "cpu", "--pipe-arg", f"max_sequence_length={demo.DEMO_MAX_SEQUENCE_LENGTH}"]
    assert cli.main(base + ["--merge", "jit", "--out", str(tmp_path / "o.png")]) == 0
    assert cli.main(base + ["--no-merge", "--out", str(tmp_path / "o2.png")]) == 0
    assert seen == ["jit", "none"]
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(base + ["--merge", "half"])


def test_a_failed_call_leaves_the_analogy_as_it_was(pipe, monkeypatch):
    """A batch that merge="full" cannot serve, or an error inside the pipeline, happens after the call computed its
    coefficients: the layers get back the analogy set before the call (set_analogy, then fuse_lora still works)."""
    pipe.set_analogy(*random_analogy(3))
    coeffs = {n: c.clone() for n, c in lf.get_coefficients(pipe.transformer).items()}
    assert next(iter(coeffs.values())).shape[0] == 1

    def same():
        now = lf.get_coefficients(pipe.transformer)
        return set(now) == set(coeffs) and all(torch.equal(now[n], coeffs[n]) for n in coeffs)

    with pytest.raises(ValueError, match="strategy='full' merges one analogy"):
        run(pipe, [random_analogy(4), random_analogy(5)], ["flip", "flip"], merge="full")
    assert same()

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(type(pipe.pipe), "__call__", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        run(pipe, [random_analogy(6)], ["flip"])
    assert same()
    monkeypatch.undo()
    pipe.fuse_lora()  # still the analogy set before the failed calls
    pipe.unfuse_lora()


# -------------------------------------------------------------------------------------------- fuse / unfuse
def test_fuse_unfuse_and_other_analogy_raises(pipe):
    x = [random_analogy(3)]
    plain = run(pipe, x, ["flip"])[0]
    before = params(pipe.transformer)
    pipe.set_analogy(*x[0])
    pipe.fuse_lora()
    assert lora_api.fused_strategy(pipe.transformer) == "full"
    with pytest.raises(RuntimeError, match="already fused"):
        pipe.fuse_lora()
    fused = run(pipe, x, ["flip"], merge="auto")[0]  # same analogy: runs on the fused weights
    np.testing.assert_allclose(fused, plain, rtol=0, atol=FP32_IMAGE_ATOL)
    coeffs = {n: c.clone() for n, c in lf.get_coefficients(pipe.transformer).items()}
    with pytest.raises(RuntimeError, match="fused for another analogy"):
        run(pipe, [random_analogy(4)], ["flip"])
    now = lf.get_coefficients(pipe.transformer)  # the fused analogy's coefficients are back
    assert all(torch.equal(now[n], coeffs[n]) for n in coeffs)
    with pytest.raises(RuntimeError, match="unfuse_lora"):
        pipe.set_lorweb_scale(0.5)
    pipe.unfuse_lora()
    pipe.unfuse_lora()  # no-op
    after = params(pipe.transformer)
    assert all(torch.equal(before[n], after[n]) for n in before)
    pipe.fuse_lora("jit")  # follows every new analogy
    other = run(pipe, [random_analogy(4)], ["flip"])[0]
    pipe.unfuse_lora()
    np.testing.assert_allclose(other, run(pipe, [random_analogy(4)], ["flip"])[0], rtol=0, atol=FP32_IMAGE_ATOL)


@pytest.mark.parametrize("move", ["dtype", "meta"])
def test_unfuse_after_the_model_moved_restores_the_weights_where_they_are_now(pipe, move):
    """fuse_lora("full") keeps the original tensors; if the model is cast or moved while fused (fuse, then
    pipe.to(...)), unfuse_lora puts them back in the weights' current dtype and device, not the ones at fuse time
    (they came back as fp32 tensors in a float64 model, and a move to another device failed and left every layer
    marked merged with no way back)."""
    pipe.set_analogy(*random_analogy(3))
    originals = {n: layer.base_layer.weight.detach().clone() for n, layer in lf.lorweb_layers(pipe.transformer).items()}
    pipe.fuse_lora()
    if move == "dtype":
        pipe.transformer.to(torch.float64)
    else:
        pipe.transformer.to("meta")
    pipe.unfuse_lora()
    assert lora_api.fused_strategy(pipe.transformer) is None
    for name, layer in lf.lorweb_layers(pipe.transformer).items():
        weight = layer.base_layer.weight
        assert not layer._merged
        if move == "dtype":
            assert weight.dtype == torch.float64 and torch.equal(weight, originals[name].double()), name
        else:
            assert weight.device.type == "meta", name
    if move == "dtype":  # every other tensor of the model was cast too: one dtype throughout
        assert {p.dtype for p in pipe.transformer.parameters()} == {torch.float64}


@pytest.mark.parametrize("strategy", ["full", "offload"])
def test_a_weight_that_cannot_go_back_is_named_and_the_others_restored(pipe, strategy):
    """If one layer's original cannot be put back at unfuse (here a weight replaced by a sparse tensor, which takes
    neither a dense .data nor a dense copy_), the other layers are still restored bit for bit and unmerged, and a
    RuntimeError names the layer. That layer stays marked merged (its weight still holds the mixture, and unmerged its
    forward would add the mixture a second time; set_query is refused) and the pipeline stays fused for it, with the
    strength to restore: once the cause is gone, ``unfuse_lora()`` again restores it and the strength (the failure
    audit: it used to drop the fuse, so the layer could only be reloaded)."""
    pipe.set_analogy(*random_analogy(3))
    layers = lf.lorweb_layers(pipe.transformer)
    originals = {n: layer.base_layer.weight.detach().clone() for n, layer in layers.items()}
    pipe.fuse_lora(strategy, lora_scale=0.5)
    stuck = next(iter(layers))
    base = layers[stuck].base_layer
    dense = base.weight
    base.weight = torch.nn.Parameter(base.weight.detach().to_sparse(), requires_grad=False)
    with pytest.raises(RuntimeError, match=rf"could not restore the original weights of 1 layers.*{stuck}"):
        pipe.unfuse_lora()
    assert lora_api.fused_strategy(pipe.transformer) == strategy and pipe._fuse_scales is not None
    for name, layer in layers.items():
        assert layer._merged == (name == stuck), name
        if name != stuck:
            assert torch.equal(layer.base_layer.weight, originals[name]), name
    with pytest.raises(RuntimeError, match="merged"):
        pipe.set_analogy(*random_analogy(4))
    base.weight = dense  # the cause gone: the retry restores the rest
    pipe.unfuse_lora()
    assert lora_api.fused_strategy(pipe.transformer) is None and pipe._fuse_scales is None
    assert not any(layer._merged for layer in layers.values())
    assert torch.equal(base.weight, originals[stuck])
    assert lora_api.get_lorweb_scale(pipe.transformer) == 1.0


def test_a_load_under_a_jit_fuse_unfuses_to_full_strength(pipe, assets):
    """Loading a checkpoint while fused with "jit" (allowed: the merged weights are built per forward) starts the
    new adapter at strength 1.0; the unfuse after it keeps 1.0 (it had put back the strength from before the fuse,
    the old adapter's)."""
    pipe.set_analogy(*random_analogy(3))
    pipe.set_lorweb_scale(0.5)
    pipe.fuse_lora("jit", lora_scale=2.0)
    pipe.load_lora_weights(assets / "lorweb.safetensors")
    pipe.unfuse_lora()
    assert lora_api.get_lorweb_scale(pipe.transformer) == 1.0


def test_reloading_under_in_memory_group_offloading_works(pipe, assets):
    """In-memory group offloading (no disk, no streams) moves the tensors as they are, so loading the adapter again
    into the existing layers is allowed and the outputs stay those of the pipeline without offloading."""
    x = [random_analogy(1)]
    want = run(pipe, x, ["flip"])[0]
    pipe.transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                          offload_type="block_level", num_blocks_per_group=1)
    pipe.load_lora_weights(assets / "lorweb.safetensors")
    np.testing.assert_array_equal(run(pipe, x, ["flip"])[0], want)


def test_a_fused_model_says_why_it_cannot_be_copied(pipe):
    """copy.deepcopy / torch.save of a fuse_lora()'d transformer: the open merge cannot be copied, and a copy would
    hold merged weights with no way back; a TypeError says to unfuse first (it was "cannot pickle 'generator'
    object"). Unfused, the model copies as before."""
    import copy
    import io

    pipe.set_analogy(*random_analogy(3))
    for strategy in ("full", "jit"):
        pipe.fuse_lora(strategy)
        with pytest.raises(TypeError, match="unfuse_lora"):
            copy.deepcopy(pipe.transformer)
        with pytest.raises(TypeError, match="unfuse_lora"):
            torch.save(pipe.transformer, io.BytesIO())
        pipe.unfuse_lora()
    with lf.merged(pipe.transformer, "offload"):  # inside a merged() block, too
        with pytest.raises(TypeError, match="merged"):
            copy.deepcopy(pipe.transformer)
    copy.deepcopy(pipe.transformer)


def test_a_loaded_adapter_starts_named_at_full_strength_and_enabled(pipe, assets):
    """As diffusers: a newly loaded adapter runs at weight 1.0 and enabled under its own name ("lorweb" unless
    adapter_name says otherwise), whatever the adapter it replaces was set to (it kept the old strength, or stayed
    disabled, and the old name); after unload_lora_weights the name is gone; an empty name and a state dict are
    refused by name."""
    x = [random_analogy(1)]
    want = run(pipe, x, ["flip"])[0]
    pipe.set_adapters("lorweb", 0.3)
    pipe.load_lora_weights(assets / "lorweb.safetensors", adapter_name="new")
    assert lora_api.get_lorweb_scale(pipe.transformer) == 1.0 and pipe.get_active_adapters() == ["new"]
    pipe.disable_lora()
    pipe.load_lora_weights(assets / "lorweb.safetensors")
    assert pipe.get_active_adapters() == ["lorweb"] and pipe.get_list_adapters() == {"transformer": ["lorweb"]}
    np.testing.assert_array_equal(run(pipe, x, ["flip"])[0], want)
    pipe.load_lora_weights(assets / "lorweb.safetensors", adapter_name="kept")
    pipe.delete_adapters("kept")
    lf.load_lorweb_weights(pipe.transformer, assets / "lorweb.safetensors")  # layers back, not through the pipeline
    assert pipe.get_list_adapters() == {"transformer": ["lorweb"]}  # the deleted adapter's name is gone
    with pytest.raises(ValueError, match="non-empty"):
        pipe.load_lora_weights(assets / "lorweb.safetensors", adapter_name=" ")
    from safetensors.torch import load_file

    with pytest.raises(TypeError, match="not a state dict"):
        pipe.load_lora_weights(load_file(assets / "lorweb.safetensors"))
    assert pipe.get_active_adapters() == ["lorweb"]


# ---------------------------------------------------------------------------------------------------- scale
def test_set_lorweb_scale_multiplies_the_mixture():
    torch.manual_seed(0)
    layer = lf.LoRWeBLinear(torch.nn.Linear(6, 5), num_loras=3, rank=2, key_dim=4, query_dim=4, backend="torch")
    torch.nn.init.normal_(layer.lora_B)
    model = torch.nn.Sequential(layer)
    lf.set_query(model, torch.randn(2, 4))
    x = torch.randn(2, 3, 6)
    with torch.no_grad():
        base = layer.base_layer(x)
        one = model(x) - base
        lf.set_lorweb_scale(model, 2.5)  # exported at the top level (README's API block) as lora_api's
        assert lf.set_lorweb_scale is lf.lora_api.set_lorweb_scale and lf.get_lorweb_scale(model) == 2.5
        torch.testing.assert_close(model(x) - base, 2.5 * one, rtol=1e-5, atol=1e-6)
        with flux.merged(model, "jit"):
            torch.testing.assert_close(model(x) - base, 2.5 * one, rtol=1e-4, atol=1e-5)
        lf.lora_api.set_lorweb_scale(model, 0.0)
        torch.testing.assert_close(model(x), base)
    for bad in (float("nan"), "1", True, torch.tensor([0.5, 1.0]), np.float32("inf")):
        with pytest.raises(ValueError, match="finite real number"):
            lf.lora_api.set_lorweb_scale(model, bad)
    for good in (np.float32(0.5), torch.tensor(0.5), np.int64(1), 0.0):  # numpy and one-element torch scalars
        lf.lora_api.set_lorweb_scale(model, good)
        assert lf.lora_api.get_lorweb_scale(model) == float(good)
    lf.set_query(model, torch.randn(1, 4))
    for strategy in ("full", "offload"):  # the merged weights hold the old scale: a new one is refused
        with flux.merged(model, strategy):
            with pytest.raises(RuntimeError, match="inside a merged"):
                lf.lora_api.set_lorweb_scale(model, 3.0)
        assert lf.lora_api.get_lorweb_scale(model) == 0.0


def test_pipeline_attributes_and_adapter_switches_as_in_diffusers(pipe):
    """``to`` / ``device`` / ``dtype``, the wrapped pipeline's components, and ``set_adapters`` / ``disable_lora`` /
    ``enable_lora`` on LoRWeB's one adapter (the strength of the mixture)."""
    assert pipe.to("cpu") is pipe and pipe.device == torch.device("cpu") and pipe.dtype == pipe.pipe.dtype
    assert next(pipe.encoder.model.parameters()).device == torch.device("cpu")
    assert pipe.vae is pipe.pipe.vae and pipe.scheduler is pipe.pipe.scheduler
    assert set(pipe.components) == set(pipe.pipe.components)
    pipe.set_progress_bar_config(disable=True)  # delegated to the FluxKontextPipeline
    with pytest.raises(AttributeError, match="has no attribute 'no_such_thing'"):
        pipe.no_such_thing
    a, a2, b = random_analogy(1)
    lorweb = run(pipe, [(a, a2, b)], ["x"])
    pipe.set_adapters("lorweb", adapter_weights=0.5)
    assert lf.lora_api.get_lorweb_scale(pipe.transformer) == 0.5
    pipe.disable_lora()
    assert lf.lora_api.get_lorweb_scale(pipe.transformer) == 0.0
    disabled = run(pipe, [(a, a2, b)], ["x"])
    pipe.enable_lora()
    assert lf.lora_api.get_lorweb_scale(pipe.transformer) == 0.5
    pipe.set_adapters(["lorweb"])  # no weight: 1.0
    assert lf.lora_api.get_lorweb_scale(pipe.transformer) == 1.0
    torch.testing.assert_close(run(pipe, [(a, a2, b)], ["x"]), lorweb)
    assert not np.allclose(disabled, lorweb)  # disabling removes the mixture
    with pytest.raises(ValueError, match="unknown adapter names"):
        pipe.set_adapters(["a", "b"], adapter_weights=[1.0, 0.5])
    with pytest.raises(ValueError, match="one adapter weight"):
        pipe.set_adapters("lorweb", adapter_weights=[1.0, 0.5])
    with pytest.raises(ValueError, match="unknown adapter names 'typo'"):
        pipe.set_adapters("typo", 0.25)
    assert lf.lora_api.get_lorweb_scale(pipe.transformer) == 1.0  # refused calls change nothing


def _denoising_bar(pipe, capsys, **options) -> str:
    """What one call of ``pipe`` on a random analogy writes to stderr (the progress bar)."""
    a, a2, b = random_analogy(0)
    capsys.readouterr()
    pipe(a, a2, b, "x", num_inference_steps=STEPS, output_type="np",
         max_sequence_length=demo.DEMO_MAX_SEQUENCE_LENGTH, **options)
    return capsys.readouterr().err


def test_a_call_keeps_the_progress_bar_settings_of_set_progress_bar_config(pipe, capsys):
    """diffusers: ``pipe.set_progress_bar_config(disable=True)`` turns the denoising bar off for every later call;
    a call without ``progress=`` keeps it so (it used to reset the settings to disable=False on every call), and
    ``progress=True`` / ``False`` still switch it."""
    def bar_shown(**options):
        return f"{STEPS}/{STEPS}" in _denoising_bar(pipe, capsys, **options)

    pipe.set_progress_bar_config(disable=True)
    assert not bar_shown()
    assert bar_shown(progress=True)
    assert not bar_shown(progress=False)


def test_progress_switches_the_bar_for_one_call_only(pipe, capsys):
    """progress=True / False is one call's choice: the next call without it shows the bar as before (it stayed
    hidden after one progress=False, e.g. after eval's generate), and set_progress_bar_config's other settings
    survive it."""
    def bar_shown(**options):
        return f"{STEPS}/{STEPS}" in _denoising_bar(pipe, capsys, **options)

    assert bar_shown()
    assert not bar_shown(progress=False)
    assert bar_shown()
    pipe.set_progress_bar_config(desc="mine", disable=True)
    assert "mine" in _denoising_bar(pipe, capsys, progress=True)
    assert not bar_shown()  # disable=True is back after the call


def test_disabled_adapter_keeps_a_strength_set_meanwhile(pipe):
    """diffusers: after disable_lora the output stays the base model's whatever set_adapters sets; enable_lora then
    uses the weight set meanwhile. The adapter bookkeeping (get_active_adapters, get_list_adapters) follows."""
    assert pipe.get_active_adapters() == ["lorweb"] and pipe.get_list_adapters() == {"transformer": ["lorweb"]}
    pipe.disable_lora()
    assert pipe.get_active_adapters() == []
    pipe.set_adapters("lorweb", 0.5)
    assert lf.lora_api.get_lorweb_scale(pipe.transformer) == 0.0  # still disabled
    with pytest.raises(ValueError, match="finite real number"):
        pipe.set_lorweb_scale(float("nan"))
    assert lf.lora_api.get_lorweb_scale(pipe.transformer) == 0.0
    pipe.enable_lora()
    assert lf.lora_api.get_lorweb_scale(pipe.transformer) == 0.5 and pipe.get_active_adapters() == ["lorweb"]


def test_fuse_lora_scale_components_and_guards(pipe):
    """fuse_lora(lora_scale=s) fuses the mixture at s times its strength (the same images as the unfused pipeline
    at that strength) and unfuse_lora brings the strength back; components / adapter_names are checked; fusing with
    no analogy names set_analogy."""
    with pytest.raises(RuntimeError, match=r"no analogy to fuse: call pipe.set_analogy\(a, a_prime, b\)"):
        pipe.fuse_lora()
    x = [random_analogy(2)]
    pipe.set_lorweb_scale(0.5)
    half = run(pipe, x, ["flip"])[0]
    pipe.set_lorweb_scale(1.0)
    pipe.set_analogy(*x[0])
    before = params(pipe.transformer)
    for kwargs, fragment in (({"components": ["text_encoder"]}, "adapts the transformer only"),
                             ({"adapter_names": ["other"]}, "unknown adapter names")):
        with pytest.raises(ValueError, match=fragment):
            pipe.fuse_lora(**kwargs)
    with pytest.raises(ValueError, match="lora_scale must be finite"):
        pipe.fuse_lora(lora_scale=float("inf"))
    assert lf.lora_api.get_lorweb_scale(pipe.transformer) == 1.0 and lora_api.fused_strategy(pipe.transformer) is None
    pipe.fuse_lora(lora_scale=0.5, components=["transformer"], adapter_names="lorweb")
    np.testing.assert_allclose(run(pipe, x, ["flip"], merge="auto")[0], half, rtol=0, atol=FP32_IMAGE_ATOL)
    pipe.unfuse_lora(components=["transformer"])
    assert lf.lora_api.get_lorweb_scale(pipe.transformer) == 1.0
    after = params(pipe.transformer)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_strength_changes_while_jit_fused_survive_unfuse(pipe):
    """Strategy "jit" allows set_lorweb_scale / disable_lora while fused: unfuse_lora restores the strength from
    before the fuse only where nothing changed it meanwhile; a disable meanwhile stays disabled, and enable_lora
    then restores the strength from before the fuse."""
    pipe.set_analogy(*random_analogy(5))
    pipe.fuse_lora("jit")
    pipe.disable_lora()
    pipe.unfuse_lora()
    assert lf.lora_api.get_lorweb_scale(pipe.transformer) == 0.0 and pipe.get_active_adapters() == []
    pipe.enable_lora()
    assert lf.lora_api.get_lorweb_scale(pipe.transformer) == 1.0
    pipe.fuse_lora("jit", lora_scale=0.5)
    pipe.disable_lora()
    pipe.unfuse_lora()
    pipe.enable_lora()
    assert lf.lora_api.get_lorweb_scale(pipe.transformer) == 1.0  # not the fused 0.5
    pipe.fuse_lora("jit", lora_scale=0.5)
    pipe.set_lorweb_scale(0.8)
    pipe.unfuse_lora()
    assert lf.lora_api.get_lorweb_scale(pipe.transformer) == 0.8  # set meanwhile: kept
    for bad in ("2", None, True):
        with pytest.raises(TypeError, match="lora_scale"):
            pipe.fuse_lora(lora_scale=bad)
    assert lora_api.fused_strategy(pipe.transformer) is None


def test_safe_fusing_refuses_non_finite_fused_weights(pipe):
    pipe.set_analogy(*random_analogy(6))
    pipe.fuse_lora(safe_fusing=True)  # finite: fused
    pipe.unfuse_lora()
    layer = next(iter(lf.lorweb_layers(pipe.transformer).values()))
    with torch.no_grad():
        layer.lora_B[0, 0, 0] = 3e38  # finite, but the merged weight overflows in fp32
        layer.lora_A[0].fill_(1e10)
    before = params(pipe.transformer)
    with pytest.raises(ValueError, match="safe_fusing: the fused weights of .* are not finite"):
        pipe.fuse_lora(safe_fusing=True)
    assert lora_api.fused_strategy(pipe.transformer) is None
    after = params(pipe.transformer)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_adapter_names_save_and_delete_as_in_diffusers(pipe, assets, tmp_path):
    """save_lora_weights writes the save_pretrained folder (layer dicts refused); load_lora_weights takes an
    adapter_name and refuses options it does not use; delete_adapters with this adapter's name unloads it."""
    out = pipe.save_lora_weights(tmp_path / "saved")
    assert (out / lora_api.WEIGHT_NAME).is_file() and (out / "config.yaml").is_file()
    with pytest.raises(TypeError, match="takes no .'transformer_lora_layers'."):
        pipe.save_lora_weights(tmp_path / "other", transformer_lora_layers={})
    assert not (tmp_path / "other").exists()
    with pytest.raises(TypeError, match="does not use: .'hotswap'."):
        pipe.load_lora_weights(out, hotswap=True)
    pipe.load_lora_weights(out, adapter_name="style")
    assert pipe.get_list_adapters() == {"transformer": ["style"]}
    with pytest.raises(ValueError, match="unknown adapter names .'lorweb'.: this pipeline holds one LoRWeB adapter"):
        pipe.delete_adapters("lorweb")
    pipe.delete_adapters(["style"])
    assert not lf.lorweb_layers(pipe.transformer) and pipe.get_active_adapters() == []
    with pytest.raises(ValueError, match="holds no LoRWeB adapter"):
        pipe.delete_adapters("style")


def test_a_second_basis_size_names_unload_first(pipe, tmp_path):
    """LoRWeB is one adapter: a checkpoint whose basis has other shapes than the loaded one (one more LoRA in every
    layer) is refused, and the error says to unload first (diffusers would add a second adapter). A checkpoint that
    is wrong in itself (a NaN; one layer's lora_A of another size than its lora_B) gets no such hint: unloading
    would not help."""
    from safetensors.torch import save_file

    state = dict(lf.lorweb_state_dict(pipe.transformer))
    grown = {name: (torch.cat([t, t[:1]]) if name.endswith(("lora_A", "lora_B", "lora_keys")) else t).contiguous()
             for name, t in state.items()}
    save_file(grown, str(tmp_path / "other.safetensors"))
    with pytest.raises(lf.LoRWeBCheckpointError, match=r"but the injected layer has(.|\n)*call "
                                                       r"unload_lora_weights\(\) first"):
        pipe.load_lora_weights(tmp_path / "other.safetensors")
    pipe.unload_lora_weights()
    pipe.load_lora_weights(tmp_path / "other.safetensors")  # the way the hint names
    assert {layer.num_loras for layer in lf.lorweb_layers(pipe.transformer).values()} == \
        {next(t for k, t in state.items() if k.endswith("lora_A")).shape[0] + 1}
    key = next(k for k in grown if k.endswith("lora_A"))
    for name, bad in (("nan", grown[key].clone().fill_(float("nan"))), ("misshapen", torch.randn(2, 3, 4))):
        save_file({**grown, key: bad.contiguous()}, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(lf.LoRWeBCheckpointError) as info:
            pipe.load_lora_weights(tmp_path / f"{name}.safetensors")
        assert "does not match" in str(info.value) and "unload_lora_weights" not in str(info.value)


def test_merging_per_forward_coefficients_names_the_cause(pipe):
    q = torch.randn(1, pipe.encoder.query_dim)
    lf.set_query(pipe.transformer, q, per_forward=True)
    with pytest.raises(RuntimeError, match="computed inside every forward .set_query.*per_forward=True"):
        with lf.merged(pipe.transformer):
            pass


# ----------------------------------------------------------------------------------- load / unload / save / push
def test_save_pretrained_load_and_unload(pipe, assets, tmp_path):
    out = pipe.save_pretrained(tmp_path / "saved", training={"data": "synthetic", "steps": 10})
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.yaml", "lorweb.safetensors"]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    net = cfg["config"]["process"][0]["network"]
    assert net["linear"] == 2 and net["network_kwargs"]["loras_num"] == 3
    assert net["network_kwargs"]["lora_keys_dim"] == 8 and net["network_kwargs"]["lora_softmax"] is True
    assert net["network_kwargs"]["external_query_model"] == str(assets / "clip")
    assert cfg["config"]["process"][0]["model"]["name_or_path"] == str(assets / "pipe")  # the base it runs on
    card = (out / "README.md").read_text()
    for word in ("base_model:", "| basis LoRAs N | 3 |", "| rank r | 2 |", str(assets / "clip"), "cat-aa'b",
                 "| training steps | 10 |", "| training data | synthetic |", "LoRWeBKontextPipeline.from_pretrained"):
        assert word in card, word

    stock = flux.load_kontext_pipeline(assets / "pipe").transformer
    names = pipe.unload_lora_weights()
    assert names and not lf.lorweb_layers(pipe.transformer)
    for (n, p), (n2, p2) in zip(pipe.transformer.named_parameters(), stock.named_parameters()):
        assert n == n2 and torch.equal(p, p2)  # the stock transformer is back
    with pytest.raises(FileNotFoundError, match="not found"):
        pipe.load_lora_weights(tmp_path / "missing.safetensors")
    loaded = pipe.load_lora_weights(out)  # a directory (weights + config.yaml)
    assert sorted(loaded) == sorted(names)
    saved = lf.lorweb_state_dict(pipe.transformer)
    ref, _ = lf.model.read_checkpoint(assets / "lorweb.safetensors")
    assert all(torch.equal(saved[k], ref[k]) for k in ref)
    pipe.unload_lora_weights()
    assert sorted(pipe.load_lora_weights(tmp_path / "saved", weight_name="lorweb.safetensors")) == sorted(names)
    with pytest.raises(ValueError, match="is for a folder.*it is the file lorweb.safetensors; pass the file alone"):
        pipe.load_lora_weights(out / "lorweb.safetensors", weight_name="x.safetensors")
    # diffusers ignores weight_name for a file: the file's own name is that file
    assert sorted(pipe.load_lora_weights(out / "lorweb.safetensors", weight_name="lorweb.safetensors")) == \
        sorted(names)


def test_save_lora_weights_takes_diffusers_options(pipe, tmp_path):
    """weight_name names the weights file (load_lora_weights(folder, weight_name) reads it back, and the model card
    loads that file), is_main_process=False writes nothing, safe_serialization=False is refused: LoRWeB files are
    safetensors. A weight_name that is no .safetensors file name is refused before anything is written."""
    out = pipe.save_lora_weights(tmp_path / "named", weight_name="my_adapter.safetensors", safe_serialization=True)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.yaml", "my_adapter.safetensors"]
    assert "path/to/this/folder/my_adapter.safetensors" in (out / "README.md").read_text()
    want = {k: v.clone() for k, v in lf.lorweb_state_dict(pipe.transformer).items()}
    pipe.unload_lora_weights()
    pipe.load_lora_weights(out, weight_name="my_adapter.safetensors")
    assert all(torch.equal(lf.lorweb_state_dict(pipe.transformer)[k], v) for k, v in want.items())
    assert pipe.save_lora_weights(tmp_path / "rank1", is_main_process=False) is None
    assert not (tmp_path / "rank1").exists()
    with pytest.raises(ValueError, match="safe_serialization=False: LoRWeB checkpoints are written as safetensors"):
        pipe.save_lora_weights(tmp_path / "pt", safe_serialization=False)
    for bad in ("sub/w.safetensors", "w.bin", ".hidden.safetensors"):
        with pytest.raises(ValueError, match="weight_name must be a file name ending in .safetensors"):
            pipe.save_lora_weights(tmp_path / "bad", weight_name=bad)
    assert not (tmp_path / "pt").exists() and not (tmp_path / "bad").exists()


def test_after_unload_the_adapter_calls_name_load_lora_weights(pipe, tmp_path):
    """After unload_lora_weights(), the calls that need the adapter (set_adapters, set_lorweb_scale, disable_lora,
    fuse_lora, save_lora_weights / save_pretrained / push_to_hub) name pipe.load_lora_weights, as the pipeline call
    does, not a library function; enable_lora (nothing disabled) and unfuse_lora stay no-ops, as in diffusers."""
    pipe.unload_lora_weights()
    calls = {"set_adapters": lambda: pipe.set_adapters("lorweb", 0.5),
             "set_lorweb_scale": lambda: pipe.set_lorweb_scale(0.5), "disable_lora": pipe.disable_lora,
             "fuse_lora": pipe.fuse_lora, "save_lora_weights": lambda: pipe.save_lora_weights(tmp_path / "a"),
             "save_pretrained": lambda: pipe.save_pretrained(tmp_path / "b"),
             "push_to_hub": lambda: pipe.push_to_hub("me/repo")}
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"holds no LoRWeB adapter.*pipe\.load_lora_weights"):
            call()
    pipe.enable_lora()
    pipe.unfuse_lora()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("strategy", ["full", "offload"])
def test_disable_and_enable_while_fused_name_themselves(pipe, strategy):
    """disable_lora / enable_lora while the mixture is baked into the weights are refused naming the call and
    unfuse_lora (not a scale the user never set), the strength and disabled state unchanged."""
    pipe.set_analogy(*random_analogy(7))
    pipe.fuse_lora(strategy)
    with pytest.raises(RuntimeError, match=rf"disable_lora\(\) while the mixture is fused into the weights "
                                           rf"\(fuse_lora\(strategy='{strategy}'\)\): call unfuse_lora\(\) first"):
        pipe.disable_lora()
    assert pipe.get_active_adapters() == ["lorweb"] and lf.lora_api.get_lorweb_scale(pipe.transformer) == 1.0
    pipe.unfuse_lora()
    pipe.disable_lora()
    pipe.set_analogy(*random_analogy(8))
    pipe.fuse_lora(strategy)  # fused while disabled: the base model's weights
    pipe.disable_lora()  # already disabled: a no-op, fused or not (as diffusers)
    with pytest.raises(RuntimeError, match=r"enable_lora\(\) while the mixture is fused"):
        pipe.enable_lora()
    assert pipe.get_active_adapters() == []
    pipe.unfuse_lora()
    pipe.enable_lora()
    assert pipe.get_active_adapters() == ["lorweb"] and lf.lora_api.get_lorweb_scale(pipe.transformer) == 1.0


def test_load_checks_query_dim_before_changing_the_model(pipe, tmp_path):
    other = torch.nn.Sequential()
    other.add_module("transformer_blocks", torch.nn.ModuleList([torch.nn.Linear(4, 4)]))
    lf.inject_lorweb(other, lf.LoRWeBConfig(num_loras=2, rank=1, key_dim=4, query_dim=7,
                                                 target_modules=["transformer_blocks.0"]))
    lf.save_lorweb_weights(other, tmp_path / "w.safetensors")
    before = params(pipe.transformer)
    with pytest.raises(lf.LoRWeBCheckpointError, match="7 features"):
        pipe.load_lora_weights(tmp_path / "w.safetensors")
    after = params(pipe.transformer)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


def test_load_checks_query_dim_without_query_projections(pipe, tmp_path):
    """A checkpoint with ``query_projection_type="none"`` has no att_lora_to_q: its query width is the keys' width,
    checked like the others (it was skipped, and the mismatch only raised at generation)."""
    other = torch.nn.Sequential()
    other.add_module("transformer_blocks", torch.nn.ModuleList([torch.nn.Linear(4, 4)]))
    lf.inject_lorweb(other, lf.LoRWeBConfig(num_loras=2, rank=1, key_dim=6, query_dim=6,
                                                 query_projection_type="none",
                                                 target_modules=["transformer_blocks.0"]))
    lf.save_lorweb_weights(other, tmp_path / "w.safetensors")
    assert lora_api.checkpoint_query_dim(tmp_path / "w.safetensors") == 6
    before = params(pipe.transformer)
    with pytest.raises(lf.LoRWeBCheckpointError, match="6 features"):
        pipe.load_lora_weights(tmp_path / "w.safetensors")
    after = params(pipe.transformer)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


def test_query_source_is_saved_and_checked_on_load(assets, pipe, tmp_path):
    """A pipeline built from a checkpoint trained with ``query_source="images"`` writes that source into what it
    saves (it was dropped: the re-saved checkpoint came back as "grid", a query of the same width from other pixels),
    and ``load_lora_weights`` refuses a checkpoint whose recorded source differs from the pipeline's encoder."""
    from lorweb_fast.model import checkpoint_metadata

    images_ckpt = tmp_path / "images.safetensors"
    lf.save_lorweb_weights(pipe.transformer, images_ckpt,
                           metadata={"encoder": str(assets / "clip"), "lorweb.query_source": "images"})
    images = flux.LoRWeBKontextPipeline.from_pretrained(assets / "pipe", images_ckpt, resolution="native",
                                                        long_edge=64)
    assert images.encoder.query_source == "images"
    images.save_pretrained(tmp_path / "resaved")
    assert checkpoint_metadata(tmp_path / "resaved" / "lorweb.safetensors")["lorweb.query_source"] == "images"
    again = flux.LoRWeBKontextPipeline.from_pretrained(assets / "pipe", tmp_path / "resaved", resolution="native",
                                                       long_edge=64)
    assert again.encoder.query_source == "images"
    pipe.save_pretrained(tmp_path / "grid")
    assert checkpoint_metadata(tmp_path / "grid" / "lorweb.safetensors")["lorweb.query_source"] == "grid"

    before = params(pipe.transformer)
    with pytest.raises(lf.LoRWeBCheckpointError, match="query_source='images'.*query_source='grid'"):
        pipe.load_lora_weights(images_ckpt)
    after = params(pipe.transformer)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    with pytest.raises(lf.LoRWeBCheckpointError, match="query_source='grid'.*query_source='images'"):
        images.load_lora_weights(tmp_path / "grid")
    assert images.load_lora_weights(tmp_path / "resaved")  # the same source loads


def test_push_to_hub_uploads_the_saved_folder(pipe, monkeypatch):
    import huggingface_hub

    calls = {}

    def fake_upload_folder(*, repo_id, folder_path, token=None, commit_message=None):
        from pathlib import Path

        calls["upload"] = (repo_id, sorted(p.name for p in Path(folder_path).iterdir()),
                           (Path(folder_path) / "README.md").read_text())
        return "https://huggingface.co/" + repo_id

    monkeypatch.setattr(huggingface_hub, "create_repo",
                        lambda repo_id, **kw: calls.setdefault("create", (repo_id, kw)))
    monkeypatch.setattr(huggingface_hub, "upload_folder", fake_upload_folder)
    url = pipe.push_to_hub("me/lorweb-test", private=True)
    assert url.endswith("me/lorweb-test")
    assert calls["create"][0] == "me/lorweb-test" and calls["create"][1]["private"] is True
    repo, files, card = calls["upload"]
    assert repo == "me/lorweb-test" and files == ["README.md", "config.yaml", "lorweb.safetensors"]
    assert "me/lorweb-test/lorweb.safetensors" in card
    with pytest.raises(ValueError, match="repo_id"):
        pipe.push_to_hub("")


def test_qfloat8_quantized_transformer_runs_unmerged(pipe, assets):
    """A transformer quantized like the official run (``lorweb_fast.training.quantize_qfloat8``: optimum-quanto fp8
    weights), then given the checkpoint: the LoRWeB layers wrap quanto's QLinear, merge="auto" runs unmerged at batch
    1, a named merge is refused before anything changes, and the result is the unmerged one (deterministic). The
    mixture is really applied: the output differs from the same quantized pipeline at strength 0."""
    pytest.importorskip("optimum.quanto")
    from lorweb_fast import training

    base = flux.load_kontext_pipeline(assets / "pipe")
    training.quantize_qfloat8(base)
    lf.load_lorweb_weights(base.transformer, assets / "lorweb.safetensors")
    qpipe = flux.LoRWeBKontextPipeline(base, pipe.encoder, resolution="native", long_edge=64)
    assert all(type(l.base_layer).__name__ == "QLinear" for l in lf.lorweb_layers(base.transformer).values())
    assert qpipe.merge_strategy("auto", 1) == "none"
    x = [random_analogy(2)]
    want = run(qpipe, x, ["flip"])
    for strategy in ("full", "offload", "jit"):
        with pytest.raises(TypeError, match="no plain tensor weight"):
            run(qpipe, x, ["flip"], merge=strategy)
    np.testing.assert_array_equal(run(qpipe, x, ["flip"])[0], want[0])
    qpipe.set_adapters(qpipe.get_active_adapters(), adapter_weights=0.0)
    assert not np.array_equal(run(qpipe, x, ["flip"])[0], want[0])


# ------------------------------------------------------------------------------------------- offloading hooks
def test_group_offloading_hooks_keep_outputs_identical(pipe):
    """diffusers' group offloading (CPU -> CPU here: the hooks run, the devices do not change) leaves the
    LoRWeB outputs unchanged; coefficients follow each layer's device. Leaf-level offloading hooks every base layer:
    merge="auto" then runs unmerged (its base layers are called), and a merge named explicitly is refused (on a GPU
    the weight lives on the offload device outside the layer's forward)."""
    from diffusers.hooks import apply_group_offloading

    x = [random_analogy(2)]
    want = run(pipe, x, ["flip"], merge="none")
    apply_group_offloading(pipe.transformer, onload_device=torch.device("cpu"),
                           offload_device=torch.device("cpu"), offload_type="leaf_level")
    assert pipe.merge_strategy("auto", 1) == "none"
    got = run(pipe, x, ["flip"])
    np.testing.assert_array_equal(got[0], want[0])
    with pytest.raises(TypeError, match="forward hooks"):
        run(pipe, x, ["flip"], merge="jit")
    np.testing.assert_array_equal(run(pipe, x, ["flip"])[0], want[0])  # the refused call changed nothing


def test_group_offloading_to_disk_is_refused_by_name(pipe, assets, tmp_path):
    """diffusers' group offloading to disk (offload_to_disk_path; hooks/group_offloading.py, ModuleGroup:
    ``_offload_to_disk`` leaves ``torch.empty_like`` placeholders, every ``onload_`` re-reads the file written when
    offloading was enabled): set_query (the pipeline's call), a checkpoint load and every merge are refused naming
    it, before anything changes. They had computed coefficients from the placeholders (an error blaming the
    checkpoint's weights, or silently wrong coefficients when the placeholders were finite), and a load or merge
    was lost at the next onload."""
    x = [random_analogy(2)]
    run(pipe, x, ["flip"])
    layers = lf.lorweb_layers(pipe.transformer)
    before = {n: layer.coefficients.clone() for n, layer in layers.items()}
    pipe.transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                          offload_type="block_level", num_blocks_per_group=1,
                                          offload_to_disk_path=str(tmp_path / "offload"))
    with pytest.raises(RuntimeError, match="group-offloaded to disk"):
        run(pipe, x, ["flip"])
    with pytest.raises(RuntimeError, match="offload_to_disk_path"):
        pipe.load_lora_weights(assets / "lorweb.safetensors")
    for strategy in flux.MERGE_STRATEGIES:
        with pytest.raises(RuntimeError, match="offload_to_disk_path"):
            with lf.merged(pipe.transformer, strategy):
                pass
    assert pipe.merge_strategy("auto", 1) == "none"
    assert all(torch.equal(layer.coefficients, before[n]) for n, layer in layers.items())
    assert all(not layer._merged and not layer._merge_jit for layer in layers.values())


def test_group_offloading_with_streams_refuses_merges_that_would_be_lost(pipe):
    """With use_stream=True, every onload copies the pinned CPU copies taken when offloading was enabled
    (ModuleGroup.cpu_param_dict), so a "full" / "offload" merge, which replaces the base weights outside the
    forward, would be lost: refused by name, and merge="auto" runs unmerged; "jit" builds its merged weights inside
    the forward and is allowed. Streams need a GPU: the group's stream is set by hand on CPU (the refusal only reads
    it)."""
    run(pipe, [random_analogy(1)], ["flip"])
    pipe.transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                          offload_type="block_level", num_blocks_per_group=1)
    assert pipe.merge_strategy("auto", 1) != "none"  # in-memory offloading keeps the merge (the weight moves with it)
    for module in pipe.transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook("group_offloading") if registry is not None else None
        if hook is not None:
            hook.group.stream = object()
    for strategy in ("full", "offload"):
        with pytest.raises(TypeError, match="use_stream=True"):
            with lf.merged(pipe.transformer, strategy):
                pass
    with lf.merged(pipe.transformer, "jit"):
        pass
    assert pipe.merge_strategy("auto", 1) == "none"


@pytest.mark.parametrize("offloading", ["block_level", "leaf_level", "disk"])
def test_injection_after_group_offloading(assets, tmp_path, offloading):
    """diffusers builds its offloading groups from the modules present when offloading is enabled. In-memory
    block-level groups move their blocks whole, so LoRWeB layers injected afterwards are moved with them: allowed,
    with the same outputs as loading first. Leaf-level groups would not hold the new LoRWeB tensors, and disk (and
    stream) groups fix their tensor tables: inject_lorweb and a first load_lorweb_weights refuse, naming the order
    that works, and the transformer is left stock."""
    from diffusers import FluxTransformer2DModel

    def transformer():
        return FluxTransformer2DModel.from_pretrained(assets / "pipe" / "transformer")

    cpu = torch.device("cpu")
    options = dict(onload_device=cpu, offload_device=cpu, offload_type="leaf_level" if offloading == "leaf_level"
                   else "block_level")
    if offloading != "leaf_level":
        options["num_blocks_per_group"] = 1
    if offloading == "disk":
        options["offload_to_disk_path"] = str(tmp_path / "offload")
    late = transformer()
    late.enable_group_offload(**options)
    if offloading != "block_level":
        with pytest.raises(RuntimeError, match="load the LoRWeB adapter first, then enable group offloading"):
            lf.inject_lorweb(late, lf.LoRWeBConfig(num_loras=2, rank=1, key_dim=8, query_dim=8))
        with pytest.raises(RuntimeError, match="load the LoRWeB adapter first, then enable group offloading"):
            lf.load_lorweb_weights(late, assets / "lorweb.safetensors")
        assert not lf.lorweb_layers(late)
        return
    lf.load_lorweb_weights(late, assets / "lorweb.safetensors")
    early = transformer()
    lf.load_lorweb_weights(early, assets / "lorweb.safetensors")
    early.enable_group_offload(**options)
    torch.manual_seed(0)
    query = torch.randn(1, next(iter(lf.lorweb_layers(early).values())).query_dim)
    config = early.config
    inputs = dict(hidden_states=torch.randn(1, 8, config.in_channels),
                  encoder_hidden_states=torch.randn(1, 4, config.joint_attention_dim),
                  pooled_projections=torch.randn(1, config.pooled_projection_dim), timestep=torch.tensor([0.5]),
                  img_ids=torch.zeros(8, 3), txt_ids=torch.zeros(4, 3), return_dict=False)
    if config.guidance_embeds:
        inputs["guidance"] = torch.tensor([3.5])
    outputs = []
    for model in (early, late):
        lf.set_query(model, query)
        with torch.no_grad():
            outputs.append(model(**inputs)[0])
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)


def test_model_offload_hooks_keep_outputs_identical(pipe):
    """The hook behind diffusers' enable_model_cpu_offload (accelerate's cpu_offload_with_hook: move the model to
    the execution device in a pre-forward hook) leaves LoRWeB outputs unchanged. diffusers itself refuses
    enable_model_cpu_offload without an accelerator, so on CPU the hook is attached directly (CPU -> CPU)."""
    from accelerate import cpu_offload_with_hook

    x = [random_analogy(2)]
    want = run(pipe, x, ["flip"])
    _, hook = cpu_offload_with_hook(pipe.transformer, execution_device=torch.device("cpu"))
    try:
        got = run(pipe, x, ["flip"])
        got_full = run(pipe, x, ["flip"], merge="full")
    finally:
        hook.remove()
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got_full[0], want[0], rtol=0, atol=FP32_IMAGE_ATOL)


def test_set_query_refuses_meta_weights_of_sequential_offload():
    """accelerate's cpu_offload (diffusers' enable_sequential_cpu_offload) leaves weights on the meta device
    between forwards; set_query says so instead of producing meta coefficients."""
    from accelerate import cpu_offload

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    lf.inject_lorweb(model, lf.LoRWeBConfig(num_loras=2, rank=1, key_dim=4, query_dim=3, target_modules=["0"]))
    cpu_offload(model, execution_device=torch.device("cpu"))
    with pytest.raises(ValueError, match="meta device"):
        lf.set_query(model, torch.randn(1, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_unfuse_after_a_move_to_the_gpu_restores_the_originals_there(pipe):
    """fuse_lora on CPU, pipe.to("cuda"), unfuse_lora: the originals go back onto the GPU, bit for bit."""
    pipe.set_analogy(*random_analogy(3))
    originals = {n: layer.base_layer.weight.detach().clone() for n, layer in lf.lorweb_layers(pipe.transformer).items()}
    pipe.fuse_lora()
    pipe.to("cuda")
    pipe.unfuse_lora()
    for name, layer in lf.lorweb_layers(pipe.transformer).items():
        weight = layer.base_layer.weight
        assert weight.is_cuda and torch.equal(weight.cpu(), originals[name]), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_model_cpu_offload_and_group_offloading_on_gpu(assets):
    pipe = flux.LoRWeBKontextPipeline.from_pretrained(assets / "pipe", assets / "lorweb.safetensors",
                                                      resolution="native", long_edge=64, device="cuda")
    x = [random_analogy(2)]
    want = run(pipe, x, ["flip"])
    pipe.pipe.to("cpu")
    pipe.enable_model_cpu_offload()
    got = run(pipe, x, ["flip"])
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-3)
    pipe2 = flux.LoRWeBKontextPipeline.from_pretrained(assets / "pipe", assets / "lorweb.safetensors",
                                                       resolution="native", long_edge=64)
    pipe2.pipe.to("cuda")
    pipe2.encoder.model.to("cuda")
    pipe2.transformer.to("cpu")
    pipe2.transformer.enable_group_offload(onload_device=torch.device("cuda"), offload_device=torch.device("cpu"),
                                           offload_type="block_level", num_blocks_per_group=1)
    got2 = run(pipe2, x, ["flip"])
    np.testing.assert_allclose(got2[0], want[0], rtol=0, atol=1e-3)


def test_save_pretrained_records_the_query_settings(assets, tmp_path):
    """A pipeline whose encoder pools with "max" saves that in config.yaml and the metadata, and from_pretrained
    on the saved folder builds the same query settings (they were once written as the defaults)."""
    pipe = flux.LoRWeBKontextPipeline.from_pretrained(assets / "pipe", assets / "lorweb.safetensors",
                                                      pooling_type="max", resolution="native", long_edge=64)
    assert pipe.encoder.pooling_type == "max"
    out = pipe.save_pretrained(tmp_path / "saved")
    net = yaml.safe_load((out / "config.yaml").read_text())["config"]["process"][0]["network"]["network_kwargs"]
    assert net["pooling_type"] == "max" and net["query_mode"] == pipe.encoder.query_mode
    assert "| pooling | max |" in (out / "README.md").read_text()
    again = flux.LoRWeBKontextPipeline.from_pretrained(assets / "pipe", out, resolution="native", long_edge=64)
    assert (again.encoder.query_mode, again.encoder.pooling_type) == (pipe.encoder.query_mode, "max")


def test_load_lora_weights_picks_the_newest_checkpoint_of_an_official_run_folder(pipe, assets, tmp_path):
    """An official run folder holds <name>_<step:09d>.safetensors files: load_lora_weights(dir) takes the highest
    step, as --weights DIR and from_pretrained do (it used to ask for weight_name=)."""
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    (run / "job_000000250.safetensors").write_bytes(b"not a checkpoint")  # loading the older step would raise
    shutil.copy(assets / "lorweb.safetensors", run / "job_000000500.safetensors")
    assert lf.lora_api.resolve_weight_file(run) == run / "job_000000500.safetensors"
    pipe.unload_lora_weights()
    assert pipe.load_lora_weights(run)


def test_load_lora_weights_refuses_a_checkpoint_trained_with_another_pooling_in_a_patch_mode(pipe, assets, tmp_path):
    """Pooling matters only in the patch modes: the official ``AttLoraLinearAdapter.forward``
    (toolkit/models/AttLoRA.py) reads ``query_pooling`` only for a query taken from the tokens and reshapes an
    external query as it is. So in "cat-aa'b" a checkpoint recording "max" loads; in a patch mode another pooling
    (same width, no shape error) is refused before the transformer changes."""
    other = tmp_path / "other"
    lf.lora_api.save_pretrained(pipe.transformer, other, encoder=pipe.encoder.name, pooling_type="max")
    assert pipe.encoder.query_mode == "cat-aa'b" and pipe.encoder.pooling_type == "avg"
    assert pipe.load_lora_weights(other)
    patch = tmp_path / "patch"
    lf.lora_api.save_pretrained(pipe.transformer, patch, encoder=pipe.encoder.name, query_mode="paa'b",
                                pooling_type="max")
    before = {k: v.clone() for k, v in lf.lorweb_state_dict(pipe.transformer).items()}
    with pytest.raises(lf.LoRWeBCheckpointError, match="pooling_type: checkpoint 'max', pipeline 'avg'"):
        lf.lora_api.load_lora_weights(pipe.transformer, patch,
                                      query_settings={"query_mode": "paa'b", "pooling_type": "avg"})
    after = lf.lorweb_state_dict(pipe.transformer)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert lf.lora_api.load_lora_weights(pipe.transformer, patch,
                                         query_settings={"query_mode": "paa'b", "pooling_type": "max"})
    assert pipe.load_lora_weights(assets / "lorweb.safetensors")  # recorded defaults: accepted


def test_a_checkpoint_of_another_encoder_family_is_refused(pipe, assets, tmp_path, monkeypatch):
    """Official inference.py ``main`` builds the encoder class from the checkpoint config's
    ``external_query_model`` (CLIPVisionModelWithProjection for openai/clip-vit-large-patch14, Siglip2VisionModel for
    google/siglip2-base-patch16-224). A CLIP and a SigLIP2 query can have the same width, so a checkpoint that
    records an encoder of another family (CLIP or SigLIP: the SigLIP2 FixRes checkpoints are stored in the SigLIP
    format) than the pipeline's is refused (load_lora_weights: before the transformer
    changes; from_pretrained with an explicit encoder: before the pipeline loads). Another name of the same family
    (a local copy) is fine."""
    other = tmp_path / "siglip"
    lf.lora_api.save_pretrained(pipe.transformer, other, encoder="google/siglip2-base-patch16-224")
    before = {k: v.clone() for k, v in lf.lorweb_state_dict(pipe.transformer).items()}
    with pytest.raises(lf.LoRWeBCheckpointError, match=r"trained with the analogy encoder 'google/siglip2-base-"
                                                       r"patch16-224' \(siglip, says .*config.yaml\) but this "
                                                       r"pipeline's encoder .* is a clip model"):
        pipe.load_lora_weights(other)
    after = lf.lorweb_state_dict(pipe.transformer)
    assert all(torch.equal(before[k], after[k]) for k in before)
    same_family = tmp_path / "clip"
    lf.lora_api.save_pretrained(pipe.transformer, same_family, encoder="openai/clip-vit-large-patch14")
    assert pipe.load_lora_weights(same_family)

    def no_pipeline(*args, **kwargs):
        raise AssertionError("the pipeline was loaded")

    monkeypatch.setattr(flux, "load_kontext_pipeline", no_pipeline)
    with pytest.raises(lf.LoRWeBCheckpointError, match=r"siglip2.*\(siglip, .* but encoder=.* is a clip model"):
        flux.LoRWeBKontextPipeline.from_pretrained(assets / "pipe", other, encoder=pipe.encoder.name,
                                                   resolution="native", long_edge=64)
    family, mismatch = lf.official_config.encoder_family, lf.official_config.encoder_family_mismatch
    assert family(pipe.encoder.name) == "clip"  # a local folder: its config.json
    assert family("someone/siglip2-so400m-patch14-384") == family("siglip2") == "siglip"
    assert family("someone/dinov2") is None
    assert family("/data/clip_runs/siglip-local") == "siglip"  # the last part names it, not a parent folder
    assert family("/data/eclipse/dinov2") is None
    # the official SigLIP2 id is a SigLIP-format (FixRes) checkpoint: an encoder loaded from it (kind "siglip") fits
    assert mismatch("google/siglip2-base-patch16-224", "siglip") is None
    assert mismatch("google/siglip2-base-patch16-224", "siglip2") is None
    assert mismatch("openai/clip-vit-large-patch14", "siglip") == "clip"
    assert mismatch("someone/dinov2", "clip") is None


def test_from_pretrained_checks_the_query_width_before_loading_the_pipeline(assets, monkeypatch, tmp_path):
    """A query mode whose width does not fit the checkpoint fails after the (small) encoder and before the
    pipeline loads; an encoder folder that does not exist is named."""
    def no_pipeline(*args, **kwargs):
        raise AssertionError("the pipeline was loaded")

    monkeypatch.setattr(flux, "load_kontext_pipeline", no_pipeline)
    with pytest.raises(ValueError, match=r"in query mode aa'bb', but .* expects \d+: the checkpoint was trained"):
        flux.LoRWeBKontextPipeline.from_pretrained(assets / "pipe", assets / "lorweb.safetensors",
                                                   query_mode="aa'bb'", resolution="native", long_edge=64)
    with pytest.raises(FileNotFoundError, match="analogy encoder folder not found: .*no-clip"):
        flux.AnalogyEncoder(tmp_path / "no-clip")
    (tmp_path / "not-clip").mkdir()
    (tmp_path / "not-clip" / "config.json").write_text('{"model_type": "no_such_model_type"}')
    with pytest.raises(ValueError, match="cannot load the analogy encoder .*not-clip"):
        flux.AnalogyEncoder(tmp_path / "not-clip")


# ------------------------------------------------------------------------------ Hugging Face Hub checkpoints
@pytest.fixture()
def fake_hub(tmp_path, monkeypatch):
    """huggingface_hub.snapshot_download and list_repo_files over a local folder of repos (nothing downloads; a file
    ``.offline`` in it makes every listing fail, as offline): a repo's files that
    huggingface_hub's own filter (``filter_repo_objects``) keeps for the allow patterns are copied into a cache folder
    laid out as huggingface_hub's (``<repo>/snapshots/<revision>/<path>``), whose path is returned; an unknown repo
    raises LocalEntryNotFoundError (offline), a repo named "owner/gated" GatedRepoError (an HTTP error).
    Returns (hub root, the calls made)."""
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError
    from huggingface_hub.utils import filter_repo_objects

    hub, calls = tmp_path / "hub", []

    def snapshot_download(repo_id, *, allow_patterns=None, **kwargs):
        calls.append({"repo_id": repo_id, "allow_patterns": allow_patterns, **kwargs})
        if repo_id == "owner/gated":  # an HTTP error; its constructor wants a real response, so built bare
            exc = GatedRepoError.__new__(GatedRepoError)
            Exception.__init__(exc, "401: access to this repo is restricted")
            raise exc
        src = hub / repo_id
        if not src.is_dir():
            raise LocalEntryNotFoundError(f"repo {repo_id} not found")
        dst = tmp_path / "cache" / repo_id.replace("/", "--") / "snapshots" / kwargs.get("revision", "main")
        files = [f.relative_to(src).as_posix() for f in src.rglob("*") if f.is_file()]
        for rel in filter_repo_objects(files, allow_patterns=allow_patterns):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / rel, dst / rel)
        dst.mkdir(parents=True, exist_ok=True)
        return str(dst)

    def list_repo_files(repo_id, *, revision=None, token=None):
        calls.append({"listed": repo_id, "revision": revision, "token": token})
        if (hub / ".offline").exists() or not (hub / repo_id).is_dir():
            raise LocalEntryNotFoundError(f"cannot list {repo_id}")
        return sorted(f.relative_to(hub / repo_id).as_posix() for f in (hub / repo_id).rglob("*") if f.is_file())

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    return hub, calls


def _hub_repo(hub, repo, assets, files):
    for name in files:
        (hub / repo / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".safetensors"):
            shutil.copy(assets / "lorweb.safetensors", hub / repo / name)
    return hub / repo


def test_hub_repo_ids_are_told_from_local_paths(tmp_path, monkeypatch):
    from lorweb_fast.lora_api import hub_repo_id

    monkeypatch.chdir(tmp_path)
    assert hub_repo_id("hilamanor/lorweb") == "hilamanor/lorweb" and hub_repo_id("a-b/c.d_e") == "a-b/c.d_e"
    (tmp_path / "runs" / "lorweb").mkdir(parents=True)
    # existing paths, a mistyped path under an existing folder, paths, files, non-strings (a Path is a local path)
    for local_or_not_an_id in ("runs/lorweb", "runs/lorweb_v2", "./x/y", "/abs/path", "a/b/c", "x/w.safetensors",
                               "lorweb", "", 3, Path("hilamanor/lorweb"), "C:\\x\\y"):
        assert hub_repo_id(local_or_not_an_id) is None, local_or_not_an_id


def test_a_hub_repo_loads_like_a_folder(pipe, assets, fake_hub, tmp_path):
    """The released layout (weights in lorweb_model/, config.yaml at the top): the only .safetensors is taken with
    the config.yaml above it; a pipeline loads it as it loads the local file; revision and weight_name are passed
    on and restrict the download to those files."""
    from lorweb_fast.lora_api import resolve_checkpoint

    hub, calls = fake_hub
    _hub_repo(hub, "owner/lorweb", assets, ["lorweb_model/lorweb_model.safetensors"])
    lf.lora_api.save_pretrained(pipe.transformer, tmp_path / "cfg", encoder=pipe.encoder.name)
    shutil.copy(tmp_path / "cfg" / "config.yaml", hub / "owner/lorweb" / "config.yaml")
    file, config = resolve_checkpoint("owner/lorweb")
    assert file.relative_to(file.parents[1]).as_posix() == "lorweb_model/lorweb_model.safetensors"
    assert config == file.parents[1] / "config.yaml" and config.is_file()
    assert calls[-2] == {"listed": "owner/lorweb", "revision": None, "token": None}
    assert calls[-1]["allow_patterns"] == ["lorweb_model/lorweb_model.safetensors", "config.yaml",
                                           "lorweb_model/config.yaml"]
    file2, config2 = resolve_checkpoint("owner/lorweb", "lorweb_model/lorweb_model.safetensors", revision="v1")
    assert file2.name == "lorweb_model.safetensors" and config2 is not None and calls[-1]["revision"] == "v1"
    assert calls[-1]["allow_patterns"] == ["lorweb_model/lorweb_model.safetensors", "config.yaml",
                                           "lorweb_model/config.yaml"]

    want = {k: v.clone() for k, v in lf.lorweb_state_dict(pipe.transformer).items()}
    pipe.unload_lora_weights()
    assert pipe.load_lora_weights("owner/lorweb", revision="v2") and calls[-1]["revision"] == "v2"
    got = lf.lorweb_state_dict(pipe.transformer)
    assert all(torch.equal(got[k], want[k].to(got[k].dtype)) for k in want)
    again = flux.LoRWeBKontextPipeline.from_pretrained(assets / "pipe", "owner/lorweb", resolution="native",
                                                       long_edge=64, weights_hub_options={"local_files_only": True})
    assert calls[-1]["local_files_only"] is True and lf.lorweb_layers(again.transformer)

    # a subfolder keeps the repo's top config.yaml as the fallback, as weight_name="sub/file" does
    assert resolve_checkpoint("owner/lorweb", subfolder="lorweb_model")[1] == config
    assert resolve_checkpoint("owner/lorweb", subfolder="lorweb_model")[0].name == "lorweb_model.safetensors"
    # an official run folder inside the repo: the official rule (the final file wins over the step files)
    _hub_repo(hub, "owner/run", assets, ["job/job_000000250.safetensors", "job/job.safetensors"])
    assert resolve_checkpoint("owner/run")[0].name == "job.safetensors"
    # brackets are literal in weight_name (the Hub filters with fnmatch)
    _hub_repo(hub, "owner/odd", assets, ["w[v2].safetensors"])
    assert resolve_checkpoint("owner/odd", "w[v2].safetensors")[0].name == "w[v2].safetensors"


def test_a_hub_repo_downloads_only_the_checkpoint_it_picks(assets, fake_hub):
    """Without weight_name the repo's listing picks the file by the folder rule (a final file over step files, the
    one folder holding checkpoints), and only it and its config.yaml files are downloaded, not every step file.
    Offline or with local_files_only (no listing) the cached snapshot is read by the same rule."""
    from lorweb_fast.lora_api import resolve_checkpoint

    hub, calls = fake_hub
    steps = [f"run/run_{step:09d}.safetensors" for step in (250, 500, 750)]
    _hub_repo(hub, "owner/run", assets, steps + ["run/run.safetensors", "run/config.yaml", "notes/readme.yaml"])
    (hub / "owner/run/run/config.yaml").write_text("job: extension\n")
    file, config = resolve_checkpoint("owner/run", revision="v3", token="t")
    assert file.name == "run.safetensors" and config == file.parent / "config.yaml"
    assert calls[-2] == {"listed": "owner/run", "revision": "v3", "token": "t"}
    assert calls[-1]["allow_patterns"] == ["run/run.safetensors", "config.yaml", "run/config.yaml"]
    assert sorted(p.name for p in file.parent.iterdir()) == ["config.yaml", "run.safetensors"]
    # no final file: the highest step, alone; lorweb_fast run folders too
    (hub / "owner/run/run/run.safetensors").unlink()
    assert resolve_checkpoint("owner/run", revision="v4")[0].name == "run_000000750.safetensors"
    assert calls[-1]["allow_patterns"][0] == "run/run_000000750.safetensors"
    _hub_repo(hub, "owner/ours", assets, ["checkpoints/step-00000010/lorweb.safetensors",
                                          "checkpoints/step-00000020/lorweb.safetensors"])
    assert resolve_checkpoint("owner/ours")[0].parent.name == "step-00000020"
    assert calls[-1]["allow_patterns"][0] == "checkpoints/step-00000020/lorweb.safetensors"
    # a subfolder narrows the listing; two final files are ambiguous, named before anything downloads
    assert resolve_checkpoint("owner/run", subfolder="run", revision="v5")[0].name == "run_000000750.safetensors"
    assert calls[-1]["allow_patterns"][0] == "run/run_000000750.safetensors"
    _hub_repo(hub, "owner/finals", assets, ["a.safetensors", "b.safetensors"])
    n = len(calls)
    with pytest.raises(lf.official_config.LoRWeBConfigError, match="repo owner/finals holds several final "
                                                                   "checkpoints \\(a.safetensors, b.safetensors\\)"):
        resolve_checkpoint("owner/finals")
    assert [c for c in calls[n:] if "allow_patterns" in c] == []
    # no listing: the snapshot's .safetensors files are read, the same file is picked
    n = len(calls)
    assert resolve_checkpoint("owner/run", local_files_only=True, revision="v6")[0].name == "run_000000750.safetensors"
    assert [c["allow_patterns"] for c in calls[n:]] == [["*.safetensors", "*.yaml", "config.yaml"]]
    (hub / ".offline").touch()
    assert resolve_checkpoint("owner/run", revision="v7")[0].name == "run_000000750.safetensors"
    assert calls[-2] == {"listed": "owner/run", "revision": "v7", "token": None}
    assert calls[-1]["allow_patterns"] == ["*.safetensors", "*.yaml", "config.yaml"]


def test_hub_checkpoint_errors_name_the_problem(pipe, assets, fake_hub, tmp_path):
    from lorweb_fast.lora_api import resolve_checkpoint

    hub, _ = fake_hub
    _hub_repo(hub, "owner/two", assets, ["a/x.safetensors", "b/y.safetensors"])
    with pytest.raises(FileNotFoundError, match=r"repo owner/two holds .safetensors files in 2 folders: a, b; pass "
                                                 r"weight_name \(--weight-name\)"):
        resolve_checkpoint("owner/two")
    assert resolve_checkpoint("owner/two", "b/y.safetensors")[0].name == "y.safetensors"
    with pytest.raises(FileNotFoundError, match="not found: c/z.safetensors in Hugging Face Hub repo owner/two"):
        resolve_checkpoint("owner/two", "c/z.safetensors")
    with pytest.raises(FileNotFoundError, match="'owner/missing' is no local path, and getting it from the Hugging "
                                                "Face Hub failed \\(LocalEntryNotFoundError"):
        resolve_checkpoint("owner/missing")
    with pytest.raises(FileNotFoundError, match="'owner/gated' .* failed \\(GatedRepoError: 401"):
        resolve_checkpoint("owner/gated")
    with pytest.raises(ValueError, match=r"\['revision'\] are Hugging Face Hub download options, but .* is a local"):
        resolve_checkpoint(assets / "lorweb.safetensors", revision="v1")
    for bad in ("/etc/x.safetensors", "../x.safetensors"):
        with pytest.raises(ValueError, match="must be a relative path inside the folder or repo"):
            resolve_checkpoint("owner/two", bad)
    # subfolder works for a local folder too (as diffusers)
    (tmp_path / "local" / "s").mkdir(parents=True)
    shutil.copy(assets / "lorweb.safetensors", tmp_path / "local" / "s" / "lorweb.safetensors")
    assert resolve_checkpoint(tmp_path / "local", subfolder="s")[0] == tmp_path / "local" / "s" / "lorweb.safetensors"
    with pytest.raises(TypeError, match="unknown checkpoint options"):
        resolve_checkpoint("owner/two", mirror="x")
    before = {k: v.clone() for k, v in lf.lorweb_state_dict(pipe.transformer).items()}
    with pytest.raises(TypeError, match="does not use: \\['mirror'\\]"):
        pipe.load_lora_weights("owner/two", mirror="x")
    with pytest.raises(FileNotFoundError):
        pipe.load_lora_weights("owner/missing")
    after = lf.lorweb_state_dict(pipe.transformer)
    assert all(torch.equal(before[k], after[k]) for k in before)  # failed calls change nothing


@pytest.mark.parametrize("strategy", ["full", "offload", "jit"])
def test_unload_after_fuse_bakes_the_analogy_into_the_stock_layers(strategy):
    """As diffusers with peft: fuse_lora() then unload_lora_weights() leaves the stock layers holding the fused
    mixture (the same outputs as the fused model, bit for bit); unfuse_lora() first gives the original weights.
    A jit fuse over a batch of different analogies cannot be baked: refused, the model still fused and unchanged."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.GELU(), torch.nn.Linear(6, 5))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    lf.inject_lorweb(model, lf.LoRWeBConfig(num_loras=2, rank=2, key_dim=4, query_dim=6, target_modules=r"\d"))
    for layer in lf.lorweb_layers(model).values():
        torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(1, 3, 8)
    with torch.no_grad():
        lf.set_query(model, torch.randn(1, 6))
        lora_api.set_lorweb_scale(model, 0.5)
        lora_api.fuse_lora(model, strategy)
        want = model(x)
        assert lora_api.unload_lora_weights(model) == ["0", "2"]
        assert not lf.lorweb_layers(model) and isinstance(model[0], torch.nn.Linear)
        assert torch.equal(model(x), want)
        assert not torch.equal(model[0].weight, original["0.weight"])

    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.GELU(), torch.nn.Linear(6, 5))
    model.load_state_dict(original)
    lf.inject_lorweb(model, lf.LoRWeBConfig(num_loras=2, rank=2, key_dim=4, query_dim=6, target_modules=r"\d"))
    with torch.no_grad():
        lf.set_query(model, torch.randn(1, 6))
        lora_api.fuse_lora(model, strategy)
        lora_api.unfuse_lora(model)
        lora_api.unload_lora_weights(model)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())

    if strategy == "jit":
        # layers that share one weight tensor each keep their own mixture (the baked weights are new tensors)
        tied = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Linear(6, 6))
        tied[1].weight = tied[0].weight
        lf.inject_lorweb(tied, lf.LoRWeBConfig(num_loras=2, rank=2, key_dim=4, query_dim=6, target_modules=r"\d"))
        for layer in lf.lorweb_layers(tied).values():
            torch.nn.init.normal_(layer.lora_B)
        with torch.no_grad():
            lf.set_query(tied, torch.randn(1, 6))
            lora_api.fuse_lora(tied, "jit")
            xt = torch.randn(1, 3, 6)
            want = tied(xt)
            lora_api.unload_lora_weights(tied)
            assert torch.equal(tied(xt), want) and not torch.equal(tied[0].weight, tied[1].weight)
        model.load_state_dict(original)
        lf.inject_lorweb(model, lf.LoRWeBConfig(num_loras=2, rank=2, key_dim=4, query_dim=6, target_modules=r"\d"))
        with torch.no_grad():
            lf.set_query(model, torch.randn(2, 6))
            lora_api.fuse_lora(model, "jit")
            with pytest.raises(RuntimeError, match="batch of different ones: set one analogy, or unfuse_lora"):
                lora_api.unload_lora_weights(model)
        assert lora_api.fused_strategy(model) == "jit" and len(lf.lorweb_layers(model)) == 2
        assert torch.equal(model[0].base_layer.weight, original["0.weight"])


def test_a_refused_unload_keeps_the_pipelines_fuse_state(pipe):
    """unload_lora_weights() on a jit fuse of a batch of different analogies is refused (nothing to bake); the
    pipeline keeps its own state, so the unfuse_lora() the error asks for still restores the strength from before."""
    (a1, a1p, b1), (a2, a2p, b2) = random_analogy(7), random_analogy(8)
    pipe.set_analogy([a1, a2], [a1p, a2p], [b1, b2])
    pipe.fuse_lora("jit", lora_scale=0.5)
    with pytest.raises(RuntimeError, match="unfuse_lora\\(\\) first to unload without baking"):
        pipe.unload_lora_weights()
    assert lf.lorweb_layers(pipe.transformer)
    pipe.unfuse_lora()
    assert lf.lora_api.get_lorweb_scale(pipe.transformer) == 1.0


def test_hub_checkpoints_resolve_in_a_fresh_process(tmp_path):
    """In a process that imported nothing else (no diffusers, which would load huggingface_hub's submodules),
    resolving a Hub repo id reads huggingface_hub.constants (a lazily loaded submodule) without an AttributeError;
    the listing and the download are stubbed (nothing downloads)."""
    import subprocess
    import sys

    code = f"""
import huggingface_hub, shutil
from pathlib import Path
cache = Path({str(tmp_path)!r}) / "snap"
def list_repo_files(repo_id, revision=None, token=None):
    return ["w.safetensors"]
def snapshot_download(repo_id, allow_patterns=None, **kwargs):
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "w.safetensors").write_bytes(b"x")
    return str(cache)
huggingface_hub.list_repo_files = list_repo_files
huggingface_hub.snapshot_download = snapshot_download
from lorweb_fast.lora_api import resolve_checkpoint
print(resolve_checkpoint("owner/repo")[0].name)
"""
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("HF_HUB_OFFLINE", "PYTHONPATH")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("w.safetensors")


def test_fuse_qkv_projections_after_loading_changes_nothing(pipe):
    """diffusers' fuse_qkv_projections() on a transformer holding LoRWeB layers is refused naming LoRWeB (the guard
    inject_lorweb sets) before it changes anything: no fused to_qkv, the LoRWeB layers and the outputs as they were.
    Partial targets: ``tests/test_diffusers_features_audit.py``."""
    x = [random_analogy(1)]
    want = run(pipe, x, ["flip"])[0]
    names = sorted(lf.lorweb_layers(pipe.transformer))
    with pytest.raises(TypeError, match=r"fuse_qkv_projections\(\) with \d+ attention projections that are LoRWeB "
                       r"layers .*bypass their mixture; remove LoRWeB first"):
        pipe.transformer.fuse_qkv_projections()
    assert sorted(lf.lorweb_layers(pipe.transformer)) == names
    assert not any(getattr(m, "fused_projections", False) or hasattr(m, "to_qkv")
                   for m in pipe.transformer.modules())
    np.testing.assert_array_equal(run(pipe, x, ["flip"])[0], want)
