"""Automatic metrics of the paper (section 4.2): CLIP directional similarity and LPIPS between b and b'.

- ``clip_dir`` = cos(e(a') - e(a), e(b') - e(b)), e = the L2-normalised ``image_embeds`` of CLIP ViT-L/14
  (``CLIPVisionModelWithProjection``) through the slow (PIL) CLIP image processor with the sizes the official query
  uses (``size`` and ``crop_size`` = the model's image size: shortest side resized, centre crop), built by
  ``flux._official_processor`` (``CLIPImageProcessorPil`` in transformers >= 5, where ``CLIPImageProcessor`` is the
  torchvision-backed class; ``CLIPImageProcessor`` before). A zero direction (a' = a) gives 0.
- ``lpips`` = LPIPS(b, b') with the ``lpips`` package (v0.1, AlexNet by default), inputs in [-1, 1] at b''s size (b is
  resized to b''s size, bicubic, when they differ). The backbone's ImageNet weights are read from torchvision's cache
  (``$TORCH_HOME/hub/checkpoints/<file>``) or from ``weights``; nothing is downloaded. The linear calibration layers
  ship inside the lpips package.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence, Union

import torch

from .. import _locks
from .._locks import holding
from ..validation import require
from .evalsets import EvalInputError, file_signature

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
LPIPS_NETS = ("alex", "vgg", "squeeze")


def weights_signature(path: Union[str, Path]) -> str:
    """``file_signature`` of a weights file, or of the files directly inside a model folder (config, weights,
    processor config): a file replaced at the same path gives another signature, so cached metric values computed
    with the old weights are not served for the new ones."""
    path = Path(path)
    return file_signature(*(sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path]))


# ------------------------------------------------------------------------------------------------------- CLIP
def check_clip_encoder(encoder: Union[str, Path]) -> None:
    """EvalInputError when the CLIP ``encoder`` can be seen not to load without loading it: a local path that does
    not exist or is no model folder, a hub id not cached under HF_HUB_OFFLINE (``validation.model_source_problem``;
    transformers would call a missing absolute path a malformed repo id)."""
    from ..validation import model_source_problem

    problem = model_source_problem(encoder, "config.json")
    if problem is not None:
        raise EvalInputError(f"cannot load the CLIP encoder {encoder}: it {problem}")


class ClipDirectional:
    """CLIP directional similarity. ``encoder``: hub id or local directory of a CLIP checkpoint, loaded frozen in
    ``dtype`` on ``device`` (None: CPU); EvalInputError when it cannot be loaded (``check_clip_encoder`` first)."""

    @holding(_locks.LOADING)  # model loads are serialized per process (see _locks)
    def __init__(self, encoder: Union[str, Path] = DEFAULT_CLIP, *, device=None, dtype=torch.float32):
        from transformers import AutoConfig, CLIPVisionModelWithProjection

        from ..flux import _official_processor, exception_first_line, load_complete_pretrained

        self.name = str(encoder)
        check_clip_encoder(self.name)
        try:
            model_type = AutoConfig.from_pretrained(encoder).model_type
            if model_type not in ("clip", "clip_vision_model"):  # e.g. a FLUX pipeline's text_encoder/ folder
                raise ValueError(f"it is a {model_type!r} model; clip_dir needs a CLIP checkpoint with its vision "
                                 "model and projection (e.g. openai/clip-vit-large-patch14)")
            model = load_complete_pretrained(CLIPVisionModelWithProjection, encoder, dtype)
            # the slow (PIL) processor at the model's image size, as the official query
            self.processor = _official_processor("clip", encoder, int(model.config.image_size))
        except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:  # RuntimeError: mismatched sizes
            raise EvalInputError(f"cannot load the CLIP encoder {self.name!r}: {exception_first_line(exc)}") from exc
        self.model = model.eval().requires_grad_(False)
        #: the metric cache's key for this encoder: its name, and for a local folder its files' signature
        self.cache_id = f"clip:{self.name}" + (f"@{weights_signature(encoder)}" if Path(encoder).is_dir() else "")
        if device is not None:
            self.model.to(device)

    @torch.no_grad()
    def embed(self, images: Sequence) -> torch.Tensor:
        """(N, projection_dim) fp32 L2-normalised ``image_embeds`` of N PIL images."""
        param = next(self.model.parameters())
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        emb = self.model(pixel_values=pixels.to(param.device, param.dtype)).image_embeds.float()
        return torch.nn.functional.normalize(emb, dim=-1)

    @staticmethod
    def directional(e_a, e_a_prime, e_b, e_b_prime) -> torch.Tensor:
        """cos(e_a' - e_a, e_b' - e_b) per row: four (Q, D) embeddings -> (Q,); 0 where a direction is zero."""
        return torch.nn.functional.cosine_similarity(e_a_prime - e_a, e_b_prime - e_b, dim=-1, eps=1e-12)

    def __call__(self, quads: Sequence[tuple]) -> list:
        """clip_dir for each (a, a', b, b') of Q PIL-image quadruples: a list of Q floats in [-1, 1] (one batch of
        4Q images)."""
        if not quads:
            return []
        emb = self.embed([im for quad in quads for im in quad]).view(len(quads), 4, -1)
        return self.directional(emb[:, 0], emb[:, 1], emb[:, 2], emb[:, 3]).tolist()


# ------------------------------------------------------------------------------------------------------ LPIPS
def _tv_weights(net: str):
    """torchvision's ImageNet weights enum of the LPIPS backbone ``net`` (its ``url`` names the cached file)."""
    models = require("torchvision.models", "the LPIPS backbones", error=EvalInputError)

    return {"alex": models.AlexNet_Weights.IMAGENET1K_V1, "vgg": models.VGG16_Weights.IMAGENET1K_V1,
            "squeeze": models.SqueezeNet1_1_Weights.IMAGENET1K_V1}[net]


def lpips_backbone_file(net: str = "alex") -> Path:
    """Where torchvision (and so the lpips package) looks for the backbone's ImageNet weights:
    ``torch.hub.get_dir()/checkpoints/<file name of the torchvision weights URL>`` (follows ``$TORCH_HOME``);
    EvalInputError for a ``net`` not in LPIPS_NETS."""
    if net not in LPIPS_NETS:
        raise EvalInputError(f"unknown LPIPS network {net!r}; choose from {LPIPS_NETS}")
    url = _tv_weights(net).url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _tv_backbone(net: str):
    """The torchvision backbone of ``net`` without weights (``weights=None``: nothing is downloaded)."""
    from torchvision import models

    return {"alex": models.alexnet, "vgg": models.vgg16, "squeeze": models.squeezenet1_1}[net](weights=None)


def check_lpips(net: str = "alex", weights: Union[str, Path, None] = None) -> tuple:
    """(the lpips package, the backbone weights file) of ``LPIPSDistance(net, weights=weights)``, found without
    loading anything (``eval score`` checks them before a judge loads): EvalInputError for an unknown ``net``, a
    package that cannot be imported, or a weights file that does not exist."""
    if net not in LPIPS_NETS:
        raise EvalInputError(f"unknown LPIPS network {net!r}; choose from {LPIPS_NETS}")
    lpips = require("lpips", "the LPIPS metric", error=EvalInputError)  # names torchvision when that is missing
    path = Path(weights) if weights else lpips_backbone_file(net)
    if not path.is_file():
        raise EvalInputError(
            f"LPIPS backbone weights not found: {path}. Place torchvision's {net} ImageNet weights "
            f"({_tv_weights(net).url.rsplit('/', 1)[-1]}, from {_tv_weights(net).url}) at "
            f"{lpips_backbone_file(net)} (TORCH_HOME/hub/checkpoints), or pass --lpips-weights PATH")
    return lpips, path


class LPIPSDistance:
    """LPIPS(b, b') through the lpips package with the backbone weights loaded from a local file: ``weights``, or
    ``lpips_backbone_file(net)`` when None. EvalInputError for an unknown ``net``, a missing lpips package, or a
    missing or unloadable weights file."""

    @holding(_locks.LOADING)
    def __init__(self, net: str = "alex", *, weights: Union[str, Path, None] = None, device=None):
        from ..model import global_rng_kept

        lpips, path = check_lpips(net, weights)
        # the networks in float32 whatever torch's default dtype (switched for the build only when it is another:
        # lpips loads its own weights into the parameters it makes), and their random initial values (overwritten
        # by the files' weights) drawn without changing the caller's random state
        default_dtype = torch.get_default_dtype()
        try:
            if default_dtype != torch.float32:
                torch.set_default_dtype(torch.float32)
            with global_rng_kept():
                try:
                    state = torch.load(path, map_location="cpu", weights_only=True)
                    backbone = _tv_backbone(net)
                    backbone.load_state_dict(state)
                except Exception as exc:  # a corrupt or wrong file
                    raise EvalInputError(f"cannot load LPIPS {net} backbone weights from {path}: {exc}") from exc
                with _locks.WARNING_FILTERS, warnings.catch_warnings():  # (process-wide: one block at a time)
                    warnings.simplefilter("ignore")  # torchvision's deprecation warning for pretrained=False
                    model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        finally:
            if torch.get_default_dtype() != default_dtype:
                torch.set_default_dtype(default_dtype)
        # lpips' slices keep torchvision's feature indices: slice<k>.<i>.<param> <- features.<i>.<param>
        features = backbone.features.state_dict()
        slices = {}
        for name in model.net.state_dict():
            _, idx, param = name.split(".", 2)
            slices[name] = features[f"{idx}.{param}"]
        model.net.load_state_dict(slices)
        self.net, self.weights = net, str(path)
        self.cache_id = f"lpips:{net}:{path}@{weights_signature(path)}"  # the metric cache's key for these weights
        self.model = model.eval().requires_grad_(False)
        if device is not None:
            self.model.to(device)

    @staticmethod
    def to_tensor(image) -> torch.Tensor:
        """(1, 3, H, W) float32 in [-1, 1] from an RGB PIL image."""
        import numpy as np

        arr = np.asarray(image.convert("RGB"), dtype=np.float32)
        return torch.from_numpy(arr).permute(2, 0, 1)[None] / 127.5 - 1.0

    @torch.no_grad()
    def __call__(self, b, b_prime) -> float:
        """LPIPS(b, b') of two PIL images (b resized to b''s size with bicubic when they differ), a float; lower:
        closer. EvalInputError when b' is too small for the backbone."""
        from PIL import Image

        if b.size != b_prime.size:
            b = b.resize(b_prime.size, Image.BICUBIC)
        param = next(self.model.parameters())
        x0, x1 = (self.to_tensor(im).to(param.device) for im in (b, b_prime))
        try:
            return float(self.model(x0, x1).flatten()[0])
        except RuntimeError as exc:
            if "too small" in str(exc):
                raise EvalInputError(f"b' of size {b_prime.size} is too small for LPIPS {self.net}: {exc}") from exc
            raise
