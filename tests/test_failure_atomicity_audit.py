"""Failure-atomicity audit: an ordinary ``Exception`` (a simulated ``torch.OutOfMemoryError``, an ``OSError`` on a
write, a warning turned into an error) raised midway through a public operation that changes a model or files in
several steps (CPU only, tiny models, nothing downloaded).

The project standard is "a failed call leaves the model and the files as they were" (README, "Guaranteed after a
failure"); the Ctrl-C (``KeyboardInterrupt``) cases live in ``test_interactive_guards.py``. Here each failure is
injected at the k-th call of an inner function (``Tensor.clone``, ``torch.isfinite``, ``flux.merged_weight``,
``flux._swap_back``, ``torch.empty``, ``ops.compute_coefficients``, ``shutil.copy2``) and every test first asserts
that the injected failure actually fired, then compares the whole state (tensors, requires_grad flags, module tree,
hooks, coefficients, strength, merged / fused flags; the folder's bytes) with the state before the call, and retries
the call.

The tests whose docstrings say "Fix:" pinned defects found by the audit, now fixed (set_query storing layer by
layer; the eval-mode warning after the store; safe_fusing's own check failing; an unfuse that could not be retried).
The others are behaviours found correct that no other test covers.
"""

import errno
import os
import shutil
import warnings

import pytest
import torch
from torch import nn

import lorweb_fast as lf
from lorweb_fast import demo, flux, lora_api, ops
from lorweb_fast.testing import (assert_same_model_state, file_tree, lorweb_model_state, one_intra_op_thread,
                                 pair_config, pair_query, PAIR_QUERY_DIM, random_analogy, tiny_lorweb_kontext_pipeline,
                                 tiny_pair_model)

pytest.importorskip("diffusers")

QUERY_DIM = PAIR_QUERY_DIM
CONFIG = pair_config()
MSL = demo.DEMO_MAX_SEQUENCE_LENGTH
X0, X1 = random_analogy(0), random_analogy(1)  # (a, a', b): 32 px a / a', 40 px b -> 64 px native grids


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_intra_op_thread():
        yield


# ------------------------------------------------------------------------------------------------------ helpers
tiny_model, query = tiny_pair_model, pair_query
def oom() -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError("CUDA out of memory (simulated)")


model_state = lorweb_model_state


def pipeline_state(pipe) -> dict:
    """``model_state`` of the transformer plus the wrapper's own bookkeeping (strength to restore after a fuse or
    ``disable_lora``, the progress-bar settings, the adapters)."""
    return {**model_state(pipe.transformer), "fuse scales": pipe._fuse_scales, "disabled": pipe._disabled_scale,
            "progress": dict(getattr(pipe.pipe, "_progress_bar_config", {})),
            "adapters": (pipe.get_list_adapters(), pipe.get_active_adapters())}


assert_same_state = assert_same_model_state


def failing_at(n: int, real, error=oom, when=None):
    """``real`` wrapped to raise ``error()`` at its ``n``-th call (1-based) among the calls for which ``when(*args,
    **kwargs)`` holds (every call without ``when``), and to run otherwise. Returns the wrapper and a one-element
    list counting the failures raised (the premise: the failure fired)."""
    seen, fired = [0], [0]

    def wrapped(*args, **kwargs):
        if when is None or when(*args, **kwargs):
            seen[0] += 1
            if seen[0] == n:
                fired[0] += 1
                raise error()
        return real(*args, **kwargs)

    return wrapped, fired


def call(pipe, analogy, **kwargs):
    """One denoising step for ``analogy`` with a fixed seed, b' as a float array."""
    a, a_prime, b = analogy
    return pipe(a, a_prime, b, "edit", num_inference_steps=1, generator=torch.Generator().manual_seed(0),
                output_type="np", max_sequence_length=MSL, **kwargs)[0]


@pytest.fixture(scope="module")
def shared_pipe(tmp_path_factory):
    """A tiny LoRWeBKontextPipeline (fp32, eval mode, native 64 px grids, silent)."""
    return tiny_lorweb_kontext_pipeline(tmp_path_factory.mktemp("atomicity"))


@pytest.fixture
def pipe(shared_pipe):
    """The shared pipeline, given back unfused, enabled, at strength 1 and silent, whatever the test left (a defect
    test leaves it changed)."""
    yield shared_pipe
    shared_pipe.unfuse_lora()
    shared_pipe.enable_lora()
    lora_api.set_lorweb_scale(shared_pipe.transformer, 1.0)
    shared_pipe._fuse_scales = None
    shared_pipe.pipe._progress_bar_config = {}
    shared_pipe.set_progress_bar_config(disable=True)


# ------------------------------------------------------------------------------------------ set_query / analogy
def test_set_query_failing_while_storing_the_second_layer_keeps_every_previous_coefficient(monkeypatch):
    """``lf.set_query`` computes every layer's coefficients, checks them, then stores them one layer at a time with
    ``set_coefficients``, which clones every layer's slice but the first (a view with a storage offset: a new
    allocation on the GPU). An out-of-memory error in the second layer's clone left the first layer with the new
    analogy and the second with the old one: a model mixing two analogies, where the README promises "previous
    coefficients kept". ``pipe.set_analogy`` calls it too (the pipeline's own call is covered by
    ``analogy_restored_on_error``). Fix: store inside ``analogy_restored_on_error(model)`` (or make every clone
    before the first layer is set)."""
    m = tiny_model()
    with torch.no_grad():
        lf.set_query(m, query())
    before = model_state(m)
    clone, fired = failing_at(1, torch.Tensor.clone)
    monkeypatch.setattr(torch.Tensor, "clone", clone)
    with pytest.raises(torch.OutOfMemoryError), torch.no_grad():
        lf.set_query(m, query(seed=1))
    monkeypatch.undo()
    assert fired[0] == 1, "the premise: the copy of a layer's coefficients failed"
    assert_same_state(model_state(m), before)


def test_set_analogy_failing_at_the_second_layer_keeps_the_previous_analogy(pipe, monkeypatch):
    """The pipeline form of the defect above: ``pipe.set_analogy`` (the documented step before ``fuse_lora``) failing
    while the second of the transformer's layers stores its coefficients leaves the first layers with the new
    analogy; a retry then works."""
    pipe.set_analogy(*X0)
    before = pipeline_state(pipe)
    setter, fired = failing_at(2, lf.LoRWeBLinear.set_coefficients)
    monkeypatch.setattr(lf.LoRWeBLinear, "set_coefficients", setter)
    with pytest.raises(torch.OutOfMemoryError):
        pipe.set_analogy(*X1)
    monkeypatch.undo()
    assert fired[0] == 1, "the premise: storing the second layer's coefficients failed"
    try:
        assert_same_state(pipeline_state(pipe), before)
    finally:
        pipe.set_analogy(*X1)  # the retry works either way


def test_set_query_warning_raised_as_an_error_keeps_the_previous_coefficients():
    """``set_query`` on a model in eval mode with autograd enabled warns, but only after every layer got the new
    coefficients. Under ``-W error`` / pytest ``filterwarnings = error`` (common in CI) the warning is an exception:
    the call fails, yet the layers hold the new coefficients, with autograd history. Fix: decide and warn before the
    layers are set (the condition only needs the computed coefficients)."""
    m = tiny_model()  # eval mode
    with torch.no_grad():
        lf.set_query(m, query())
    before = model_state(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(Warning, match="eval mode with autograd enabled"):
            lf.set_query(m, query(seed=1))  # autograd on: the warning fires
    assert_same_state(model_state(m), before)


def test_set_query_failing_in_its_second_configuration_group_changes_nothing(monkeypatch):
    """A model whose layers form two configuration groups (different N): ``set_query`` computes and checks both groups
    before it stores any layer, so an out-of-memory error while the second group is computed keeps every previous
    coefficient, and the retry sets both groups."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)).eval()
    lf.inject_lorweb(m, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=4, query_dim=QUERY_DIM, target_modules=["0"]))
    lf.inject_lorweb(m, lf.LoRWeBConfig(num_loras=2, rank=2, key_dim=4, query_dim=QUERY_DIM, target_modules=["1"]))
    with torch.no_grad():
        lf.set_query(m, query())
    before = model_state(m)
    compute, fired = failing_at(2, ops.compute_coefficients)
    monkeypatch.setattr(ops, "compute_coefficients", compute)
    with pytest.raises(torch.OutOfMemoryError), torch.no_grad():
        lf.set_query(m, query(seed=1))
    monkeypatch.undo()
    assert fired[0] == 1, "the premise: the second group's computation failed"
    assert_same_state(model_state(m), before)
    with torch.no_grad():
        lf.set_query(m, query(seed=1))
    assert all(not torch.equal(m[i].coefficients, before["coefficients"][str(i)]) for i in (0, 1))


# ---------------------------------------------------------------------------------------------- fuse / unfuse
@pytest.mark.parametrize("strategy", ["full", "offload"])
def test_safe_fusing_check_that_fails_leaves_the_pipeline_unfused(pipe, strategy, monkeypatch):
    """``LoRWeBKontextPipeline.fuse_lora(safe_fusing=True)`` fuses, records the fuse, then checks every fused weight
    with ``validation.all_finite`` (once ``torch.isfinite``, a bool tensor the size of the weight: on a GPU that just
    took a whole extra copy of the adapted weights for "full", an allocation that can run out of memory; now a sum,
    which can still fail or be interrupted). Only a non-finite result unfuses; an error in the check escaped with
    the pipeline left fused, at the fuse's strength (0.5 here), and the retry the user makes was refused ("already
    fused"). Fixed: the check runs inside ``try: ... except BaseException: self.unfuse_lora(); raise``."""
    pipe.set_analogy(*X0)
    before = pipeline_state(pipe)
    weights = [layer.base_layer.weight for layer in lf.lorweb_layers(pipe.transformer).values()]
    check, fired = failing_at(1, flux.all_finite, when=lambda t, *a, **k: any(t is w for w in weights))
    monkeypatch.setattr(flux, "all_finite", check)
    with pytest.raises(torch.OutOfMemoryError):
        pipe.fuse_lora(strategy, lora_scale=0.5, safe_fusing=True)
    monkeypatch.undo()
    assert fired[0] == 1, "the premise: the finiteness check of a fused weight failed"
    assert lora_api.fused_strategy(pipe.transformer) is None, "left fused by the failed call"
    assert_same_state(pipeline_state(pipe), before)
    pipe.fuse_lora(strategy, lora_scale=0.5, safe_fusing=True)  # the retry
    pipe.unfuse_lora()
    assert_same_state(pipeline_state(pipe), before)


@pytest.mark.parametrize("strategy, restore", [("full", "_swap_back"), ("offload", "_copy_back")])
def test_unfuse_lora_that_fails_to_restore_a_layer_can_be_retried(strategy, restore, monkeypatch):
    """``unfuse_lora`` whose restore of one layer raises (an out-of-memory error: "full" moves the original back with
    ``.to()`` when the model was moved or cast while fused, e.g. ``pipe.to("cuda")`` after ``fuse_lora``) restores
    the other layers and raises naming the layer left merged, which is fine, but the fuse state is already gone:
    ``unfuse_lora()`` again returns silently with the layer still merged, ``fuse_lora`` refuses it as "already
    merged", ``set_query`` and ``remove_lorweb`` refuse too; only reloading the model helps, although the original
    weights were still held when the error came (``pipe.unfuse_lora`` also drops the strength to restore). Fix: keep
    the fuse state (and the originals of the layers not restored) until every layer is back, so that a retry restores
    the rest."""
    m = tiny_model()
    with torch.no_grad():
        lf.set_query(m, query())
    before = model_state(m)
    lora_api.fuse_lora(m, strategy)
    back, fired = failing_at(2, getattr(flux, restore))  # the second layer: the first loads before it
    monkeypatch.setattr(flux, restore, back)
    with pytest.raises(RuntimeError, match="could not restore the original weights of 1 layers"):
        lora_api.unfuse_lora(m)
    monkeypatch.undo()
    assert fired[0] == 1, "the premise: the restore of one layer failed"
    before_retry = model_state(m)
    with pytest.raises(RuntimeError, match="load_state_dict inside a merged"):  # (the review: its hooks were gone,
        m.load_state_dict(tiny_model(seed=5).state_dict())  # so a load changed layers before the merged one refused)
    assert_same_state(model_state(m), before_retry)
    lora_api.unfuse_lora(m)  # the retry, once memory is free again
    assert_same_state(model_state(m), before)


def test_merged_offload_failing_to_allocate_the_second_host_copy_restores_the_first_layer(monkeypatch):
    """``merged(strategy="offload")`` merges in place layer by layer, each after a host copy of its original weight;
    an out-of-memory error allocating the second layer's (pinned) host copy, after the first layer's weight was
    overwritten with its merged weight, puts that weight back bit for bit, leaves no layer merged and no
    load_state_dict hook, and the same block then works (equal to a clean run)."""
    m = tiny_model()
    with torch.no_grad():
        lf.set_query(m, query())
    x = torch.randn(1, 3, 6)
    with torch.no_grad(), lf.merged(m, "offload"):
        want = m(x)
    before = model_state(m)
    host_copy = (lambda *a, **k: k.get("device") == "cpu" and "pin_memory" in k)  # noqa: E731
    empty, fired = failing_at(2, torch.empty, when=host_copy)
    monkeypatch.setattr(torch, "empty", empty)
    with pytest.raises(torch.OutOfMemoryError), torch.no_grad(), lf.merged(m, "offload"):
        pass
    monkeypatch.undo()
    assert fired[0] == 1, "the premise: the second layer's host copy failed"
    assert_same_state(model_state(m), before)
    with torch.no_grad(), lf.merged(m, "offload"):
        assert torch.equal(m(x), want)


def test_unload_baking_a_jit_fuse_that_runs_out_of_memory_changes_nothing(monkeypatch):
    """``unload_lora_weights`` on a model fused with "jit" computes every layer's merged weight before any weight
    changes: an out-of-memory error on the second layer leaves the model fused ("jit") with its LoRWeB layers and
    weights as they were, and the retry bakes exactly what an unload without the failure bakes."""
    m = tiny_model()
    with torch.no_grad():
        lf.set_query(m, query())
    lora_api.fuse_lora(m, "jit")
    before = model_state(m)
    merge, fired = failing_at(2, flux.merged_weight)
    monkeypatch.setattr(flux, "merged_weight", merge)
    with pytest.raises(torch.OutOfMemoryError):
        lora_api.unload_lora_weights(m)
    monkeypatch.undo()
    assert fired[0] == 1, "the premise: baking the second layer failed"
    assert_same_state(model_state(m), before)
    assert lora_api.unload_lora_weights(m) == ["0", "1"]
    clean = tiny_model()
    with torch.no_grad():
        lf.set_query(clean, query())
    lora_api.fuse_lora(clean, "jit")
    lora_api.unload_lora_weights(clean)
    assert_same_state(model_state(m), model_state(clean))


# ------------------------------------------------------------------------------------------------ the pipeline
@pytest.mark.parametrize("merge", ["full", "offload"])
def test_pipeline_call_whose_merge_runs_out_of_memory_leaves_the_pipeline_as_it_was(pipe, merge, monkeypatch):
    """A generation whose ``merged()`` entry fails (out of memory building the second layer's merged weight), with a
    per-call strength and the progress bar switched on for the call: weights, the previous analogy's coefficients,
    strength, merged flags, progress-bar settings and adapters are as before, and the same call then gives what it
    gives on an untouched pipeline. (``test_lifecycle_guards`` covers an error inside the denoising loop.)"""
    want = call(pipe, X1, merge=merge)
    pipe.set_analogy(*X0)
    before = pipeline_state(pipe)
    merge_weight, fired = failing_at(2, flux.merged_weight)
    monkeypatch.setattr(flux, "merged_weight", merge_weight)
    with pytest.raises(torch.OutOfMemoryError):
        call(pipe, X1, merge=merge, progress=True, joint_attention_kwargs={"scale": 0.5})
    monkeypatch.undo()
    assert fired[0] == 1, "the premise: the merge failed"
    assert_same_state(pipeline_state(pipe), before)
    assert (call(pipe, X1, merge=merge) == want).all()


def test_pipeline_fuse_lora_out_of_memory_while_merging_keeps_the_strength(pipe, monkeypatch):
    """``pipe.fuse_lora(lora_scale=0.5)`` that runs out of memory while merging (an Exception, not the Ctrl-C of
    ``test_interactive_guards``): nothing is fused, the strength is 1.0 again, and a retry fuses and unfuses."""
    pipe.set_analogy(*X0)
    before = pipeline_state(pipe)
    merge_weight, fired = failing_at(2, flux.merged_weight)
    monkeypatch.setattr(flux, "merged_weight", merge_weight)
    with pytest.raises(torch.OutOfMemoryError):
        pipe.fuse_lora("offload", lora_scale=0.5)
    monkeypatch.undo()
    assert fired[0] == 1, "the premise: the merge failed"
    assert_same_state(pipeline_state(pipe), before)
    pipe.fuse_lora("offload", lora_scale=0.5)
    assert lf.get_lorweb_scale(pipe.transformer) == 0.5
    pipe.unfuse_lora()
    assert_same_state(pipeline_state(pipe), before)


# ------------------------------------------------------------------------------------------------------- files
def test_save_without_hard_links_that_fails_keeping_a_copy_puts_the_renamed_file_back(tmp_path, monkeypatch):
    """``save_pretrained`` over an earlier save on a file system without hard links (``os.link`` refused: the
    previous files are kept as copies, ``shutil.copy2``): a full disk while copying README.md, after config.yaml was
    already renamed into place, leaves the folder byte for byte as it was (config.yaml put back from its copy) with
    no temporary or ``.kept`` file, and the model unchanged; the retry writes files that load back."""
    lora_api.save_pretrained(tiny_model(), tmp_path)
    files = file_tree(tmp_path)
    m = tiny_model(seed=1)
    before = model_state(m)
    renamed = []
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        renamed.append(os.path.basename(dst))
        return real_replace(src, dst, *args, **kwargs)

    def no_link(*args, **kwargs):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    copy2, fired = failing_at(2, shutil.copy2, error=lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    monkeypatch.setattr(os, "link", no_link)
    monkeypatch.setattr(shutil, "copy2", copy2)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError) as info:
        lora_api.save_pretrained(m, tmp_path, encoder="another/encoder")  # config.yaml and the card differ
    monkeypatch.undo()
    assert fired[0] == 1 and info.value.errno == errno.ENOSPC, "the premise: keeping the second file failed"
    assert "config.yaml" in renamed, "the premise: config.yaml was replaced before the failure"
    assert file_tree(tmp_path) == files
    assert_same_state(model_state(m), before)
    monkeypatch.setattr(os, "link", no_link)
    lora_api.save_pretrained(m, tmp_path, encoder="another/encoder")
    monkeypatch.undo()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith((".kept", ".tmp"))]
    fresh = tiny_model()
    lf.load_lorweb_weights(fresh, tmp_path / lora_api.WEIGHT_NAME)
    assert torch.equal(fresh[1].lora_B, m[1].lora_B)
