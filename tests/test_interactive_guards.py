"""Interactive-user guards found by an audit (CPU only, tiny models, no timing): a researcher in a Jupyter notebook or
an IPython session for hours, as with diffusers and peft.

* Ctrl-C, simulated by a ``KeyboardInterrupt`` raised from a ``callback_on_step_end``, a forward hook, a step
  callback or a monkeypatched helper inside ``merged()`` / ``fuse_lora`` / ``unfuse_lora`` / loading / saving /
  ``set_query`` / ``inject_lorweb`` / ``train``: the object must be left usable and as it was (tensors bit-identical,
  coefficients, strength, adapters, merged / fused flags, requires_grad flags, progress-bar settings, files on disk
  with no temporary files left, the run lock released), and a retry of the same call must work.
* Re-running a notebook cell: ``inject_lorweb``, ``load_lora_weights``, ``from_pretrained``, ``fuse_lora``,
  ``merged()`` and ``train`` twice in a row: a clear error or idempotent behaviour, never doubled adapters or state;
  and ``train`` again with another mixed precision in the same session.
* ``repr`` / ``str``: never raising (meta device, fused, unloaded), small, and naming what a user needs to see.
* Warnings in a loop: Python's default filter shows a warning once per line of the caller (what ``validation.warn``'s
  frame walk gives), not once per call.
* Progress bars: ``progress=False`` honoured by every Python entry point, no bar left open after an exception.
* Plots: the caller's matplotlib backend untouched and no pyplot figure left open.

Tests marked "found by the interactive audit" fail until their bug is fixed (see each docstring).
"""

import copy
import dataclasses
import io
import re
import warnings

import pytest
import torch
from torch import nn

import lorweb_fast as lf
from lorweb_fast import demo, flux, lora_api, ops, training
from lorweb_fast import model as lf_model
from lorweb_fast._files import FolderLock
from lorweb_fast.testing import (assert_same_model_state, file_tree, lorweb_model_state, one_intra_op_thread,
                                 pair_config, pair_query, PAIR_QUERY_DIM, random_analogy, tiny_kontext_with_encoder,
                                 tiny_pair_model, tiny_train_config, tiny_training_assets)

pytest.importorskip("diffusers")

QUERY_DIM = PAIR_QUERY_DIM
CONFIG = pair_config()
MSL = demo.DEMO_MAX_SEQUENCE_LENGTH
X0, X1 = random_analogy(0), random_analogy(1)  # (a, a', b): 32 px a / a', 40 px b -> 64 px native grids
#: a tqdm bar as it is drawn ("  0%|", "100%|")
BAR = re.compile(r"\d+%\|")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_intra_op_thread():
        yield


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("interactive")


@pytest.fixture(scope="module")
def shared_pipe(tiny_root):
    """The tiny in-memory FLUX.1-Kontext of ``tiny_kontext_with_encoder`` (fp32, eval mode, native 64 px grids)."""
    pipe, encoder = tiny_kontext_with_encoder(tiny_root)
    for component in pipe.components.values():
        if isinstance(component, nn.Module):
            component.eval()  # built in memory, the text encoders are in training mode (dropout)
    return flux.LoRWeBKontextPipeline(pipe, encoder, resolution="native", long_edge=64)


@pytest.fixture
def tiny(shared_pipe):
    """The shared pipeline with a silent progress bar, given back unfused, enabled, at strength 1 and silent, whatever
    the test left (a bug test may leave it changed)."""
    shared_pipe.pipe._progress_bar_config = {}
    shared_pipe.set_progress_bar_config(disable=True)
    yield shared_pipe
    shared_pipe.unfuse_lora()
    shared_pipe.enable_lora()
    lora_api.set_lorweb_scale(shared_pipe.transformer, 1.0)
    shared_pipe.pipe._progress_bar_config = {}
    shared_pipe.set_progress_bar_config(disable=True)


@pytest.fixture(scope="module")
def train_assets(tmp_path_factory):
    return tiny_training_assets(tmp_path_factory.mktemp("interactive-train"), 4)


def call(pipe, analogy, **kwargs):
    """One denoising step for ``analogy`` with a fixed seed, b' as a float array."""
    a, a_prime, b = analogy
    return pipe(a, a_prime, b, "edit", num_inference_steps=1, generator=torch.Generator().manual_seed(0),
                output_type="np", max_sequence_length=MSL, **kwargs)[0]


tiny_model, query = tiny_pair_model, pair_query
model_state = lorweb_model_state


def pipeline_state(pipe) -> dict:
    return {**model_state(pipe.transformer), "progress": dict(getattr(pipe.pipe, "_progress_bar_config", {})),
            "adapters": (pipe.get_list_adapters(), pipe.get_active_adapters())}


assert_same_state = assert_same_model_state


def open_bars() -> set:
    from tqdm.std import tqdm

    return set(tqdm._instances)


def interrupt_on_call(n: int, real):
    """``real`` wrapped to raise KeyboardInterrupt (Ctrl-C) at its ``n``-th call (1-based) and to run otherwise."""
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    return wrapped


# ------------------------------------------------------------------------------------ Ctrl-C in a generation
@pytest.mark.parametrize("merge", ["full", "offload", "jit", "none"])
def test_ctrl_c_in_a_denoising_step_leaves_the_pipeline_as_it_was_and_a_retry_works(tiny, merge):
    """Ctrl-C at the end of a denoising step (``callback_on_step_end``), with a per-call strength and the progress bar
    switched on for the call: weights, the previous analogy's coefficients, strength, merged flags, adapters and the
    ``set_progress_bar_config`` settings are as before, no tqdm bar stays open, and the same call then gives what it
    gives on an untouched pipeline."""
    sink = io.StringIO()
    tiny.set_progress_bar_config(file=sink, desc="kept", disable=True)
    want = call(tiny, X1, merge=merge)
    tiny.set_analogy(*X0)
    before, bars = pipeline_state(tiny), open_bars()

    def stop(pipe, step, timestep, kwargs):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        call(tiny, X1, merge=merge, progress=True, joint_attention_kwargs={"scale": 0.5}, callback_on_step_end=stop)
    assert BAR.search(sink.getvalue()), "the premise: the bar was shown for the call"
    assert_same_state(pipeline_state(tiny), before)
    assert open_bars() == bars
    got = call(tiny, X1, merge=merge)
    assert (got == want).all()


def test_ctrl_c_in_the_analogy_encoder_keeps_the_previous_analogy(tiny):
    """Ctrl-C while the CLIP encoder computes the query (before ``set_query``): nothing changed, the retry works."""
    tiny.set_analogy(*X0)
    before = pipeline_state(tiny)
    handle = tiny.encoder.model.register_forward_pre_hook(interrupt_on_call(1, lambda *args: None))
    try:
        with pytest.raises(KeyboardInterrupt):
            call(tiny, X1)
    finally:
        handle.remove()
    assert_same_state(pipeline_state(tiny), before)
    assert call(tiny, X1).shape == (32, 32, 3)


# ---------------------------------------------------------------------------- Ctrl-C in model-level calls
@pytest.mark.parametrize("strategy", ["full", "offload", "jit"])
def test_ctrl_c_in_a_forward_inside_merged_restores_the_weights_and_a_new_merge_works(strategy):
    """A forward interrupted inside ``with lf.merged(model)``: the original weights back bit for bit, no layer marked
    merged, no load_state_dict hook left, and the same block run again gives the same output."""
    m = tiny_model()
    with torch.no_grad():
        lf.set_query(m, query())
    x = torch.randn(1, 3, 6)
    with torch.no_grad(), lf.merged(m, strategy):
        want = m(x)
    before = model_state(m)
    handle = m[1].register_forward_pre_hook(interrupt_on_call(1, lambda *args: None))
    with pytest.raises(KeyboardInterrupt), torch.no_grad(), lf.merged(m, strategy):
        m(x)
    handle.remove()
    assert_same_state(model_state(m), before)
    m.load_state_dict(m.state_dict())  # no load hook left refusing it (it drops the coefficients)
    with torch.no_grad():
        lf.set_query(m, query())
    with torch.no_grad(), lf.merged(m, strategy):
        assert torch.equal(m(x), want)


@pytest.mark.parametrize("strategy", ["full", "offload"])
def test_ctrl_c_while_fusing_leaves_the_model_unfused_and_a_retry_fuses(strategy, monkeypatch):
    """``lora_api.fuse_lora`` interrupted while it computes the merged weights (the slow part on FLUX.1-Kontext):
    the model is not fused and unchanged; fusing again works and unfusing gives the weights back."""
    m = tiny_model()
    with torch.no_grad():
        lf.set_query(m, query())
    before = model_state(m)
    monkeypatch.setattr(flux, "merged_weight", interrupt_on_call(2, flux.merged_weight))
    with pytest.raises(KeyboardInterrupt):
        lora_api.fuse_lora(m, strategy)
    assert_same_state(model_state(m), before)
    lora_api.fuse_lora(m, strategy)
    assert lora_api.fused_strategy(m) == strategy
    lora_api.unfuse_lora(m)
    assert_same_state(model_state(m), before)


def test_ctrl_c_in_pipeline_fuse_lora_keeps_the_strength(tiny, monkeypatch):
    """Found by the interactive audit: ``pipe.fuse_lora(lora_scale=0.5)`` interrupted while it merges left the
    strength at 0.5 for good (every later generation ran at half strength, and ``unfuse_lora`` has nothing to
    restore). ``LoRWeBKontextPipeline.fuse_lora`` puts the strength back in an ``except Exception`` block, which a
    KeyboardInterrupt (a BaseException) skips; ``except BaseException`` restores it."""
    tiny.set_analogy(*X0)
    before = pipeline_state(tiny)
    monkeypatch.setattr(flux, "merged_weight", interrupt_on_call(2, flux.merged_weight))
    with pytest.raises(KeyboardInterrupt):
        tiny.fuse_lora("full", lora_scale=0.5)
    monkeypatch.undo()
    assert lora_api.fused_strategy(tiny.transformer) is None
    assert lora_api.get_lorweb_scale(tiny.transformer) == 1.0, "the interrupted fuse left its strength behind"
    assert_same_state(pipeline_state(tiny), before)
    tiny.fuse_lora("full", lora_scale=0.5)
    tiny.unfuse_lora()
    assert lora_api.get_lorweb_scale(tiny.transformer) == 1.0


@pytest.mark.parametrize("strategy, restore", [("full", "_swap_back"), ("offload", "_copy_back")])
@pytest.mark.parametrize("leave", ["unfuse_lora", "merged() block"])
def test_ctrl_c_while_the_original_weights_go_back_can_be_recovered(strategy, restore, leave, monkeypatch):
    """Found by the interactive audit: a Ctrl-C while ``unfuse_lora()`` (or the exit of a ``merged()`` block) copies
    the original weights back ("offload" copies every adapted weight from host memory: seconds on FLUX.1-Kontext,
    where an impatient user presses Ctrl-C twice) left every layer not yet restored holding the merged weights and
    marked merged for good: ``lora_api.unfuse_lora`` drops the fuse state before restoring, so a retry is a no-op,
    and ``flux._restore_layers`` catches ``Exception`` only, so the interrupt skips the remaining layers. Then
    ``set_query`` / ``remove_lorweb`` are refused and the weights hold the old analogy: only reloading the model helps.
    Restoring every layer whatever it raises (``except BaseException``, re-raising the interrupt after the loop), or
    keeping the fuse state until the restore has finished, fixes it."""
    m = tiny_model()
    with torch.no_grad():
        lf.set_query(m, query())
    before = model_state(m)
    if leave == "unfuse_lora":
        lora_api.fuse_lora(m, strategy)
        monkeypatch.setattr(flux, restore, interrupt_on_call(1, getattr(flux, restore)))
        with pytest.raises(KeyboardInterrupt):
            lora_api.unfuse_lora(m)
        monkeypatch.undo()
        lora_api.unfuse_lora(m)  # the retry a user makes
    else:
        with pytest.raises(KeyboardInterrupt), lf.merged(m, strategy):
            monkeypatch.setattr(flux, restore, interrupt_on_call(1, getattr(flux, restore)))
        monkeypatch.undo()
    merged = [name for name, layer in lf.lorweb_layers(m).items() if layer._merged]
    assert merged == [], f"{merged} stay merged after the interrupted restore"
    assert_same_state(model_state(m), before)
    with torch.no_grad():
        lf.set_query(m, query(seed=1))


def test_a_restore_that_fails_after_a_ctrl_c_keeps_the_interrupt_as_its_cause(monkeypatch):
    """Found by the review: a Ctrl-C during the restore of a layer whose retry then fails raised only the
    RuntimeError naming the layer left merged; the interrupt is now its ``__cause__`` (not lost)."""
    m = tiny_model()
    with torch.no_grad():
        lf.set_query(m, query())
    calls = [0]

    def failing(layer, original):
        calls[0] += 1
        raise KeyboardInterrupt if calls[0] == 1 else OSError("device lost")

    with pytest.raises(RuntimeError, match="could not restore the original weights of 2 layers") as info:
        with lf.merged(m, "full"):
            monkeypatch.setattr(flux, "_swap_back", interrupt_on_call(99, failing))
    assert isinstance(info.value.__cause__, KeyboardInterrupt)


def test_ctrl_c_in_set_query_keeps_the_previous_coefficients(monkeypatch):
    m = tiny_model()
    with torch.no_grad():
        lf.set_query(m, query())
    before = model_state(m)
    monkeypatch.setattr(ops, "compute_coefficients", interrupt_on_call(1, ops.compute_coefficients))
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        lf.set_query(m, query(seed=1))
    monkeypatch.undo()
    assert_same_state(model_state(m), before)
    with torch.no_grad():
        lf.set_query(m, query(seed=1))
    assert not torch.equal(m[0].coefficients, before["coefficients"]["0"])


def interrupt_once(changed):
    """A ``sys.settrace`` function raising KeyboardInterrupt (Ctrl-C) at the first line that lorweb_fast executes once
    ``changed()`` is true, i.e. at any moment after a call started changing the model, however it changes it; and
    the list that records whether it fired."""
    fired = []

    def local(frame, event, arg):
        if not fired and event == "line" and changed():
            fired.append(frame.f_code.co_name)
            raise KeyboardInterrupt
        return local

    def tracer(frame, event, arg):
        if fired or not (frame.f_globals.get("__name__") or "").startswith("lorweb_fast"):
            return None
        return local

    return tracer, fired


@pytest.mark.parametrize("target", ["stock model", "loaded model"])
def test_ctrl_c_while_a_checkpoint_is_copied_in_leaves_the_model_unchanged(target, tmp_path):
    """Found by the interactive audit: ``load_lorweb_weights`` (``pipe.load_lora_weights``) validates everything, then
    swaps the new layers in and copies the tensors layer by layer (494 layers x 4 tensors onto the GPU for
    FLUX.1-Kontext). A Ctrl-C in that copy left a stock model with injected layers holding their random
    initialisation, and a model that held another checkpoint with a mix of both checkpoints' layers (some layers'
    coefficients dropped, the others' kept from the old tensors), where the README promises "a failed
    load_lorweb_weights leaves the model bit-identical". Now an interrupt while the new layers are built or swapped in
    undoes them (and the requires_grad flags), and one during the copy finishes the copy first: the model is as
    before, or holds the whole checkpoint (as a load that was not interrupted), never a mix. The
    interrupt comes at the first line lorweb_fast runs once the model has started to change (a load that changes
    it in one step, with no line in between, passes too)."""
    import sys

    lf.save_lorweb_weights(tiny_model(seed=1), tmp_path / "other.safetensors")
    if target == "stock model":
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
        changed = (lambda: any(isinstance(layer, lf.LoRWeBLinear) for layer in m))
    else:
        m = tiny_model()
        with torch.no_grad():
            lf.set_query(m, query())
        kept = [layer.lora_A.detach().clone() for layer in m]
        changed = (lambda: any(not torch.equal(layer.lora_A, a) for layer, a in zip(m, kept)))
    before = model_state(m)
    clean = copy.deepcopy(m)
    lf.load_lorweb_weights(clean, tmp_path / "other.safetensors")
    loaded = model_state(clean)  # what an uninterrupted load leaves
    tracer, fired = interrupt_once(changed)
    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        lf.load_lorweb_weights(m, tmp_path / "other.safetensors")
    except KeyboardInterrupt:
        pass
    finally:
        sys.settrace(previous)
    if fired:
        got = model_state(m)
        try:
            assert_same_state(got, before)
        except AssertionError:
            assert target == "loaded model", "a stock model must come back as it was"
            assert_same_state(got, loaded)
    assert lf.load_lorweb_weights(m, tmp_path / "other.safetensors") == ["0", "1"]  # the retry
    assert torch.equal(m[1].lora_B, tiny_model(seed=1)[1].lora_B)


def test_a_load_interrupted_while_it_builds_its_layers_changes_nothing(tmp_path, monkeypatch):
    """Found by the review: ``load_lorweb_weights`` into a stock model built its layers (each freezing its base)
    before its rollback began, so a Ctrl-C or an out-of-memory error on the third layer left the first bases
    frozen in a model that got no adapter."""
    lf.save_lorweb_weights(tiny_model(seed=1), tmp_path / "other.safetensors")
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    before = model_state(m)
    real_init, built = lf.LoRWeBLinear.__init__, []

    def init(self, *args, **kwargs):
        if len(built) == 1:
            raise KeyboardInterrupt
        real_init(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(lf.LoRWeBLinear, "__init__", init)
    with pytest.raises(KeyboardInterrupt):
        lf.load_lorweb_weights(m, tmp_path / "other.safetensors")
    monkeypatch.undo()
    assert len(built) == 1  # the premise: one layer was built (its base frozen) before the interrupt
    assert_same_state(model_state(m), before)


def failing_after(n: int, real, when):
    """``real`` (a Tensor method) wrapped to raise ``torch.OutOfMemoryError`` at every call for which ``when(self,
    *args, **kwargs)`` holds after the first ``n`` such calls, and to run otherwise. Returns the wrapper and the list
    of those calls' count."""
    calls = [0]

    def wrapped(self, *args, **kwargs):
        if when(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] > n:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, *args, **kwargs)

    return wrapped, calls


def half_checkpoint(seed=1) -> dict:
    """A float16 state dict of ``tiny_model(seed)``: loading it into the float32 layers converts every tensor."""
    return {k: v.detach().half() for k, v in lf.lorweb_state_dict(tiny_model(seed=seed)).items()}


def as_across_devices(monkeypatch):
    """Make ``load_lorweb_weights`` treat the checkpoint as if it were on another device than the layers (this
    machine has one device): a ``param.copy_`` across devices converts a dtype or a stride through a temporary,
    so such tensors are staged (converted, made contiguous) before the first copy."""
    monkeypatch.setattr(lf_model, "_copies_in_place", lambda param, values: False)


@pytest.mark.parametrize("target", ["stock model", "loaded model"])
def test_an_out_of_memory_error_in_a_converting_copy_cannot_leave_a_mix(target, monkeypatch):
    """Noticed by the review of the Ctrl-C guard: ``load_lorweb_weights`` copied the checkpoint with
    ``param.copy_(tensor)``, which across devices converts a float16 tensor to the layer's float32 (and a strided
    one to a contiguous temporary) as it copies: an allocation per tensor, after the first tensors were copied. An
    out-of-memory error there (an Exception, which the Ctrl-C guard lets through) left a model that held another
    checkpoint with a mix of both. Now every such tensor is converted before the first copy, so the copies allocate
    nothing: here (the checkpoint taken as on another device) a copy that would convert fails, and the load still
    succeeds, bit-identical to one without the failure. On one device ``copy_`` converts in place (ATen's copy
    kernels need no temporary there): nothing is staged, the whole checkpoint is not copied once more."""
    state = half_checkpoint()
    as_across_devices(monkeypatch)
    stock = lambda: (torch.manual_seed(0), nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)))[1]  # noqa: E731
    make = stock if target == "stock model" else tiny_model
    clean = make()
    lf.load_lorweb_weights(clean, state)
    m = make()
    if target == "loaded model":
        with torch.no_grad():
            lf.set_query(m, query())
    needs_temporary = (lambda self, src, *a, **k: isinstance(src, torch.Tensor)  # noqa: E731
                       and (src.dtype != self.dtype or not src.is_contiguous()))
    copy, calls = failing_after(2, torch.Tensor.copy_, needs_temporary)
    monkeypatch.setattr(torch.Tensor, "copy_", copy)
    assert lf.load_lorweb_weights(m, state) == ["0", "1"]
    monkeypatch.undo()
    assert calls[0] == 0, "a copy into the layers converted or went through a temporary"
    assert_same_state(model_state(m), model_state(clean))
    # one device: copy_ converts, nothing staged
    converts = (lambda self, *a, dtype=None, **k: dtype is not None and dtype != self.dtype)  # noqa: E731
    to, conversions = failing_after(10 ** 9, torch.Tensor.to, converts)
    copy, converting_copies = failing_after(10 ** 9, torch.Tensor.copy_, needs_temporary)
    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.Tensor, "copy_", copy)
    m = make()
    lf.load_lorweb_weights(m, state)
    monkeypatch.undo()
    assert conversions[0] == 0 and converting_copies[0] == 8  # 2 layers x 4 tensors converted by copy_
    assert_same_state(model_state(m), model_state(clean))


@pytest.mark.parametrize("target", ["stock model", "loaded model"])
def test_an_out_of_memory_error_while_the_checkpoint_is_converted_leaves_the_model_unchanged(target, monkeypatch):
    """The conversion of a checkpoint on another device to the layers' dtype that precedes the copy (see above)
    allocates: an out-of-memory error on its third tensor raises, the model as it was (a stock model without the
    injected layers, a loaded one with its tensors and coefficients), and a retry loads."""
    import traceback

    state = half_checkpoint()
    as_across_devices(monkeypatch)
    if target == "stock model":
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    else:
        m = tiny_model()
        with torch.no_grad():
            lf.set_query(m, query())
    before = model_state(m)
    converts = (lambda self, *a, dtype=None, **k: dtype is not None and dtype != self.dtype)  # noqa: E731
    to, calls = failing_after(2, torch.Tensor.to, converts)
    monkeypatch.setattr(torch.Tensor, "to", to)
    with pytest.raises(torch.OutOfMemoryError) as caught:
        lf.load_lorweb_weights(m, state)
    monkeypatch.undo()
    assert any(frame.name == "_staged_for_copy" for frame in traceback.extract_tb(caught.value.__traceback__)), \
        "the premise: the error came while the checkpoint was converted for the copy"
    assert_same_state(model_state(m), before)
    assert lf.load_lorweb_weights(m, state) == ["0", "1"]
    assert torch.equal(m[1].lora_B, state["transformer.1.lora_B"].float())


def test_an_interrupted_inject_lorweb_changes_nothing(monkeypatch):
    """Found by the interactive audit: ``inject_lorweb`` builds every layer before it swaps them in (so a failure
    swaps none in), but each ``LoRWeBLinear.__init__`` freezes its base layer (``base.requires_grad_(False)``) as it
    is built: a Ctrl-C (or an out-of-memory error) while building the 494 layers of FLUX.1-Kontext left the base
    layers built so far frozen in a model that got no adapter. Freezing at swap-in time (or restoring the flags on
    ``BaseException``) fixes it."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    before = model_state(m)
    built = [0]

    class Interrupted(lf.LoRWeBLinear):
        def __init__(self, *args, **kwargs):
            built[0] += 1
            super().__init__(*args, **kwargs)
            if built[0] == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(lf_model, "LoRWeBLinear", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        lf.inject_lorweb(m, CONFIG)
    monkeypatch.undo()
    assert lf.lorweb_layers(m) == {}
    frozen = [n for n, p in m.named_parameters() if not p.requires_grad]
    assert frozen == [], f"{frozen} were frozen by an injection that did not happen"
    assert_same_state(model_state(m), before)


@pytest.mark.parametrize("where", ["writing the weights", "the second rename"])
def test_ctrl_c_while_saving_keeps_the_folder_as_it_was(where, tmp_path, monkeypatch):
    """``save_pretrained`` (``pipe.save_lora_weights``) over an earlier save, interrupted while the safetensors file
    is written or between two renames: the folder's files are as before (no temporary or ``.kept`` file left), the
    model is unchanged, and the retry writes a file that loads back."""
    import os

    import safetensors.torch

    lora_api.save_pretrained(tiny_model(), tmp_path)
    files = file_tree(tmp_path)
    m = tiny_model(seed=1)
    before = model_state(m)
    if where == "writing the weights":
        real = safetensors.torch.save_file

        def save_file(*args, **kwargs):
            real(*args, **kwargs)
            raise KeyboardInterrupt

        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    else:
        monkeypatch.setattr(os, "replace", interrupt_on_call(2, os.replace))
    with pytest.raises(KeyboardInterrupt):
        lora_api.save_pretrained(m, tmp_path)
    monkeypatch.undo()
    assert file_tree(tmp_path) == files
    assert_same_state(model_state(m), before)
    lora_api.save_pretrained(m, tmp_path)
    fresh = tiny_model()
    lf.load_lorweb_weights(fresh, tmp_path / lora_api.WEIGHT_NAME)
    assert torch.equal(fresh[1].lora_B, m[1].lora_B)


def test_ctrl_c_in_remove_lorweb_then_a_retry_removes_the_rest(monkeypatch):
    """``remove_lorweb`` interrupted between two layers (a loop of attribute assignments: microseconds) leaves a
    model that still works, and running the cell again takes the remaining layers out: the stock layers, with their
    original tensors, are back."""
    m = tiny_model()
    bases = [layer.base_layer for layer in m]
    monkeypatch.setattr(lf_model, "_set_submodule", interrupt_on_call(2, lf_model._set_submodule))
    with pytest.raises(KeyboardInterrupt):
        lf.remove_lorweb(m)
    monkeypatch.undo()
    assert lf.remove_lorweb(m) == ["1"]
    assert list(m) == bases and lf.lorweb_layers(m) == {}


def test_ctrl_c_in_eval_generate_keeps_what_it_wrote_and_a_rerun_continues(tiny, tmp_path):
    """``evaluation.generate.generate`` interrupted in its second batch: the first b' is complete, no temporary file
    is left, no bar stays open and the pipeline is as before; the same cell run again generates only the rest."""
    from lorweb_fast.evaluation import generate as G, tiny as eval_tiny
    from lorweb_fast.evaluation.evalsets import read_evalset

    triplets = read_evalset(eval_tiny.make_folder_evalset(tmp_path / "ev", tasks=("flip",), per_task=2,
                                                          size=(32, 32)))
    options = dict(batch_size=1, num_inference_steps=1, progress=True, pipe_kwargs={"max_sequence_length": MSL})
    tiny.set_analogy(*X0)
    before, bars = pipeline_state(tiny), open_bars()
    handle = tiny.transformer.register_forward_pre_hook(interrupt_on_call(2, lambda *args: None))
    try:
        with pytest.raises(KeyboardInterrupt):
            G.generate(tiny, triplets, tmp_path / "runs", **options)
    finally:
        handle.remove()
    names = [path for path, _ in file_tree(tmp_path / "runs")]
    assert sum(name.endswith("b_prime.png") for name in names) == 1, names
    assert not any(".tmp" in name for name in names), names
    assert open_bars() == bars
    # the first batch's call succeeded: its analogy is the pipeline's now (a failed call keeps the one before it)
    assert_same_state(pipeline_state(tiny), before, ignore=("coefficients",))
    assert G.generate(tiny, triplets, tmp_path / "runs", **options) == {"generated": 1, "skipped": 1}


# ------------------------------------------------------------------------------------------ Ctrl-C in train
def test_ctrl_c_in_training_releases_the_run_and_the_pipeline_and_resume_continues(train_assets, tmp_path, capsys):
    """Ctrl-C in ``train``'s step callback after the step-2 checkpoint: the caller's transformer is as before (no
    LoRWeB layer left, tensors, requires_grad flags and train/eval mode), the run lock is released (another lock on
    the folder can be taken), no temporary file is left and the training bar is closed. Re-running the same cell is
    refused by name; with ``resume=True`` the run continues from the checkpoint to its last step."""
    cfg = tiny_train_config(train_assets, tmp_path / "run", steps=3, checkpoint_every=2, batch_size=1,
                            progress=True)
    pipe = flux.load_kontext_pipeline(cfg.model)
    encoder = flux.AnalogyEncoder(cfg.encoder)
    before, mode, bars = model_state(pipe.transformer), pipe.transformer.training, open_bars()

    def stop(step, loss):
        if step == 2:
            raise KeyboardInterrupt

    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        training.train(cfg, pipe=pipe, encoder=encoder, step_callback=stop)
    assert BAR.search(capsys.readouterr().err), "the premise: the training bar was shown"
    assert_same_state(model_state(pipe.transformer), before)
    assert pipe.transformer.training == mode
    assert open_bars() == bars
    names = [path for path, _ in file_tree(cfg.out)]
    assert not any(".tmp" in name or name.endswith(training.RUN_LOCK_NAME) for name in names), names
    lock = FolderLock(cfg.out, training.RUN_LOCK_NAME, "training run")
    lock.acquire()
    lock.release()
    with pytest.raises(ValueError, match="pass --resume to continue it or --overwrite"):
        training.train(cfg, pipe=pipe, encoder=encoder)
    assert_same_state(model_state(pipe.transformer), before)
    result = training.train(dataclasses.replace(cfg, resume=True), pipe=pipe, encoder=encoder)
    assert result["step"] == 3


class _Stop(Exception):
    pass


def test_train_again_with_another_mixed_precision_in_the_same_session(train_assets, tmp_path, monkeypatch):
    """Found by the interactive audit: ``train(cfg)`` with ``mixed_precision="no"``, then the same cell with
    ``mixed_precision="bf16"`` in the same notebook kernel failed with accelerate's "AcceleratorState has already
    been initialized and cannot be changed, restart your runtime completely and pass `mixed_precision='bf16'` to
    `Accelerator()`": ``training._train`` builds a new ``Accelerator`` per call, but accelerate keeps one process-wide
    state whose precision cannot change (the suite works around it, see test_training_wiring.py). Resetting
    accelerate's state before a one-process run (``AcceleratorState._reset_state()`` when no process group is
    initialised), or not handing the precision to accelerate, fixes it. Stopped once the models would load."""
    from accelerate.state import AcceleratorState

    def load(*args, **kwargs):
        raise _Stop

    monkeypatch.setattr(training, "load_training_pipeline", load)
    try:
        for i, precision in enumerate(("no", "bf16", "no")):
            cfg = tiny_train_config(train_assets, tmp_path / f"run{i}", steps=1, mixed_precision=precision)
            with pytest.raises(_Stop):
                training.train(cfg)
    finally:  # accelerate's process-wide state left in the precision the rest of the suite trains in
        if AcceleratorState._shared_state.get("_mixed_precision", "no") != "no":
            AcceleratorState._reset_state()


# ----------------------------------------------------------------------------------------- re-running cells
def test_inject_lorweb_twice_is_refused_and_changes_nothing():
    m = tiny_model()
    before = model_state(m)
    with pytest.raises(ValueError, match="already injected into 2 targeted modules"):
        lf.inject_lorweb(m, CONFIG)
    assert_same_state(model_state(m), before)


def test_merged_block_nested_is_refused_and_the_outer_block_stays_intact():
    m = tiny_model()
    with torch.no_grad():
        lf.set_query(m, query())
    before = model_state(m)
    x = torch.randn(1, 2, 6)
    with torch.no_grad(), lf.merged(m):
        want = m(x)
        with pytest.raises(RuntimeError, match="already merged"):
            with lf.merged(m):
                pass
        assert torch.equal(m(x), want)
    assert_same_state(model_state(m), before)


def test_pipeline_load_lora_weights_twice_replaces_the_one_adapter(tiny, tmp_path):
    """The same ``load_lora_weights`` cell run twice (and after ``set_adapters``): still one adapter, the same layers
    and modules, the file's tensors, strength 1.0 as diffusers starts a loaded adapter; then unload twice: the second
    is a no-op."""
    tiny.save_lora_weights(tmp_path)
    saved = {k: v.clone() for k, v in lf.lorweb_state_dict(tiny.transformer).items()}
    first = pipeline_state(tiny)
    tiny.set_adapters("lorweb", 0.5)
    for _ in range(2):
        tiny.load_lora_weights(tmp_path)
    got = pipeline_state(tiny)
    assert got["modules"] == first["modules"] and got["adapters"] == ({"transformer": ["lorweb"]}, ["lorweb"])
    assert got["strength"] == first["strength"] and set(got["strength"]) == {1.0}
    state = lf.lorweb_state_dict(tiny.transformer)
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    try:
        assert len(tiny.unload_lora_weights()) == len(saved) // 4
        assert tiny.unload_lora_weights() == []
        assert tiny.get_list_adapters() == {}
        assert "LoRWeB" not in repr(tiny.transformer)
    finally:
        tiny.load_lora_weights(tmp_path)


def test_pipeline_fuse_lora_twice_is_refused_and_unfuse_twice_is_a_no_op(tiny):
    tiny.set_analogy(*X0)
    before = pipeline_state(tiny)
    tiny.fuse_lora(lora_scale=0.5)
    fused = pipeline_state(tiny)
    with pytest.raises(RuntimeError, match="already fused"):
        tiny.fuse_lora(lora_scale=0.5)
    assert_same_state(pipeline_state(tiny), fused)
    tiny.unfuse_lora()
    tiny.unfuse_lora()
    assert_same_state(pipeline_state(tiny), before)


def test_from_pretrained_twice_gives_two_independent_pipelines(shared_pipe, train_assets, tmp_path):
    """Re-running the cell that loads the pipeline: two pipelines that share no module and hold the file's layers
    once each (nothing doubled), and that generate the same b'."""
    weights = tmp_path / "lorweb.safetensors"
    lf.save_lorweb_weights(shared_pipe.transformer, weights, metadata={"encoder": str(train_assets / "clip")})
    pipes = [flux.LoRWeBKontextPipeline.from_pretrained(train_assets / "pipe", weights, resolution="native",
                                                        long_edge=64) for _ in range(2)]
    count = len(lf.lorweb_layers(shared_pipe.transformer))
    assert [len(lf.lorweb_layers(p.transformer)) for p in pipes] == [count, count]
    assert pipes[0].transformer is not pipes[1].transformer and pipes[0].encoder.model is not pipes[1].encoder.model
    ids = [{id(t) for t in p.transformer.parameters()} for p in pipes]
    assert not ids[0] & ids[1]
    outs = []
    for p in pipes:
        for component in p.pipe.components.values():
            if isinstance(component, nn.Module):
                component.eval()
        outs.append(call(p, X0, progress=False))
    assert (outs[0] == outs[1]).all()


# ------------------------------------------------------------------------------------------------ repr / str
def test_repr_and_str_never_raise_and_stay_small(shared_pipe, train_assets, tmp_path):
    """repr() and str() of a layer (also on the meta device), a model with LoRWeB layers (also fused), the
    configurations, the analogy encoder and the pipeline (also after ``unload_lora_weights``) never raise, hold no
    tensor values and stay short; the layer names its sizes."""
    m = tiny_model()
    with torch.device("meta"):
        meta_layer = lf.LoRWeBLinear(nn.Linear(4, 3), num_loras=2, rank=1, key_dim=2, query_dim=3)
    cfg = tiny_train_config(train_assets, tmp_path / "run")
    objects = {"layer": (m[0], 700), "meta layer": (meta_layer, 700), "model": (m, 1500),
               "config": (CONFIG, 400), "train config": (cfg, 2000), "encoder": (shared_pipe.encoder, 400),
               "pipeline": (shared_pipe, 2000)}
    with torch.no_grad():
        lf.set_query(m, query())
    for name, (obj, limit) in objects.items():
        for text in (repr(obj), str(obj)):
            assert 0 < len(text) <= limit, (name, len(text))
            assert "tensor(" not in text, name
    layer = repr(m[0])
    for part in ("in_features=6", "out_features=5", "num_loras=3", "rank=2", "lora_alpha=2"):
        assert part in layer
    lora_api.fuse_lora(m)
    try:
        assert "LoRWeBLinear" in repr(m)
    finally:
        lora_api.unfuse_lora(m)


def test_layer_repr_shows_strength_and_merged_state():
    """Found by the interactive audit: a layer's repr (and so the model's) showed neither the strength
    (``set_lorweb_scale``, ``disable_lora``) nor whether the mixture is merged or fused into the weights: a notebook
    user printing a model at strength 0 (disabled) or fused saw the same text as for a fresh one. Add both to
    ``LoRWeBLinear.extra_repr`` (e.g. ``strength=0.5``, ``merged='full'``), at least when they differ from the
    defaults."""
    m = tiny_model()
    with torch.no_grad():
        lf.set_query(m, query())
    plain = repr(m[0])
    lf.set_lorweb_scale(m, 0.5)
    assert repr(m[0]) != plain and "0.5" in repr(m[0]), "the strength is not shown"
    lf.set_lorweb_scale(m, 1.0)
    lora_api.fuse_lora(m)
    try:
        assert repr(m[0]) != plain and "merged" in repr(m[0]).lower(), "the merged state is not shown"
    finally:
        lora_api.unfuse_lora(m)


@pytest.mark.parametrize("what", ["pipeline", "analogy encoder"])
def test_pipeline_and_encoder_repr_are_informative(shared_pipe, what):
    """Found by the interactive audit: ``LoRWeBKontextPipeline`` and ``AnalogyEncoder`` have no ``__repr__``, so a
    notebook cell ending in ``pipe`` printed ``<lorweb_fast.flux.LoRWeBKontextPipeline object at 0x...>`` where the
    stock diffusers pipeline prints its components, and the encoder hid its model and query mode. A ``__repr__``
    naming (pipeline) the adapter, its layer count, N and r, the strength and fused state, the resolution, and
    (encoder) the model, kind and query mode would do."""
    if what == "pipeline":
        text = repr(shared_pipe)
        wanted = ("LoRWeBKontextPipeline", "lorweb", str(len(lf.lorweb_layers(shared_pipe.transformer))))
    else:
        text = repr(shared_pipe.encoder)
        wanted = ("AnalogyEncoder", shared_pipe.encoder.name, shared_pipe.encoder.query_mode)
    assert " object at 0x" not in text, text
    missing = [w for w in wanted if w not in text]
    assert not missing, f"{missing} not in {text!r}"


def test_pipeline_dir_lists_what_it_forwards(shared_pipe):
    """Tab completion: ``dir(pipe)`` lists the wrapper's own names and the stock pipeline's it forwards (``vae``,
    ``set_progress_bar_config``), each of which resolves."""
    names = dir(shared_pipe)
    for name in ("set_analogy", "fuse_lora", "vae", "scheduler", "set_progress_bar_config", "encode_prompt"):
        assert name in names, name
        getattr(shared_pipe, name)
    assert names == sorted(set(names))


# ----------------------------------------------------------------------------------------- warnings in a loop
def test_a_warning_in_a_loop_is_shown_once_at_the_callers_line(tiny):
    """Twenty calls in a loop with b images of different aspect ratios: with Python's default filter the warning is
    shown once (diffusers' logger warnings repeat every call; Python's "default" action shows a warning once per
    location), and it points at this file's line, not at lorweb_fast's; with the "always" filter every call warns."""
    b_wide = X1[2].resize((60, 40))
    batch = [[X0[0], X1[0]], [X0[1], X1[1]], [X0[2], b_wide]]
    kwargs = dict(num_inference_steps=1, output_type="np", max_sequence_length=MSL, merge="none")
    counts = {}
    for action in ("default", "always"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter(action)
            for _ in range(20 if action == "default" else 2):
                line = _line() + 1  # the call's line
                tiny(*batch, ["edit", "edit"], **kwargs)
        ours = [w for w in caught if issubclass(w.category, lf.LoRWeBWarning)]
        counts[action] = len(ours)
        assert all(w.filename == __file__ and w.lineno == line for w in ours), [(w.filename, w.lineno) for w in ours]
        assert all("different aspect ratios" in str(w.message) for w in ours)
    assert counts == {"default": 1, "always": 2}


def _line() -> int:
    """The caller's line number."""
    import sys

    return sys._getframe(1).f_lineno


def test_merged_forward_and_set_query_warnings_in_a_loop_point_at_the_users_line():
    """A forward with autograd inside ``merged()`` warns once per block (not once per layer or call), and
    ``set_query`` in eval mode with autograd on, called 20 times from one line, is shown once by the default filter;
    both point at the caller's line."""
    m = tiny_model()
    x = torch.randn(1, 2, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(20):
            line = _line() + 1
            lf.set_query(m, query())
    caught = [w for w in caught if issubclass(w.category, lf.LoRWeBWarning)]
    assert [(w.filename, w.lineno) for w in caught] == [(__file__, line)]
    assert "eval mode with autograd" in str(caught[0].message)
    with torch.no_grad():
        lf.set_query(m, query())
    m.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with lf.merged(m):
            for _ in range(20):
                line = _line() + 1
                m(x)
    caught = [w for w in caught if issubclass(w.category, lf.LoRWeBWarning)]
    assert [(w.filename, w.lineno) for w in caught] == [(__file__, line)]
    assert "inside merged()" in str(caught[0].message)


# ------------------------------------------------------------------------------------------------ progress bars
@pytest.mark.parametrize("entry", ["pipeline call", "data.check_folder", "training.train", "evaluation.score"])
def test_progress_false_shows_no_progress_bar(entry, tiny, train_assets, tiny_root, tmp_path, capsys):
    """``progress=False`` (``TrainConfig.progress=False``) in the Python API shows no progress bar at all, as the
    command line's ``--quiet`` does. The pipeline call and ``data.check_folder`` pass. Found by the interactive
    audit: ``training.train(cfg)`` and ``evaluation.score.score`` turn off only their own bars, while the models
    they load themselves still draw diffusers' "Loading pipeline components" and transformers' "Loading weights"
    bars; ``cli.library_progress_bars(enabled=False)``, which the CLI wraps every command in, is not applied. Wrapping
    their model loading in it when progress is False (moving the helper out of cli.py) fixes both."""
    from lorweb_fast import data
    from lorweb_fast.evaluation import score, tiny as eval_tiny

    tiny.set_progress_bar_config(disable=False)  # the premise: the pipeline's own setting would show the bar
    capsys.readouterr()
    if entry == "pipeline call":
        before = pipeline_state(tiny)
        call(tiny, X0, progress=False)
        after = pipeline_state(tiny)
        assert after["progress"] == before["progress"] == {"disable": False}
    elif entry == "data.check_folder":
        assert data.check_folder(train_assets / "data", progress=False)["samples"] == 4
    elif entry == "training.train":
        cfg = tiny_train_config(train_assets, tmp_path / "run", steps=1, checkpoint_every=1, batch_size=1,
                                progress=False)
        assert training.train(cfg)["step"] == 1
    else:
        runs = eval_tiny.make_runs_folder(tmp_path / "runs", eval_tiny.make_folder_evalset(tmp_path / "set"))
        score.score({"ours": runs}, tmp_path / "report", metrics=("clip_dir",), encoder=str(tiny_root / "clip"),
                    progress=False)
    err = capsys.readouterr().err
    bars = sorted({line.split(":")[0].strip() for line in re.split(r"[\r\n]", err) if BAR.search(line)})
    assert not bars, f"progress=False, yet these bars were drawn: {bars}"


# --------------------------------------------------------------------------------------------------- matplotlib
def test_plots_keep_the_callers_backend_and_leave_no_figure_open(train_assets, tmp_path, monkeypatch):
    """``lf.plot_coefficients``, ``training.plot_loss`` and the evaluation report's plots use ``Figure`` directly:
    the backend stays the caller's (``matplotlib.use`` is never called) and pyplot keeps no figure (a notebook would
    display it, and a loop would pile figures up); a Ctrl-C while a plot is written keeps the previous file."""
    import json

    import matplotlib
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    from lorweb_fast.evaluation import score, tiny as eval_tiny

    backend, figures = matplotlib.get_backend(), plt.get_fignums()
    monkeypatch.setattr(matplotlib, "use", lambda *args, **kwargs: pytest.fail("matplotlib.use was called"))
    monkeypatch.setattr(plt, "switch_backend", lambda *args, **kwargs: pytest.fail("pyplot.switch_backend was called"))
    m = tiny_model()
    with torch.no_grad():
        lf.set_query(m, query())
    log = tmp_path / "loss.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "lr": 0.01}) + "\n" for s in range(1, 6)))
    evalset = eval_tiny.make_folder_evalset(tmp_path / "set")
    runs = eval_tiny.make_runs_folder(tmp_path / "runs", evalset)
    base = eval_tiny.make_runs_folder(tmp_path / "base", evalset, seed=1)
    for _ in range(3):  # a notebook loop
        lf.plot_coefficients(m, tmp_path / "coefficients.png")
        training.plot_loss(log, tmp_path / "loss.png")
    score.score({"ours": runs}, tmp_path / "report", metrics=("vlm",), judge=eval_tiny.FixedJudge(),
                against={"base": base}, progress=False)
    assert (tmp_path / "report" / "win_rates.png").is_file() and (tmp_path / "coefficients.png").is_file()
    kept = file_tree(tmp_path)
    real_savefig = Figure.savefig

    def savefig(fig, fname, *args, **kwargs):  # a Ctrl-C half-way through writing the image
        real_savefig(fig, fname, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", savefig)
    for plot in (lambda: lf.plot_coefficients(m, tmp_path / "coefficients.png"),
                 lambda: training.plot_loss(log, tmp_path / "loss.png")):
        with pytest.raises(KeyboardInterrupt):
            plot()
    assert file_tree(tmp_path) == kept  # the previous plots intact, no temporary file left
    assert matplotlib.get_backend() == backend
    assert plt.get_fignums() == figures


def test_a_failed_load_into_a_diffusers_model_leaves_its_layerwise_casting_skip_patterns(tmp_path, monkeypatch):
    """Noticed by the failure-atomicity audit: a load into a diffusers model adds ``att_lora_to_q`` to the model's
    ``_skip_layerwise_casting_patterns`` (an instance attribute shadowing the class's) as it swaps its layers in; a
    load that then failed (out of memory converting the checkpoint) undid the layers but left the attribute. Now the
    rollback removes it: the model's ``__dict__`` is as before."""
    from diffusers import FluxTransformer2DModel

    from lorweb_fast.testing import inject_random_lorweb, tiny_flux_config

    torch.manual_seed(0)
    source = FluxTransformer2DModel(**tiny_flux_config())
    inject_random_lorweb(source)
    lf.save_lorweb_weights(source, tmp_path / "w.safetensors", dtype=torch.float16)
    target = FluxTransformer2DModel(**tiny_flux_config())
    before = dict(target.__dict__)
    assert "_skip_layerwise_casting_patterns" not in before  # the premise: the class holds the patterns
    as_across_devices(monkeypatch)  # the checkpoint's conversion, staged before the copy, fails
    converts = (lambda self, *a, dtype=None, **k: dtype is not None and dtype != self.dtype)  # noqa: E731
    to, calls = failing_after(5, torch.Tensor.to, converts)
    monkeypatch.setattr(torch.Tensor, "to", to)
    with pytest.raises(torch.OutOfMemoryError):
        lf.load_lorweb_weights(target, tmp_path / "w.safetensors")
    monkeypatch.undo()
    assert calls[0] > 5, "the premise: the conversion failed"
    assert target.__dict__.keys() == before.keys()
    assert not lf.lorweb_layers(target)
    lf.load_lorweb_weights(target, tmp_path / "w.safetensors")
    assert "att_lora_to_q" in target._skip_layerwise_casting_patterns
