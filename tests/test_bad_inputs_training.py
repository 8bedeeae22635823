"""Training runs that must not get mixed up (issue 16): a used --out needs --resume or --overwrite, a resume with a
different training config is refused naming the fields, stray folders under checkpoints/ are ignored, an empty or
corrupt newest checkpoint falls back to the previous complete one with a warning, leftover temporary folders are
removed; TrainConfig refuses every out-of-range or non-finite value. Most cases need no model (``prepare_output``
runs before any model loads); one end-to-end run checks that the fallback resume is still bit-identical."""

import dataclasses
import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from lorweb_fast import _files, demo, training
from lorweb_fast.official_config import CONFIG_NAME
from lorweb_fast.model import save_lorweb_weights
from lorweb_fast.testing import (fake_checkpoint, file_tree, hold_folder_lock, small_train_config,
                                 tiny_lorweb_linear_model, tiny_train_config, tiny_training_assets)
from lorweb_fast.training import TrainConfig, prepare_output


# ------------------------------------------------------------------------------------------ used --out
@pytest.mark.parametrize("what", ["checkpoint", "weights", "loss"])
def test_used_out_is_refused_without_resume_or_overwrite(tmp_path, what):
    cfg = small_train_config(tmp_path)
    if what == "checkpoint":
        fake_checkpoint(tmp_path, 2, cfg)
    elif what == "weights":
        (tmp_path / "lorweb.safetensors").write_bytes(b"old")
    else:
        (tmp_path / "loss.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    before = file_tree(tmp_path)
    with pytest.raises(ValueError, match="already holds a training run.*--resume.*--overwrite"):
        prepare_output(cfg)
    assert file_tree(tmp_path) == before


def test_overwrite_removes_only_the_run(tmp_path):
    cfg = small_train_config(tmp_path, overwrite=True)
    fake_checkpoint(tmp_path, 2, cfg)
    for name in training.RUN_FILES:
        (tmp_path / name).write_text("old")
    (tmp_path / "my_notes.txt").write_text("keep")
    assert prepare_output(cfg) == (None, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_notes.txt"]


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_over(tmp_path, caplog):
    (tmp_path / "loss.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with caplog.at_level("WARNING", logger="lorweb_fast.training"):
        assert prepare_output(small_train_config(tmp_path, resume=True)) == (None, None)
    assert "starting from step 0" in caplog.text


@pytest.mark.parametrize("held", ["checkpoint_without_trainer_state", "top_level_weights"])
def test_resume_refuses_weights_it_cannot_continue_instead_of_overwriting_them(tmp_path, held):
    """--resume where trained weights exist but no checkpoint holds both weights and trainer state (the trainer state
    deleted to save space, or only the final lorweb.safetensors kept) is refused naming what is there: starting at
    step 0 would overwrite those weights. Nothing is changed."""
    cfg = small_train_config(tmp_path, resume=True)
    if held == "top_level_weights":
        save_lorweb_weights(tiny_lorweb_linear_model(), tmp_path / "lorweb.safetensors")
    else:
        (fake_checkpoint(tmp_path, 4, cfg) / "trainer_state.pt").unlink()
    before = file_tree(tmp_path)
    shown = "step-00000004" if held != "top_level_weights" else "lorweb.safetensors"
    with pytest.raises(ValueError, match=rf"--resume: .* holds trained weights \({shown}\) but no checkpoint with both "
                                         r"lorweb.safetensors and trainer_state.pt.*pass --overwrite"):
        prepare_output(cfg)
    assert file_tree(tmp_path) == before


# -------------------------------------------------------------------------------------- resume config check
CHANGES = [("learning_rate", 5e-3), ("rank", 4), ("num_loras", 8), ("seed", 3), ("data", "other_data"),
           ("batch_size", 3), ("weighting_scheme", "logit_normal"), ("betas", (0.8, 0.9)), ("caption_dropout", 0.2),
           ("optimizer", "adamw"), ("model", "other_model"), ("long_edge", 128), ("batching", "mixed")]


@pytest.mark.parametrize("field,value", CHANGES)
def test_resume_with_a_different_config_is_refused_naming_the_field(tmp_path, field, value):
    cfg = small_train_config(tmp_path)
    fake_checkpoint(tmp_path, 2, cfg)
    before = file_tree(tmp_path)
    with pytest.raises(ValueError, match=rf"differs from .*trainer_state.pt in {field}: "):
        prepare_output(dataclasses.replace(cfg, resume=True, **{field: value}))
    assert file_tree(tmp_path) == before


def test_resume_names_every_differing_field(tmp_path):
    cfg = small_train_config(tmp_path)
    fake_checkpoint(tmp_path, 2, cfg)
    with pytest.raises(ValueError, match="learning_rate: 0.01 -> 0.02, rank: 2 -> 3"):
        prepare_output(dataclasses.replace(cfg, resume=True, learning_rate=2e-2, rank=3))


@pytest.mark.parametrize("field,value", [("steps", 20), ("num_workers", 3), ("progress", True),
                                         ("checkpoint_every", 3), ("save_dtype", "fp32")])
def test_resume_may_change_the_step_budget(tmp_path, field, value):
    """The step budget and options that change no computed value: how often checkpoints are written, the dtype of
    the saved weights files (the trainer state keeps the fp32 masters a resume loads)."""
    cfg = small_train_config(tmp_path)
    ckpt = fake_checkpoint(tmp_path, 2, cfg)
    found, state = prepare_output(dataclasses.replace(cfg, resume=True, **{field: value}))
    assert found == ckpt and state["step"] == 2


def test_resume_may_change_how_many_checkpoints_are_kept(tmp_path):
    """keep_checkpoints changes no computed value (as keep_milestone_every): a run whose disk fills up can resume
    keeping fewer checkpoints."""
    cfg = small_train_config(tmp_path, keep_checkpoints=4)
    ckpt = fake_checkpoint(tmp_path, 2, cfg)
    found, state = prepare_output(dataclasses.replace(cfg, resume=True, keep_checkpoints=1))
    assert found == ckpt and state["step"] == 2


def test_resume_compares_folders_not_how_they_are_spelled(tmp_path, monkeypatch):
    """--data, --model and --encoder name the same folders as ``DIR``, ``DIR/`` (shell completion) or ``./DIR`` from
    the same directory; ``--out`` is where the checkpoint is found, so a run folder written as ``runs/x/`` or moved
    elsewhere resumes. Another data folder is still refused, naming it."""
    monkeypatch.chdir(tmp_path)
    for name in ("data", "other_data", "pipe", "clip"):
        (tmp_path / name).mkdir()
    cfg = small_train_config(tmp_path / "runs" / "x", data="data", model="pipe", encoder="clip")
    fake_checkpoint(tmp_path / "runs" / "x", 2, cfg)
    spelled = dict(data=str(tmp_path / "data") + "/", model="./pipe", encoder=str(tmp_path / "clip"))
    found, state = prepare_output(dataclasses.replace(cfg, resume=True, out="runs/x/", **spelled))
    assert found.name == "step-00000002" and state["step"] == 2
    (tmp_path / "runs" / "x").rename(tmp_path / "moved")
    found, state = prepare_output(dataclasses.replace(cfg, resume=True, out=str(tmp_path / "moved")))
    assert found == tmp_path / "moved" / "checkpoints" / "step-00000002" and state["step"] == 2
    with pytest.raises(ValueError, match=r"in data: '.*/data' -> '.*/other_data'"):
        prepare_output(dataclasses.replace(cfg, resume=True, out="moved", data="other_data"))


def test_a_given_encoder_with_another_query_is_refused_before_overwrite_deletes_the_old_run(tmp_path):
    """train(cfg, encoder=...) checks the given encoder's query settings before --overwrite deletes anything (it used
    to delete the old run, load the pipeline, then refuse the encoder)."""
    demo.make_synthetic_analogies(tmp_path / "data", 2)
    out = tmp_path / "run"
    cfg = small_train_config(out, data=str(tmp_path / "data"), overwrite=True)
    fake_checkpoint(out, 2, cfg)
    (out / "loss.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    before = file_tree(out)
    encoder = SimpleNamespace(query_mode="caa'b", pooling_type="avg", query_source="grid", query_dim=24)
    with pytest.raises(ValueError, match=r"the encoder's \(query_mode, pooling_type, query_source\) = \(\"caa'b\""):
        training.train(cfg, encoder=encoder)
    assert file_tree(out) == before


def test_a_key_dim_other_than_the_encoders_width_without_projection_is_refused_before_overwrite(tmp_path,
                                                                                               monkeypatch):
    """query_projection_type 'none' feeds the encoder's queries to the keys, so key_dim must be the encoder's query
    width: refused naming both before --overwrite deletes the old run and before the FLUX pipeline loads (it used to
    fail at injection, after both)."""
    from lorweb_fast import flux

    demo.make_synthetic_analogies(tmp_path / "data", 2)
    demo.build_tiny_clip(tmp_path / "clip")
    out = tmp_path / "run"
    cfg = small_train_config(out, data=str(tmp_path / "data"), encoder=str(tmp_path / "clip"),
                             query_projection_type="none", key_dim=8, heads=1, overwrite=True)
    fake_checkpoint(out, 2, cfg)
    (out / "loss.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    before = file_tree(out)

    def no_pipeline(*args, **kwargs):
        raise AssertionError("the FLUX pipeline was loaded before the key_dim check")

    monkeypatch.setattr(training, "load_training_pipeline", no_pipeline)
    width = flux.AnalogyEncoder(str(tmp_path / "clip")).query_dim
    assert width != 8
    with pytest.raises(ValueError, match=rf"key_dim must be {width} with query_projection_type 'none', got 8: .*"
                                         rf"pass --key-dim {width}"):
        training.train(cfg)
    assert file_tree(out) == before
    with pytest.raises(AssertionError, match="pipeline was loaded"):  # positive control: the matching width passes
        training.train(dataclasses.replace(cfg, key_dim=width))


def test_resume_checks_train_config_json_for_older_checkpoints(tmp_path):
    cfg = small_train_config(tmp_path)
    fake_checkpoint(tmp_path, 2, cfg, state={"step": 2, "optimizer": {"state": {}, "param_groups": []}})
    (tmp_path / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), default=str))
    with pytest.raises(ValueError, match="train_config.json in rank"):
        prepare_output(dataclasses.replace(cfg, resume=True, rank=8))


def test_resume_of_a_run_from_before_bucket_batching_names_batching(tmp_path):
    """A checkpoint whose stored config has no ``batching`` field was trained with batches across buckets ("mixed"),
    not with today's default: resuming with the default is refused naming the field, ``--batching mixed`` resumes."""
    cfg = small_train_config(tmp_path, batching="mixed")
    stored = {k: v for k, v in training._comparable_config(cfg).items() if k != "batching"}
    fake_checkpoint(tmp_path, 2, cfg, state={"step": 2, "optimizer": {"state": {}, "param_groups": []},
                                             "config": stored})
    with pytest.raises(ValueError, match=r"in batching: 'mixed' -> 'bucket' \(pass --batching mixed to resume it\)"):
        prepare_output(dataclasses.replace(cfg, resume=True, batching="bucket"))
    found, state = prepare_output(dataclasses.replace(cfg, resume=True))
    assert state["step"] == 2


def test_resume_of_a_run_from_before_missing_caption_names_it(tmp_path):
    """Before ``missing_caption`` existed a sample without a caption was an error (skipped with --skip-bad): a run
    that lacks the field resumes with ``--missing-caption raise`` only, not with today's "empty" (which could add
    the samples it skipped)."""
    cfg = small_train_config(tmp_path, missing_caption="raise", skip_bad=True)
    stored = {k: v for k, v in training._comparable_config(cfg).items() if k != "missing_caption"}
    fake_checkpoint(tmp_path, 2, cfg, state={"step": 2, "optimizer": {"state": {}, "param_groups": []},
                                             "config": stored})
    with pytest.raises(ValueError, match=r"in missing_caption: 'raise' -> 'empty' \(pass --missing-caption raise to "
                                         r"resume it\)"):
        prepare_output(dataclasses.replace(cfg, resume=True, missing_caption="empty"))
    found, state = prepare_output(dataclasses.replace(cfg, resume=True))
    assert state["step"] == 2


def test_resume_beyond_the_step_budget_is_refused(tmp_path):
    cfg = small_train_config(tmp_path)
    fake_checkpoint(tmp_path, 6, cfg)
    before = file_tree(tmp_path)
    with pytest.raises(ValueError, match="at step 6, beyond --steps 4"):
        prepare_output(dataclasses.replace(cfg, resume=True, steps=4))
    assert file_tree(tmp_path) == before


# -------------------------------------------------------------------------------- checkpoints/ contents
@pytest.mark.parametrize("stray", ["step-foo", "notes", "step-12-old", "step-", "backup_step-00000009",
                                   "step-00000009.bak"])
def test_stray_folders_under_checkpoints_are_ignored(tmp_path, stray):
    cfg = small_train_config(tmp_path)
    good = fake_checkpoint(tmp_path, 4, cfg)
    (tmp_path / "checkpoints" / stray).mkdir()
    (tmp_path / "checkpoints" / stray / "trainer_state.pt").write_bytes(b"junk")
    (tmp_path / "checkpoints" / stray / "lorweb.safetensors").write_bytes(b"junk")
    assert training.checkpoint_dirs(tmp_path) == [good]
    assert training.latest_checkpoint(tmp_path) == good
    assert prepare_output(dataclasses.replace(cfg, resume=True))[0] == good
    assert (tmp_path / "checkpoints" / stray).is_dir()  # not ours: left alone


@pytest.mark.parametrize("corruption", ["empty", "garbage", "not a dict", "no optimizer", "weights corrupt",
                                        "bad data position", "bad process count"])
def test_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path, corruption):
    cfg = small_train_config(tmp_path)
    older = fake_checkpoint(tmp_path, 2, cfg)
    newest = fake_checkpoint(tmp_path, 4, cfg)
    bad_file = newest / ("lorweb.safetensors" if corruption == "weights corrupt" else "trainer_state.pt")
    if corruption == "empty":
        bad_file.write_bytes(b"")
    elif corruption in ("garbage", "weights corrupt"):
        bad_file.write_bytes(b"\x80\x02 definitely not a checkpoint")
    elif corruption == "not a dict":
        torch.save([1, 2, 3], bad_file)
    elif corruption in ("bad data position", "bad process count"):  # resume across process counts
        bad_position = corruption == "bad data position"
        torch.save({"step": 4, "optimizer": {"state": {}, "param_groups": []},
                    "config": training._comparable_config(cfg), "data_position": -8 if bad_position else 8,
                    "num_processes": 2 if bad_position else 0}, bad_file)
    else:
        torch.save({"step": 4}, bad_file)
    with pytest.warns(UserWarning, match=rf"cannot resume from step-00000004: .*{bad_file.name}.*falling back"):
        found, state = prepare_output(dataclasses.replace(cfg, resume=True))
    assert found == older and state["step"] == 2


def test_all_checkpoints_corrupt_is_an_error_naming_the_files(tmp_path):
    cfg = small_train_config(tmp_path)
    for step in (2, 4):
        (fake_checkpoint(tmp_path, step, cfg) / "trainer_state.pt").write_bytes(b"")
    before = file_tree(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="no usable checkpoint.*step-00000004.*step-00000002"):
            prepare_output(dataclasses.replace(cfg, resume=True))
    assert file_tree(tmp_path) == before  # the corrupt checkpoints are kept for inspection, nothing else written


@pytest.mark.parametrize("leftover", ["checkpoints/.tmp-step-00000006-abc123", "checkpoints/.tmp-step-00000004-x",
                                      ".lorweb.safetensors.tmp", ".config.yaml.tmp",
                                      "checkpoints/step-00000002/.lorweb-k2j3.safetensors.tmp",
                                      "config temporary", "loss plot temporary"])
def test_leftover_temporary_files_are_removed(tmp_path, leftover):
    """What a killed run leaves: temporary checkpoint folders, the top-level copies' temporaries, and inside a
    checkpoint the weights' and config.yaml's temporaries under the names their writers really give them."""
    cfg = small_train_config(tmp_path)
    fake_checkpoint(tmp_path, 2, cfg)
    if leftover == "config temporary":  # the name save_lorweb_weights' config.yaml writer uses
        path = Path(_files.write_temporary_text(tmp_path / "checkpoints" / "step-00000002", CONFIG_NAME, "x: 1\n"))
    elif leftover == "loss plot temporary":  # plot_loss's, through save_figure_atomically's atomic_write
        path = Path(_files.temporary_file(tmp_path, ".loss.png."))
    else:
        path = tmp_path / leftover
    if path.name.endswith(".tmp"):
        path.write_bytes(b"partial")
    else:
        path.mkdir()
        (path / "lorweb.safetensors").write_bytes(b"partial")
    prepare_output(dataclasses.replace(cfg, resume=True))
    assert not path.exists()
    assert (tmp_path / "checkpoints" / "step-00000002" / "trainer_state.pt").is_file()


# ------------------------------------------------------------------------------------------- TrainConfig
BAD_FIELDS = [("steps", 0, ValueError), ("steps", 2.5, TypeError), ("steps", True, TypeError),
              ("batch_size", -1, ValueError), ("learning_rate", math.nan, ValueError),
              ("learning_rate", 0.0, ValueError), ("learning_rate", "1e-3", TypeError),
              ("weight_decay", -1.0, ValueError), ("weight_decay", math.inf, ValueError),
              ("max_grad_norm", math.nan, ValueError), ("long_edge", 16, ValueError),
              ("logit_mean", math.inf, ValueError), ("logit_std", 0.0, ValueError),
              ("mode_scale", math.nan, ValueError), ("caption_dropout", -0.1, ValueError),
              ("guidance_scale", math.nan, ValueError), ("guidance_scale", -2.0, ValueError),
              ("max_sequence_length", 0, ValueError), ("max_sequence_length", 1024, ValueError),
              ("num_loras", 0, ValueError), ("rank", 1.0, TypeError), ("key_dim", 0, ValueError),
              ("heads", 0, ValueError), ("checkpoint_every", 0, ValueError), ("keep_checkpoints", -1, ValueError),
              ("seed", -1, ValueError), ("num_workers", -2, ValueError), ("resume", "yes", TypeError),
              ("gradient_checkpointing", 1, TypeError), ("betas", (0.9,), ValueError),
              ("betas", (0.9, 1.0), ValueError), ("betas", (math.nan, 0.9), ValueError),
              ("activation", "relu", ValueError), ("reduce", "max", ValueError), ("model", "", TypeError),
              ("batch_size", "2", TypeError), ("steps", "10", TypeError), ("long_edge", None, TypeError)]


@pytest.mark.parametrize("field,value,exc", BAD_FIELDS)
def test_train_config_refuses_bad_values(tmp_path, field, value, exc):
    with pytest.raises(exc, match=field):
        small_train_config(tmp_path, **{field: value}).validate()


@pytest.mark.parametrize("value,resize,bound", [(0, "bucket", 2), (1, "bucket", 2), (0, "long-edge", 1)])
def test_bucket_divisibility_bound_follows_the_resize_rule(tmp_path, value, resize, bound):
    """Aspect buckets split into two cells, so with resize="bucket" the bound is 2 for 0 and 1 alike; the
    long-edge rule only needs a positive integer."""
    with pytest.raises(ValueError, match=rf"bucket_divisibility must be an integer >= {bound}, got {value}$"):
        small_train_config(tmp_path, bucket_divisibility=value, resize=resize).validate()


def test_train_config_defaults_are_valid(tmp_path):
    TrainConfig(data="d", out=str(tmp_path)).validate()
    small_train_config(tmp_path).validate()


# ---------------------------------------------------------------------------- end to end: fallback is exact
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    pytest.importorskip("diffusers")
    return tiny_training_assets(tmp_path_factory.mktemp("train_bad"), 8)


def test_accelerate_gradient_accumulation_is_refused(assets, tmp_path, monkeypatch):
    """accelerate takes its gradient accumulation from ACCELERATE_GRADIENT_ACCUMULATION_STEPS (or a DeepSpeed
    config); accelerator.backward then divides every loss by it, while the trainer steps the optimizer every step,
    so every gradient was silently divided. Refused by name before any model loads; nothing is written."""
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")
    cfg = TrainConfig(data=str(assets / "data"), out=str(tmp_path / "run"), model=str(tmp_path / "no-model"),
                      encoder=str(tmp_path / "no-encoder"), steps=2, batch_size=2, long_edge=64, resize="long-edge",
                      num_loras=4, rank=2, key_dim=8, num_workers=0, progress=False, mixed_precision="no")
    with pytest.raises(ValueError, match="accumulate gradients over 2 steps"):
        training.train(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_corrupt_newest_optimizer_state_resumes_from_the_previous_checkpoint_bit_identically(assets, tmp_path):
    def real_cfg(out, steps):
        return tiny_train_config(assets, out, steps=steps, checkpoint_every=2, keep_checkpoints=3, optimizer="adamw",
                                 save_dtype=TrainConfig.save_dtype)

    straight = tmp_path / "straight"
    training.train(real_cfg(straight, 6))
    run = tmp_path / "run"
    training.train(real_cfg(run, 4))
    (run / "checkpoints" / "step-00000004" / "trainer_state.pt").write_bytes(b"")  # killed while writing, say
    (run / "checkpoints" / "notes").mkdir()  # a stray folder
    (run / "checkpoints" / ".tmp-step-00000006-zz").mkdir()  # a killed run's temporary folder
    seen = []
    with pytest.warns(UserWarning, match="trainer_state.pt is empty or corrupt.*falling back"):
        training.train(dataclasses.replace(real_cfg(run, 6), resume=True), step_callback=lambda s, l: seen.append(s))
    assert seen == [3, 4, 5, 6]
    assert not (run / "checkpoints" / ".tmp-step-00000006-zz").exists()
    a, b = load_file(str(straight / "lorweb.safetensors")), load_file(str(run / "lorweb.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log_a = [json.loads(l) for l in (straight / "loss.jsonl").read_text().splitlines()]
    log_b = [json.loads(l) for l in (run / "loss.jsonl").read_text().splitlines()]
    assert log_a == log_b  # one run's log, not two mixed
    with pytest.raises(ValueError, match="already holds a training run"):
        training.train(real_cfg(run, 6))  # a fresh run into it is refused


@pytest.mark.slow
def test_resume_past_a_corrupt_newest_checkpoint_keeps_the_one_it_resumes_from(assets, tmp_path, monkeypatch):
    """A resume that falls back past a corrupt newest checkpoint, with fewer checkpoints kept than before, and that
    then fails in its first step: the checkpoint it resumed from is still there (the resume-time completion of the
    top-level files does not rotate then), so the run stays resumable; a checkpoint without config.yaml (written
    before each checkpoint held one) resumes too."""
    cfg = tiny_train_config(assets, tmp_path / "run", steps=3, checkpoint_every=1, keep_checkpoints=2,
                            optimizer="adamw")
    training.train(cfg)
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002", "step-00000003"]
    (ckpts / "step-00000003" / "trainer_state.pt").write_bytes(b"")

    def fail(*args, **kwargs):
        raise RuntimeError("stopped in the first step")

    resumed = dataclasses.replace(cfg, resume=True, keep_checkpoints=1, steps=4)
    with monkeypatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch.setattr(training, "flow_matching_loss", fail)  # before the step's checkpoint
        with pytest.raises(RuntimeError, match="stopped in the first step"):
            training.train(resumed)
    assert (ckpts / "step-00000002" / "trainer_state.pt").is_file()
    (ckpts / "step-00000002" / "config.yaml").unlink()
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        training.train(resumed, step_callback=lambda step, loss: seen.append(step))
    assert seen == [3, 4]


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_killed_mid_run_then_resume_is_bit_identical(assets, tmp_path, signame):
    """A `lorweb-fast train` process killed by a signal (possibly mid-checkpoint, leaving a temporary folder)
    resumes from its newest complete checkpoint to the same weights and loss log as an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from lorweb_fast import cli

    def argv(out, steps):
        return ["train", "--data", str(assets / "data"), "--out", str(out), "--model", str(assets / "pipe"),
                "--encoder", str(assets / "clip"), "--steps", str(steps), "--batch-size", "2", "--mixed-precision",
                "no", "--long-edge", "64", "--resize", "long-edge", "--max-sequence-length",
                str(demo.DEMO_MAX_SEQUENCE_LENGTH), "--num-loras", "4", "--rank", "2", "--key-dim", "8",
                "--checkpoint-every", "2", "--num-workers", "0", "--no-progress", "--optimizer", "adamw",
                "--learning-rate", "0.01"]

    killed = tmp_path / "killed"
    exe = Path(sys.executable).with_name("lorweb-fast")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lorweb_fast.cli"]
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "wb") as err:  # PYTHONFAULTHANDLER: a hung child prints its threads' stacks on SIGABRT
        # a shell starts background jobs with SIGINT ignored, and a Python started so never raises
        # KeyboardInterrupt: the child gets SIGINT's default back, as a run started from a terminal has it
        proc = subprocess.Popen(cmd + argv(killed, 400), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err,
                                env=dict(os.environ, PYTHONFAULTHANDLER="1"),
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 600
        while training.latest_checkpoint(killed) is None and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be killed: " + stderr.read_text()[-2000:]
        os.kill(proc.pid, getattr(signal, signame))
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            proc.wait(timeout=60)
            pytest.fail(f"still running 300 s after {signame}; its stacks:\n" + stderr.read_text()[-6000:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    newest = training.latest_checkpoint(killed)
    if signame == "SIGINT":  # Ctrl-C: one line naming the checkpoint to continue from, status 128 + SIGINT
        assert proc.returncode == 130, stderr.read_text()[-3000:]
        assert stderr.read_text().endswith(f"lorweb-fast train: interrupted; the newest checkpoint is {newest.name}: "
                                           "run the same command with --resume to continue from it\n")
    resumed_from = int(newest.name.split("-")[1])
    total = resumed_from + 2
    assert cli.main(argv(killed, total) + ["--resume"]) == 0
    assert not list((killed / "checkpoints").glob(".tmp-step-*"))
    straight = tmp_path / "straight"
    assert cli.main(argv(straight, total)) == 0
    a, b = load_file(str(straight / "lorweb.safetensors")), load_file(str(killed / "lorweb.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log_a = [json.loads(l) for l in (straight / "loss.jsonl").read_text().splitlines()]
    log_b = [json.loads(l) for l in (killed / "loss.jsonl").read_text().splitlines()]
    assert log_a == log_b and [r["step"] for r in log_b] == list(range(1, total + 1))


@pytest.mark.parametrize("value,refused", [("none", False), ("logit_normal", True)])
def test_field_missing_from_an_older_checkpoint_counts_as_its_default(tmp_path, value, refused):
    cfg = small_train_config(tmp_path)
    stored = training._comparable_config(cfg)
    del stored["weighting_scheme"]  # as if written before the field existed (default "none")
    fake_checkpoint(tmp_path, 2, cfg, state={"step": 2, "optimizer": {"state": {}, "param_groups": []},
                                             "config": stored})
    resumed = dataclasses.replace(cfg, resume=True, weighting_scheme=value)
    if refused:
        with pytest.raises(ValueError, match="weighting_scheme: 'none' -> 'logit_normal'"):
            prepare_output(resumed)
    else:
        assert prepare_output(resumed)[1]["step"] == 2


def test_a_torn_loss_log_line_is_left_out_of_the_plot(tmp_path):
    """The loss log is appended every step: a line cut short by a stopped run is left out of the plot with a
    warning instead of failing it (the resume side: test_training.py::test_resume_after_kill_is_exact)."""
    from lorweb_fast.training import plot_loss

    log = tmp_path / "loss.jsonl"
    log.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    with pytest.warns(UserWarning, match="1 incomplete line"):
        plot_loss(log, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0


# ------------------------------------------------------------------------------------------ one run per folder
def _hold_lock(folder):
    """A separate process holding ``folder``'s training lock (as a running `lorweb-fast train` does) until killed."""
    return hold_folder_lock(folder, training.RUN_LOCK_NAME, "training run")


@pytest.mark.parametrize("flags", [{"overwrite": True}, {"resume": True}])
def test_a_second_run_into_a_folder_in_use_is_refused_and_changes_nothing(assets, tmp_path, flags):
    """A training run into an --out whose lock another process holds (the same job started twice, a requeued job
    while the old one still runs) is refused with a ValueError naming the holder, before it deletes (--overwrite)
    or reads anything there; once the holder is gone (killed: the kernel releases its lock, its lock file stays)
    the run goes ahead and leaves no lock file behind."""
    out = tmp_path / "run"
    training.train(tiny_train_config(assets, out, steps=2, checkpoint_every=2))
    holder = _hold_lock(out)
    try:
        before = file_tree(out)
        with pytest.raises(ValueError, match=rf"--out {out} is in use by another training run \(process "
                                             rf"{holder.pid} on .*, which holds {out / training.RUN_LOCK_NAME}\)"):
            training.train(tiny_train_config(assets, out, steps=4, checkpoint_every=2, **flags))
        assert file_tree(out) == before
    finally:
        holder.kill()
        holder.wait()
    assert (out / training.RUN_LOCK_NAME).is_file()  # the killed holder's
    result = training.train(tiny_train_config(assets, out, steps=4, checkpoint_every=2, **flags))
    assert result["step"] == 4 and not (out / training.RUN_LOCK_NAME).exists()
    assert training.latest_checkpoint(out).name == "step-00000004"


def test_a_run_that_fails_before_writing_leaves_no_folder(assets, tmp_path, monkeypatch):
    """The lock creates a missing --out (and its missing parents) before anything loads; a run that fails before
    writing anything there (here its base model does not load) removes them again, as it found the file system."""
    out = tmp_path / "new" / "run"
    seen = []

    def failing_load(*args, **kwargs):
        seen.append(sorted(p.name for p in out.iterdir()))  # the lock is held while the models load
        raise OSError("simulated: the base model does not load")

    monkeypatch.setattr(training, "load_training_pipeline", failing_load)
    with pytest.raises(OSError, match="simulated"):
        training.train(tiny_train_config(assets, out, steps=2))
    assert seen == [[training.RUN_LOCK_NAME]]
    assert not (tmp_path / "new").exists()


def test_folder_lock_is_exclusive_within_a_process_and_relocks_a_removed_file(tmp_path, monkeypatch):
    """_files.FolderLock: a second lock object on the same folder is refused in the same process too (flock locks
    an open file, not a process), and a lock taken on a file that its holder removed meanwhile (the holder unlinks
    it on release while still holding it) is not kept: the file in place is locked instead."""
    first = _files.FolderLock(tmp_path / "out", "x.lock", "thing")
    first.acquire()
    with pytest.raises(_files.FolderInUseError, match=rf"{tmp_path / 'out'} is in use by another thing \(process "):
        _files.FolderLock(tmp_path / "out", "x.lock", "thing").acquire()
    first.release()
    assert not (tmp_path / "out").exists()  # the lock created it, and it is empty again

    (tmp_path / "out").mkdir()

    import fcntl

    real_flock, calls = fcntl.flock, []

    def flock_then_removed(fd, op):  # the first lock lands on a file its holder unlinks right after
        real_flock(fd, op)
        calls.append(fd)
        if len(calls) == 1:
            (tmp_path / "out" / "x.lock").unlink()

    monkeypatch.setattr(fcntl, "flock", flock_then_removed)
    second = _files.FolderLock(tmp_path / "out", "x.lock", "thing")
    second.acquire()
    assert len(calls) == 2 and (tmp_path / "out" / "x.lock").is_file()
    monkeypatch.setattr(fcntl, "flock", real_flock)
    with pytest.raises(_files.FolderInUseError):
        _files.FolderLock(tmp_path / "out", "x.lock", "thing").acquire()
    second.release()


def test_a_killed_holders_forked_child_does_not_keep_the_lock(tmp_path):
    """A child forked while the lock is held (a DataLoader worker) closes its copy of the lock's descriptor: once
    the holder is killed, the lock is free although the child still runs."""
    import os
    import signal
    import subprocess
    import sys

    code = ("import os, sys, time\nfrom lorweb_fast._files import FolderLock\n"
            "FolderLock(sys.argv[1], 'x.lock', 'thing').acquire()\n"
            "child = os.fork()\n"
            "if child == 0:\n    time.sleep(600)\n    os._exit(0)\n"
            "print(child, flush=True)\ntime.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(_files.FolderInUseError):
            _files.FolderLock(tmp_path / "out", "x.lock", "thing").acquire()
        holder.kill()
        holder.wait()
        lock = _files.FolderLock(tmp_path / "out", "x.lock", "thing")
        lock.acquire()  # at once, while the forked child still runs
        lock.release()
    finally:
        holder.kill()
        holder.wait()
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_file_system_without_flock_runs_unlocked_with_a_warning(tmp_path, monkeypatch):
    """Where flock is not implemented (some network and cluster file systems: ENOSYS, ENOLCK, EOPNOTSUPP) the run
    goes on unlocked with a warning saying so, leaving neither the lock file nor the folder it created; another
    error while locking is raised, leaving neither too."""
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock = _files.FolderLock(tmp_path / "a" / "out", "x.lock", "training run")
    with pytest.warns(UserWarning, match=r"does not support flock \(Function not implemented\): this training run "
                                         r"runs without its lock"):
        lock.acquire()
    assert lock.fd is None and not (tmp_path / "a").exists()
    lock.release()

    def broken_flock(fd, op):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fcntl, "flock", broken_flock)
    with pytest.raises(OSError, match="Input/output error"):
        _files.FolderLock(tmp_path / "a" / "out", "x.lock", "training run").acquire()
    assert not (tmp_path / "a").exists()


def test_a_failure_after_locking_releases_the_lock(tmp_path, monkeypatch):
    """An error after the lock is taken (recording the holder on a full disk, an interrupt) releases it again: the
    folder can be locked at once, and the lock file and the folder acquire created are gone."""
    import errno

    def full_disk(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_files.os, "write", full_disk)
    first = _files.FolderLock(tmp_path / "out", "x.lock", "thing")
    first.acquire()  # the holder is not recorded, the lock is held
    monkeypatch.undo()
    assert first.fd is not None and (tmp_path / "out" / "x.lock").read_text() == ""
    first.release()

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(_files.FolderLock, "_write_holder", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _files.FolderLock(tmp_path / "out", "x.lock", "thing").acquire()
    monkeypatch.undo()
    assert not (tmp_path / "out").exists()
    again = _files.FolderLock(tmp_path / "out", "x.lock", "thing")
    again.acquire()
    again.release()


def test_train_with_an_invalid_out_gets_the_configs_error(tmp_path):
    """The run folder's lock takes ``out`` as a path only once the config is validated: a non-string ``out`` gets
    the config's error naming the field, not pathlib's."""
    cfg = dataclasses.replace(small_train_config(tmp_path), out=None)
    with pytest.raises(TypeError, match="^out must be a non-empty string, got None$"):
        training.train(cfg)
