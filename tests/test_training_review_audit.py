"""Review of the training loop (lorweb_fast/training.py): one test per confirmed defect, each failing on the code
as reviewed. See /tmp/review_training.md for the reproductions and proposed fixes."""

import dataclasses
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file

from lorweb_fast import demo, training
from lorweb_fast.testing import small_train_config, tiny_train_config, tiny_training_assets

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_training_assets(tmp_path_factory.mktemp("review_train"), 8)


def test_frozen_text_encoders_run_in_eval_mode_so_a_callers_pipeline_trains_deterministically(assets, tmp_path):
    """train(cfg, pipe=pipe) with a pipeline whose modules are in train mode (built from configs, as
    ``demo.build_tiny_kontext_pipeline()`` returns it, or after the caller's own ``.train()``): T5's dropout
    (dropout_rate 0.1, also in FLUX's T5-XXL) stays active while the frozen text encoder embeds the captions, drawn
    from the global RNG. Now: two runs with the same cfg and seed end with different weights (and a resume is not
    exact; the official trainer calls ``text_encoder.eval()`` / ``vae.eval()``). Should: the frozen models run in
    eval mode, so the weights depend only on cfg.seed; the caller's pipeline gets its modes back (module by module)."""
    weights = []
    for i, global_seed in enumerate((1, 2)):
        pipe = demo.build_tiny_kontext_pipeline()
        pipe.vae.encoder.eval()  # a mixed caller's choice, given back as it was
        modes = {name: [m.training for m in getattr(pipe, name).modules()]
                 for name in ("vae", "text_encoder", "text_encoder_2")}
        assert any(modes["text_encoder_2"]) and not all(modes["vae"])
        torch.manual_seed(global_seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            training.train(tiny_train_config(assets, tmp_path / f"run{i}", steps=2, checkpoint_every=2,
                                             optimizer="adamw"), pipe=pipe)
        weights.append(load_file(str(tmp_path / f"run{i}" / "lorweb.safetensors")))
        assert {name: [m.training for m in getattr(pipe, name).modules()] for name in modes} == modes
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_rotation_after_a_fallback_resume_keeps_the_checkpoints_it_writes(assets, tmp_path):
    """A resume that falls back past a corrupt newest checkpoint (step-4) with another --checkpoint-every and
    --keep-checkpoints 1 (both may change on resume): ``rotate_checkpoints`` orders by step, so the corrupt step-4
    counts as the newest and the first checkpoint the resumed run writes (step-3) is deleted at once, together with
    step-2 it resumed from. Now: a run stopped after step 3 leaves only the corrupt step-4, and the next --resume
    fails with "no usable checkpoint". Should: the checkpoint just written (and the one resumed from) are never
    rotated out in favour of a folder past the current step (ai-toolkit orders its saves by creation time)."""
    cfg = tiny_train_config(assets, tmp_path / "run", steps=4, checkpoint_every=2, keep_checkpoints=2,
                            keep_milestone_every=0, optimizer="adamw")
    training.train(cfg)
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "step-00000004" / "trainer_state.pt").write_bytes(b"")  # corrupt (bit rot, a partial copy)

    def stop_after_step_3(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    resumed = dataclasses.replace(cfg, resume=True, steps=6, checkpoint_every=3, keep_checkpoints=1)
    with warnings.catch_warnings(), pytest.raises(KeyboardInterrupt):
        warnings.simplefilter("ignore")
        training.train(resumed, step_callback=stop_after_step_3)
    assert (ckpts / "step-00000003" / "trainer_state.pt").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckpt, _ = training.find_resumable_checkpoint(tmp_path / "run")
    assert ckpt.name == "step-00000003"


@pytest.mark.parametrize("over", [dict(logit_mean=2.0), dict(logit_std=0.3), dict(mode_scale=0.5),
                                  dict(timestep_type="diffusers", logit_mean=2.0),
                                  dict(timestep_type="diffusers", weighting_scheme="mode", logit_std=3.0)])
def test_timestep_density_options_the_run_does_not_use_are_refused(tmp_path, over):
    """--logit-mean / --logit-std / --mode-scale shape only diffusers' "logit_normal" / "mode" densities. Now: with
    the default --timestep-type weighted (or another --weighting-scheme) they are accepted and silently ignored,
    while --weighting-scheme in the same situation is refused by name. Should: a value other than the default is
    refused unless the chosen weighting scheme uses it."""
    with pytest.raises(ValueError, match="logit_mean|logit_std|mode_scale"):
        small_train_config(tmp_path / "out", **over).validate()


@pytest.mark.parametrize("mode_scale", [10.0, -3.0])
def test_mode_scale_outside_the_densitys_range_is_refused(tmp_path, mode_scale):
    """--timestep-type diffusers --weighting-scheme mode with a --mode-scale outside SD3's range
    (-1 <= s <= 2 / (pi - 2)): diffusers' ``compute_density_for_timestep_sampling`` then maps some u in [0, 1] to
    t < 0 or t > 1. Now: accepted; the run trains on timesteps down to -0.29 and up to 1.29 (noisy latents with a
    negative x0 or noise coefficient), without a word. Should: refused by validate() naming mode_scale."""
    cfg = small_train_config(tmp_path / "out", timestep_type="diffusers", weighting_scheme="mode",
                             mode_scale=mode_scale)
    try:
        cfg.validate()
    except ValueError as exc:
        assert "mode_scale" in str(exc)
        return
    t, _ = training.sample_timesteps(cfg, 4096, torch.Generator().manual_seed(0))
    assert 0.0 <= t.min().item() and t.max().item() <= 1.0, (t.min().item(), t.max().item())
    assert math.isfinite(t.sum().item())
