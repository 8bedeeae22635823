"""``LoRWeBLinear``: a drop-in wrapper adding a per-sample mixture of a LoRA basis to any linear-like layer."""

from __future__ import annotations

import contextlib
import contextvars
import copy
import math
import weakref
from collections import defaultdict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .reference import ACTIVATIONS, REDUCTIONS
from .validation import check_finite_tensor, check_float_tensor, check_has_values, check_int, check_real, warn

#: attributes a copy (deepcopy, pickle) leaves out: weak references to the sources, and what is remembered about
#: the coefficients (the copy decides it again for its own)
COPIED_WITHOUT = ("_coefficient_sources", "_one_analogy_memo", "_moved_coefficients")

#: True inside ``uninitialised_lorweb_tensors()``: new LoRWeBLinear layers leave their LoRWeB tensors uninitialised
_UNINITIALISED = contextvars.ContextVar("lorweb_fast_uninitialised", default=False)


@contextlib.contextmanager
def uninitialised_lorweb_tensors():
    """LoRWeBLinear layers built inside leave lora_A, lora_B, lora_keys and att_lora_to_q.weight uninitialised
    (``torch.empty``; an identity projection is still the identity), for a checkpoint load that overwrites them
    all: no initial values computed (on CPU most of a fresh load's time) and none drawn from the RNG."""
    token = _UNINITIALISED.set(True)
    try:
        yield
    finally:
        _UNINITIALISED.reset(token)


#: ``LoRWeBLinear.merged_weight_for`` builds a merged weight in blocks of rows: MERGE_BLOCK_BYTES of fp32 (float64)
#: work each, or more for a large layer, which is built in MERGE_MAX_BLOCKS blocks at most (each block is a few
#: kernel launches: "jit" merges every forward)
MERGE_BLOCK_BYTES = 4 * 2 ** 20
MERGE_MAX_BLOCKS = 8


def _refuse_inside_merged(layer: "LoRWeBLinear", what: str) -> None:
    if layer._merged:
        raise RuntimeError(f"{what} inside a merged() block (or on a fuse_lora()'d model): the merged weights were "
                           "built from the current coefficients and would silently stay in use; exit the merged() "
                           "block (or unfuse_lora()) first")


def linear_dims(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like module (nn.Linear and its subclasses, e.g. bitsandbytes)."""
    try:
        return int(base.in_features), int(base.out_features)
    except AttributeError:
        raise TypeError(f"{type(base).__name__} is not linear-like: it has no in_features/out_features") from None


def has_plain_weight(base: nn.Module) -> bool:
    """True when ``base(x)`` is exactly ``F.linear(x, base.weight, base.bias)`` on an ordinary tensor weight, so the
    fused kernels may read the weight directly. False for bitsandbytes (quantized weight, own forward)."""
    return (isinstance(base, nn.Linear) and type(base).forward is nn.Linear.forward
            and type(base.weight) in (nn.Parameter, torch.Tensor) and base.weight.is_floating_point())


def _diffusers_hook(module: nn.Module, name: str):
    """The diffusers hook ``name`` ("layerwise_casting", "group_offloading") registered on ``module`` itself, or
    None."""
    get_hook = getattr(module.__dict__.get("_diffusers_hook"), "get_hook", None)
    return get_hook(name) if callable(get_hook) else None


def default_adapter_dtype(base: nn.Module) -> torch.dtype:
    """The dtype a new LoRWeBLinear over ``base`` holds its LoRWeB tensors in: the compute dtype of diffusers'
    layerwise casting when ``base`` has it (its weight is stored in a low-precision dtype outside the forward), else
    the weight's dtype for a plain floating-point weight of 16 bits or more, else float32 (quantized and float8
    weights)."""
    compute = getattr(_diffusers_hook(base, "layerwise_casting"), "compute_dtype", None)
    if isinstance(compute, torch.dtype) and compute.is_floating_point:
        return compute
    if has_plain_weight(base) and base.weight.element_size() >= 2:
        return base.weight.dtype
    return torch.float32


def replaced_query_projection_error(name: str, layer: nn.Module) -> Optional[str]:
    """Why ``layer``'s ``att_lora_to_q`` cannot be used, or None: a module whose forward is not ``nn.Linear``'s (a
    quantization of the whole model after LoRWeB was injected turns it into e.g. quanto's QLinear or a bitsandbytes
    layer, whose weight is no plain tensor): ``set_query`` reads that weight directly, and saving or loading it
    would fail inside safetensors or write quantized values."""
    proj = layer.att_lora_to_q
    if type(proj).forward is nn.Linear.forward:
        weight = proj._parameters.get("weight")
        weight = proj._buffers.get("weight") if weight is None else weight  # ("none": the identity buffer)
        if weight is None or _torch_tensor_type(weight):
            return None  # (None: parametrized, refused where it matters)
        return (f"layer {name}: its att_lora_to_q weight is a {type(weight).__name__}, not a plain tensor (the "
                "model was quantized after LoRWeB was injected, e.g. by torchao's quantize_, which keeps the "
                "nn.Linear and swaps its weight?); quantize the base before injecting LoRWeB or loading a "
                "checkpoint, or only the LoRWeB layers' base layers (e.g. quantize_'s filter_fn on "
                "'.base_layer')")
    if hasattr(proj, "adapter_layer_names") and hasattr(proj, "get_base_layer"):  # peft's BaseTunerLayer
        return (f"layer {name}: its att_lora_to_q is a peft adapter layer ({type(proj).__name__}): a peft / "
                "diffusers LoRA was added after LoRWeB with target modules that reach into LoRWeB's layers (e.g. "
                "target_modules='all-linear'); LoRWeB does not stack with peft adapters: take LoRWeB out with "
                "lf.remove_lorweb(model) (the peft layers stay), unload the peft adapter, then inject or load "
                "LoRWeB again")
    return (f"layer {name}: its att_lora_to_q is a {type(proj).__name__}, not a plain nn.Linear (the model was "
            "quantized or converted after LoRWeB was injected?); quantize the base before injecting LoRWeB or "
            "loading a checkpoint")


def _torch_tensor_type(t: torch.Tensor) -> bool:
    """Whether ``t`` is a tensor of torch's own (a plain tensor or Parameter, a DTensor of FSDP2, the FakeTensor /
    FunctionalTensor of torch.export, make_fx and fake-mode tracing), not a quantized subclass of another package
    (torchao, diffusers' GGUFParameter, optimum-quanto, bitsandbytes)."""
    return type(t) in (nn.Parameter, torch.Tensor) or type(t).__module__.startswith("torch.")


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, skipped when ``t`` has that dtype already (then ``.to`` returns ``t`` itself anyway)."""
    return t if t.dtype == dtype else t.to(dtype)


def one_analogy(coeffs: torch.Tensor) -> bool:
    """Whether (B, N) coefficients hold one analogy: one row, or identical rows (a host synchronisation for B > 1).
    False for an empty batch. ``LoRWeBLinear.holds_one_analogy`` remembers the answer for its coefficients."""
    return coeffs.shape[0] == 1 or (coeffs.shape[0] > 1 and bool((coeffs == coeffs[:1]).all()))


def rows_identical(coeffs: torch.Tensor) -> torch.Tensor:
    """(..., B, N) coefficients -> (...,) bool tensor: all B rows equal to the first (on their device, no host
    synchronisation; True for B = 1)."""
    return (coeffs == coeffs[..., :1, :]).flatten(-2).all(-1)


def decide_one_analogy(layers) -> None:
    """Decide ``holds_one_analogy`` for every LoRWeBLinear of ``layers`` with coefficients of B > 1 rows not decided
    yet: one host synchronisation per device for all of them, instead of one per layer."""
    undecided = defaultdict(list)
    for layer in layers:
        coeffs = layer._coefficients  # read once: the flag is remembered for this tensor
        if coeffs is not None and coeffs.shape[0] > 1 and layer._one_analogy_memo_for(coeffs) is None:
            undecided[coeffs.device].append((layer, coeffs))
    for members in undecided.values():
        flags = torch.stack([rows_identical(coeffs) for _, coeffs in members]).tolist()
        for (layer, coeffs), flag in zip(members, flags):
            layer.remember_one_analogy(flag, coeffs)


def tensor_version(t: torch.Tensor) -> Optional[int]:
    """``t._version`` (it grows with every in-place change), None for an inference tensor, which has none."""
    try:
        return t._version
    except RuntimeError:
        return None


def _parameter_version(t: Optional[torch.Tensor]) -> Optional[int]:
    """``tensor_version`` of an ``nn.Parameter``; None for anything else (the "none" projection's identity buffer,
    which DDP's buffer broadcast may write in place, with the same values, before a forward)."""
    return tensor_version(t) if isinstance(t, nn.Parameter) else None


def has_forward_hooks(module: nn.Module) -> bool:
    """True when calling ``module`` does more than its class's forward: torch forward (pre-)hooks or backward
    (pre-)hooks (which fire only when the module is called), a ``forward`` replaced on the instance (how kohya,
    LyCORIS and the official toolkit attach their networks: ``org_module.forward = ...``), an accelerate hook
    (``_hf_hook``: sequential CPU offload loads the weight inside the forward) or diffusers hooks
    (``_diffusers_hook``: group offloading, layerwise casting). Such a base layer must be called, not read: its
    weight may be on the meta or offload device (or in a storage dtype) outside its forward, and its forward or
    hooks must run."""
    # accelerate's _hf_hook and diffusers' HookRegistry are plain attributes, held in the module's __dict__ (read
    # there: a getattr that misses goes through nn.Module.__getattr__, which raises and catches on every call)
    attrs = module.__dict__
    registry = attrs.get("_diffusers_hook")
    forward = attrs.get("forward")  # (diffusers puts the class's bound forward back there when its hooks go)
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or attrs.get("_hf_hook") is not None
                or (forward is not None and getattr(forward, "__func__", None) is not type(module).forward)
                or (registry is not None and getattr(registry, "hooks", getattr(registry, "_hooks", True))))


def group_offloading_modes(model: nn.Module) -> dict[int, str]:
    """``{id(tensor): mode}`` for the tensors of ``model`` that diffusers' group offloading (``enable_group_offload``
    / ``apply_group_offloading``) manages, with ``mode``:

    * ``"disk"`` (``offload_to_disk_path``): outside their group's forward the tensors are empty placeholders, and
      every onload reads them back from the file written when offloading was enabled;
    * ``"stream"`` (``use_stream=True``): outside the forward they are CPU copies taken when offloading was
      enabled, and every onload copies those copies (a weight replaced in the meantime is lost);
    * ``"memory"``: moved between devices as they are.

    Empty without group offloading."""
    modes: dict[int, str] = {}
    for mode, group in _offloading_groups(model):
        tensors = [*getattr(group, "parameters", ()), *getattr(group, "buffers", ())]
        for member in getattr(group, "modules", ()):
            tensors += [*member.parameters(), *member.buffers()]
        for t in tensors:
            modes.setdefault(id(t), mode)
    return modes


def group_offloading_members(model: nn.Module) -> tuple[bool, set[int]]:
    """(whether any group keeps fixed tables of its tensors, the ids of the modules the in-memory groups move whole).
    Disk and stream groups fix their tensors when offloading is enabled; an in-memory group moves its ``modules``
    with ``.to()``, so a layer added under one of them later (block-level offloading) is moved with it, while one
    added beside a leaf-level group's layer belongs to no group."""
    fixed, members = False, set()
    for mode, group in _offloading_groups(model):
        fixed = fixed or mode != "memory"
        members.update(id(m) for m in getattr(group, "modules", ()))
    return fixed, members


def _offloading_groups(model: nn.Module):
    """(mode, diffusers ModuleGroup) of every group-offloading hook in ``model`` (see group_offloading_modes)."""
    for module in model.modules():
        group = getattr(_diffusers_hook(module, "group_offloading"), "group", None)
        if group is not None:
            yield ("disk" if getattr(group, "offload_to_disk_path", None) else
                   "stream" if getattr(group, "stream", None) is not None else "memory"), group


def refuse_disk_group_offloading(layers: dict[str, "LoRWeBLinear"], modes: dict[int, str], what: str) -> None:
    """Raise when group offloading keeps a LoRWeB layer's tensors on disk (``group_offloading_modes``): ``what``
    would read placeholders or write into them (the next onload re-reads the file)."""
    if "disk" not in modes.values():  # set_query runs this every step: nothing per layer without disk groups
        return
    for name, layer in layers.items():
        tensors = [layer.lora_A, layer.lora_B, layer.lora_keys, layer.att_lora_to_q.weight]
        weight = getattr(layer.base_layer, "weight", None)
        if isinstance(weight, torch.Tensor):
            tensors.append(weight)
        if any(modes.get(id(t)) == "disk" for t in tensors):
            raise RuntimeError(f"{what}: {name} is group-offloaded to disk (offload_to_disk_path): outside its "
                               "group's forward its tensors are placeholders and every onload re-reads the file "
                               "written when offloading was enabled, so coefficients would be computed from "
                               "placeholders and new weights or merges lost; offload in memory instead (without "
                               "offload_to_disk_path)")


def refuse_sharded_weight(base: nn.Module) -> None:
    """Tensor parallelism shards the base weight (a DTensor with a Shard placement) but not the LoRA basis: refuse."""
    weight = getattr(base, "weight", None)
    placements = getattr(weight, "placements", None)
    if placements is not None and any(p.is_shard() for p in placements):
        raise NotImplementedError(
            f"the base layer of this LoRWeB layer has a tensor-parallel sharded weight ({placements}); LoRWeB does "
            "not support tensor parallelism yet (the basis is not sharded). Use context parallelism instead.")


class LoRWeBLinear(nn.Module):
    """``y = base(x) + scale * sum_n alpha_b[n] B_n^T A_n^T x`` with alpha_b computed per sample from a query.

    Parameters (official names and layout, see METHOD.md):
        lora_A: (N, in, r), lora_B: (N, r, out), lora_keys: (N, key_dim), att_lora_to_q.weight: (key_dim, query_dim).

    The LoRWeB parameters are created and initialised in ``dtype`` (default ``default_adapter_dtype``: the base
    weight's dtype for a plain weight of 16 bits or more, the compute dtype under diffusers' layerwise casting, fp32
    for a base without a plain weight such as bitsandbytes layers, or with a float8 weight) on the base weight's
    device (the default device for a meta or absent weight); the trainer passes float32, as the official network is
    initialised in fp32 (NVlabs/LoRWeB toolkit/models/AttLoRA.py ``AttLoRAModule.__init__``). lora_alpha None means
    rank (scale = lora_alpha / rank = 1); query_projection_type="none" holds an identity (key_dim, key_dim)
    projection instead (key_dim must equal query_dim); backend as in ``lorweb_fast.ops`` (None: the best available
    per call).

    The base layer is kept as ``base_layer``, not copied, and frozen (its parameters get ``requires_grad=False``,
    as peft freezes the layers it wraps: the base weight is frozen in LoRWeB, and the fused backward then skips its
    gradient). Coefficients are set with
    ``set_coefficients`` (usually by ``lorweb_fast.set_query`` for the whole model) and stay until replaced or
    cleared; a forward without them raises.

    Inputs: (B, S, in) or (B, in) (more dimensions, (B, ..., in), are one sample's tokens); coefficients: (B, N).
    Outputs: (B, S, out), (B, out) or (B, ..., out).
    """

    def __init__(self, base: nn.Module, *, num_loras: int = 32, rank: int = 4, lora_alpha: Optional[float] = None,
                 key_dim: int = 128, query_dim: int = 2304, heads: int = 1, activation: str = "softmax",
                 reduce: str = "mean", backend: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                 query_projection_type: str = "linear"):
        super().__init__()
        if isinstance(base, LoRWeBLinear):
            raise TypeError("base is already a LoRWeBLinear")
        in_features, out_features = linear_dims(base)
        for name, value in (("num_loras", num_loras), ("rank", rank), ("key_dim", key_dim),
                            ("query_dim", query_dim), ("heads", heads)):
            check_int(name, value, lo=1)
        if lora_alpha is not None:
            check_real("lora_alpha", lora_alpha, lo=0.0, lo_open=True)
        if key_dim % heads:
            raise ValueError(f"key_dim={key_dim} is not divisible by heads={heads}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
        if query_projection_type not in ("linear", "none"):
            raise ValueError(f"query_projection_type must be 'linear' or 'none', got {query_projection_type!r}")
        if query_projection_type == "none" and key_dim != query_dim:
            raise ValueError(f"query_projection_type='none' feeds the query to the keys directly, so key_dim must "
                             f"equal query_dim; got key_dim={key_dim}, query_dim={query_dim}")
        if backend is not None and backend not in ops.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {ops.BACKENDS} or None")
        self.base_layer = base
        self.in_features, self.out_features = in_features, out_features
        self.num_loras, self.rank, self.key_dim, self.query_dim = num_loras, rank, key_dim, query_dim
        self.heads, self.activation, self.reduce, self.backend = heads, activation, reduce, backend
        self.lora_alpha = float(rank if lora_alpha is None else lora_alpha)
        self.scale = self.lora_alpha / rank
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
        weight = getattr(base, "weight", None)
        if dtype is None:
            dtype = default_adapter_dtype(base)
        device = weight.device if isinstance(weight, torch.Tensor) and weight.device.type != "meta" else None
        factory = {"dtype": dtype, "device": device}
        initialise = not _UNINITIALISED.get()  # a checkpoint load overwrites every LoRWeB tensor: no values drawn
        self.lora_A = nn.Parameter(torch.empty(num_loras, in_features, rank, **factory))
        self.lora_B = nn.Parameter((torch.zeros if initialise else torch.empty)(num_loras, rank, out_features,
                                                                                **factory))
        self.lora_keys = nn.Parameter((torch.randn if initialise else torch.empty)(num_loras, key_dim, **factory))
        if initialise:
            self.att_lora_to_q = nn.Linear(query_dim, key_dim, bias=False, **factory)
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            self.att_lora_to_q = nn.Linear(query_dim, key_dim, bias=False, device="meta", dtype=dtype)
            self.att_lora_to_q.weight = nn.Parameter(torch.empty(key_dim, query_dim, **factory))
        # "none" (official nn.Identity): an identity projection held as a non-persistent buffer, not a parameter, so
        # it is never trained (not even after model.requires_grad_(True) in a custom loop, which would train a
        # tensor no checkpoint saves) and not saved
        self.query_projection_type = query_projection_type
        if query_projection_type == "none":
            del self.att_lora_to_q.weight
            self.att_lora_to_q.register_buffer("weight", torch.eye(key_dim, **factory), persistent=False)
        self._coefficients: Optional[torch.Tensor] = None
        self._query: Optional[torch.Tensor] = None  # per-forward mode, see set_query_per_forward
        #: what set_query computed the coefficients from (record_coefficient_sources): None unchecked, False stale
        self._coefficient_sources = None
        self._merged = False  # set by lorweb_fast.merged(): the mixture is folded into the base weight
        self._merge_jit = False  # set by merged(strategy="jit"): merged weight built inside each forward
        self._lorweb_scale = 1.0  # strength multiplier of the mixture (set_lorweb_scale)
        #: "auto": the mixture runs in the input's (or autocast's) dtype through the fused kernels (fp32 accumulation);
        #: "fp32": the official numerics (NVlabs/LoRWeB toolkit/network_mixins.py ``forward``): x and the query cast
        #: to fp32, coefficients and mixture in fp32 outside autocast, the result cast to the base output's dtype and
        #: added to it. Set by the trainer's ``adapter_precision``.
        self.adapter_precision = "auto"
        self._merged_grad_warned = [False]  # shared by the layers of one merged() block: one warning per block
        base.requires_grad_(False)  # W is frozen (METHOD.md), as peft freezes the layers it wraps

    def get_base_layer(self) -> "LoRWeBLinear":
        """``self``. diffusers' stock unload (``unload_lora()``, a stock pipeline's ``unload_lora_weights()``: its
        ``recurse_remove_peft_layers``) puts ``module.get_base_layer()`` in the place of every module with a
        ``base_layer`` attribute, meaning peft adapter layers. A LoRWeB layer is none: unloading a peft LoRA loaded
        beside LoRWeB leaves the LoRWeB layers in place (without this method that unload raised an AttributeError
        after removing part of the peft layers). ``lf.remove_lorweb`` takes LoRWeB out."""
        return self

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names) -> "LoRWeBLinear":
        """``self``. A ``PeftModel``'s ``merge_and_unload()`` / ``unload()`` (peft's ``_unload_and_optionally_merge``)
        merges and unloads every module with a ``base_layer`` attribute, calling ``merge`` (which a LoRWeB layer has
        not: the mixture changes with each analogy) unless the module has this method. A LoRWeB layer is no peft
        adapter: the peft LoRAs beside it are merged or unloaded and the LoRWeB layers stay in place, as with
        diffusers' ``unload_lora()``. ``lf.merged(model)`` merges one analogy's mixture; ``lf.remove_lorweb`` takes
        LoRWeB out."""
        return self

    def lorweb_tensors(self) -> dict[str, nn.Parameter]:
        """The LoRWeB parameters under their official checkpoint suffixes, in checkpoint order: lora_A (N, in, r),
        lora_B (N, r, out), lora_keys (N, key_dim), att_lora_to_q.weight (key_dim, query_dim) (left out when
        ``query_projection_type == "none"``: the official layer then has none)."""
        tensors = {"lora_A": self.lora_A, "lora_B": self.lora_B, "lora_keys": self.lora_keys}
        if self.query_projection_type == "linear":
            tensors["att_lora_to_q.weight"] = self.att_lora_to_q.weight
        return tensors

    # ------------------------------------------------------------------------------------------ coefficients
    @property
    def coefficients(self) -> Optional[torch.Tensor]:
        """(B, N) coefficients in use, or None."""
        return self._coefficients

    def set_coefficients(self, coeffs: Optional[torch.Tensor], *, check_finite: bool = True) -> None:
        """Use ``coeffs`` (B, N) floating point, finite (any device: the forward moves them to x's), for every
        following forward, until replaced; None clears them. A per-forward query is dropped either way.
        ``check_finite=False`` skips the finiteness check (``set_query`` checks all layers at once); coefficients on
        the meta device (no values) are refused either way.

        A view with a storage offset (e.g. one layer's slice of ``set_query``'s stacked (L, B, N) result) is stored
        as a copy: torch.compile guards on the storage offset of a tensor attribute, and an offset that grows with
        the batch size would recompile every compiled block at a new batch size.
        """
        _refuse_inside_merged(self, "set_coefficients / set_query")
        if coeffs is not None:
            if not isinstance(coeffs, torch.Tensor) or coeffs.dim() != 2 or coeffs.shape[1] != self.num_loras:
                shape = tuple(coeffs.shape) if isinstance(coeffs, torch.Tensor) else type(coeffs).__name__
                raise ValueError(f"coefficients must be (B, N={self.num_loras}), got {shape}")
            check_float_tensor("coefficients", coeffs)
            check_has_values("coefficients", coeffs)  # whatever check_finite says: the forward reads their values
            if check_finite:
                check_finite_tensor("coefficients", coeffs)
            # a view into a larger tensor (set_query's stack of every layer's rows) gets its own storage, so that
            # compiled code guards on no hidden base; an expanded row (stride 0) stays one row
            if coeffs.storage_offset() != 0 or (coeffs._base is not None and coeffs.untyped_storage().nbytes()
                                                > coeffs.numel() * coeffs.element_size()):
                coeffs = coeffs.clone()
            if coeffs.is_inference():  # (set under torch.inference_mode): a normal tensor, whose version counter
                with torch.inference_mode(False):  # shows in-place changes to what is remembered about it
                    coeffs = coeffs.clone()
        if coeffs is not None and not torch.compiler.is_compiling():  # (forbidden inside traced code: set_query in
            torch._dynamo.maybe_mark_dynamic(coeffs, 0)  # a compiled step) the batch may vary: mark_dynamic on x's
            # batch is not pinned to a constant B here
        self._coefficients = coeffs
        self._forget_coefficient_memos()
        self._query = None
        self._coefficient_sources = None  # set by hand: from whatever the caller chose

    #: (the class default: a module pickled before this attribute existed loads without it)
    _coefficient_sources = None
    #: (coefficients, (their version,), whether they hold one analogy): ``holds_one_analogy``'s answer for them
    _one_analogy_memo = None
    #: (coefficients, (their version, the device, inference mode), their copy there): ``_coefficients_on``'s copy
    _moved_coefficients = None

    def _forget_coefficient_memos(self) -> None:
        """The coefficients changed: what was remembered about the old ones is dropped (and no reference kept)."""
        self._one_analogy_memo = self._moved_coefficients = None

    @staticmethod
    def _remembered(memo: Optional[tuple], coeffs: torch.Tensor, key: tuple):
        """The value of ``memo`` = (coefficients, key, value) if it was made for this very ``coeffs`` tensor under
        ``key`` (whose first entry is their version), else None; never for a tensor without a version counter (an
        inference tensor: its in-place changes would be unseen)."""
        if memo is not None and memo[0] is coeffs and key[0] is not None and memo[1] == key:
            return memo[2]
        return None

    def _one_analogy_memo_for(self, coeffs: torch.Tensor) -> Optional[bool]:
        return self._remembered(self._one_analogy_memo, coeffs, (tensor_version(coeffs),))

    def remember_one_analogy(self, flag: bool, coefficients: Optional[torch.Tensor] = None) -> None:
        """Record whether ``coefficients`` (default: those in use) hold one analogy (decided by the caller, e.g.
        ``set_query`` in its finiteness check's synchronisation); remembered for that tensor object, so used only
        while it is the one in use and unchanged in place (coefficients another thread set meanwhile are decided
        again)."""
        if not isinstance(flag, bool):
            raise TypeError(f"remember_one_analogy takes a bool, got {type(flag).__name__}")
        coeffs = self._coefficients if coefficients is None else coefficients
        self._one_analogy_memo = None if coeffs is None else (coeffs, (tensor_version(coeffs),), flag)

    def holds_one_analogy(self) -> bool:
        """``one_analogy(self.coefficients)``: one row, or identical rows (False without coefficients or for an empty
        batch). Decided once per coefficient tensor (one host synchronisation for B > 1, none when ``set_query`` or
        ``merged()`` decided it already), not at every forward."""
        coeffs = self._coefficients
        if coeffs is None or coeffs.shape[0] <= 1:
            return coeffs is not None and coeffs.shape[0] == 1
        known = self._one_analogy_memo_for(coeffs)
        if known is None:
            known = one_analogy(coeffs)
            self.remember_one_analogy(known, coeffs)  # for the tensor decided (not whatever is in use by now)
        return known

    def _coefficients_on(self, coeffs: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``coeffs`` on ``device``. From the CPU to a GPU without a stream synchronisation (``non_blocking``: the
        pageable source is staged before the call returns); the coefficients set by ``set_query`` (without autograd
        history) are moved once and the copy kept until they change (model CPU offload: the coefficients stay on the
        CPU, every forward runs on the GPU)."""
        if coeffs.device == device:
            return coeffs
        non_blocking = coeffs.device.type == "cpu" and device.type == "cuda"
        if torch.compiler.is_compiling() or coeffs is not self._coefficients or coeffs.requires_grad:
            return coeffs.to(device, non_blocking=non_blocking)
        # keyed also on inference mode: a copy made inside it is an inference tensor, which autograd cannot save
        key = (tensor_version(coeffs), device, torch.is_inference_mode_enabled())
        moved = self._remembered(self._moved_coefficients, coeffs, key)
        if moved is not None:
            return moved
        moved = coeffs.to(device, non_blocking=non_blocking)
        self._moved_coefficients = (coeffs, key, moved)
        return moved

    def _projection_tensor(self) -> Optional[torch.Tensor]:
        """att_lora_to_q's weight tensor object as the layer holds it now: its parameter ("linear"), its identity
        buffer ("none"), or None under a parametrization."""
        projection = self.att_lora_to_q
        weight = projection._parameters.get("weight")
        return projection._buffers.get("weight") if weight is None else weight

    def record_coefficient_sources(self, routing_gradient_warning: Optional[list] = None) -> None:
        """Remember the lora_keys / att_lora_to_q tensors the current coefficients were computed from (``set_query``
        calls it), and the version counters of those that are parameters: a forward after they were replaced by
        other tensors (``torch.func.functional_call``, accelerate's ``set_module_tensor_to_device``, an assignment)
        or changed in place (an optimizer step, a ``load_state_dict`` into ``att_lora_to_q`` alone) raises instead
        of using coefficients computed from the old values. Writes through ``param.data`` (diffusers' ``EMAModel``
        ``copy_to`` / ``restore``) and torch's fused or bitsandbytes' 8-bit optimizer steps change no version counter
        and are not seen (a training forward then fails at backward: the coefficients' graph was freed): call
        ``set_query`` again.

        ``routing_gradient_warning``: ``set_query`` computed the coefficients without autograd history; a one-element
        list its layers share, so that a training forward (train mode, autograd enabled, lora_keys or att_lora_to_q
        requiring grad), where they would silently get no gradient, warns once for all of them."""
        keys, projection = self._parameters.get("lora_keys"), self._projection_tensor()
        self._coefficient_sources = (None if keys is None else weakref.ref(keys),
                                     None if projection is None else weakref.ref(projection),
                                     _parameter_version(keys), _parameter_version(projection),
                                     routing_gradient_warning)

    def _drop_coefficients(self) -> None:
        """Forget the coefficients (and what they were computed from): new LoRWeB parameters were loaded."""
        self._coefficients = self._coefficient_sources = None
        self._forget_coefficient_memos()

    def _coefficients_stale(self) -> bool:
        """Whether the coefficients came from lora_keys / att_lora_to_q tensors the layer no longer holds, or from
        parameter values changed in place since (their version counters)."""
        return self._sources_stale(self.__dict__.get("_coefficient_sources"))

    def _sources_stale(self, sources) -> bool:
        """``_coefficients_stale`` for recorded ``sources`` (None: unchecked, False: stale). Not asked under
        accelerate's offload hooks (``enable_sequential_cpu_offload``), which put new tensor objects in place around
        every forward. Inline (no generator, no tuple): it runs in every eager layer call."""
        if sources is None:
            return False
        if sources is False:
            return True
        projection_module = self._modules["att_lora_to_q"]  # (not nn.Module.__getattr__: this is the hot path)
        if "_hf_hook" in self.__dict__ or "_hf_hook" in projection_module.__dict__:
            return False
        keys_ref, projection_ref, keys_version, projection_version, _ = sources
        projection = projection_module._parameters.get("weight")
        if projection is None:
            projection = projection_module._buffers.get("weight")
        keys = self._parameters.get("lora_keys")
        return ((None if keys_ref is None else keys_ref()) is not keys
                or (None if projection_ref is None else projection_ref()) is not projection
                or (keys_version is not None and tensor_version(keys) != keys_version)
                or (projection_version is not None and tensor_version(projection) != projection_version))

    def _warn_routing_gets_no_gradient(self, sources) -> None:
        """Once per ``set_query`` (the layers share the flag): a training forward with coefficients computed without
        autograd gives lora_keys and att_lora_to_q no gradient (optimizers then skip them, silently)."""
        warned = sources[4]
        if (warned is not None and not warned[0] and self.training and torch.is_grad_enabled()
                and (self.lora_keys.requires_grad or self.att_lora_to_q.weight.requires_grad)):
            warned[0] = True
            warn("a training forward (train mode, autograd enabled) uses coefficients that set_query computed "
                 "without autograd (under torch.no_grad() or torch.inference_mode()): lora_keys and att_lora_to_q "
                 "get no gradient and do not train; call lorweb_fast.set_query with autograd enabled (the query "
                 "itself may come from a frozen encoder under no_grad), or freeze them (requires_grad_(False)); "
                 "for inference, call model.eval() or run the forward under torch.no_grad()")

    def set_query_per_forward(self, query: Optional[torch.Tensor], *, check_finite: bool = True) -> None:
        """Keep the (B, query_dim) query and compute this layer's coefficients inside every forward.

        For sharded training (FSDP): the LoRWeB parameters are then only used inside this module's own forward,
        where the wrapper has gathered them. Costs one (B x query_dim x key_dim) product per forward; inference
        should use ``set_coefficients`` / ``lorweb_fast.set_query`` instead (once per generation). None clears.
        ``check_finite=False`` skips the finiteness check; a query on the meta device (no values) is refused either way.
        """
        if query is not None and (not isinstance(query, torch.Tensor) or query.dim() != 2
                                  or query.shape[1] != self.query_dim):
            shape = tuple(query.shape) if isinstance(query, torch.Tensor) else type(query).__name__
            raise ValueError(f"query must be (B, query_dim={self.query_dim}), got {shape}")
        _refuse_inside_merged(self, "set_query")
        if query is not None:
            check_float_tensor("query", query)
            check_has_values("query", query)  # whatever check_finite says: the forward reads its values
            if check_finite:
                check_finite_tensor("query", query)
        self._coefficients = self._coefficient_sources = None
        self._forget_coefficient_memos()
        self._query = query

    def query_projection_weight(self) -> torch.Tensor:
        """The (key_dim, query_dim) query projection the coefficients are computed with: att_lora_to_q's weight, or
        with ``query_projection_type="none"`` (the official nn.Identity) an identity made here in the identity
        buffer's dtype and device: a model-wide initialisation (``model.apply(init)``, ``reset_parameters()`` of
        every nn.Linear) may have written into that buffer, and the official layer has no weights there to change."""
        weight = self.att_lora_to_q.weight
        if self.query_projection_type == "none":
            return torch.eye(self.key_dim, dtype=weight.dtype, device=weight.device)
        return weight

    def coefficients_from_query(self, query: torch.Tensor, *, fp32: bool = False) -> torch.Tensor:
        """(B, query_dim) -> (B, N) for this layer alone (``set_query`` batches this over all layers); the query on
        att_lora_to_q's device. The result is fp32 (float64 for float64 LoRWeB weights); ``fp32`` computes with the
        query, projection and keys cast to fp32 (the official adapter arithmetic)."""
        weight, keys = self.query_projection_weight(), self.lora_keys
        if fp32:
            query, weight, keys = query.float(), weight.float(), keys.float()
        return ops.compute_coefficients(query, weight, keys, heads=self.heads, activation=self.activation,
                                        reduce=self.reduce)

    def _coefficients_for(self, x: torch.Tensor, *, fp32: bool = False) -> torch.Tensor:
        """The (B, N) coefficients for input ``x`` (B, S, in) / (B, in): the ones set by ``set_query``, or computed
        here from the per-forward query; raises when there are none or they do not match x's batch."""
        coeffs, sources = self._coefficients, self.__dict__.get("_coefficient_sources")
        # eager only: compiled code reads neither the sources nor the warning flag (no guard on them, no recompile)
        if coeffs is not None and sources is not None and not torch.compiler.is_compiling():
            if self._sources_stale(sources):
                raise RuntimeError(
                    "LoRWeBLinear's coefficients were computed by set_query from lora_keys / att_lora_to_q values it "
                    "no longer holds (the tensors were replaced by torch.func.functional_call, "
                    "set_module_tensor_to_device or an assignment, or changed in place by an optimizer step or a "
                    "load): call lorweb_fast.set_query(model, query) again, or set_query(..., per_forward=True) to "
                    "compute them inside every forward from the tensors in use (torch.func)")
            self._warn_routing_gets_no_gradient(sources)  # (a tuple here: False, stale, raised above)
        if coeffs is None and self._query is not None:
            weight = self.att_lora_to_q.weight
            if not torch.compiler.is_compiling() and not _torch_tensor_type(weight):  # quantized after set_query
                why = replaced_query_projection_error("LoRWeBLinear", self)
                raise ValueError(why or f"LoRWeBLinear: its att_lora_to_q weight is a {type(weight).__name__}, not a "
                                        "plain tensor")
            query = self._query.to(weight.device, torch.float32 if fp32 else weight.dtype)
            coeffs = self.coefficients_from_query(query, fp32=fp32)
        if coeffs is None:
            raise RuntimeError(
                "LoRWeBLinear has no coefficients: call lorweb_fast.set_query(model, query) with the analogy query "
                "(or layer.set_coefficients(coeffs)) before the forward pass")
        if x.dim() not in (2, 3):
            raise ValueError(f"LoRWeBLinear takes (B, ..., in) inputs with a batch dimension, got shape "
                             f"{tuple(x.shape)}")
        if coeffs.shape[0] != x.shape[0]:
            raise ValueError(f"coefficients are set for batch size {coeffs.shape[0]} but the input has batch size "
                             f"{x.shape[0]}; call set_query with one query per sample")
        return coeffs

    # ----------------------------------------------------------------------------------------------- forward
    def _warn_no_gradient_when_merged(self) -> None:
        """Once per merged() context: a forward with autograd there gives the LoRWeB parameters no gradient."""
        # not while torch.compile traces: dynamo cannot trace warnings.warn (a graph break, or an error with
        # fullgraph=True); the eager calls warn
        if (not torch.compiler.is_compiling() and not self._merged_grad_warned[0] and torch.is_grad_enabled()
                and self.lora_A.requires_grad):
            self._merged_grad_warned[0] = True
            warn("forward with autograd inside merged(): the mixture is folded into the base weight, so "
                 "the LoRWeB parameters (lora_A, lora_B, lora_keys, att_lora_to_q) get no gradient; "
                 "train outside merged()")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, in), (B, in) or (B, ..., in) -> (B, S, out), (B, out) or (B, ..., out): ``base(x)`` plus the mixture
        with the coefficients set by ``set_query`` (B must match theirs; none set raises RuntimeError). In autocast's
        dtype when autocast casts x, else x's dtype, which must then be the base weight's (a RuntimeError otherwise,
        as ``nn.Linear`` gives); a base returning another dtype (a hook, a quantized layer), or
        ``adapter_precision="fp32"``, gives the base output's dtype. Inside ``merged()``: the merged weight (built per
        forward by ``jit_merged_forward`` under strategy="jit")."""
        if self._merged:
            self._warn_no_gradient_when_merged()
            return self.base_layer(x)
        if x.dim() > 3:  # (B, ..., in) as nn.Linear takes it: the middle dimensions are one sample's tokens
            # the token count is spelled out: -1 is ambiguous for an empty batch
            tokens = math.prod(x.shape[1:-1])
            return self.forward(x.reshape(x.shape[0], tokens, x.shape[-1])).reshape(*x.shape[:-1],
                                                                                     self.out_features)
        if self._merge_jit:
            self._warn_no_gradient_when_merged()
            return self.jit_merged_forward(x)
        if self.adapter_precision != "auto":
            return self._forward_fp32(x)  # raises for anything but "fp32"
        coeffs = self._coefficients_for(x)
        # autocast's own rule (only fp16 / bf16 / fp32 inputs are cast; a meta forward has no autocast)
        dtype = ops.autocast_dtype(x) or x.dtype
        # _cast: a cast only where the dtype differs (``.to`` to the same dtype returns the tensor itself, after
        # several microseconds of host time per call: this runs on every eager layer call)
        lora_a, lora_b = _cast(self.lora_A, dtype), _cast(self.lora_B, dtype)
        coeffs = self._with_strength(self._coefficients_on(coeffs, x.device))
        base = self.base_layer
        if has_plain_weight(base) and not has_forward_hooks(base):  # the fused kernels read W: y = x W^T + b + delta
            # nn.Linear's rule outside autocast (no per-call cast of W); other input dtypes are refused by the op
            if x.dtype != base.weight.dtype and x.is_floating_point() and not ops.autocast_casts(x):
                raise RuntimeError(f"LoRWeBLinear: the input is {x.dtype} but the base layer's weight is "
                                   f"{base.weight.dtype} (nn.Linear refuses this too): cast the input to the "
                                   "model's dtype, or run under torch.autocast")
            bias = base.bias
            return ops.lorweb_linear(_cast(x, dtype), _cast(base.weight, dtype),
                                     None if bias is None else _cast(bias, dtype), lora_a, lora_b, coeffs,
                                     self.scale, backend=self.backend)
        refuse_sharded_weight(base)
        y = base(x)
        if y.dtype == dtype:
            return ops.mixed_lora_delta(_cast(x, dtype), lora_a, lora_b, coeffs, self.scale, add_to=y,
                                        backend=self.backend)
        # a base returning another dtype (a hook that upcasts; a quantized bf16 base called with fp32 x): the mixture
        # in the compute dtype, added to the base output in its own dtype, which the layer returns (as peft's LoRA
        # layers return the base layer's dtype)
        delta = ops.mixed_lora_delta(_cast(x, dtype), lora_a, lora_b, coeffs, self.scale, backend=self.backend)
        return y + delta.to(y.dtype)

    # ------------------------------------------------------------------------------------------ merged weights
    def _with_strength(self, coeffs: torch.Tensor) -> torch.Tensor:
        """``coeffs`` times the ``set_lorweb_scale`` strength, as a tensor op: the op then takes ``self.scale``
        alone. A product of the two Python floats (scale times strength) made torch 2.11's dynamo guard on its value and
        recompile for every new strength. Eager calls at strength 1 skip the product (one elementwise kernel less
        per layer call; the same values); compiled code keeps it, so a later strength does not recompile."""
        if not torch.compiler.is_compiling() and self._lorweb_scale == 1.0:  # in this order: no guard on it
            return coeffs
        return coeffs * self._lorweb_scale

    def merged_weight_for(self, coeffs: torch.Tensor) -> torch.Tensor:
        """``W + scale * strength * sum_n coeffs[..., n] (A_n B_n)^T`` in fp32 (float64 for a float64 weight), rounded
        once to W's dtype.

        Built in blocks of rows written into the result (``MERGE_BLOCK_BYTES`` of fp32 work each, or 1 /
        ``MERGE_MAX_BLOCKS`` of the layer's fp32 size when that is larger, e.g. 4.7 MB at 3072 -> 3072, times B): the
        memory needed is the merged weight and one block, never a whole-layer fp32 copy of W or of the delta. While
        compiling, the rows per block are those of B = 1 (a block count that depends on B would recompile per batch
        size).

        Args:
            coeffs: (N,) for one analogy -> (out, in); (B, N) -> (B, out, in), one merged weight per sample; any
                floating dtype and device (the result is on W's device).
        """
        refuse_sharded_weight(self.base_layer)  # before "no plain weight": a DTensor weight is no quantization
        if not has_plain_weight(self.base_layer):
            raise TypeError(f"cannot merge into a {type(self.base_layer).__name__}: no plain tensor weight")
        check_float_tensor("coeffs", coeffs)
        if coeffs.dim() not in (1, 2) or coeffs.shape[-1] != self.num_loras:
            raise ValueError(f"coeffs must be (N={self.num_loras},) or (B, N={self.num_loras}), got shape "
                             f"{tuple(coeffs.shape)}")
        w = self.base_layer.weight.detach()  # (out, in)
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        c = coeffs.detach().to(w.device)
        scaling = ops.column_scaling(self._with_strength(c.to(acc)), self.rank, self.scale).to(acc)  # (R,), (B, R)
        a_cat, b_cat = ops.concat_basis(self.lora_A.detach().to(w.device, acc),
                                        self.lora_B.detach().to(w.device, acc))  # (in, R), (R, out)
        a_scaled_t = (a_cat * scaling.unsqueeze(-2)).transpose(-1, -2)  # (R, in) or (B, R, in)
        out_features, in_features = w.shape
        batch = c.shape[0] if c.dim() == 2 else 1
        sized = 1 if torch.compiler.is_compiling() else batch  # a batch-dependent block count guards on the batch
        rows = max(1, MERGE_BLOCK_BYTES // max(1, sized * in_features * acc.itemsize),
                   -(-out_features // MERGE_MAX_BLOCKS))  # rows per block
        merged = torch.empty((*c.shape[:-1], out_features, in_features), dtype=w.dtype, device=w.device)
        for start in range(0, out_features, rows):
            stop = min(start + rows, out_features)
            b_block_t = b_cat[:, start:stop].t()  # (rows, R)
            if c.dim() == 1:  # W rows + their delta rows, in acc; rounded once into the result
                merged[start:stop] = w[start:stop].to(acc, copy=True).addmm_(b_block_t, a_scaled_t)
            else:
                merged[:, start:stop] = torch.baddbmm(w[start:stop].to(acc), b_block_t.expand(batch, -1, -1),
                                                      a_scaled_t)  # (B, rows, in)
        return merged

    def jit_merged_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward of ``merged(strategy="jit")``: the merged weight is built here and freed on return.

        One analogy (or identical coefficient rows): ``F.linear(x, merged_weight, bias)``, exactly what a layer
        merged by ``merged(strategy="full")`` computes. Different analogies: one merged weight per sample,
        (B, out, in), applied with a batched matmul. Inputs (B, S, in) or (B, in) -> (B, S, out) or (B, out).
        """
        coeffs = self._coefficients
        if coeffs is None:
            raise RuntimeError("LoRWeBLinear has no coefficients for merged(strategy='jit'): call "
                               "lorweb_fast.set_query(model, query) without per_forward before the forward")
        if x.dim() not in (2, 3):
            raise ValueError(f"LoRWeBLinear takes (B, ..., in) inputs with a batch dimension, got shape "
                             f"{tuple(x.shape)}")
        if coeffs.shape[0] != x.shape[0]:  # as the unmerged forward: one analogy per sample
            raise ValueError(f"coefficients are set for batch size {coeffs.shape[0]} but the input has batch size "
                             f"{x.shape[0]}; call set_query with one query per sample")
        bias = self.base_layer.bias
        # identical rows take the one-weight path; under torch.compile that data-dependent test would break the
        # graph, so a compiled batch takes the per-sample path (the same values up to rounding)
        if coeffs.shape[0] == 1 or (not torch.compiler.is_compiling() and self.holds_one_analogy()):
            return F.linear(x, self.merged_weight_for(coeffs[0]), bias)
        weights = self.merged_weight_for(coeffs)  # (B, out, in)
        x3 = x if x.dim() == 3 else x.unsqueeze(1)
        y = torch.matmul(x3, weights.transpose(1, 2))
        if bias is not None:  # in the product's dtype: under autocast an fp32 bias would promote y (F.linear casts)
            y = y + bias.to(y.dtype)
        return y if x.dim() == 3 else y.squeeze(1)

    def _forward_fp32(self, x: torch.Tensor) -> torch.Tensor:
        """The official arithmetic: ``base(x) + delta(x.float()).to(base(x).dtype)`` with the delta in fp32."""
        if self.adapter_precision != "fp32":
            raise ValueError(f"adapter_precision must be 'auto' or 'fp32', got {self.adapter_precision!r}")
        refuse_sharded_weight(self.base_layer)  # as the default path: the basis is not sharded
        y = self.base_layer(x)
        # torch.autocast has no meta device type (entering it raises): nothing to disable in a meta forward
        no_autocast = (contextlib.nullcontext() if x.device.type == "meta"
                       else torch.autocast(x.device.type, enabled=False))
        with no_autocast:
            coeffs = self._with_strength(self._coefficients_on(self._coefficients_for(x, fp32=True), x.device).float())
            delta = ops.mixed_lora_delta(x.float(), self.lora_A.float(), self.lora_B.float(), coeffs, self.scale,
                                         backend=self.backend)
        return y + delta.to(y.dtype)

    def _apply(self, fn, recurse=True):
        """``nn.Module._apply`` (``to``, ``half``, ``to_empty``, ...); with ``query_projection_type="none"`` the
        identity query projection is filled in again afterwards: ``to_empty`` leaves it uninitialised, and no
        checkpoint or state dict holds it (a non-persistent buffer). Coefficients current before the conversion
        stay current: a conversion that makes new tensor objects (meta, ``to_empty``) is no replacement."""
        sources = self._coefficient_sources
        current = sources is not None and not self._coefficients_stale()
        result = super()._apply(fn, recurse)
        self.refill_identity_projection()
        if current:
            self.record_coefficient_sources(sources[4])
        return result

    def refill_identity_projection(self) -> None:
        """With ``query_projection_type="none"``: the (key_dim, key_dim) identity query projection written in again
        (not on the meta device); a no-op for "linear". Called after module conversions and loads, which may leave
        it uninitialised (``to_empty``) while no checkpoint holds it."""
        if getattr(self, "query_projection_type", None) == "none":  # (None while __init__ runs)
            identity = self.att_lora_to_q.weight
            keys = self._parameters.get("lora_keys")
            if identity.device.type == "meta" and keys is not None and keys.device.type != "meta":
                # built on meta, then given real tensors by load_state_dict(assign=True), which has none for it
                self.att_lora_to_q.register_buffer(
                    "weight", torch.eye(self.key_dim, dtype=identity.dtype, device=keys.device), persistent=False)
            elif identity.device.type != "meta":
                with torch.no_grad():
                    identity.copy_(torch.eye(self.key_dim, dtype=identity.dtype, device=identity.device))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """``load_state_dict``: refused inside ``merged()``; loading new LoRWeB parameters drops the coefficients
        computed from the old ones (the next forward raises until ``set_query``)."""
        own = [prefix + k for k in ("lora_A", "lora_B", "lora_keys", "att_lora_to_q.weight")]
        touches = any(k.startswith(prefix) for k in state_dict)
        if touches:
            _refuse_inside_merged(self, "load_state_dict")
        identity_key = prefix + "att_lora_to_q.weight"
        if self.query_projection_type == "none" and identity_key in state_dict:
            # a module state_dict saved before the identity became a non-persistent buffer holds it: accepted (it
            # is left out, not an unexpected key) when it is the identity, refused when it is anything else
            saved = state_dict.pop(identity_key)
            if not (isinstance(saved, torch.Tensor) and saved.shape == (self.key_dim, self.key_dim)
                    and torch.equal(saved.to(torch.float32), torch.eye(self.key_dim, device=saved.device))):
                error_msgs.append(f"{identity_key}: query_projection_type='none' has the identity as its query "
                                  "projection, but the state dict holds another tensor")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if any(k in state_dict for k in own):
            self._drop_coefficients()
            self.refill_identity_projection()  # e.g. after to_empty: the state dict does not hold it

    def _refuse_copy_of_autograd_history(self, what_call: str, how: str) -> None:
        """Raise when the coefficients (or a per-forward query) carry autograd history (``set_query`` with autograd
        on, as in training): a copy would hold them cut off from lora_keys / att_lora_to_q."""
        for attr, what in (("_coefficients", "coefficients"), ("_query", "per-forward query")):
            t = self.__dict__.get(attr)
            if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                raise RuntimeError(
                    f"cannot {what_call} a LoRWeBLinear holding {what} with autograd history (set_query with "
                    f"autograd on, e.g. in training): {how}. Call lorweb_fast.clear_query(model), or "
                    f"set_query(...) under torch.no_grad(), before {what_call}")

    def __deepcopy__(self, memo):
        """``copy.deepcopy`` as for any module (its ``__dict__``, deep-copied: also for a layer with a
        ``torch.nn.utils.parametrize`` parametrization, whose ``__getstate__`` refuses), but coefficients (or a
        per-forward query) that carry autograd history are refused by name: torch can only deep-copy graph leaves,
        and its own error ("Only Tensors created explicitly by the user ...") names neither the tensor nor the way
        out."""
        self._refuse_copy_of_autograd_history("deep-copy", "torch deep-copies graph leaves only")
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        state = {k: v for k, v in self.__dict__.items() if k not in COPIED_WITHOUT}
        new.__dict__.update(copy.deepcopy(state, memo))
        new._coefficient_sources = self._copied_coefficient_sources()
        new._merge_jit = False  # a merged("jit") block is the original's: the copy runs unmerged (never left "jit")
        return new

    def _copied_coefficient_sources(self):
        """What a copy records for its coefficients' sources: unchecked when they are current here (the copy's own
        tensors are new objects), stale when they are stale here."""
        return False if self._coefficients_stale() else None

    def _replicate_for_data_parallel(self):
        """``nn.DataParallel``'s replica: it gets its own copies of the tensors (new objects), so its coefficients'
        sources are recorded as a copy's are."""
        replica = super()._replicate_for_data_parallel()
        replica.__dict__["_coefficient_sources"] = self._copied_coefficient_sources()
        return replica

    def __getstate__(self):
        """Pickling (``torch.save(model)``): refused as ``copy.deepcopy`` is for coefficients with autograd history
        (the pickled copy would hold them as a leaf cut off from the parameters they were computed from)."""
        self._refuse_copy_of_autograd_history("copy or pickle (copy.copy, torch.save of the module)",
                                              "the copy would hold them cut off from the parameters")
        state = {k: v for k, v in super().__getstate__().items() if k not in COPIED_WITHOUT}
        state["_coefficient_sources"] = self._copied_coefficient_sources()  # (weak references do not pickle)
        state["_merge_jit"] = False  # a merged("jit") block is the original's: the copy runs unmerged
        return state

    def extra_repr(self) -> str:
        """The layer's settings; the strength (``set_lorweb_scale``, 0 while disabled) and the merged state
        (``merged=True``: the mixture is in the base weight, "full" / "offload"; ``merged='jit'``: merged at every
        forward) when not the defaults."""
        merged = "True" if self._merged else "'jit'" if self._merge_jit else None
        return (f"in_features={self.in_features}, out_features={self.out_features}, num_loras={self.num_loras}, "
                f"rank={self.rank}, lora_alpha={self.lora_alpha:g}, key_dim={self.key_dim}, "
                f"query_dim={self.query_dim}, heads={self.heads}, activation={self.activation!r}, "
                f"reduce={self.reduce!r}, backend={self.backend!r}"
                + ("" if self.query_projection_type == "linear" else ", query_projection_type='none'")
                + ("" if self._lorweb_scale == 1.0 else f", strength={self._lorweb_scale:g}")
                + ("" if merged is None else f", merged={merged}"))
