"""Offline tiny stand-ins for the evaluation's models (tests and a dry run of the protocol): a random Gemma-3 with a
locally built character-level tokenizer and processor, random LPIPS backbone weights in a torchvision cache, and
synthetic evaluation sets / runs folders. Nothing is downloaded."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence, Union

import torch

#: A Gemma-3-style chat template (turn markers, <start_of_image> per image item) for the tiny processor.
TINY_GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<start_of_image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def build_tiny_gemma3(directory: Union[str, Path], *, extra_text: str = "", seed: int = 0,
                      image_size: int = 32, image_seq_length: int = 4) -> Path:
    """Save a tiny random ``Gemma3ForConditionalGeneration`` and its ``Gemma3Processor`` (character-level tokenizer
    covering printable ASCII, the paper's prompts and ``extra_text``) to ``directory``; load them back with
    ``Gemma3ForConditionalGeneration.from_pretrained`` / ``AutoProcessor.from_pretrained``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor, \
        PreTrainedTokenizerFast

    from .judge import PAIRWISE_PROMPT, SCORE_PROMPT

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                "<end_of_image>", "<image_soft_token>"]
    chars = sorted(set(chr(i) for i in range(32, 127)) | set("\n") | set(SCORE_PROMPT + PAIRWISE_PROMPT + extra_text))
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": image_size, "width": image_size}),
                                tokenizer=tokenizer, chat_template=TINY_GEMMA3_CHAT_TEMPLATE,
                                image_seq_length=image_seq_length)
    config = Gemma3Config(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=64,
                         max_position_embeddings=8192),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        mm_tokens_per_image=image_seq_length, boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"), image_token_index=tokenizer.image_token_id)
    torch.manual_seed(seed)
    Gemma3ForConditionalGeneration(config).save_pretrained(directory)
    processor.save_pretrained(directory)
    return Path(directory)


def save_random_lpips_backbone(torch_home: Union[str, Path], net: str = "alex", *, seed: int = 0) -> Path:
    """Random torchvision backbone weights saved where torchvision's cache would hold the ImageNet ones
    (``torch_home/hub/checkpoints/<file>``); returns the file."""
    from .metrics import _tv_backbone, _tv_weights

    torch.manual_seed(seed)
    path = Path(torch_home) / "hub" / "checkpoints" / _tv_weights(net).url.rsplit("/", 1)[-1]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_tv_backbone(net).state_dict(), path)
    return path


def random_picture(rng: random.Random, size: tuple):
    """A background colour with a few coloured rectangles; ``size`` = (width, height)."""
    from PIL import Image, ImageDraw

    w, h = size
    im = Image.new("RGB", (w, h), tuple(rng.randrange(30, 226) for _ in range(3)))
    draw = ImageDraw.Draw(im)
    for _ in range(3):
        x0, y0 = rng.randrange(0, w // 2), rng.randrange(0, h // 2)
        draw.rectangle((x0, y0, x0 + rng.randrange(3, w // 2), y0 + rng.randrange(3, h // 2)),
                       fill=tuple(rng.randrange(256) for _ in range(3)))
    return im


def make_folder_evalset(root: Union[str, Path], tasks: Sequence[str] = ("flip", "swap"), per_task: int = 2, *,
                        size: tuple = (32, 32), seed: int = 0) -> Path:
    """``root/<task>/<id>/{a,a_prime,b}.png`` + ``prompt.txt`` (``per_task`` ids 000, 001, ... per task), every image
    ``size`` = (width, height): left-right flips and colour-channel swaps (any other task name: a flip); returns
    root."""
    from PIL import Image

    edits = {"flip": ("mirror the image", lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
             "swap": ("swap the colour channels", lambda im: Image.merge("RGB", im.split()[::-1]))}
    rng = random.Random(seed)
    root = Path(root)
    for task in tasks:
        prompt, fn = edits[task] if task in edits else edits["flip"]
        for i in range(per_task):
            d = root / task / f"{i:03d}"
            d.mkdir(parents=True, exist_ok=True)
            a = random_picture(rng, size)
            fn(a).save(d / "a_prime.png")
            a.save(d / "a.png")
            random_picture(rng, size).save(d / "b.png")
            (d / "prompt.txt").write_text(prompt + "\n", encoding="utf-8")
    return root


def make_relation252k(root: Union[str, Path], tasks: Sequence[str] = ("1-A", "2-B"), per_task: int = 3) -> Path:
    """Relation252k's layout in ``root``: <task>/Group1/labels.json and ``per_task`` side-by-side (a | a') 64x32
    images per task. Returns ``root``."""
    import json

    from PIL import Image

    root = Path(root)
    for t, task in enumerate(tasks):
        group = root / task / "Group1"
        group.mkdir(parents=True)
        labels = []
        for i in range(per_task):
            Image.new("RGB", (64, 32), (40 * i, 30 * t, 90)).save(group / f"{i}.png")
            labels.append({"img_name": f"{i}.png", "edit_instruction": f"edit {task} {i}"})
        (group / "labels.json").write_text(json.dumps(labels))
    return root


def make_runs_folder(root: Union[str, Path], evalset: Union[str, Path], *, b_prime_fn=None, seed: int = 0) -> Path:
    """A runs folder from a folder-layout evaluation set: its a, a', b and prompt.txt copied, b' =
    ``b_prime_fn(b, rng)`` (a numpy Generator; default: b plus uniform integer noise in [-40, 40]); returns root."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    root, evalset = Path(root), Path(evalset)
    for prompt in sorted(evalset.glob("*/*/prompt.txt")):
        src = prompt.parent
        d = root / src.parent.name / src.name
        d.mkdir(parents=True, exist_ok=True)
        for stem in ("a", "a_prime", "b"):
            with Image.open(src / f"{stem}.png") as image:
                image.save(d / f"{stem}.png")
        with Image.open(src / "b.png") as image:
            b = image.convert("RGB")
        if b_prime_fn is None:
            arr = np.asarray(b, dtype=np.int16) + rng.integers(-40, 41, size=(b.height, b.width, 3))
            b_prime = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
        else:
            b_prime = b_prime_fn(b, rng)
        b_prime.save(d / "b_prime.png")
        (d / "prompt.txt").write_text(prompt.read_text(encoding="utf-8"), encoding="utf-8")
    return root


def make_released_evalset(root: Union[str, Path], sizes: dict, *, a_size: tuple = (60, 40), n_a_prime: int = 2) -> Path:
    """The released LoRWeB evaluation layout in ``root``: a = ``original/unsplash_animals/dog.jpg`` (``a_size``),
    other photos there of ``sizes`` (stem -> (width, height)), and ``n_a_prime`` a' images of one prompt
    (``decoded_random_inference_set/db_not_in_trainset/animals/Add_a_hat/dog_<k>.png``, 30x20); random pictures.
    Returns root."""
    rng = random.Random(0)
    root = Path(root)
    orig = root / "original/unsplash_animals"
    orig.mkdir(parents=True)
    random_picture(rng, a_size).save(orig / "dog.jpg")
    for stem, size in sizes.items():
        random_picture(rng, size).save(orig / f"{stem}.jpg")
    prompt = root / "decoded_random_inference_set/db_not_in_trainset/animals/Add_a_hat"
    prompt.mkdir(parents=True)
    for k in range(n_a_prime):
        random_picture(rng, (30, 20)).save(prompt / f"dog_{k}.png")
    return root


class FixedJudge:
    """A judge for tests: answers every score question accuracy 7 / consistency 8 and every pairwise question "B'1",
    and records each question as (kind, id, against) in ``asked``."""

    name = "fixed"

    def __init__(self):
        self.asked = []

    def __call__(self, request):
        """The fixed answer's JSON text for ``request``."""
        self.asked.append((request.kind, request.id, request.against))
        if request.kind == "score":
            return '{"metrics": {"accuracy": 7, "consistency": 8}}'
        return '{"better": 1}'


def b_picks_without_warnings(root: Union[str, Path]) -> tuple[list, bool]:
    """(the sorted stems of the b photos ``read_evalset`` picks from the evaluation set at ``root``, whether any
    triplet is flagged ``b_aspect_outside_tolerance``), read with every LoRWeB warning an error (raised as a
    LoRWeBWarning; this thread's only: other threads' warnings and the process-wide filters are left alone)."""
    from ..validation import LoRWeBWarning, silenced_lorweb_warnings
    from .evalsets import read_evalset

    said: list = []
    with silenced_lorweb_warnings(into=said):
        triplets = read_evalset(root)
    if said:
        raise LoRWeBWarning(said[0])
    return sorted(t.b.path.stem for t in triplets), any(t.extra.get("b_aspect_outside_tolerance") for t in triplets)
