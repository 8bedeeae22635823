"""Guards for lorweb_fast/training.py found by a mutation audit: behaviour of the pure-logic parts of training that
the other training tests left unpinned (the sampler's length, key check and bidirectional swap positions, the
"mixed" collate, config choices and boundaries, which checkpoint a resume picks, the fields a resume may change,
trainer-state validation edges, ``prepare_output`` outside the main process, checkpoint rewrite and crash safety,
the optimizer state's groups and order, quantization detection, injected-layer checks, the loss log and
``batch_query``). Everything is built here on tiny CPU modules; no pipeline is loaded."""

import dataclasses
import errno
import json
import os
import shutil
import types
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

import lorweb_fast as lf
from lorweb_fast import training
from lorweb_fast.data import bidirectional_swap
from lorweb_fast.testing import (fake_checkpoint, file_tree, module_from_package, small_train_config,
                                 tiny_lorweb_linear_model)
from lorweb_fast.training import StepBatchSampler, TrainConfig, prepare_output

KEYS = [(64, 64)] * 5 + [(96, 48)] * 3 + [(64, 64)] * 2  # two buckets: 7 and 3 samples


# ------------------------------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("start,total,want", [(0, 5, 5), (3, 5, 2), (5, 5, 0), (7, 5, 0)])
def test_sampler_length_is_the_number_of_steps_left(start, total, want):
    """``len`` is the number of steps ``start_step .. total_steps - 1`` the iterator yields, never negative."""
    sampler = StepBatchSampler(10, 2, seed=0, start_step=start, total_steps=total)
    assert len(sampler) == want == len(list(sampler))


def test_groups_must_have_one_key_per_sample_and_position_zero_is_the_start():
    """More keys than samples is refused like fewer; ``start_position=0`` is valid and is the stream's start."""
    with pytest.raises(ValueError, match="groups has 4 keys for 3 samples"):
        StepBatchSampler(3, 2, seed=0, start_step=0, total_steps=1, groups=[(1, 1)] * 4)
    for groups in (KEYS, None):
        default = StepBatchSampler(len(KEYS), 3, seed=1, start_step=0, total_steps=4, groups=groups)
        explicit = StepBatchSampler(len(KEYS), 3, seed=1, start_step=0, total_steps=4, groups=groups,
                                    start_position=0)
        assert list(explicit) == list(default)


@pytest.mark.parametrize("groups", [KEYS, None], ids=["bucket", "mixed"])
@pytest.mark.parametrize("world_size,rank", [(1, 0), (2, 1)])
def test_bidirectional_swaps_are_drawn_at_the_sample_stream_position(groups, world_size, rank):
    """``data.bidirectional_swap``'s contract: the swap of a sample is the coin at its position in the sample stream,
    step * global batch + rank * batch + slot (bucket batching: the batch's place in the stream of batches times
    ``batch_size``, plus the slot), and the indices are those of the sampler without ``bidirectional``."""
    bs, seed = 3, 7
    plain = StepBatchSampler(len(KEYS), bs, seed=seed, start_step=0, total_steps=8, world_size=world_size,
                             rank=rank, groups=groups)
    both = StepBatchSampler(len(KEYS), bs, seed=seed, start_step=0, total_steps=8, world_size=world_size, rank=rank,
                            groups=groups, bidirectional=True)
    for step in range(8):
        pairs = both.batch(step)
        assert [i for i, _ in pairs] == plain.batch(step)
        first = (step * world_size + rank) * bs  # the first slot of this process's batch in the sample stream
        assert [s for _, s in pairs] == [bidirectional_swap(seed, first + j) for j in range(len(pairs))]


def test_mixed_collate_resizes_every_image_to_the_first_target():
    """"mixed" batching (lorweb_fast's first rule): each batch is resized to its first sample's size, bicubic,
    controls and targets alike; captions and names stay with their samples, in order."""
    def item(k, size):
        control = Image.new("RGB", size, (10 * k, 20, 30))
        control.putpixel((1, 1), (255, 0, 0))
        target = Image.new("RGB", size, (30, 10 * k, 20))
        target.putpixel((2, 1), (0, 255, 0))
        return {"control": control, "target": target, "caption": f"caption {k}", "name": f"s{k}"}

    items = [item(0, (8, 6)), item(1, (8, 6)), item(2, (12, 4)), item(3, (10, 10))]
    batch = training._collate(items)
    assert batch["caption"] == [f"caption {k}" for k in range(4)] and batch["name"] == ["s0", "s1", "s2", "s3"]
    for key in ("control", "target"):
        assert all(im.size == (8, 6) for im in batch[key])
        assert batch[key][0] is items[0][key] and batch[key][1] is items[1][key]
        for k in (2, 3):
            assert batch[key][k].tobytes() == items[k][key].resize((8, 6), Image.BICUBIC).tobytes()


# -------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("field", ["resize", "batching", "missing_caption", "mixed_precision", "query_source",
                                   "save_dtype"])
def test_every_choice_field_refuses_an_unknown_value(tmp_path, field):
    """The choice fields no other test covers: an unknown value is refused naming the field."""
    with pytest.raises(ValueError, match=rf"{field} must be one of"):
        small_train_config(tmp_path, **{field: "bogus"}).validate()


@pytest.mark.parametrize("field,value", [("caption_dropout", 1.0), ("caption_dropout", 0.0),
                                         ("keep_milestone_every", 0), ("steps", 1), ("checkpoint_every", 1),
                                         ("batch_size", 1), ("keep_checkpoints", 0)])
def test_boundary_values_are_accepted(tmp_path, field, value):
    """The documented ends of each range are valid: caption_dropout in [0, 1], keep_milestone_every 0 (no
    milestones), sizes of 1, keep_checkpoints 0 (keep all)."""
    small_train_config(tmp_path, **{field: value}).validate()


def test_resume_and_overwrite_together_are_refused(tmp_path):
    """--resume continues a run, --overwrite deletes it: both at once is an error naming both."""
    with pytest.raises(ValueError, match="resume and overwrite exclude each other"):
        small_train_config(tmp_path, resume=True, overwrite=True).validate()


def test_query_settings_are_checked_by_validate(tmp_path):
    """An unknown query mode is refused before anything loads."""
    with pytest.raises(ValueError, match="query_mode"):
        small_train_config(tmp_path, query_mode="bogus").validate()


# -------------------------------------------------------------------------------------------- checkpoints/
def test_checkpoint_folders_are_ordered_by_step_and_files_are_not_checkpoints(tmp_path):
    """Folders sort by their step number (a ninth digit or a hand-made unpadded name does not sort as text), and a
    file named like a checkpoint is ignored."""
    root = tmp_path / "checkpoints"
    for name in ("step-100000000", "step-99999999", "step-10", "step-9"):
        (root / name).mkdir(parents=True)
    (root / "step-00000005").write_bytes(b"a file")
    assert [p.name for p in training.checkpoint_dirs(tmp_path)] == ["step-9", "step-10", "step-99999999",
                                                                     "step-100000000"]


def test_a_resume_picks_the_newest_complete_checkpoint(tmp_path):
    """Of several complete checkpoints the newest is resumed; a newer folder with weights but no trainer state
    (not a finished checkpoint) is passed over silently, not as a corrupt one."""
    cfg = small_train_config(tmp_path)
    fake_checkpoint(tmp_path, 2, cfg)
    newest = fake_checkpoint(tmp_path, 4, cfg)
    half = tmp_path / "checkpoints" / "step-00000006"
    half.mkdir()
    shutil.copyfile(newest / "lorweb.safetensors", half / "lorweb.safetensors")
    assert training.latest_checkpoint(tmp_path) == newest
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found, state = prepare_output(dataclasses.replace(cfg, resume=True))
    assert found == newest and state["step"] == 4


RESUME_MAY_CHANGE = {"steps", "resume", "overwrite", "progress", "num_workers", "cudnn_attention",
                     "gradient_checkpointing", "keep_checkpoints", "keep_milestone_every", "checkpoint_every", "save_dtype", "nan_loss", "out"}


@pytest.mark.parametrize("stored,now", [({"cudnn_attention": True}, {}), ({}, {"keep_milestone_every": 0}),
                                        ({}, {"nan_loss": "raise"}), ({"overwrite": True}, {})])
def test_options_that_change_no_computed_value_may_change_on_resume(tmp_path, stored, now):
    """RESUME_MAY_DIFFER: the attention kernel choice, the milestone spacing, the NaN policy, and --overwrite (a run
    started with --overwrite is continued with --resume) do not block a resume."""
    ckpt = fake_checkpoint(tmp_path, 2, small_train_config(tmp_path, **stored))
    found, state = prepare_output(small_train_config(tmp_path, resume=True, **now))
    assert found == ckpt and state["step"] == 2


def test_every_other_config_field_blocks_a_resume(tmp_path):
    """Any field outside the documented set (the step budget and options that change no computed value) differing
    from the checkpoint's config refuses the resume, naming that field; nothing on disk changes (``out`` itself is
    where the checkpoint is looked for)."""
    cfg = small_train_config(tmp_path)
    fake_checkpoint(tmp_path, 2, cfg)
    before = file_tree(tmp_path)
    others = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in RESUME_MAY_CHANGE | {"out"}]
    assert len(others) > 40
    for name in others:
        with pytest.raises(ValueError, match=rf"differs from .* in {name}: .* -> 'changed'"):
            prepare_output(dataclasses.replace(cfg, resume=True, **{name: "changed"}))
    assert file_tree(tmp_path) == before


def test_older_train_config_json_may_differ_in_the_step_budget(tmp_path):
    """A checkpoint without a stored config is compared with train_config.json (every field): the fields that may
    differ on resume are left out of that comparison too."""
    cfg = small_train_config(tmp_path)
    ckpt = fake_checkpoint(tmp_path, 2, cfg, state={"step": 2, "optimizer": {"state": {}, "param_groups": []}})
    (tmp_path / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), default=str))
    found, state = prepare_output(dataclasses.replace(cfg, resume=True, steps=20, num_workers=3))
    assert found == ckpt and state["step"] == 2


@pytest.mark.parametrize("extra", [{"data_position": 0, "num_processes": 1}, {"data_position": 5, "num_processes": 3}])
def test_valid_stream_positions_are_accepted(tmp_path, extra):
    """data_position 0 (the stream's start) and a single process are valid trainer-state values."""
    cfg = small_train_config(tmp_path)
    state = {"step": 2, "optimizer": {"state": {}, "param_groups": []}, "config": training._comparable_config(cfg),
             **extra}
    ckpt = fake_checkpoint(tmp_path, 2, cfg, state=state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found, got = prepare_output(dataclasses.replace(cfg, resume=True))
    assert found == ckpt and {k: got[k] for k in extra} == extra


@pytest.mark.parametrize("corruption", ["step missing", "step a string", "optimizer without groups",
                                        "data position True"])
def test_malformed_trainer_states_fall_back(tmp_path, corruption):
    """A trainer state without an integer step, with an optimizer state lacking its keys, or with a bool as data
    position is not resumable: the previous checkpoint is used, with a warning naming the file."""
    cfg = small_train_config(tmp_path)
    older = fake_checkpoint(tmp_path, 2, cfg)
    state = {"step": 4, "optimizer": {"state": {}, "param_groups": []}, "config": training._comparable_config(cfg)}
    if corruption == "step missing":
        del state["step"]
    elif corruption == "step a string":
        state["step"] = "4"
    elif corruption == "optimizer without groups":
        state["optimizer"] = {"state": {}}
    else:
        state["data_position"] = True
    fake_checkpoint(tmp_path, 4, cfg, state=state)
    with pytest.warns(UserWarning, match=r"cannot resume from step-00000004: .*trainer_state.pt.*falling back"):
        found, got = prepare_output(dataclasses.replace(cfg, resume=True))
    assert found == older and got["step"] == 2


class PickledNote:
    """An object a trainer state should never hold: unpickling it needs a global outside torch's allowlist."""

    def __init__(self, text: str = "note"):
        self.text = text


def test_trainer_state_pickling_other_objects_is_not_unpickled(tmp_path):
    """Trainer states load with ``weights_only=True``: one that pickles an arbitrary object (a shared run folder could
    run code when unpickled) is not resumed from; the warning names the global and torch's allowlist, and the previous
    checkpoint is used. Allowed with ``torch.serialization.safe_globals``, the same file resumes."""
    cfg = small_train_config(tmp_path)
    older = fake_checkpoint(tmp_path, 2, cfg)
    state = {"step": 4, "optimizer": {"state": {}, "param_groups": []}, "config": training._comparable_config(cfg),
             "note": PickledNote()}
    newer = fake_checkpoint(tmp_path, 4, cfg, state=state)
    with pytest.warns(UserWarning, match=r"cannot resume from step-00000004: .*trainer_state.pt pickles objects "
                                         r"other than tensors .*PickledNote.*add_safe_globals"):
        found, got = prepare_output(dataclasses.replace(cfg, resume=True))
    assert found == older and got["step"] == 2
    with torch.serialization.safe_globals([PickledNote]):
        found, got = prepare_output(dataclasses.replace(cfg, resume=True))
    assert found == newer and got["step"] == 4 and got["note"].text == "note"


def test_trainer_state_that_is_no_pickle_is_called_corrupt(tmp_path):
    """Bytes that are no torch file at all are 'empty or corrupt', not an unsafe pickle."""
    cfg = small_train_config(tmp_path)
    older = fake_checkpoint(tmp_path, 2, cfg)
    newer = fake_checkpoint(tmp_path, 4, cfg)
    (newer / "trainer_state.pt").write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match=r"step-00000004: .*trainer_state.pt is empty or corrupt"):
        found, _ = prepare_output(dataclasses.replace(cfg, resume=True))
    assert found == older


# ------------------------------------------------------------------------------------------- prepare_output
def test_out_that_is_a_file_is_refused(tmp_path):
    """--out naming a file is an error naming it; the file is left as it was."""
    path = tmp_path / "run"
    path.write_bytes(b"notes")
    with pytest.raises(ValueError, match=r"run is a file; give a folder"):
        prepare_output(small_train_config(path, overwrite=True))
    assert path.read_bytes() == b"notes"


def test_only_the_main_process_deletes_anything(tmp_path):
    """With ``main_process=False`` neither leftover temporaries nor (with --overwrite) the run itself are removed:
    rank 0 does that, the other processes only read."""
    cfg = small_train_config(tmp_path)
    fake_checkpoint(tmp_path, 2, cfg)
    (tmp_path / "checkpoints" / ".tmp-step-00000004-x").mkdir()
    (tmp_path / ".lorweb.safetensors.tmp").write_bytes(b"partial")
    (tmp_path / "loss.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    before = file_tree(tmp_path)
    assert prepare_output(dataclasses.replace(cfg, resume=True), main_process=False)[1]["step"] == 2
    assert prepare_output(dataclasses.replace(cfg, overwrite=True), main_process=False) == (None, None)
    assert file_tree(tmp_path) == before


def test_an_empty_loss_log_is_not_a_run(tmp_path):
    """A loss.jsonl with nothing in it (created, never written) does not make --out a used run folder."""
    (tmp_path / "loss.jsonl").write_text("")
    assert prepare_output(small_train_config(tmp_path)) == (None, None)


def test_resume_of_a_finished_run_is_allowed(tmp_path):
    """A checkpoint exactly at --steps resumes (nothing left to train); only beyond it is refused."""
    cfg = small_train_config(tmp_path, steps=6)
    ckpt = fake_checkpoint(tmp_path, 6, cfg)
    assert prepare_output(dataclasses.replace(cfg, resume=True)) == (ckpt, training._read_trainer_state(ckpt))


# -------------------------------------------------------------------------------------------- writing
def _write(out, step, model, *, keep=4, **kw):
    """``_write_checkpoint`` of ``model``'s LoRWeB tensors in fp32 with an empty optimizer state."""
    return training._write_checkpoint(out, step, model, lf.lorweb_state_dict(model),
                                      {"state": {}, "param_groups": []}, {}, keep, **kw)


@pytest.mark.parametrize("keep,milestone_every,want", [(0, 0, [1, 2, 3, 4, 5]), (2, 0, [4, 5]), (1, 2, [2, 4, 5])])
def test_rotation_keeps_all_for_keep_zero(tmp_path, keep, milestone_every, want):
    """keep 0 keeps every checkpoint; otherwise the newest ``keep`` and the milestones stay, and the returned list
    names exactly the deleted folders."""
    for step in range(1, 6):
        (tmp_path / "checkpoints" / f"step-{step:08d}").mkdir(parents=True)
    deleted = training.rotate_checkpoints(tmp_path, keep, milestone_every)
    assert [int(p.name[5:]) for p in training.checkpoint_dirs(tmp_path)] == want
    assert sorted(int(p.name[5:]) for p in deleted) == sorted(set(range(1, 6)) - set(want))


def test_a_checkpoint_rewritten_at_the_same_step_replaces_the_old_one(tmp_path):
    """Resuming from an older checkpoint (the newest was corrupt) writes a step folder that exists: it is
    replaced, the trainer state records what this write was given, and no temporary folder is left."""
    model = tiny_lorweb_linear_model()
    _write(tmp_path, 4, model, data_position=8, num_processes=2)
    with torch.no_grad():
        model[0].lora_B.add_(1.0)
    final = _write(tmp_path, 4, model, config={"seed": 3}, data_position=12, num_processes=3,
                   grad_scaler={"scale": 8.0})
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000004"]
    state = torch.load(final / "trainer_state.pt", weights_only=True)
    assert (state["step"], state["config"], state["data_position"], state["num_processes"], state["grad_scaler"]) \
        == (4, {"seed": 3}, 12, 3, {"scale": 8.0})
    written = load_file(str(final / "lorweb.safetensors"))
    assert torch.equal(written["transformer.0.lora_B"], model[0].lora_B)


def test_a_failed_rename_over_an_existing_step_folder_keeps_the_old_one(tmp_path, monkeypatch):
    """The step folder being replaced is moved aside, not deleted, until the new one is in place: a rename that
    fails puts it back byte for byte and leaves no temporary folder; the next write replaces it and removes it."""
    model = tiny_lorweb_linear_model()
    old = _write(tmp_path, 4, model)
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    with torch.no_grad():
        model[0].lora_B.add_(1.0)
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src).name.startswith(".tmp-step-") and not Path(src).name.endswith("-replaced"):
            raise OSError(errno.EIO, "I/O error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="step-00000004"):
        _write(tmp_path, 4, model)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000004"]
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    monkeypatch.setattr(os, "replace", real_replace)
    _write(tmp_path, 4, model)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000004"]
    assert torch.equal(load_file(str(old / "lorweb.safetensors"))["transformer.0.lora_B"], model[0].lora_B)


def test_a_step_folder_moved_aside_by_a_killed_run_goes_back_at_the_next_start(tmp_path):
    """A run killed between ``_write_checkpoint``'s two renames leaves the old step folder under its
    ``.tmp-step-*-replaced`` name and no ``step-N``: the next start puts it back (and removes the half-written new
    one), and resumes from it; one whose step folder did come back, or a file moved aside, is removed."""
    cfg = small_train_config(tmp_path, steps=6)
    old = fake_checkpoint(tmp_path, 4, cfg)
    root = tmp_path / "checkpoints"
    before = file_tree(old)
    os.replace(old, root / ".tmp-step-00000004-ab_1-replaced")
    (root / ".tmp-step-00000004-ab_1").mkdir()  # the new one, never renamed
    (root / ".tmp-step-00000002-cd_2-replaced").write_bytes(b"a file moved aside")
    ckpt, _ = prepare_output(dataclasses.replace(cfg, resume=True))
    assert ckpt == old and file_tree(old) == before
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004"]


@pytest.mark.parametrize("name", ["lorweb.safetensors", "config.yaml"])
def test_a_crash_while_copying_the_top_level_files_keeps_the_previous_ones(tmp_path, monkeypatch, name):
    """``out/lorweb.safetensors`` and ``out/config.yaml`` are replaced by a rename of a finished copy: a copy that
    dies half-way leaves the previous file intact (and the new step's folder complete)."""
    model = tiny_lorweb_linear_model()
    _write(tmp_path, 2, model, settings={"num_loras": 2})
    previous = (tmp_path / name).read_bytes()
    real_copy = shutil.copyfile

    def dying_copy(src, dst, *args, **kwargs):
        if Path(src).name == name:
            Path(dst).write_bytes(Path(src).read_bytes()[:10])
            raise OSError("disk full")
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(training.shutil, "copyfile", dying_copy)
    with torch.no_grad():
        model[0].lora_A.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        _write(tmp_path, 4, model, settings={"num_loras": 2})
    assert (tmp_path / name).read_bytes() == previous
    assert (tmp_path / "checkpoints" / "step-00000004" / "trainer_state.pt").is_file()


# -------------------------------------------------------------------------------------------- optimizer
def _stepped_adamw(params, lr):
    """AdamW over ``params`` after two steps of a fixed loss."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    for _ in range(2):
        sum(((k + 1) * p ** 2).sum() for k, p in enumerate(params)).backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_optimizer_state_keeps_group_settings_and_follows_names_not_order():
    """The by-name state carries the group hyper-parameters (lr, weight decay, betas), and it loads into an
    optimizer that lists the same parameters in another order: each state goes to the parameter of its name."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(4))]
    names = ["a", "b", "c"]
    opt = _stepped_adamw(params, lr=0.123)
    state = training.optimizer_state_dict(None, opt, names, sharded=False)
    order = [2, 0, 1]
    fresh = torch.optim.AdamW([nn.Parameter(params[i].detach().clone()) for i in order], lr=1e-2, weight_decay=0.5)
    training.load_optimizer_state_dict(None, fresh, state, [names[i] for i in order], sharded=False)
    group = fresh.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (0.123, 0.05, (0.9, 0.999))
    for slot, i in enumerate(order):
        assert torch.equal(fresh.state[fresh.param_groups[0]["params"][slot]]["exp_avg"],
                           opt.state[params[i]]["exp_avg"])


# ----------------------------------------------------------------------------------------- quantization
def _diffusers_quantizer(method):
    """A stand-in for a diffusers model's ``hf_quantizer`` whose config has ``quant_method`` (an enum, as diffusers'
    ``QuantizationMethod``, whose ``value`` is the name)."""
    return types.SimpleNamespace(quantization_config=types.SimpleNamespace(
        quant_method=types.SimpleNamespace(value=method)))


@pytest.mark.parametrize("module,kind", [
    (module_from_package("optimum.quanto.nn.qlinear"), "quanto"),
    (module_from_package("bitsandbytes.nn.modules"), "bitsandbytes"),
    (module_from_package("torchao.quantization"), "torchao"),
    (module_from_package("diffusers.quantizers.gguf.utils"), "gguf"),
    (module_from_package("torch.nn", is_quantized=True, hf_quantizer=_diffusers_quantizer("bf16_fp8")), "bf16_fp8"),
    (module_from_package("torch.nn", is_quantized=True), "an unknown diffusers quantizer"),
    (module_from_package("torch.nn"), None)],
    ids=["quanto", "bitsandbytes", "torchao", "gguf", "diffusers_config", "is_quantized", "plain"])
def test_quantization_kind(module, kind):
    """optimum-quanto, bitsandbytes, torchao and diffusers' GGUF layers are told apart by their package (a GGUF or
    torchao model is not "bitsandbytes", which quantize_base int8 / nf4 mean); another diffusers ``is_quantized``
    model by its config's ``quant_method``; a plain module is not quantized."""
    assert training.quantization_kind(module) == kind


def test_given_pipeline_must_be_quantized_as_asked():
    """quantize_base "none" checks nothing; "int8" needs a bitsandbytes transformer and names the problem."""
    plain = type("Pipe", (), {"transformer": module_from_package("torch.nn")})()
    training._check_given_quantization(object(), "none")  # no components to look at: nothing is checked
    with pytest.raises(ValueError, match="quantize_base='int8' but the given pipeline's transformer is not quantized"):
        training._check_given_quantization(plain, "int8")
    pipe = type("Pipe", (), {"transformer": module_from_package("bitsandbytes.nn")})()
    training._check_given_quantization(pipe, "int8")


# -------------------------------------------------------------------------------------- injected layers
@pytest.mark.parametrize("over,field", [({}, None), ({"lora_alpha": 5.0}, "lora_alpha"),
                                        ({"activation": "tanh"}, "activation"), ({"key_dim": 4}, "key_dim")])
def test_injected_layers_are_checked_against_the_config(over, field):
    """Layers injected before ``train`` must match the config (lora_alpha is the rank, as the saved config.yaml
    says); without an encoder yet (query_dim None) the query width is not compared. A mismatch names the
    setting and leaves the layers untouched."""
    model = tiny_lorweb_linear_model(**{"num_loras": 4, "rank": 2, "key_dim": 8, "query_dim": 3, **over})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(data="d", out="o", num_loras=4, rank=2, key_dim=8)
    if field is None:
        training._check_injected_layers(model, cfg, None)
        training._check_injected_layers(model, cfg, 3)
        with pytest.raises(ValueError, match=r"query_dim: layer 3, config 5"):
            training._check_injected_layers(model, cfg, 5)
    else:
        with pytest.raises(ValueError, match=rf"LoRWeB layers differ from the training config \(0: {field}: "):
            training._check_injected_layers(model, cfg, None)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------------ loss log
def test_loss_log_rows_need_step_and_loss(tmp_path):
    """Blank lines are not torn lines; a row without a loss, or a line cut short, is left out with a warning that
    counts them."""
    log = tmp_path / "loss.jsonl"
    log.write_text('{"step": 1, "loss": 0.5}\n\n{"step": 2}\n{"step": 3, "loss": null}\n\n{"step": 4, "lo')
    with pytest.warns(UserWarning, match="2 incomplete line"):
        rows = training._loss_rows(log)
    assert [r for _, r in rows] == [{"step": 1, "loss": 0.5}, {"step": 3, "loss": None}]
    log.write_text('{"step": 1, "loss": 0.5}\n\n')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(training._loss_rows(log)) == 1


# --------------------------------------------------------------------------------------------- the query
def test_batch_query_encodes_the_control_grids_with_training_crops():
    """Official (SDTrainer.py ``before_unet_predict``): the query comes from the control grids with the training
    crops; an encoder without ``query_source`` is a grid encoder."""
    calls = []

    class Encoder:
        def query_from_grid(self, grids, crops):
            calls.append((grids, crops))
            return torch.ones(len(grids), 3)

    batch = {"control": ["c0", "c1"], "target": ["t0", "t1"]}
    assert torch.equal(training.batch_query(Encoder(), batch, "cpu"), torch.ones(2, 3))
    assert calls == [(["c0", "c1"], "training")]


# ------------------------------------------------------------------------------------------- evaluation
def test_evaluation_loss_uses_fixed_bucket_batches_seeds_and_no_caption_dropout(monkeypatch):
    """``evaluation_loss`` is a deterministic yardstick: the batches of a sampler seeded by ``seed`` with the
    config's bucket grouping, one generator seeded ``seed + batch`` per batch, caption dropout off (the caller's
    config is not changed), and the mean of the batch losses."""
    keys = [(8, 8), (8, 4), (8, 8), (8, 4), (8, 8), (8, 4), (8, 8)]

    class Folder:
        samples = [(None,) * 4 + (key,) for key in keys]

        def __len__(self):
            return len(keys)

        def grid_size(self, key):
            return key

        def __getitem__(self, i):
            image = Image.new("RGB", keys[i])
            return {"control": image, "target": image, "caption": f"c{i}", "name": i}

    seen = []

    def fake_loss(transformer, pipe, batch, query, cfg, generator):
        seen.append((batch["name"], cfg.caption_dropout, generator.initial_seed(), query.shape[0]))
        return torch.tensor(float(len(seen)))

    monkeypatch.setattr(training, "flow_matching_loss", fake_loss)
    monkeypatch.setattr(training, "batch_query", lambda encoder, batch, device: torch.zeros(len(batch["name"]), 1))
    pipe = type("Pipe", (), {"transformer": type("T", (), {"device": torch.device("cpu")})()})()
    cfg = small_train_config("o", batch_size=2, caption_dropout=0.3)
    assert cfg.batching == "bucket"
    loss = training.evaluation_loss(pipe, None, Folder(), cfg, batches=3, seed=11)
    want = StepBatchSampler(len(keys), 2, seed=11, start_step=0, total_steps=3, groups=keys)
    assert [s[0] for s in seen] == [want.batch(k) for k in range(3)]
    assert [s[1:] for s in seen] == [(0.0, 11 + k, len(want.batch(k))) for k in range(3)]
    assert loss == 2.0 and cfg.caption_dropout == 0.3


# -------------------------------------------------------------------------------- what a checkpoint records
def test_recorded_locations_are_absolute_for_local_paths_only(tmp_path, monkeypatch):
    """A local model folder is recorded as an absolute path (also when given relative); a hub id, which is no local
    path, is recorded unchanged, and so is a ``~`` path (never expanded: the loaders take it as given)."""
    (tmp_path / "models" / "clip").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    want = str((tmp_path / "models" / "clip").resolve())
    assert training.recorded_location("models/clip") == want
    assert training.recorded_location("~/models/clip") == "~/models/clip"
    assert training.recorded_location("openai/clip-vit-large-patch14") == "openai/clip-vit-large-patch14"


def test_checkpoint_settings_carry_every_lorweb_setting_of_the_config():
    """config.yaml's LoRWeB settings are the run's: each field from the config, lora_alpha the rank as a float
    (scale alpha / rank = 1, as the trained layers use), and the encoder as given."""
    cfg = TrainConfig(data="d", out="o", num_loras=5, rank=3, key_dim=12, heads=2, activation="tanh", reduce="sum",
                      query_mode="cat-aa'b", pooling_type="avg", query_projection_type="none")
    assert training.checkpoint_settings(cfg, "enc") == {
        "num_loras": 5, "rank": 3, "lora_alpha": 3.0, "key_dim": 12, "heads": 2, "activation": "tanh",
        "reduce": "sum", "query_mode": "cat-aa'b", "pooling_type": "avg", "query_projection_type": "none",
        "encoder": "enc"}


@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap"])
def test_diffusers_timesteps_carry_the_schemes_loss_weight(scheme):
    """timestep_type "diffusers": t from ``compute_density_for_timestep_sampling`` and the weight of
    ``compute_loss_weighting_for_sd3`` at that t (not 1: these schemes weight the loss)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    cfg = TrainConfig(data="d", out="o", timestep_type="diffusers", weighting_scheme=scheme)
    t, weight = training.sample_timesteps(cfg, 8, torch.Generator().manual_seed(3))
    want_t = compute_density_for_timestep_sampling(scheme, 8, 0.0, 1.0, 1.29,
                                                   generator=torch.Generator().manual_seed(3))
    want_w = compute_loss_weighting_for_sd3(scheme, want_t).float()
    assert torch.equal(t, want_t.float()) and torch.equal(weight, want_w) and not torch.equal(want_w, torch.ones(8))


@pytest.mark.parametrize("groups", [None, ["a", "b", "a", "b", "a"]])
def test_every_accepted_seed_draws_batches(groups):
    """--seed accepts [0, 2**63 - 1]; the seeds derived from it (seed * 7919 + ..., seed * 1_000_003 + ...)
    overflowed torch.Generator.manual_seed for seeds above ~1.8e13, after the models had loaded. They are taken
    modulo 2**64 (training.derived_seed): the largest seed draws batches, and a seed whose derived values fit draws
    exactly what it drew before."""
    from lorweb_fast.training import StepBatchSampler, derived_seed

    big = list(StepBatchSampler(5, 2, seed=2 ** 63 - 1, start_step=0, total_steps=6, groups=groups))
    assert len(big) == 6 and all(0 <= i < 5 for batch in big for i in batch)
    assert derived_seed(12345 * 1_000_003 + 7) == 12345 * 1_000_003 + 7
    assert derived_seed((2 ** 63 - 1) * 1_000_003) < 2 ** 64
    torch.Generator().manual_seed(derived_seed((2 ** 63 - 1) * 1_000_003 + 10 ** 6 * 1009 + 7))
