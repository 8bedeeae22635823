"""The CUDA C++ fallback: built by setup.py, importable, ops registered with the right schemas and fake kernels.

Running the kernels needs a GPU: that is tests/test_gpu.py."""

import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import lorweb_fast
from lorweb_fast import ops

FWD_SCHEMA = ("lorweb_fast_cuda::fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? base, Tensor lora_a, "
              "Tensor lora_b, Tensor coeffs, float scale, SymInt rows_per_sample) -> (Tensor, Tensor, Tensor)")
BWD_SCHEMA = ("lorweb_fast_cuda::bwd(Tensor dy, Tensor x, Tensor? weight, Tensor lora_a, Tensor lora_b, "
              "Tensor coeffs, Tensor u, Tensor z, float scale, SymInt rows_per_sample) -> "
              "(Tensor, Tensor, Tensor, Tensor)")


def build_expected() -> bool:
    """setup.py builds the extension whenever torch is a CUDA build and a toolkit is found, unless skipped."""
    from torch.utils.cpp_extension import CUDA_HOME

    skipped = os.environ.get("LORWEB_FAST_SKIP_CUDA_BUILD", "").lower() in {"1", "true", "yes", "on"}
    return torch.version.cuda is not None and CUDA_HOME is not None and not skipped


@pytest.fixture(scope="module")
def ext():
    try:
        import lorweb_fast._C as ext
    except ImportError as exc:
        if build_expected():
            pytest.fail(f"lorweb_fast._C should have been built (CUDA torch {torch.version.cuda} and a toolkit are "
                        f"present) but does not import: {exc}")
        pytest.skip(f"lorweb_fast._C not built here: {exc}")
    return ext


def test_extension_imports_and_ops_have_the_contract_schemas(ext):
    assert str(torch.ops.lorweb_fast_cuda.fwd.default._schema) == FWD_SCHEMA
    assert str(torch.ops.lorweb_fast_cuda.bwd.default._schema) == BWD_SCHEMA
    assert callable(ext.device_supported)
    assert ops.cuda_build_arch_list() not in ("", "unknown")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("lorweb_fast_cuda::fwd", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("lorweb_fast_cuda::bwd", "CUDA")
    assert "cuda" in ops._FUSED_OPS


def test_backend_status_says_why_cuda_is_unavailable(ext):
    status = lorweb_fast.backend_status()["cuda"]
    if torch.cuda.is_available():
        assert status.startswith("available") or "TORCH_CUDA_ARCH_LIST" in status
    else:
        assert status == "unavailable: lorweb_fast._C is built but no CUDA GPU is visible to torch"
        with pytest.raises(lorweb_fast.BackendUnavailableError, match="no CUDA GPU"):
            ops.resolve_backend("cuda", torch.device("cuda"))


def test_fake_kernels_give_contract_shapes(ext):
    with FakeTensorMode():
        x = torch.empty(10, 17, device="cuda", dtype=torch.bfloat16)
        w = torch.empty(19, 17, device="cuda", dtype=torch.bfloat16)
        a = torch.empty(3, 17, 4, device="cuda", dtype=torch.bfloat16)
        b = torch.empty(3, 4, 19, device="cuda", dtype=torch.bfloat16)
        c = torch.empty(2, 3, device="cuda")
        y, u, z = torch.ops.lorweb_fast_cuda.fwd(x, w, None, None, a, b, c, 1.0, 5)
        assert (y.shape, u.shape, z.shape) == ((10, 19), (10, 12), (10, 12))
        assert y.dtype == torch.bfloat16 and y.device.type == "cuda"
        dx, da, db, dc = torch.ops.lorweb_fast_cuda.bwd(torch.empty_like(y), x, w, a, b, c, u, z, 1.0, 5)
        assert (dx.shape, da.shape, db.shape, dc.shape) == ((10, 17), (3, 17, 4), (3, 4, 19), (2, 3))
        assert dc.dtype == torch.float32 and da.dtype == torch.bfloat16
