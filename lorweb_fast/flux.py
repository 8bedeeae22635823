"""FLUX.1-Kontext integration: analogy grids, the batch-1 merged fast path and coefficient plots.

Works on diffusers' own ``FluxTransformer2DModel`` after ``inject_lorweb`` / ``load_lorweb_weights``. (The
pipeline wrapper, the training loop and the CLI are not written yet; see the README's Status.)
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Union

import torch
from torch import nn

from .layer import LoRWeBLinear, has_plain_weight
from .model import lorweb_layers
from .ops import column_scaling, concat_basis


# ----------------------------------------------------------------------------------------------------- grids
def _cell_size(images, long_edge: int, multiple: int = 16) -> tuple[int, int]:
    """(width, height) of one grid cell: the aspect ratio of b, the grid's long edge capped at ``long_edge`` and
    both sides multiples of ``multiple`` (FLUX latents are packed 2x2 after the 8x VAE)."""
    w, h = images[-1].size
    scale = min(1.0, long_edge / (2 * max(w, h)))
    cw = max(multiple, int(w * scale) // multiple * multiple)
    ch = max(multiple, int(h * scale) // multiple * multiple)
    return cw, ch


def make_grid(top_left, top_right, bottom_left, bottom_right, *, long_edge: int = 512):
    """A 2x2 PIL grid [top_left top_right; bottom_left bottom_right] of equal cells (resized to b's aspect)."""
    from PIL import Image

    cells = [im.convert("RGB") for im in (top_left, top_right, bottom_left, bottom_right)]
    cw, ch = _cell_size(cells[2:3], long_edge)
    grid = Image.new("RGB", (2 * cw, 2 * ch))
    for i, im in enumerate(cells):
        grid.paste(im.resize((cw, ch), Image.BICUBIC), ((i % 2) * cw, (i // 2) * ch))
    return grid


def control_grid(a, a_prime, b, *, long_edge: int = 512):
    """The conditioning grid [a a'; b b] (METHOD.md)."""
    return make_grid(a, a_prime, b, b, long_edge=long_edge)


def target_grid(a, a_prime, b, b_prime, *, long_edge: int = 512):
    """The training target grid [a a'; b b']."""
    return make_grid(a, a_prime, b, b_prime, long_edge=long_edge)


def bottom_right_cell(grid):
    """b' from a generated grid."""
    w, h = grid.size
    return grid.crop((w // 2, h // 2, w, h))


# ------------------------------------------------------------------------------------------ merged fast path
def merged_weight(layer: LoRWeBLinear) -> torch.Tensor:
    """``W + scale * sum_n alpha[n] (A_n B_n)^T`` computed in fp32 and rounded once to W's dtype. (out, in)."""
    coeffs = layer.coefficients
    if coeffs is None:
        raise RuntimeError("cannot merge a LoRWeBLinear without coefficients: call set_query first")
    if coeffs.shape[0] != 1 and not bool((coeffs == coeffs[:1]).all()):
        raise ValueError(f"merging needs one analogy (batch size 1), got coefficients for {coeffs.shape[0]} "
                         "different samples")
    w = layer.base_layer.weight
    scaling = column_scaling(coeffs[0].detach(), layer.rank, layer.scale)  # (R,)
    a_cat, b_cat = concat_basis(layer.lora_A.detach().float(), layer.lora_B.detach().float())  # (in, R), (R, out)
    delta = (a_cat * scaling.to(a_cat.device)) @ b_cat  # (in, out)
    return (w.detach().float() + delta.t().to(w.device)).to(w.dtype)


@contextlib.contextmanager
def merged(model: nn.Module) -> Iterator[nn.Module]:
    """Batch-1 fast path: inside the block every LoRWeB layer runs as its plain base layer with the current
    analogy's mixture merged into the weight, so a denoising step costs what the base model costs.

    On entry each base weight is replaced by ``merged_weight`` (fp32 math, one rounding); the original tensors are
    kept, untouched, and put back on exit (also on error), so the weights are restored bit for bit: nothing is ever
    subtracted. Holds one extra copy of the adapted weights while active. Needs plain (non-quantized) base weights
    and coefficients for a single analogy (``set_query`` with one query).
    """
    layers = lorweb_layers(model)
    for name, layer in layers.items():
        if not has_plain_weight(layer.base_layer):
            raise TypeError(f"cannot merge into {name}: its base layer {type(layer.base_layer).__name__} has no "
                            "plain tensor weight (quantized layers run unmerged)")
        if layer._merged:
            raise RuntimeError(f"{name} is already merged (nested merged() blocks)")
    merged_weights = {name: merged_weight(layer) for name, layer in layers.items()}  # all or nothing
    originals = {}
    try:
        for name, layer in layers.items():
            weight = layer.base_layer.weight
            originals[name] = weight.data
            weight.data = merged_weights.pop(name)
            layer._merged = True
        yield model
    finally:
        for name, data in originals.items():
            layer = layers[name]
            layer.base_layer.weight.data = data
            layer._merged = False


# -------------------------------------------------------------------------------------------- analogy encoder
class AnalogyEncoder:
    """Frozen image encoder turning analogies (a, a', b) into LoRWeB queries.

    query = concat(image_embeds(a), image_embeds(a'), image_embeds(b)) -> (B, 3 * projection_dim); 2304 for
    CLIP ViT-L/14. Each image goes through the image processor separately. ``model`` is a hub id or a local
    directory holding a ``CLIPVisionModelWithProjection`` and its ``CLIPImageProcessor``.
    """

    def __init__(self, model: Union[str, Path] = "openai/clip-vit-large-patch14", *, device=None,
                 dtype: torch.dtype = torch.float32):
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        self.processor = CLIPImageProcessor.from_pretrained(model)
        self.model = CLIPVisionModelWithProjection.from_pretrained(model, dtype=dtype).eval().requires_grad_(False)
        if device is not None:
            self.model.to(device)

    @property
    def query_dim(self) -> int:
        return 3 * int(self.model.config.projection_dim)

    @torch.no_grad()
    def embed(self, images) -> torch.Tensor:
        """(B, projection_dim) unnormalized image embeddings of a list of PIL images."""
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        param = next(self.model.parameters())
        return self.model(pixel_values=pixels.to(param.device, param.dtype)).image_embeds.float()

    def __call__(self, a, a_prime, b) -> torch.Tensor:
        """Queries (B, 3 * projection_dim) for B analogies; each argument is an image or a list of B images."""
        groups = [x if isinstance(x, (list, tuple)) else [x] for x in (a, a_prime, b)]
        if len({len(g) for g in groups}) != 1:
            raise ValueError(f"a, a_prime and b must hold the same number of images, got {[len(g) for g in groups]}")
        return torch.cat([self.embed(g) for g in groups], dim=1)


# ------------------------------------------------------------------------------------------------------ plots
def plot_coefficients(model: nn.Module, path: Union[str, Path], *, sample: int = 0) -> Path:
    """Heat map (layers x basis LoRAs) of the coefficients the current analogy selected, for one sample."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    coeffs = {n: l.coefficients for n, l in lorweb_layers(model).items() if l.coefficients is not None}
    if not coeffs:
        raise RuntimeError("no coefficients to plot: call set_query first")
    names = list(coeffs)
    data = torch.stack([coeffs[n][sample].detach().float().cpu() for n in names]).numpy()
    fig, ax = plt.subplots(figsize=(max(6, data.shape[1] * 0.25 + 3), max(4, len(names) * 0.12 + 2)))
    im = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("basis LoRA n")
    ax.set_ylabel("layer")
    step = max(1, len(names) // 40)
    ax.set_yticks(range(0, len(names), step))
    ax.set_yticklabels(names[::step], fontsize=5)
    ax.set_title(f"LoRWeB coefficients (sample {sample})")
    fig.colorbar(im, ax=ax, label="alpha")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
