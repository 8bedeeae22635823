"""A fresh audit of lorweb_fast/lora_api.py and the merge strategies (flux.merged, layer.merged_weight_for) from a
diffusers / peft user's point of view (CPU only, nothing downloaded).

Every test here fails on the audited commit and passes once the defect its docstring names is fixed. What the
audit checked and found correct (bit-exact load -> fuse -> unfuse -> unload in fp32 / bf16 for the three strategies,
merged == unmerged for every heads / activation / reduce / projection / lora_alpha / strength combination, save /
load round trips of every setting, torch.compile and compile_repeated_blocks around fuse / unfuse) is in the audit
report, not repeated as tests.
"""

import types

import pytest
import torch

import lorweb_fast as lf
from lorweb_fast import lora_api
from lorweb_fast.testing import (pair_query, random_analogy, tiny_flux_inputs, tiny_flux_with_lorweb,
                                 tiny_lorweb_kontext_pipeline, tiny_pair_model)


# ------------------------------------------------------------------------- check_fused_query after a cast
@pytest.mark.parametrize("fuse_dtype", [torch.bfloat16, torch.float16])
def test_a_model_fused_in_half_precision_then_cast_to_fp32_accepts_its_own_analogy(fuse_dtype):
    """lora_api.py:check_fused_query. README (fuse_lora row): a model cast or moved while fused (``fuse_lora()``,
    then ``pipe.to(...)``) is supported, and "calls with the same analogy run at base cost". A model fused in bf16 /
    fp16 and then cast to fp32 must accept the analogy it was fused with (the same query values). The check compares
    the fuse-time coefficients (computed by set_query from bf16 / fp16 weights) with coefficients recomputed in fp32
    under a tolerance taken from the *current* weights' dtype (fp32: 1e-4), so the fuse-time rounding (about 1e-3
    in bf16) makes it refuse "fused for another analogy". Expected: the tolerance also covers the dtype the
    coefficients were fused in (e.g. recorded in the fuse state)."""
    refused = []
    for seed in range(4):
        model = tiny_pair_model(seed).to(fuse_dtype)
        query = pair_query(seed=seed).to(fuse_dtype)
        with torch.no_grad():
            lf.set_query(model, query)
        lora_api.fuse_lora(model, "full")
        try:
            model.to(torch.float32)
            try:
                lora_api.check_fused_query(model, query.float())  # the very same query values
            except RuntimeError as exc:
                refused.append((seed, str(exc)))
        finally:
            lora_api.unfuse_lora(model)
    assert not refused, refused


def test_the_pipeline_fused_in_bf16_then_cast_to_fp32_generates_its_fused_analogy(tmp_path):
    """flux.py:LoRWeBKontextPipeline.__call__ -> lora_api.py:check_fused_query, the user's route of the test above:
    ``pipe.to(bfloat16); pipe.set_analogy(a, a', b); pipe.fuse_lora(); pipe.to(float32); pipe(a, a', b, ...)`` with
    the same analogy must generate (README: casting while fused is supported, the same analogy runs fused); it
    raises "the LoRWeB mixture is fused for another analogy"."""
    pipe = tiny_lorweb_kontext_pipeline(tmp_path)
    analogy = random_analogy(0)
    pipe.to(torch.bfloat16)
    pipe.set_analogy(*analogy)
    pipe.fuse_lora()
    try:
        pipe.to(torch.float32)
        (out,) = pipe(*analogy, "edit", num_inference_steps=1)
        assert out.size[0] > 0
    finally:
        pipe.unfuse_lora()


# ------------------------------------------------------------- unfuse after offloading enabled while fused
def _fused_then_disk_offloaded(strategy, tmp_path):
    """(a tiny LoRWeB FLUX transformer fused with ``strategy`` and then group-offloaded to disk, its inputs, its
    unmerged output)."""
    model = tiny_flux_with_lorweb()
    inputs = tiny_flux_inputs(1, 0)
    with torch.no_grad():
        lf.set_query(model, torch.randn(1, 12, generator=torch.Generator().manual_seed(0)))
        unmerged = model(**inputs).sample
        lora_api.fuse_lora(model, strategy)
    cpu = torch.device("cpu")
    model.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type="block_level",
                               num_blocks_per_group=1, offload_to_disk_path=str(tmp_path / "offload"))
    return model, inputs, unmerged


@pytest.mark.parametrize("strategy", ["full", "offload"])
def test_unfuse_after_disk_group_offloading_was_enabled_while_fused_is_refused_or_restores(strategy, tmp_path):
    """lora_api.py:unfuse_lora -> flux.py:_restore_layers (_swap_back / _copy_back). diffusers' group offloading to
    disk (``enable_group_offload(..., offload_to_disk_path=...)``) enabled while fused writes the *merged* weights
    to its file and re-reads that file at every onload. unfuse_lora then puts the original into the placeholder,
    which the next onload overwrites with the merged weight again, while the layer is marked unmerged: the forward
    adds the mixture a second time, silently (here the output moves by about 0.12 from the unmerged model's).
    The same defect class as the fixed "unfuse_lora() after the bases were quantized while fused" (README, 38th
    session). Expected: unfuse_lora raises naming the offloading (the layers stay fused, as for a quantized base),
    or the model afterwards computes what the unmerged model computes."""
    pytest.importorskip("diffusers")
    model, inputs, unmerged = _fused_then_disk_offloaded(strategy, tmp_path)
    with torch.no_grad():
        try:
            lora_api.unfuse_lora(model)
        except (RuntimeError, TypeError) as exc:  # a refusal naming the offloading is a fix
            assert "offload" in str(exc), exc
            assert lora_api.fused_strategy(model) == strategy
            return
        after = model(**inputs).sample
    torch.testing.assert_close(after, unmerged)


def test_a_jit_fuse_unfuses_under_disk_group_offloading_enabled_while_fused(tmp_path):
    """Regression of the fix above (found by the session's diff review): "jit" changes no base weight, so offloading
    enabled while jit-fused keeps no merged copy; ``unfuse_lora`` must not refuse it, and the model afterwards
    computes what the unmerged model computes."""
    pytest.importorskip("diffusers")
    model, inputs, unmerged = _fused_then_disk_offloaded("jit", tmp_path)
    with torch.no_grad():
        lora_api.unfuse_lora(model)
        assert lora_api.fused_strategy(model) is None
        after = model(**inputs).sample
    torch.testing.assert_close(after, unmerged)


# ---------------------------------------------------------------------------- unfuse_lora on a non-model
def test_unfuse_lora_refuses_what_is_no_model_as_fuse_lora_does():
    """lora_api.py:unfuse_lora. Every other lora_api function (fuse_lora, load_lora_weights, unload_lora_weights,
    set_lorweb_scale, get_lorweb_scale, save_pretrained) refuses an object that is no torch module with
    "model must be a torch.nn.Module, got ...". unfuse_lora returns None for one: passing a pipeline (the
    diffusers habit ``unfuse_lora(pipe)``; here a stand-in holding the fused transformer) reports success while
    the transformer stays fused. Expected: the same TypeError."""
    model = tiny_pair_model()
    with torch.no_grad():
        lf.set_query(model, pair_query())
    lora_api.fuse_lora(model, "full")
    pipeline_like = types.SimpleNamespace(transformer=model)
    try:
        with pytest.raises(TypeError, match="torch.nn.Module"):
            lora_api.unfuse_lora(pipeline_like)
    finally:
        lora_api.unfuse_lora(model)
