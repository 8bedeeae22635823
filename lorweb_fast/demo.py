"""Offline building blocks for the demo and the tests: a tiny random FLUX.1-Kontext pipeline, a tiny CLIP analogy
encoder and a synthetic analogy dataset, all made from configs (nothing is downloaded).

The tiny models are saved with ``save_pretrained`` and loaded back through ``from_pretrained``, so the demo and the
tests run exactly the code paths that load real checkpoints.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Union

import torch

from .model import global_rng_kept
from .testing import tiny_flux_config

#: Cell size (pixels) of the synthetic analogies; the tiny VAE downsamples 2x, so a 2x2 grid is 32x32 latents.
DEMO_CELL = 32
#: T5 tokens the tiny pipeline encodes (the real model uses 512).
DEMO_MAX_SEQUENCE_LENGTH = 16

_WORDS = ("make", "the", "it", "a", "an", "turn", "into", "same", "edit", "as", "red", "green", "blue", "flip",
          "mirror", "colour", "color", "invert", "shape", "square", "apply", "transformation", "image", "to", "b",
          "like", "from", "of", "and", "with", "photo", "picture", "darker", "brighter", "swap", "channels", "left",
          "right", "colours", "analogy")


def _clip_tokenizer():
    """A character-level CLIPTokenizer (no merges) covering the letters of ``_WORDS``, 77 tokens."""
    from transformers import CLIPTokenizer

    chars = sorted(set("".join(_WORDS)))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer():
    """A T5Tokenizer (unigram) over the ``_WORDS`` pieces and their letters, no extra ids."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -float(i + 1)) for i, w in enumerate(_WORDS)]
    pieces += [(c, -100.0) for c in sorted(set("".join(_WORDS)))]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def build_tiny_kontext_pipeline(directory: Union[str, Path, None] = None, *, seed: int = 0):
    """A tiny random ``FluxKontextPipeline`` (``testing.tiny_flux_config``: 1 double + 1 single block; a 2x VAE),
    fp32 on the CPU, returned. Saved to ``directory`` with ``save_pretrained`` when given (then load it with
    ``FluxKontextPipeline.from_pretrained(directory)``)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    flux_cfg = tiny_flux_config()
    with global_rng_kept():  # seeded draws that leave the caller's random state as it was
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(**flux_cfg)
        latent_channels = flux_cfg["in_channels"] // 4
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                            latent_channels=latent_channels, norm_num_groups=4, sample_size=64, use_quant_conv=False,
                            use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
        clip_tok = _clip_tokenizer()
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=flux_cfg["pooled_projection_dim"], intermediate_size=32,
            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
            pad_token_id=1, projection_dim=flux_cfg["pooled_projection_dim"]))
        t5_tok = _t5_tokenizer()
        text_encoder_2 = T5EncoderModel(T5Config(
            vocab_size=len(t5_tok), d_model=flux_cfg["joint_attention_dim"], d_kv=8, d_ff=32, num_layers=1,
            num_heads=2, relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
        pipe = FluxKontextPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                                   tokenizer=clip_tok, text_encoder_2=text_encoder_2, tokenizer_2=t5_tok,
                                   transformer=transformer)
    if directory is not None:
        pipe.save_pretrained(directory)
    return pipe


def build_tiny_clip(directory: Union[str, Path], *, projection_dim: int = 8, seed: int = 0) -> Path:
    """Save a tiny random ``CLIPVisionModelWithProjection`` (32 px images, 8 px patches) and its
    ``CLIPImageProcessor`` to ``directory`` (queries of 3 * projection_dim features); returns ``directory``."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(hidden_size=16, intermediate_size=32, projection_dim=projection_dim, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8)
    with global_rng_kept():  # seeded draws that leave the caller's random state as it was
        torch.manual_seed(seed)
        model = CLIPVisionModelWithProjection(cfg)
    model.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return Path(directory)


# --------------------------------------------------------------------------------------- synthetic analogies
def _flip(im):
    from PIL import Image

    return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def _swap_channels(im):
    from PIL import Image

    return Image.merge("RGB", im.convert("RGB").split()[::-1])


#: name -> (caption, transformation) of the synthetic edits.
_TRANSFORMS = {
    "flip": ("mirror the image from left to right", _flip),
    "swap": ("swap the colour channels", _swap_channels),
}


def _random_picture(rng: random.Random, size: int):
    """A picture with a background colour and a few coloured rectangles (never blank)."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), tuple(rng.randrange(30, 226) for _ in range(3)))
    draw = ImageDraw.Draw(im)
    for _ in range(3):
        x0, y0 = rng.randrange(0, size // 2), rng.randrange(0, size // 2)
        x1, y1 = x0 + rng.randrange(4, size // 2), y0 + rng.randrange(4, size // 2)
        draw.rectangle((x0, y0, x1, y1), fill=tuple(rng.randrange(256) for _ in range(3)))
    return im


def make_synthetic_analogies(directory: Union[str, Path], count: int = 8, *, cell: int = DEMO_CELL,
                             seed: int = 0) -> Path:
    """Write ``count`` analogies in the grid layout: ``control/<id>.png`` ([a a'; b b]), ``target/<id>.png``
    ([a a'; b b']), both 2c x 2c px with c = ``cell`` rounded down to a multiple of 16 (``flux.make_grid``), and
    ``captions/<id>.txt``, ids 0000, 0001, ...; returns the folder.
    Transformations alternate between a left-right flip and a colour-channel swap, so the basis has two different
    edits to learn."""
    from .flux import control_grid, target_grid

    rng = random.Random(seed)
    root = Path(directory)
    for sub in ("control", "target", "captions"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    names = list(_TRANSFORMS)
    for i in range(count):
        caption, fn = _TRANSFORMS[names[i % len(names)]]
        a, b = _random_picture(rng, cell), _random_picture(rng, cell)
        a2, b2 = fn(a), fn(b)
        stem = f"{i:04d}"
        control_grid(a, a2, b, long_edge=2 * cell).save(root / "control" / f"{stem}.png")
        target_grid(a, a2, b, b2, long_edge=2 * cell).save(root / "target" / f"{stem}.png")
        (root / "captions" / f"{stem}.txt").write_text(caption + "\n")
    return root


def demo_analogy(cell: int = DEMO_CELL, seed: int = 1234):
    """(a, a', b, prompt) for the demo's inference, ``cell`` x ``cell`` PIL images: a held-out left-right flip."""
    rng = random.Random(seed)
    caption, fn = _TRANSFORMS["flip"]
    a, b = _random_picture(rng, cell), _random_picture(rng, cell)
    return a, fn(a), b, caption
