"""The functional API: op registration (torch.library) and dispatch between the torch, triton and cuda backends.

Op contract shared by the fused backends (``lorweb_fast::triton_fwd`` / ``triton_bwd`` and the C++
``lorweb_fast_cuda::fwd`` / ``bwd``), on 2-D rows (M = B * rows_per_sample):

    fwd(x (M, in), weight (out, in)?, bias (out,)?, base (M, out)?, lora_a (N, in, r), lora_b (N, r, out),
        coeffs (B, N) fp32, scale, rows_per_sample) -> (y (M, out), u (M, R), z (M, R))
        u = x A_cat (unscaled), z = u * scaling, y = [x W^T + bias] + [base] + z B_cat
    bwd(dy (M, out), x, weight?, lora_a, lora_b, coeffs, u, z, scale, rows_per_sample, need_dx=True,
        need_dbasis=True) -> (dx (M, in), d_lora_a (N, in, r), d_lora_b (N, r, out), d_coeffs (B, N) fp32)
        (dx, or d_lora_a and d_lora_b, an empty (0,) tensor when not needed: autograd asks for what requires grad)

with R = N * r and scaling[m, n*r + j] = scale * coeffs[m // rows_per_sample, n]; u, z and y in x's dtype, except
Triton's u for fp16 x: fp32 (``kernels.mixed_lora.saved_u_dtype``). The weight is frozen:
its gradient is only computed (by a plain GEMM) if it requires grad. The Triton op bodies are
``lorweb_fast.kernels.mixed_lora.forward`` / ``backward``: they pack the basis into contiguous (R, in) / (R, out)
matrices on every call and pick the fused, composed or all-cuBLAS route by ``choose_route`` (committed per-GPU
tables; 2-D inputs, R > 256 (``MAX_FUSED_R``) and a rank r that is not a power of two -> cuBLAS).

Eager calls of plain tensors run those op bodies through ``_EagerFusedFunction`` (the same kernels and gradient
formula) instead of torch.library's dispatch, whose Python autograd wrapper costs more host time than a kernel at
small M; torch.compile, torch.jit tracing, dispatch and function modes, functorch's vmap, the autograd profiler and
tensor subclasses use the registered ops (``_eager_direct``); forward-mode AD and functorch's reverse mode
(``torch.func.grad`` / ``vjp`` / ``jacrev``) are refused by name.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .validation import check_float_tensor, check_positive_int, check_real

#: The names ``backend=`` takes (None: the best available per call, ``DEFAULT_ORDER``).
BACKENDS = ("torch", "triton", "cuda")
#: The fused backends ``backend=None`` tries on CUDA tensors, in order. The CUDA extension first: on the H200 record
#: (benchmarks/results/h200-2026-11-23-run5to8, bf16, M=8192, 3072->3072) both take the same device time (forward
#: 0.250 vs 0.245 ms, forward+backward 0.561 vs 0.562 ms), the extension less at the wide-input layers
#: (15360->3072 forward+backward 2.58 vs 3.33 ms), an eager call of it far less host time (wall: forward 0.32 vs
#: 0.51 ms, forward+backward 1.01 vs 1.54 ms) and less memory (forward+backward peak 61 vs 72 MB). Triton when the
#: extension is not built or not built for this GPU.
DEFAULT_ORDER = ("cuda", "triton")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
#: dtypes of the fused backends (triton, cuda); float64 runs on the torch backend only.
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CUDA_NAMESPACE = "lorweb_fast_cuda"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run these inputs."""


# ----------------------------------------------------------------------------------------------- backend discovery
def _import_triton_kernels():
    """(the kernels module, None), or (None, why not: the import error and what to do)."""
    try:
        return importlib.import_module("lorweb_fast.kernels.mixed_lora"), None
    except Exception as exc:  # triton missing or broken
        why = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, ModuleNotFoundError) and exc.name == "triton":
            return None, (f"{why}; pip install triton (Linux only; torch's Linux wheels bring it), or use "
                          "backend='torch'")
        try:  # whether triton itself is what fails (not the kernels module: a local edit, a missing name)
            importlib.import_module("triton")
        except Exception:  # noqa: BLE001 - installed but broken (another torch's triton, a missing library)
            return None, (f"{why}; triton is installed but fails to import: reinstall the triton of this torch, or "
                          "use backend='torch'")
        return None, why


_TRITON_KERNELS, _TRITON_IMPORT_ERROR = _import_triton_kernels()


def _load_cuda_extension():
    """(lorweb_fast._C, None), or (None, its ImportError)."""
    try:
        return importlib.import_module("lorweb_fast._C"), None
    except ImportError as exc:
        return None, exc


_CUDA_EXT, _CUDA_IMPORT_ERROR = _load_cuda_extension()


def _cuda_ext_missing() -> bool:
    """Whether lorweb_fast._C is absent (not built) rather than present but failing to load."""
    error = _CUDA_IMPORT_ERROR
    return not isinstance(error, ImportError) or (isinstance(error, ModuleNotFoundError)
                                                  and error.name == "lorweb_fast._C")


def cuda_build_error() -> Optional[str]:
    """Why setup.py did not build lorweb_fast._C at install (skipped, no toolkit, or a failed compile; recorded in
    ``_cuda_build_info``), else None."""
    try:
        from ._cuda_build_info import BUILD_ERROR
    except ImportError:
        return None
    return BUILD_ERROR


def cuda_build_arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST that lorweb_fast._C was compiled for ("unknown" when not recorded)."""
    try:
        from ._cuda_build_info import TORCH_CUDA_ARCH_LIST
    except ImportError:
        return "unknown"
    return TORCH_CUDA_ARCH_LIST


def triton_interpret_mode() -> bool:
    """True when TRITON_INTERPRET=1, or another value Triton reads as on ("true", "on", "yes", "y", any case):
    Triton's CPU interpreter, the triton backend then takes CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes", "y")


#: Oldest Triton whose CPU interpreter runs these kernels: 3.6's interpreter cannot take a loop bound computed with
#: ``tl.minimum`` (``TypeError: only 0-dimensional arrays can be converted to Python scalars``); 3.7 and 3.8 pass the
#: interpreter suite. Compiled kernels on a GPU are not affected (3.6 passes the sm_80/sm_90 AOT checks).
MIN_INTERPRETER_TRITON = (3, 7)


@lru_cache(maxsize=16)
def _version_tuple(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "3.6.0", "3.8.0+git1a2b" or "3.7.0rc1" ((0, 0) if unparsable);
    cached by the string (the interpreter check asks on every call)."""
    from packaging.version import InvalidVersion, Version

    try:
        return tuple(Version(version).release[:2])
    except InvalidVersion:
        return (0, 0)


def _interpreter_unsupported() -> Optional[str]:
    """Why this Triton's CPU interpreter cannot run the kernels, or None."""
    import triton

    if _version_tuple(triton.__version__) < MIN_INTERPRETER_TRITON:
        need = ".".join(map(str, MIN_INTERPRETER_TRITON))
        return (f"the CPU interpreter of triton {triton.__version__} cannot run these kernels (it needs triton >= "
                f"{need}); upgrade triton or use backend='torch' on CPU")
    return None


@lru_cache(maxsize=None)
def _cuda_ext_device_supported(index: int) -> bool:
    """The extension's own check (``cudaFuncGetAttributes``), once per device and process: a device's architecture
    does not change, and asking cost host time on every eager layer call."""
    return bool(_CUDA_EXT.device_supported(index))


@torch.compiler.assume_constant_result
def _cuda_ext_supports(index: int) -> bool:
    """Whether lorweb_fast._C has code for CUDA device ``index``. A pybind call that torch.compile cannot trace:
    evaluated once while tracing and kept as a constant (no graph break)."""
    return _cuda_ext_device_supported(index)


def _unavailable_reason(name: str, device: torch.device | None = None) -> Optional[str]:
    """None when backend ``name`` can run on ``device`` (any usable device when None), else why not."""
    if name == "torch":
        return None
    if name == "triton":
        if _TRITON_KERNELS is None:
            return f"the Triton kernels cannot be imported ({_TRITON_IMPORT_ERROR})"
        if device is not None and device.type == "cpu":
            if not triton_interpret_mode():
                return "CPU tensors need TRITON_INTERPRET=1 (set before triton is imported); use backend='torch' on CPU"
            old = _interpreter_unsupported()
            if old is None and not _TRITON_KERNELS.kernels_interpreted():
                return ("TRITON_INTERPRET is set, but the Triton kernels were compiled before it was (it is read "
                        "once, when triton and lorweb_fast's kernels are imported): set it before importing "
                        "lorweb_fast, or use backend='torch' on CPU")
            return old
        if device is not None and device.type != "cuda":
            return f"no Triton support for {device.type} tensors"
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible to torch" + (
                " (TRITON_INTERPRET=1 is set: CPU tensors are accepted)"
                if triton_interpret_mode() and _TRITON_KERNELS.kernels_interpreted() else "")
        return None
    if name == "cuda":
        why = cuda_build_error()
        if why is not None:  # an importable _C is then a binary of an earlier build, not this install's
            return f"the CUDA extension lorweb_fast._C was not built at install: {why}"
        if _CUDA_EXT is None:
            if not _cuda_ext_missing():
                return (f"the CUDA extension lorweb_fast._C is built but fails to load ({_CUDA_IMPORT_ERROR}): built "
                        "against another torch? Reinstall lorweb_fast with this torch (pip install "
                        "--no-build-isolation --force-reinstall), or use backend='triton' or 'torch'")
            return ("the CUDA extension lorweb_fast._C is not built (install with a CUDA-enabled torch and nvcc, "
                    f"see README; import error: {_CUDA_IMPORT_ERROR})")
        if device is not None and device.type != "cuda":
            return f"the CUDA extension only takes CUDA tensors, got {device.type} tensors"
        if not torch.cuda.is_available():
            return "lorweb_fast._C is built but no CUDA GPU is visible to torch"
        dev = device if device is not None else torch.device("cuda", torch.cuda.current_device())
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if not _cuda_ext_supports(index):
            major, minor = torch.cuda.get_device_capability(index)
            return (f"lorweb_fast._C was built for TORCH_CUDA_ARCH_LIST={cuda_build_arch_list()}, which cannot run "
                    f"on this GPU (sm_{major}{minor}); rebuild with TORCH_CUDA_ARCH_LIST={major}.{minor}")
        return None
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS} or None")


def backend_status() -> dict[str, str]:
    """``{backend: "available: ..." | "unavailable: <why>"}`` for this process."""
    status = {"torch": "available: batched matmuls (rank N*r LoRA with per-sample scaling), any device"}
    for name, what in (("triton", "fused Triton kernels on CUDA tensors"), ("cuda", "CUDA C++ extension")):
        why = _unavailable_reason(name)
        if why is None:
            status[name] = f"available: {what}"
        elif name == "triton" and triton_interpret_mode() and _TRITON_KERNELS is not None:
            cpu_why = _unavailable_reason("triton", torch.device("cpu"))  # an old Triton, kernels built compiled
            status[name] = (f"unavailable: {why}; {cpu_why}" if cpu_why else
                            "available: Triton interpreter on CPU tensors (TRITON_INTERPRET=1); " + why)
        else:
            status[name] = f"unavailable: {why}"
    return status


def resolve_backend_for(backend: Optional[str], x: torch.Tensor) -> str:
    """``resolve_backend`` for the tensors of ``x``: float64 runs on the torch backend (picked when ``backend`` is
    None); a fused backend named for float64 raises BackendUnavailableError."""
    if x.dtype == torch.float64:
        if backend is None or backend == "torch":
            return "torch"
        resolve_backend(backend, x.device)  # an unknown or unusable backend names its own problem first
        raise BackendUnavailableError(f"backend={backend!r} does not support float64 (fused backends take "
                                      f"{FUSED_DTYPES}); use backend='torch' for float64")
    return resolve_backend(backend, x.device)


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """The backend that runs tensors on ``device``. None picks the best usable one (``DEFAULT_ORDER``); a named backend
    that cannot run raises BackendUnavailableError instead of falling back."""
    if backend is None:
        if device.type == "cuda":
            for name in DEFAULT_ORDER:
                if _unavailable_reason(name, device) is None:
                    return name
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS} or None")
    why = _unavailable_reason(backend, device)
    if why is not None:
        raise BackendUnavailableError(f"backend={backend!r} is unavailable: {why}")
    return backend


# ------------------------------------------------------------------------------------------------------ validation
def _check_dtype(t: torch.Tensor, name: str, dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {dtype}; cast them to one dtype")


def _check_device(t: torch.Tensor, name: str, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}; move them to one device")


def validate_inputs(x, lora_a, lora_b, coeffs, weight=None, bias=None, add_to=None) -> None:
    """Raise a clear error naming the offending argument for a wrong shape, dtype or device.

    Accepted: x (B, S, in) or (B, in) in SUPPORTED_DTYPES; lora_a (N, in, r), lora_b (N, r, out), weight (out, in),
    bias (out,) and add_to (x's shape with out features) in x's dtype; coeffs (B, N) of any floating dtype; all on
    x's device (TypeError for a wrong type or dtype, ValueError for a wrong shape or device)."""
    for name, t in (("x", x), ("lora_a", lora_a), ("lora_b", lora_b), ("coeffs", coeffs)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("weight", weight), ("bias", bias), ("add_to", add_to)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; supported dtypes are {SUPPORTED_DTYPES}")
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be (B, S, in) or (B, in), got shape {tuple(x.shape)}")
    if lora_a.dim() != 3:
        raise ValueError(f"lora_a must be (N, in, r), got shape {tuple(lora_a.shape)}")
    n, k, r = lora_a.shape
    if k != x.shape[-1] and r == x.shape[-1]:
        raise ValueError(f"lora_a must be (N, in, r) = (N, {x.shape[-1]}, r) for x {tuple(x.shape)}, got shape "
                         f"{tuple(lora_a.shape)}, which looks like peft's (N, r, in) layout: pass "
                         "lora_a.transpose(1, 2)")
    if lora_b.dim() != 3 or tuple(lora_b.shape[:2]) != (n, r):
        raise ValueError(f"lora_b must be (N, r, out) = ({n}, {r}, out) to match lora_a {tuple(lora_a.shape)}, "
                         f"got shape {tuple(lora_b.shape)}")
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features but lora_a {tuple(lora_a.shape)} expects {k}")
    if coeffs.dim() != 2 or tuple(coeffs.shape) != (x.shape[0], n):
        raise ValueError(f"coeffs must be (B, N) = ({x.shape[0]}, {n}) for x {tuple(x.shape)} and N={n}, "
                         f"got shape {tuple(coeffs.shape)}")
    if not coeffs.is_floating_point():
        raise TypeError(f"coeffs must be floating point, got {coeffs.dtype}")
    out = lora_b.shape[2]
    _check_dtype(lora_a, "lora_a", x.dtype)
    _check_dtype(lora_b, "lora_b", x.dtype)
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b), ("coeffs", coeffs)):
        _check_device(t, name, x.device)
    if weight is not None:
        if weight.dim() != 2 or tuple(weight.shape) != (out, k):
            raise ValueError(f"weight must be (out, in) = ({out}, {k}), got shape {tuple(weight.shape)}")
        _check_dtype(weight, "weight", x.dtype)
        _check_device(weight, "weight", x.device)
    if bias is not None:
        if tuple(bias.shape) != (out,):
            raise ValueError(f"bias must be (out,) = ({out},), got shape {tuple(bias.shape)}")
        _check_dtype(bias, "bias", x.dtype)
        _check_device(bias, "bias", x.device)
    if add_to is not None:
        want = (*x.shape[:-1], out)
        if tuple(add_to.shape) != want:
            raise ValueError(f"add_to must have shape {want}, got {tuple(add_to.shape)}")
        _check_dtype(add_to, "add_to", x.dtype)
        _check_device(add_to, "add_to", x.device)


# --------------------------------------------------------------------------------------------------- torch backend
def column_scaling(coeffs: torch.Tensor, rank: int, scale: float) -> torch.Tensor:
    """(B, N) coefficients -> (B, N*r) per-sample column scaling (alpha_b[n] repeated r times, times scale); fp32,
    or float64 for float64 coefficients."""
    acc = torch.float64 if coeffs.dtype == torch.float64 else torch.float32
    coeffs = coeffs.to(acc)
    if isinstance(scale, torch.Tensor) or scale != 1.0:  # the official lora_alpha = r: no multiplication (x * 1.0
        # is x, one kernel less); a tensor scale is multiplied whatever its value (no data-dependent branch)
        coeffs = coeffs * scale
    return coeffs.repeat_interleave(rank, dim=-1)


def concat_basis(lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The N basis LoRAs as one rank-R LoRA: (A_cat (in, R), B_cat (R, out)), column n*r + j = LoRA n, slot j."""
    n, k, r = lora_a.shape
    return lora_a.permute(1, 0, 2).reshape(k, n * r), lora_b.reshape(n * r, lora_b.shape[2])


def _torch_delta(x, lora_a, lora_b, coeffs, scale):
    """Batched-matmul delta: the basis as one rank-R LoRA whose R columns are scaled per sample. x (B, S, in) or
    (B, in) -> (B, S, out) or (B, out)."""
    a_cat, b_cat = concat_basis(lora_a, lora_b)  # (in, R), (R, out)
    scaling = column_scaling(coeffs, lora_a.shape[2], scale)  # (B, R), fp32 (float64 for float64 coefficients)
    x3 = x if x.dim() == 3 else x.unsqueeze(1)
    u = x3 @ a_cat  # (B, S, R) in x's dtype (autocast's under autocast)
    # the product in fp32 (type promotion), rounded once to u's dtype: its gradient for the coefficients, a sum over
    # every token, is then formed in fp32 as in the fused backends (in fp16 it overflowed where the exact one fits)
    z = (u * scaling.unsqueeze(1)).to(u.dtype)
    delta = z @ b_cat
    return delta if x.dim() == 3 else delta.squeeze(1)


# -------------------------------------------------------------------------------------------------- fused backends
def _fused_autograd(bwd):
    """Autograd formula shared by the fused backends; ``bwd`` is the backend's backward op."""

    def setup_context(ctx, inputs, output):
        x, weight, bias, base, lora_a, lora_b, coeffs, scale, rows_per_sample = inputs
        _, u, z = output
        ctx.save_for_backward(x, weight, lora_a, lora_b, coeffs, u, z)
        ctx.scale, ctx.rows_per_sample = scale, rows_per_sample
        ctx.has_bias, ctx.has_base = bias is not None, base is not None
        # u and z are outputs for the backward only: not differentiable, and their gradients arrive as None instead
        # of two (M, R) zero fills per backward
        ctx.mark_non_differentiable(u, z)
        ctx.set_materialize_grads(False)

    def backward(ctx, dy, _du, _dz):
        if dy is None:  # not reached through y
            return (None,) * 9
        return _fused_input_grads(bwd, ctx, ctx.needs_input_grad, dy) + (None, None)

    return setup_context, backward


def _fused_input_grads(bwd, ctx, needs, dy) -> tuple:
    """(dx, d_weight, d_bias, d_base, d_lora_a, d_lora_b, d_coeffs) of a fused forward from its saved tensors
    (x, weight, lora_a, lora_b, coeffs, u, z): the backward op ``bwd`` computes what ``needs`` (the seven inputs'
    needs_input_grad) asks for; None for the rest."""
    x, weight, lora_a, lora_b, coeffs, u, z = ctx.saved_tensors
    need_dx, need_dbasis = needs[0], needs[4] or needs[5]
    dx, d_lora_a, d_lora_b, d_coeffs = bwd(dy, x, weight, lora_a, lora_b, coeffs, u, z,
                                           ctx.scale, ctx.rows_per_sample, need_dx, need_dbasis)
    dx = dx if need_dx else None
    d_lora_a = d_lora_a if needs[4] else None
    d_lora_b = d_lora_b if needs[5] else None
    d_coeffs = d_coeffs if needs[6] else None
    d_weight = dy.t().mm(x) if weight is not None and needs[1] else None
    d_bias = dy.sum(0) if ctx.has_bias and needs[2] else None
    d_base = dy if ctx.has_base and needs[3] else None
    return dx, d_weight, d_bias, d_base, d_lora_a, d_lora_b, d_coeffs


def _no_double_backward(ctx, *grads):
    """The autograd formula of the fused backward ops: reached only by differentiating a gradient
    (``create_graph=True``), which the fused kernels do not support."""
    raise NotImplementedError("double backward (torch.autograd.grad(..., create_graph=True): gradient penalties, "
                              "Hessian-vector products) through lorweb_fast's fused backends is not supported; run "
                              "those layers with backend='torch', which supports it")


def _register_no_double_backward(op_name: str) -> None:
    torch.library.register_autograd(op_name, _no_double_backward, setup_context=lambda ctx, inputs, output: None)


#: Tests that check only the structure of a graph traced around the interpreter (recompiles, which gradients the
#: traced backward asks for; never values) switch this on: the graph then holds no kernel launches.
INTERPRETER_GRAPH_CAPTURE = False


def _refuse_graph_capture_of_the_interpreter() -> None:
    """BackendUnavailableError when a graph is being captured through the op's body (AOT autograd's
    functionalization or proxy tracing: torch.compile with aot_eager or inductor) around Triton's CPU interpreter: its
    kernels run on the spot and are not recorded in the graph, and the compiled call returned uninitialised memory.
    Shape propagation alone (fake tensors: dynamo's backend="eager", torch.export, which keeps the op whole) and eager
    calls are not affected."""
    if not triton_interpret_mode() or INTERPRETER_GRAPH_CAPTURE:
        return
    from torch._subclasses.functional_tensor import FunctionalTensorMode
    from torch.fx.experimental.proxy_tensor import ProxyTorchDispatchMode
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    if any(isinstance(mode, (FunctionalTensorMode, ProxyTorchDispatchMode))
           for mode in _get_current_dispatch_mode_stack()):
        raise BackendUnavailableError(
            "backend='triton' is unavailable: a graph capture (torch.compile with aot_eager / inductor) "
            "cannot record Triton's CPU interpreter (TRITON_INTERPRET=1): its kernels are not "
            "captured, and the compiled call returned uninitialised memory; call it eagerly, compile with "
            "backend='eager', or use backend='torch' on CPU")


_FUSED_OPS: dict[str, object] = {}
#: backend -> (forward body, backward body, backward op) for eager calls (``_eager_fused``)
_EAGER_BODIES: dict[str, tuple] = {}
#: Eager calls of plain tensors skip torch.library's dispatch of the fused op (tests switch it off to compare)
EAGER_DIRECT = True
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)

if _TRITON_KERNELS is not None:
    _k = _TRITON_KERNELS

    @torch.library.triton_op("lorweb_fast::triton_fwd", mutates_args=())
    def _triton_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    base: Optional[torch.Tensor], lora_a: torch.Tensor, lora_b: torch.Tensor, coeffs: torch.Tensor,
                    scale: float, rows_per_sample: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _refuse_graph_capture_of_the_interpreter()
        return _k.forward(x, weight, bias, base, lora_a, lora_b, coeffs, scale, rows_per_sample)

    @torch.library.triton_op("lorweb_fast::triton_bwd", mutates_args=())
    def _triton_bwd(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], lora_a: torch.Tensor,
                    lora_b: torch.Tensor, coeffs: torch.Tensor, u: torch.Tensor, z: torch.Tensor, scale: float,
                    rows_per_sample: int, need_dx: bool = True,
                    need_dbasis: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        _refuse_graph_capture_of_the_interpreter()
        return _k.backward(dy, x, weight, lora_a, lora_b, coeffs, u, z, scale, rows_per_sample, need_dx, need_dbasis)

    _setup, _backward = _fused_autograd(_triton_bwd)
    torch.library.register_autograd("lorweb_fast::triton_fwd", _backward, setup_context=_setup)
    _register_no_double_backward("lorweb_fast::triton_bwd")
    _FUSED_OPS["triton"] = _triton_fwd
    # the op bodies, called directly by eager calls (see _eager_fused); the backward op itself where the backward
    # must be seen (create_graph=True, so that its refusal is recorded; modes, compiled autograd)
    _EAGER_BODIES["triton"] = (_k.forward, _k.backward, _triton_bwd)


def _cuda_contract(x, weight, lora_a, lora_b, coeffs, rows_per_sample) -> tuple:
    """The shape and dtype checks of csrc/lorweb_ops.cpp ``check_common`` / ``check_weight`` (devices aside), for
    the extension ops' fake kernels: meta-device shape inference, torch.compile and torch.export refuse what the
    CUDA kernel would refuse, naming the argument. Returns (M, in, N, r, out)."""
    def check(ok, message):
        torch._check(ok, lambda: f"lorweb_fast_cuda: {message}")

    check(x.dim() == 2, f"x must be 2-D (M, in), got shape {tuple(x.shape)}")
    check(x.dtype in (torch.float32, torch.float16, torch.bfloat16),
          f"x must be float32, float16 or bfloat16, got {x.dtype}")
    for name, t, dim in (("lora_a", lora_a, 3), ("lora_b", lora_b, 3), ("weight", weight, 2)):
        if t is not None:
            check(t.dim() == dim, f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
            check(t.dtype == x.dtype, f"{name} has dtype {t.dtype} but x has dtype {x.dtype}")
    check(coeffs.dtype == torch.float32, f"coeffs must be float32, got {coeffs.dtype}")
    check(coeffs.dim() == 2, f"coeffs must be 2-D (B, N), got shape {tuple(coeffs.shape)}")
    m, k = x.shape
    n, r, out = lora_a.shape[0], lora_a.shape[2], lora_b.shape[2]
    check(lora_a.shape[1] == k, f"lora_a must be (N, in={k}, r), got {tuple(lora_a.shape)}")
    check(lora_b.shape[0] == n and lora_b.shape[1] == r, f"lora_b must be (N={n}, r={r}, out), got "
                                                         f"{tuple(lora_b.shape)}")
    check(coeffs.shape[1] == n, f"coeffs must be (B, N={n}), got {tuple(coeffs.shape)}")
    check((rows_per_sample >= 1 or m == 0) and rows_per_sample >= 0 and coeffs.shape[0] * rows_per_sample == m,
          f"x has {m} rows but coeffs has {coeffs.shape[0]} samples of rows_per_sample={rows_per_sample}")
    if weight is not None:
        check(tuple(weight.shape) == (out, k), f"weight must be (out={out}, in={k}), got {tuple(weight.shape)}")
    return m, k, n, r, out


if _CUDA_EXT is not None:

    @torch.library.register_fake(f"{CUDA_NAMESPACE}::fwd")
    def _cuda_fwd_fake(x, weight, bias, base, lora_a, lora_b, coeffs, scale, rows_per_sample):
        m, _, n, r, out = _cuda_contract(x, weight, lora_a, lora_b, coeffs, rows_per_sample)
        torch._check(bias is None or weight is not None,
                     lambda: "lorweb_fast_cuda: bias without weight is not supported")
        for name, t, shape in (("bias", bias, (out,)), ("base", base, (m, out))):
            if t is not None:
                torch._check(tuple(t.shape) == shape and t.dtype == x.dtype,
                             lambda: f"lorweb_fast_cuda: {name} must be {shape} {x.dtype}, got {tuple(t.shape)} "
                                     f"{t.dtype}")
        return x.new_empty(m, out), x.new_empty(m, n * r), x.new_empty(m, n * r)

    @torch.library.register_fake(f"{CUDA_NAMESPACE}::bwd")
    def _cuda_bwd_fake(dy, x, weight, lora_a, lora_b, coeffs, u, z, scale, rows_per_sample, need_dx=True,
                       need_dbasis=True):
        m, _, n, r, out = _cuda_contract(x, weight, lora_a, lora_b, coeffs, rows_per_sample)
        torch._check(tuple(dy.shape) == (m, out) and dy.dtype == x.dtype,
                     lambda: f"lorweb_fast_cuda: dy must be (M, out) = {(m, out)} {x.dtype}, got {tuple(dy.shape)} "
                             f"{dy.dtype}")
        torch._check(tuple(u.shape) == (m, n * r) and tuple(z.shape) == (m, n * r),
                     lambda: f"lorweb_fast_cuda: u and z must be (M, N*r) = {(m, n * r)}, got {tuple(u.shape)} and "
                             f"{tuple(z.shape)}")
        # contiguous, as the extension returns them (empty_like would keep a transposed input's strides)
        return (x.new_empty(x.shape if need_dx else (0,)),
                lora_a.new_empty(lora_a.shape if need_dbasis else (0,)),
                lora_b.new_empty(lora_b.shape if need_dbasis else (0,)),
                coeffs.new_empty(coeffs.shape, dtype=torch.float32))

    _cuda_setup, _cuda_backward = _fused_autograd(getattr(torch.ops, CUDA_NAMESPACE).bwd)
    torch.library.register_autograd(f"{CUDA_NAMESPACE}::fwd", _cuda_backward, setup_context=_cuda_setup)
    _register_no_double_backward(f"{CUDA_NAMESPACE}::bwd")
    _FUSED_OPS["cuda"] = getattr(torch.ops, CUDA_NAMESPACE).fwd

    def _cuda_fwd_below_autograd(*args):
        with torch._C._AutoDispatchBelowAutograd():  # the extension's CUDA kernel, without the autograd wrapper
            return getattr(torch.ops, CUDA_NAMESPACE).fwd(*args)

    def _cuda_bwd_below_autograd(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return getattr(torch.ops, CUDA_NAMESPACE).bwd(*args)

    _EAGER_BODIES["cuda"] = (_cuda_fwd_below_autograd, _cuda_bwd_below_autograd,
                             getattr(torch.ops, CUDA_NAMESPACE).bwd)


class _EagerFusedFunction(torch.autograd.Function):
    """The fused op's autograd formula (``_fused_autograd``) for eager calls, around the op bodies: the same kernels
    and gradients as the registered op, without torch.library's Python autograd wrapper of it (which re-binds the
    op's schema on every call: about 90 us of Python time per forward on the 2-core CI CPU,
    benchmarks/host_python_cpu.py; more than a kernel at M=1024 on a GPU). Only the mixture's output y is an
    output; u and z are saved for the backward."""

    @staticmethod
    def forward(ctx, backend, x, weight, bias, base, lora_a, lora_b, coeffs, rows_per_sample):
        forward_body, ctx.backward_body, ctx.backward_op = _EAGER_BODIES[backend]
        y, u, z = forward_body(x, weight, bias, base, lora_a, lora_b, coeffs, 1.0, rows_per_sample)
        ctx.save_for_backward(x, weight, lora_a, lora_b, coeffs, u, z)
        ctx.scale, ctx.rows_per_sample = 1.0, rows_per_sample
        ctx.has_bias, ctx.has_base = bias is not None, base is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        # through the backward op when compiled autograd traces this backward (checked first: dynamo cannot trace
        # the mode checks), when this gradient is differentiated (create_graph=True: the op's autograd formula
        # refuses that by name, as on the registered path), when something watches the ops (see _watched), or when
        # autograd's own vmap batches the incoming gradient (torch.autograd.grad(..., is_grads_batched=True),
        # autograd.functional.jacobian / hessian with vectorize=True): the op bodies cannot read a batched tensor
        via_op = (torch.compiler.is_compiling() or torch.is_grad_enabled() or _watched()
                  or torch._C._functorch.is_legacy_batchedtensor(dy))
        bwd = ctx.backward_op if via_op else ctx.backward_body
        return (None,) + _fused_input_grads(bwd, ctx, ctx.needs_input_grad[1:8], dy) + (None,)


def _watched() -> bool:
    """Whether something records or transforms the ops that run: a torch dispatch or function mode (FakeTensorMode,
    FlopCounterMode, partial_gradients' recorder), a functorch transform, forward-mode AD (dual tensors), the
    autograd profiler (its op tables name the registered ops) or torch.jit tracing."""
    return (_get_current_dispatch_mode() is not None or torch._C._is_torch_function_mode_enabled()
            or torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0
            or torch._C._autograd._profiler_enabled() or torch.jit.is_tracing())


def _eager_direct(tensors) -> bool:
    """Whether a fused call may run the op bodies directly (``_eager_fused``): eager (not traced by torch.compile or
    export), nothing watching the ops (``_watched``; forward-mode AD among them is refused by name here), and plain
    tensors only. Anything else goes through the registered op, which those mechanisms see and handle."""
    if torch.compiler.is_compiling():
        return False
    if _watched():
        _refuse_unsupported_transforms(tensors)
        return False
    return EAGER_DIRECT and all(t is None or type(t) in _PLAIN_TENSOR_TYPES for t in tensors)


def _eager_fused(backend, x, weight, bias, base, lora_a, lora_b, coeffs, rows_per_sample) -> torch.Tensor:
    """y of the fused op for an eager call: through ``_EagerFusedFunction`` when autograd records, else the forward
    body alone."""
    tensors = (x, weight, bias, base, lora_a, lora_b, coeffs)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _EagerFusedFunction.apply(backend, *tensors, rows_per_sample)
    return _EAGER_BODIES[backend][0](*tensors, 1.0, rows_per_sample)[0]


def _refuse_unsupported_transforms(tensors) -> None:
    """The autodiff transforms the fused ops cannot take, refused by name (asked only when ``_watched`` says
    something is on):

    - forward-mode AD (dual tensors of ``torch.autograd.forward_ad``, ``torch.func.jvp`` / ``jacfwd``): the ops have
      no forward-mode formula, and torch gave no tangent (dual tensors) or a zero tangent (``torch.func.jvp``)
      instead of an error;
    - differentiating through them with functorch's reverse mode (``torch.func.grad`` / ``vjp`` / ``jacrev``):
      torch.library's autograd registration of an op cannot run under it (torch raised an error about
      ``autograd.Function.setup_context`` naming neither the op nor the way out). Calls under ``no_grad`` or on
      inputs the transform does not track still run; ``torch.autograd.grad`` / ``backward`` work.
    """
    forward_ad = torch.autograd.forward_ad
    dual = forward_ad._current_level >= 0 and any(
        t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)
    jvp = grad = False
    if not dual and torch._C._are_functorch_transforms_active():
        from torch._C._functorch import TransformType, get_interpreter_stack

        levels = {level.key() for level in (get_interpreter_stack() or ())}
        jvp = TransformType.Jvp in levels
        # only a call that would be differentiated: grad mode on and an input the transform tracks (requires_grad
        # at its level; inputs that do not depend on the variable, and calls under no_grad, ran and still run)
        grad = (TransformType.Grad in levels and torch.is_grad_enabled()
                and any(t is not None and t.requires_grad for t in tensors))
    if dual or jvp:
        raise NotImplementedError("forward-mode AD (torch.func.jvp / jacfwd, forward_ad dual tensors) through "
                                  "lorweb_fast's fused backends is not supported: they have no forward-mode "
                                  "formula; run those layers with backend='torch', which supports it")
    if grad:
        raise NotImplementedError("torch.func.grad / vjp / jacrev through lorweb_fast's fused backends is not "
                                  "supported (torch.library's autograd registration of their ops cannot run under "
                                  "functorch's reverse mode); use torch.autograd.grad / .backward(), or run those "
                                  "layers with backend='torch', which supports torch.func")


def _fused_linear(backend, x, weight, bias, base, lora_a, lora_b, coeffs, scale):
    """Run a fused backend on x of any supported rank; returns the output in x's leading shape."""
    rows_per_sample = 1 if x.dim() == 2 else x.shape[1]
    rows = math.prod(x.shape[:-1])  # spelled out: -1 is ambiguous for a layer of 0 input or output features
    x2d = x.reshape(rows, x.shape[-1])
    base2d = None if base is None else base.reshape(rows, base.shape[-1])
    fwd = _FUSED_OPS[backend]
    # the scale goes in with the coefficients (a tensor op), not as the op's float argument: torch.compile would
    # specialise on that float and recompile for every value. LoRWeBLinear passes lora_alpha / r, 1 for the official
    # models, and has multiplied its strength in already: no second elementwise kernel per layer then.
    scaled = coeffs.float() if not isinstance(scale, torch.Tensor) and scale == 1.0 else coeffs.float() * scale
    if _eager_direct((x2d, weight, bias, base2d, lora_a, lora_b, scaled)):
        y = _eager_fused(backend, x2d, weight, bias, base2d, lora_a, lora_b, scaled, rows_per_sample)
    else:
        y, _, _ = fwd(x2d, weight, bias, base2d, lora_a, lora_b, scaled, 1.0, rows_per_sample)
    return y.view(*x.shape[:-1], lora_b.shape[2])


# ---------------------------------------------------------------------------------------------------- public API
def mixed_lora_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, coeffs: torch.Tensor,
                     scale: float, *, add_to: Optional[torch.Tensor] = None,
                     backend: Optional[str] = None) -> torch.Tensor:
    """The LoRWeB update ``scale * sum_n coeffs[b, n] * B_n^T A_n^T x`` (plus ``add_to`` when given).

    Args:
        x: (B, S, in) or (B, in); float32 / bfloat16 / float16 (float64: torch backend only).
        lora_a: (N, in, r); lora_b: (N, r, out), both in x's dtype.
        coeffs: (B, N), one coefficient vector per sample, any floating dtype (the fused backends read it in fp32).
            All tensors on x's device.
        scale: lora_alpha / r (a finite real; a tensor that requires grad is refused).
        add_to: optional (B, S, out) / (B, out) tensor in x's dtype to add the delta to (e.g. the output of a
            quantized base layer); the fused backends add it in the same pass instead of writing the delta
            separately (not under autocast: then it is added afterwards).
        backend: None (best available), "torch", "triton" or "cuda".

    Returns:
        (B, S, out) or (B, out) in x.dtype; under ``torch.autocast`` in autocast's dtype, promoted with add_to's
        dtype when add_to is given (as the torch backend's matmuls).
    """
    validate_inputs(x, lora_a, lora_b, coeffs, add_to=add_to)
    scale = _checked_scale(scale)
    name = resolve_backend_for(backend, x)
    if name == "torch":
        delta = _torch_delta(x, lora_a, lora_b, coeffs, scale)
        return delta if add_to is None else add_to + delta
    dtype = autocast_dtype(x)
    if dtype is not None:  # as the torch backend's matmuls: the mixture in autocast's dtype, add_to (x's dtype,
        # so not autocast's) added to it with type promotion
        delta = _fused_linear(name, x.to(dtype), None, None, None, lora_a.to(dtype), lora_b.to(dtype), coeffs, scale)
        return delta if add_to is None else add_to + delta
    return _fused_linear(name, x, None, None, add_to, lora_a, lora_b, coeffs, scale)


def lorweb_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                  lora_b: torch.Tensor, coeffs: torch.Tensor, scale: float, *,
                  backend: Optional[str] = None) -> torch.Tensor:
    """``x W^T + bias + mixed_lora_delta(x, ...)``: a frozen linear layer plus the per-sample LoRA mixture.

    Args:
        x: (B, S, in) or (B, in); weight: (out, in); bias: (out,) or None, both in x's dtype and on x's device; the
            rest as in ``mixed_lora_delta``.

    Returns:
        (B, S, out) or (B, out) in x.dtype (in autocast's dtype under ``torch.autocast``, as ``F.linear``).
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    validate_inputs(x, lora_a, lora_b, coeffs, weight=weight, bias=bias)
    scale = _checked_scale(scale)
    name = resolve_backend_for(backend, x)
    if name == "torch":
        return F.linear(x, weight, bias) + _torch_delta(x, lora_a, lora_b, coeffs, scale)
    dtype = autocast_dtype(x)
    if dtype is not None:  # as F.linear and the torch backend's matmuls under autocast
        x, weight, lora_a, lora_b = x.to(dtype), weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return _fused_linear(name, x, weight, bias, None, lora_a, lora_b, coeffs, scale)


def _checked_scale(scale):
    """``scale`` checked (a finite real number; when eager only: under dynamic compile it may be symbolic, and a
    tensor's value is not read while tracing). A tensor that requires grad is refused in both modes: the eager check
    reads its value (no gradient would reach it) while a compiled call differentiated it."""
    if isinstance(scale, torch.Tensor) and scale.requires_grad:
        raise TypeError("scale must be a number or a tensor that does not require grad: the LoRA scale is not "
                        "trained (fold a learned strength into the coefficients instead)")
    return scale if torch.compiler.is_compiling() else check_real("scale", scale)


def autocast_casts(x: torch.Tensor) -> bool:
    """Whether torch.autocast is on for x's device and would cast x (an fp16 / bf16 / fp32 input; never on meta),
    also when x is already in autocast's dtype."""
    return x.device.type != "meta" and x.dtype in FUSED_DTYPES and torch.is_autocast_enabled(x.device.type)


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype torch.autocast runs x's matmuls in on x's device, or None when autocast is off there or does not
    cast x (only fp16 / bf16 / fp32 inputs are cast; torch.autocast has no meta device type, asking raises: a meta
    forward has no autocast). The fused ops are not autocast ops: the public functions (and LoRWeBLinear) cast their
    inputs so every backend returns the torch backend's dtype."""
    if not autocast_casts(x):
        return None
    dtype = torch.get_autocast_dtype(x.device.type)
    return dtype if dtype != x.dtype else None


def compute_coefficients(query: torch.Tensor, to_q_weight: torch.Tensor, keys: torch.Tensor, *, heads: int = 1,
                         activation: str = "softmax", reduce: str = "mean",
                         backend: Optional[str] = None) -> torch.Tensor:
    """Per-sample mixing coefficients, for one layer or for a stack of L layers at once.

    Args:
        query: (B, query_dim), any floating dtype (cast to the weights' dtype), on the weights' device.
        to_q_weight: (key_dim, query_dim), or (L, key_dim, query_dim) for L layers in one batched computation.
        keys: (N, key_dim), or (L, N, key_dim) (cast to the logits' dtype).
        heads, activation, reduce: as in ``lorweb_fast.reference.compute_coefficients``.
        backend: checked as by ``resolve_backend`` on query's device (an unknown or unusable named backend raises);
            every backend computes this tiny batched GEMM with torch (cuBLAS on GPU), the projection in the
            weights' dtype, logits and softmax in fp32 (float64 for float64 weights).

    Autocast is disabled inside, so these dtype rules hold under an enclosing ``torch.autocast`` as well (bf16
    training calls ``set_query`` inside one): fp32 weights give fp32 coefficients computed in fp32, as the official
    code computes them (NVlabs/LoRWeB toolkit/network_mixins.py: the query cast to the fp32 LoRA parameters).

    Returns:
        (B, N) fp32 (float64 for float64 weights), or (L, B, N) for stacked inputs.
    """
    from .reference import ACTIVATIONS, REDUCTIONS

    for name, t in (("query", query), ("to_q_weight", to_q_weight), ("keys", keys)):
        check_float_tensor(name, t)
    heads = check_positive_int("heads", heads)
    resolve_backend(backend, query.device)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    stacked = to_q_weight.dim() == 3
    w = to_q_weight if stacked else to_q_weight.unsqueeze(0)
    kk = keys if stacked else keys.unsqueeze(0)
    if query.dim() != 2:
        raise ValueError(f"query must be (B, query_dim), got shape {tuple(query.shape)}")
    if w.dim() != 3:
        raise ValueError(f"to_q_weight must be (key_dim, query_dim) (or stacked (L, key_dim, query_dim)), got shape "
                         f"{tuple(to_q_weight.shape)}")
    if w.shape[2] != query.shape[1]:
        raise ValueError(f"query has {query.shape[1]} features but to_q_weight {tuple(to_q_weight.shape)} expects "
                         f"query_dim={w.shape[2]}: the query comes from another encoder or query mode than the layers "
                         "were built for")
    if kk.dim() != 3 or kk.shape[0] != w.shape[0] or kk.shape[2] != w.shape[1]:
        raise ValueError(f"keys must be (N, key_dim={w.shape[1]}) (or stacked (L, N, key_dim)), "
                         f"got shape {tuple(keys.shape)}")
    num_layers, key_dim, _ = w.shape
    if key_dim % heads:
        raise ValueError(f"key_dim={key_dim} is not divisible by heads={heads}")
    for name, t in (("to_q_weight", to_q_weight), ("keys", keys)):
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}")
    d = key_dim // heads
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    device_type = query.device.type
    # torch.autocast has no meta (or other unknown) device type: nothing to disable there. While torch.compile
    # traces, is_autocast_available is not asked (torch 2.11's dynamo cannot trace it: a graph break); traced
    # tensors are on a real device
    available = (device_type != "meta" if torch.compiler.is_compiling()
                 else torch.amp.is_autocast_available(device_type))
    no_autocast = torch.autocast(device_type, enabled=False) if available else contextlib.nullcontext()
    with no_autocast:
        p = torch.matmul(query.to(w.dtype).unsqueeze(0), w.transpose(1, 2)).to(acc)  # (L, B, key_dim)
        p = p.view(num_layers, -1, heads, d)
        kh = kk.to(acc).view(num_layers, kk.shape[1], heads, d)
        logits = torch.einsum("lbhd,lnhd->lbhn", p, kh) * (d ** -0.5)
        c = torch.softmax(logits, dim=-1) if activation == "softmax" else torch.tanh(logits)
        if reduce == "mean":
            c = c.mean(dim=2)
        else:
            c = c.sum(dim=2).clamp(0.0 if activation == "softmax" else -1.0, 1.0)
    return c if stacked else c.squeeze(0)
