"""Guards around the training objective found by a mutation audit of ``lorweb_fast.training``: what the existing
tests let through. Every expected value comes from a small reference written from the official trainer
(NVlabs/LoRWeB, built on ai-toolkit), on tiny models built here; nothing is downloaded."""

import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

import lorweb_fast as lf
from lorweb_fast import demo, training
from lorweb_fast.testing import tiny_train_config, tiny_training_assets
from lorweb_fast.training import TrainConfig

pytest.importorskip("diffusers")


# ------------------------------------------------------------------------------------------ VAE latents
def test_latents_of_a_non_square_grid_keep_height_and_width():
    """toolkit/models/base_model.py ``encode_images``: the images as (B, C, H, W) pixel tensors in [-1, 1] through
    the VAE, then ``scaling_factor * (latents - shift_factor)``; a grid wider than tall stays wider than tall (the
    Relation252k bucket sizes are not square)."""
    pipe = demo.build_tiny_kontext_pipeline(seed=0)
    pipe.vae.eval().requires_grad_(False)
    rng = random.Random(3)
    images = [demo._random_picture(rng, 48).resize((48, 32)) for _ in range(2)]  # W 48, H 32
    got = training._encode_images(pipe, images, torch.Generator().manual_seed(0), sample=False)
    pixels = torch.stack([torch.from_numpy(np.asarray(im, dtype="float32")).permute(2, 0, 1)
                          for im in images]) / 127.5 - 1.0  # (B, 3, H, W), [0, 255] -> [-1, 1]
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mode()
    want = pipe.vae.config.scaling_factor * (latents - pipe.vae.config.shift_factor)
    assert got.shape[-2:] == (32 // 2, 48 // 2) and got.shape == want.shape  # the tiny VAE downsamples by 2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------- loss in fp32 on bf16
class _Spy:
    """A transformer stand-in: a fixed random bf16 prediction for every token, recording its inputs."""

    def __init__(self):
        self.pred = None

    def __call__(self, **inputs):
        hidden = inputs["hidden_states"]
        self.pred = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(7)).to(hidden.dtype)
        return (self.pred,)


def test_loss_is_computed_in_fp32_on_a_bf16_pipeline():
    """extensions_built_in/sd_trainer/SDTrainer.py ``calculate_loss``: ``mse_loss(pred.float(), target.float(),
    reduction="none")`` times the timestep weight, ``mean([1, 2, 3])``, ``mean()``: a bf16 model's prediction is
    compared in fp32, so the loss is not rounded to bf16. The target ``noise - x0`` is fp32 here, from the VAE's
    latents as they come (README: noise and target in fp32, a documented difference at bf16 rounding level), not
    rounded to the transformer's dtype. Reference in float64 from the same draws
    (caption dropout, target latents, control latents, noise, timestep index: lorweb_fast's order)."""
    pipe = demo.build_tiny_kontext_pipeline(seed=0)
    pipe.transformer.to(torch.bfloat16)  # a bf16 model; the VAE's fp32 latents must not be rounded to it
    for name in ("vae", "text_encoder", "text_encoder_2", "transformer"):
        getattr(pipe, name).eval().requires_grad_(False)
    lf.inject_lorweb(pipe.transformer, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=4, query_dim=6))
    rng = random.Random(5)
    bsz = 3
    batch = {"target": [demo._random_picture(rng, 32) for _ in range(bsz)],
             "control": [demo._random_picture(rng, 32) for _ in range(bsz)], "caption": ["a", "b", "c"]}
    cfg = TrainConfig(data="d", out="o", caption_dropout=0.0, max_sequence_length=demo.DEMO_MAX_SEQUENCE_LENGTH)
    spy = _Spy()
    query = torch.randn(bsz, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss = training.flow_matching_loss(spy, pipe, batch, query, cfg, torch.Generator().manual_seed(4))

    g = torch.Generator().manual_seed(4)
    torch.rand(bsz, generator=g)  # caption dropout draw
    x0 = training._encode_images(pipe, batch["target"], g, sample=True).double()
    training._encode_images(pipe, batch["control"], g, sample=True)
    noise = torch.randn(x0.shape, generator=g).double()
    index = torch.randint(0, 999, (bsz,), generator=g)
    k = torch.arange(1000, dtype=torch.float64)
    bell = torch.exp(-2 * ((k - 500) / 1000) ** 2)
    bell = (bell - bell.min()) * (1000 / (bell - bell.min()).sum())
    b, c, h, w = x0.shape
    target = (noise - x0).view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * 4)
    pred = spy.pred[:, :target.shape[1]].double()
    want = (((pred - target) ** 2).mean(dim=(1, 2)) * bell[index]).mean()
    assert spy.pred.dtype == torch.bfloat16 and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want, rtol=2e-6, atol=0)


# --------------------------------------------------------------------------------------- the query
def test_images_query_source_encodes_a_a_prime_b_in_that_order():
    """query_source "images" (not official; the official query is the control grid's, tested elsewhere): the a, a'
    and b cells of the target grid [a a'; b b'] (top-left, top-right, bottom-left), in that order, as
    ``AnalogyEncoder(a, a', b)`` takes them (the official query order cat-aa'b: a, then a', then b)."""
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]  # a, a', b, b'
    grid = Image.new("RGB", (16, 12))
    for i, colour in enumerate(colours):
        grid.paste(Image.new("RGB", (8, 6), colour), ((i % 2) * 8, (i // 2) * 6))
    seen = []

    class Encoder:
        query_source = "images"

        def __call__(self, a, a_prime, b):
            seen.append([[im.getpixel((3, 3)) for im in cells] for cells in (a, a_prime, b)])
            return torch.zeros(len(a), 3)

    out = training.batch_query(Encoder(), {"control": [None, None], "target": [grid, grid]}, "cpu")
    assert out.shape == (2, 3)
    assert seen == [[[colours[0]] * 2, [colours[1]] * 2, [colours[2]] * 2]]


# ---------------------------------------------------------------------------------------- gradients
def test_a_gradient_with_an_infinite_entry_is_named():
    """An infinite gradient entry (not only a NaN) makes the norm infinite: the error names that parameter."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model(torch.randn(4, 3)).sum().backward()
    model[0].bias.grad[1] = float("-inf")
    with pytest.raises(FloatingPointError, match=r"1 parameters on this rank \(e.g. 0.bias\)"):
        training._check_gradients(torch.tensor(float("inf")), model, 2, TrainConfig(data="d", out="o"))


# --------------------------------------------------------------------------------------------- the plot
def test_plot_shows_positive_losses_and_marks_skipped_steps(tmp_path, monkeypatch):
    """The plot's raw curve holds the steps with a positive loss (log axis: a zero loss cannot be drawn), and every
    step logged with loss null (a NaN loss, no update) gets a vertical marker."""
    import matplotlib.figure

    log = tmp_path / "loss.jsonl"
    rows = [{"step": 1, "loss": 0.5, "lr": 1e-3}, {"step": 2, "loss": None, "lr": 1e-3, "nan_loss_skipped": True},
            {"step": 3, "loss": 0.0, "lr": 1e-3}, {"step": 4, "loss": 0.25, "lr": 1e-3}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    made = []
    real = matplotlib.figure.Figure.savefig

    def savefig(fig, *args, **kwargs):
        made.append(fig)
        return real(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    training.plot_loss(log, tmp_path / "loss.png")
    ax, = made[0].axes
    raw, smooth, *marks = ax.lines
    assert list(raw.get_xdata()) == [1, 4] and list(raw.get_ydata()) == [0.5, 0.25]
    assert list(smooth.get_xdata()) == [1, 4]
    assert [list(m.get_xdata()) for m in marks] == [[2, 2]]


# ---------------------------------------------------------------------------------------- the train loop
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_training_assets(tmp_path_factory.mktemp("objective_guards"), 4)


def _config(assets, out, **over) -> TrainConfig:
    """Two steps of a 2 x rank-2 basis, AdamW, no checkpoint."""
    return tiny_train_config(assets, out, **{**dict(steps=2, num_loras=2, key_dim=4, checkpoint_every=100,
                                                    optimizer="adamw"), **over})


def _spy_steps(monkeypatch):
    """Record, at every optimizer step, the norm ``_check_gradients`` was given (the unclipped global norm), the
    global norm of the gradients the optimizer then sees and how many trained tensors have a gradient."""
    seen = []
    real_make, real_check = training._make_optimizer, training._check_gradients

    def make(params, cfg):
        params = list(params)
        opt = real_make(params, cfg)
        real_step = opt.step

        def step(*args, **kwargs):
            grads = [p.grad for p in params if p.grad is not None]
            seen[-1]["after_clip"] = float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g.double()) for g in grads]))) if grads else 0.0
            seen[-1]["with_grad"] = len(grads)
            return real_step(*args, **kwargs)

        opt.step = step
        seen.append({"params": len(params)})
        return opt

    def check(grad_norm, model, step, cfg, **kwargs):
        seen.append({"norm": float(grad_norm)})
        return real_check(grad_norm, model, step, cfg, **kwargs)

    monkeypatch.setattr(training, "_make_optimizer", make)
    monkeypatch.setattr(training, "_check_gradients", check)
    return seen


def test_the_optimizer_steps_on_gradients_clipped_to_max_grad_norm(assets, tmp_path, monkeypatch):
    """extensions_built_in/sd_trainer/SDTrainer.py ``hook_train_loop``: ``zero_grad``, backward of the step's loss,
    ``accelerator.clip_grad_norm_(params, max_grad_norm)`` over every trained parameter, ``optimizer.step()``,
    ``zero_grad(set_to_none=True)``. So the optimizer sees the gradients of every trained tensor rescaled to global
    norm min(norm, max_grad_norm) (torch's ``clip_grad_norm_``: factor max_norm / (norm + 1e-6), capped at 1);
    lorweb_fast's max_grad_norm 0 (no clipping) is checked by the next test."""
    max_grad_norm = 1e-4
    seen = _spy_steps(monkeypatch)
    cfg = _config(assets, tmp_path / "run", max_grad_norm=max_grad_norm)
    training.train(cfg)
    n_params = seen[0]["params"]
    steps = seen[1:]
    assert len(steps) == 2 and n_params == 20 * 4  # every LoRWeB tensor of the 20 layers
    for s in steps:
        assert s["with_grad"] == n_params and math.isfinite(s["norm"])
        assert s["norm"] > 100 * max_grad_norm  # clipping is active
        want = s["norm"] * (max_grad_norm / (s["norm"] + 1e-6))
        assert s["after_clip"] == pytest.approx(want, rel=1e-5)


def test_each_step_starts_from_no_gradient_and_logs_step_loss_lr(assets, tmp_path, monkeypatch):
    """SDTrainer.py ``hook_train_loop`` zeroes the gradients before the step's backward and sets them to None after
    the step, so the gradient the optimizer gets at every step is that step's loss's alone: its norm equals the
    norm of ``autograd.grad`` of the same loss (not |g1 + g2| at step 2). The log (ai-toolkit reports ``loss`` and
    ``lr`` per step) holds one row per step with exactly the step, the loss the step computed and the learning
    rate, the loss being the mean over the ranks. With max_grad_norm 0 (lorweb_fast: no clipping) the optimizer gets
    these gradients unscaled."""
    cfg = _config(assets, tmp_path / "run", max_grad_norm=0.0)
    seen = _spy_steps(monkeypatch)
    fresh = []
    real_loss = training.flow_matching_loss

    def loss_fn(model, *args, **kwargs):
        loss = real_loss(model, *args, **kwargs)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        fresh.append((loss.item(), float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g.double()) for g in grads])))))
        return loss

    monkeypatch.setattr(training, "flow_matching_loss", loss_fn)
    import accelerate

    # the logged loss is the mean over the ranks (the official run is one process): emulate two ranks of the same
    # loss, whose mean is that loss (and whose sum would be twice it)
    monkeypatch.setattr(accelerate.Accelerator, "reduce",
                        lambda self, tensor, reduction="sum", scale=1.0: {"mean": tensor, "sum": 2 * tensor}[reduction])
    calls = []
    training.train(cfg, step_callback=lambda step, loss: calls.append((step, loss)))
    steps = seen[1:]
    assert len(steps) == len(fresh) == 2
    for s, (_, norm) in zip(steps, fresh):
        assert s["norm"] == pytest.approx(norm, rel=1e-5) and s["after_clip"] == pytest.approx(norm, rel=1e-5)
    rows = [json.loads(line) for line in (tmp_path / "run" / "loss.jsonl").read_text().splitlines()]
    assert rows == [{"step": k + 1, "loss": calls[k][1], "lr": cfg.learning_rate} for k in range(2)]
    assert [c[1] for c in calls] == pytest.approx([f[0] for f in fresh], rel=1e-6)
