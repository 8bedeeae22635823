"""The training objective of ``lorweb_fast.training.flow_matching_loss`` against a reference written from the
official trainer, on the tiny FLUX.1-Kontext pipeline with a spy in place of the transformer.

Reference, from NVlabs/LoRWeB (ai-toolkit):
- jobs/process/BaseSDTrainProcess.py ``process_general_training_batch``: ``noise_scheduler: flowmatch`` with
  ``content_or_style: balanced`` draws ``timestep_indices = torch.randint(0, max_denoising_steps - 1)`` (0..998) and
  takes ``timesteps = noise_scheduler.timesteps[timestep_indices]``, the grid of
  toolkit/samplers/custom_flowmatch_sampler.py ``set_train_timesteps("weighted")``: ``linspace(1000, 1, 1000)``;
- custom_flowmatch_sampler.py ``add_noise``: ``t_01 = timesteps / 1000``, ``(1 - t_01) * x0 + t_01 * noise``;
- extensions_built_in/sd_trainer/SDTrainer.py ``calculate_loss``: flow matching target ``noise - latents``,
  ``mse_loss(pred.float(), target.float(), reduction="none")`` times the timestep weight
  (``get_weights_for_timesteps``: the bell curve ``linear_timesteps_weights`` at the timestep's grid index) when
  ``timestep_type == "weighted"`` (no weight for "linear"), ``mean([1, 2, 3])`` per sample, then ``mean()``;
- toolkit/dataloader_mixins.py (caption): ``random() < caption_dropout_rate`` gives the caption ``""``;
- toolkit/models/base_model.py ``encode_images``: ``latent_dist.sample()``, then ``scaling_factor * (latents -
  shift_factor)``;
- extensions_built_in/flux_kontext.py ``get_noise_prediction``: latents packed by
  ``rearrange("b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)``, the control tokens appended after the noisy
  ones, ``img_ids`` (row, column) grids with first coordinate 0 for the target and 1 for the control, ``txt_ids``
  zeros, ``guidance`` the train config's ``cfg_scale`` (1.0), ``timestep=timestep / 1000``; the prediction is cut
  to the noisy tokens and unpacked before the loss.

The random draws are lorweb_fast's own (one ``torch.Generator`` per step, in the order caption dropout, target
latents, control latents, noise, timestep index), so the reference makes the same draws from the same seed; given
them, every formula is the official one.
"""

import random

import pytest
import torch

import lorweb_fast as lf
from lorweb_fast import demo, training
from lorweb_fast.training import TrainConfig

pytest.importorskip("diffusers")

BATCH = 4
QUERY_DIM = 6
CAPTIONS = ["flip the image", "make it red", "turn it blue", "edit the same as a"]


@pytest.fixture(scope="module")
def pipe():
    pipe = demo.build_tiny_kontext_pipeline(seed=0)
    for name in ("vae", "text_encoder", "text_encoder_2", "transformer"):  # as from_pretrained loads them (no dropout)
        getattr(pipe, name).eval().requires_grad_(False)
    lf.inject_lorweb(pipe.transformer, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=4, query_dim=QUERY_DIM))
    return pipe


@pytest.fixture(scope="module")
def batch():
    rng = random.Random(5)
    return {"target": [demo._random_picture(rng, 32) for _ in range(BATCH)],
            "control": [demo._random_picture(rng, 32) for _ in range(BATCH)],
            "caption": list(CAPTIONS)}


class SpyTransformer:
    """Records the transformer inputs and returns a fixed random prediction for all tokens."""

    def __init__(self):
        self.inputs = None
        self.pred = None

    def __call__(self, **inputs):
        self.inputs = inputs
        hidden = inputs["hidden_states"]
        self.pred = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(99)).to(hidden.dtype)
        return (self.pred,)


def official_pack(x):
    """``rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)``."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def official_unpack(x, c, h, w):
    """``rearrange(x, "b (h w) (c ph pw) -> b c (h ph) (w pw)", ph=2, pw=2)``."""
    b = x.shape[0]
    return x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def official_encode(pipe, images, generator):
    """base_model.py ``encode_images`` (sample of the latent distribution, shifted and scaled)."""
    vae = pipe.vae
    w, h = images[0].size
    with torch.no_grad():
        latents = vae.encode(pipe.image_processor.preprocess(images, h, w)).latent_dist.sample(generator)
    return vae.config.scaling_factor * (latents - vae.config.shift_factor)


def official_bell_weights():
    """custom_flowmatch_sampler.py ``__init__``: exp(-2 ((x - 500) / 1000)^2) over x = 0..999, minimum shifted to 0,
    scaled to mean 1 (``num_timesteps / sum``)."""
    x = torch.arange(1000, dtype=torch.float64)
    y = torch.exp(-2 * ((x - 500) / 1000) ** 2)
    y = y - y.min()
    return y * (1000 / y.sum())


def official_step(pipe, batch, cfg, seed, pred_packed):
    """Everything the official trainer computes for one step, from lorweb_fast's draws; float64 loss."""
    g = torch.Generator().manual_seed(seed)
    drop = torch.rand(BATCH, generator=g) < cfg.caption_dropout
    prompts = ["" if d else c for d, c in zip(drop.tolist(), batch["caption"])]
    x0 = official_encode(pipe, batch["target"], g).float()
    control = official_encode(pipe, batch["control"], g)
    noise = torch.randn(x0.shape, generator=g)
    index = torch.randint(0, 1000 - 1, (BATCH,), generator=g)
    timesteps = torch.linspace(1000, 1, 1000)[index]
    t_01 = (timesteps / 1000).view(-1, 1, 1, 1)
    noisy = (1.0 - t_01) * x0 + t_01 * noise
    target = noise - x0
    _, c, h, w = x0.shape
    pred = official_unpack(pred_packed[:, :(h // 2) * (w // 2)], c, h, w)
    loss = torch.nn.functional.mse_loss(pred.double(), target.double(), reduction="none")
    if cfg.timestep_type == "weighted":
        loss = loss * official_bell_weights()[index].view(-1, 1, 1, 1)
    loss = loss.mean([1, 2, 3]).mean()
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    ctrl_ids = ids.clone()
    ctrl_ids[..., 0] = 1
    img_ids = torch.cat([ids.reshape(-1, 3), ctrl_ids.reshape(-1, 3)], dim=0)
    return dict(prompts=prompts, noisy=official_pack(noisy), control=official_pack(control), timestep=timesteps / 1000,
                loss=loss, img_ids=img_ids, dropped=drop)


def run_step(pipe, batch, cfg, seed, monkeypatch):
    """flow_matching_loss with the spy transformer; returns (loss, spy, prompts given to encode_prompt)."""
    prompts_seen = []
    real_encode = pipe.encode_prompt

    def encode_prompt(*args, **kwargs):
        prompts_seen.append(list(kwargs["prompt"]))
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(pipe, "encode_prompt", encode_prompt)
    spy = SpyTransformer()
    query = torch.randn(BATCH, QUERY_DIM, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss = training.flow_matching_loss(spy, pipe, batch, query, cfg, torch.Generator().manual_seed(seed))
    monkeypatch.undo()
    return loss, spy, prompts_seen


@pytest.mark.parametrize("timestep_type", ["weighted", "linear"])
def test_flow_matching_loss_is_the_official_objective(pipe, batch, monkeypatch, timestep_type):
    cfg = TrainConfig(data="d", out="o", timestep_type=timestep_type, caption_dropout=0.5,
                      max_sequence_length=demo.DEMO_MAX_SEQUENCE_LENGTH)
    assert cfg.guidance_scale == 1.0
    seed = 1
    loss, spy, prompts_seen = run_step(pipe, batch, cfg, seed, monkeypatch)
    want = official_step(pipe, batch, cfg, seed, spy.pred)
    inputs = spy.inputs

    # caption dropout: some captions dropped to "", the others kept, as drawn
    assert 0 < int(want["dropped"].sum()) < BATCH
    assert prompts_seen == [want["prompts"]]
    embeds, pooled, text_ids = pipe.encode_prompt(prompt=want["prompts"], prompt_2=None, device="cpu",
                                                  max_sequence_length=cfg.max_sequence_length)
    assert torch.equal(inputs["encoder_hidden_states"], embeds) and torch.equal(inputs["pooled_projections"], pooled)
    assert torch.equal(inputs["txt_ids"], torch.zeros_like(text_ids))

    # x_t and the control tokens, packed as flux_kontext.get_noise_prediction, noisy tokens first
    n = want["noisy"].shape[1]
    assert inputs["hidden_states"].shape[1] == 2 * n
    torch.testing.assert_close(inputs["hidden_states"][:, :n], want["noisy"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(inputs["hidden_states"][:, n:], want["control"], rtol=1e-6, atol=1e-6)
    # the timestep on the official grid, divided by 1000; guidance 1; image ids 0 (target) / 1 (control)
    assert torch.equal(inputs["timestep"], want["timestep"])
    assert torch.equal(inputs["guidance"], torch.ones(BATCH))
    assert torch.equal(inputs["img_ids"], want["img_ids"])
    assert inputs["img_ids"][:n, 0].eq(0).all() and inputs["img_ids"][n:, 0].eq(1).all()

    # the loss: MSE against noise - x0 over the target tokens, the bell weight per sample, mean over everything
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), want["loss"], rtol=1e-5, atol=0)


def test_caption_dropout_extremes_and_timestep_range(pipe, batch, monkeypatch):
    """caption_dropout 1: every prompt is ""; 0: every caption is kept. Over many steps the timestep indices cover
    0..998 of the official grid (never t = 1 / 1000, index 999)."""
    for p, want in ((1.0, [""] * BATCH), (0.0, CAPTIONS)):
        cfg = TrainConfig(data="d", out="o", caption_dropout=p, max_sequence_length=demo.DEMO_MAX_SEQUENCE_LENGTH)
        _, _, prompts_seen = run_step(pipe, batch, cfg, 0, monkeypatch)
        assert prompts_seen == [want]
    cfg = TrainConfig(data="d", out="o")
    t, _ = training.sample_timesteps(cfg, 50_000, torch.Generator().manual_seed(0))
    index = torch.round(1000 - t.double() * 1000).long()
    assert int(index.min()) == 0 and int(index.max()) == 998
    assert torch.equal(t, torch.linspace(1000, 1, 1000)[index] / 1000)
