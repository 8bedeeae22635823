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
              "Tensor coeffs, Tensor u, Tensor z, float scale, SymInt rows_per_sample, bool need_dx=True, "
              "bool need_dbasis=True) -> (Tensor, Tensor, Tensor, Tensor)")


def build_expected() -> bool:
    """setup.py builds the extension whenever torch is a CUDA build and a toolkit is found, unless skipped (now, or
    at install time: the build info records it)."""
    from torch.utils.cpp_extension import CUDA_HOME

    from lorweb_fast import _cuda_build_info

    skipped = os.environ.get("LORWEB_FAST_SKIP_CUDA_BUILD", "").lower() in {"1", "true", "yes", "on"} \
        or "LORWEB_FAST_SKIP_CUDA_BUILD" in str(_cuda_build_info.BUILD_ERROR or "")
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
        # what autograd does not need is not computed: an empty (0,) tensor in its place
        for need_dx, need_dbasis in ((False, True), (True, False), (False, False)):
            grads = torch.ops.lorweb_fast_cuda.bwd(torch.empty_like(y), x, w, a, b, c, u, z, 1.0, 5, need_dx,
                                                   need_dbasis)
            want = [(10, 17) if need_dx else (0,), (3, 17, 4) if need_dbasis else (0,),
                    (3, 4, 19) if need_dbasis else (0,), (2, 3)]
            assert [tuple(g.shape) for g in grads] == want


def test_backward_fake_kernel_gives_contiguous_gradients_for_strided_inputs(ext):
    """The extension returns contiguous gradients whatever the inputs' strides (a transposed x, lora_a in peft's
    layout): the fake kernel must say so, or inductor's stride asserts fail (and without them fused code would read
    the gradients with the wrong strides)."""
    with FakeTensorMode():
        x = torch.empty(17, 10, device="cuda", dtype=torch.bfloat16).t()
        w = torch.empty(19, 17, device="cuda", dtype=torch.bfloat16)
        a = torch.empty(3, 4, 17, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        b = torch.empty(3, 19, 4, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        c = torch.empty(2, 3, device="cuda")
        y, u, z = torch.ops.lorweb_fast_cuda.fwd(x, w, None, None, a, b, c, 1.0, 5)
        grads = torch.ops.lorweb_fast_cuda.bwd(torch.empty_like(y), x, w, a, b, c, u, z, 1.0, 5)
        assert [tuple(g.shape) for g in grads] == [(10, 17), (3, 17, 4), (3, 4, 19), (2, 3)]
        assert all(g.is_contiguous() for g in grads)


def test_why_the_extension_was_not_built_is_named_by_the_backend_status(monkeypatch):
    """setup.py records why it did not build the extension in _cuda_build_info.BUILD_ERROR (a failed compile, a skip,
    no toolkit): backend='cuda' then raises naming it (not the generic "not built")."""
    import sys
    import types

    info = types.ModuleType("lorweb_fast._cuda_build_info")
    info.TORCH_CUDA_ARCH_LIST, info.CUDA_VERSION = "9.0", "13.0"
    info.BUILD_ERROR = "its compile failed (RuntimeError: Error compiling objects for extension); fix the cause"
    monkeypatch.setitem(sys.modules, "lorweb_fast._cuda_build_info", info)
    monkeypatch.setattr(ops, "_CUDA_EXT", None)
    assert ops.cuda_build_error() == info.BUILD_ERROR
    assert ops.backend_status()["cuda"] == (
        "unavailable: the CUDA extension lorweb_fast._C was not built at install: its compile failed (RuntimeError: "
        "Error compiling objects for extension); fix the cause")
    with pytest.raises(lorweb_fast.BackendUnavailableError, match="not built at install: its compile failed"):
        ops.resolve_backend("cuda", torch.device("cuda"))
    info.BUILD_ERROR = "LORWEB_FAST_SKIP_CUDA_BUILD=1 was set"
    assert ops.backend_status()["cuda"].endswith("not built at install: LORWEB_FAST_SKIP_CUDA_BUILD=1 was set")
    info.BUILD_ERROR = None
    assert "is not built" in ops.backend_status()["cuda"]


@pytest.mark.skipif(not build_expected(), reason="needs a CUDA torch and a CUDA toolkit")
def test_setup_installs_without_the_extension_when_its_compile_fails(tmp_path):
    """A compile error (here an #error in both sources) does not fail the install: setup.py logs it, records it in
    _cuda_build_info.BUILD_ERROR and removes a stale binary from an earlier build; LORWEB_FAST_FORCE_CUDA_BUILD=1
    makes it an install error."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    shutil.copytree(repo / "csrc", src / "csrc")
    shutil.copytree(repo / "kernels", src / "kernels")
    (src / "lorweb_fast").mkdir()
    shutil.copy(repo / "setup.py", src / "setup.py")
    shutil.copy(repo / "pyproject.toml", src / "pyproject.toml")
    shutil.copy(repo / "lorweb_fast" / "__init__.py", src / "lorweb_fast" / "__init__.py")
    (src / "lorweb_fast" / "evaluation").mkdir()  # a package setup.py lists (build_py needs it to exist)
    shutil.copy(repo / "lorweb_fast" / "evaluation" / "__init__.py", src / "lorweb_fast" / "evaluation")
    for name in ("lorweb_kernels.cu", "lorweb_ops.cpp"):
        path = src / "csrc" / name
        path.write_text("#error deliberate build failure\n" + path.read_text())
    stale = src / "lorweb_fast" / ("_C" + __import__("sysconfig").get_config_var("EXT_SUFFIX"))
    env = {k: v for k, v in os.environ.items() if k not in ("LORWEB_FAST_SKIP_CUDA_BUILD", "PYTHONPATH")}
    env["LORWEB_FAST_FORCE_CUDA_BUILD"] = "1"
    forced = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=src, env=env,
                            capture_output=True, text=True, timeout=600)
    assert forced.returncode != 0 and "deliberate build failure" in forced.stdout + forced.stderr
    stale.write_bytes(b"an earlier build")
    del env["LORWEB_FAST_FORCE_CUDA_BUILD"]
    proc = subprocess.run([sys.executable, "setup.py", "build"], cwd=src, env=env,  # build_py, then build_ext
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING: the CUDA extension lorweb_fast._C failed to build (RuntimeError" in proc.stderr
    assert not stale.exists()
    info = {}
    exec((src / "lorweb_fast" / "_cuda_build_info.py").read_text(), info)
    assert info["BUILD_ERROR"].startswith("its compile failed (RuntimeError: Error compiling objects")
    # a wheel is made from the build folder, which build_py filled before the compile: it holds the reason too
    built_info = {}
    exec(next((src / "build").glob("lib*/lorweb_fast/_cuda_build_info.py")).read_text(), built_info)
    assert built_info["BUILD_ERROR"] == info["BUILD_ERROR"]
    skipped = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=src,
                             env={**env, "LORWEB_FAST_SKIP_CUDA_BUILD": "1"}, capture_output=True, text=True,
                             timeout=600)
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    info = {}
    exec((src / "lorweb_fast" / "_cuda_build_info.py").read_text(), info)
    assert info["BUILD_ERROR"] == "LORWEB_FAST_SKIP_CUDA_BUILD=1 was set"


# ------------------------------------------------------------------------------------------ register spills (no GPU)
KERNELS = ("scale_columns_kernel", "scale_dz_column_partials_kernel", "reduce_dcoeffs_kernel")


def find_cuobjdump():
    """cuobjdump from PATH, the CUDA toolkit, or the copy bundled with Triton's NVIDIA backend; None if absent."""
    import shutil
    from pathlib import Path

    from torch.utils.cpp_extension import CUDA_HOME

    candidates = [shutil.which("cuobjdump")]
    if CUDA_HOME:
        candidates.append(str(Path(CUDA_HOME) / "bin" / "cuobjdump"))
    try:
        import triton

        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and Path(c).is_file() and os.access(c, os.X_OK)), None)


def parse_resource_usage(text: str) -> dict:
    """``cuobjdump --dump-resource-usage`` output -> {arch: {mangled kernel name: {"REG": .., "STACK": .., ...}}}."""
    import re

    usage, arch, function = {}, None, None
    for line in text.splitlines():
        line = line.strip()
        if m := re.fullmatch(r"arch = (sm_\d+a?)", line):
            arch = m.group(1)
            usage.setdefault(arch, {})
        elif m := re.fullmatch(r"Function (\S+):", line):
            function = m.group(1)
        elif function is not None and line.startswith("REG:"):
            usage[arch][function] = {k: int(v) for k, v in re.findall(r"([A-Z_\[\]0-9]+):(\d+)", line)}
            function = None
    return usage


def parse_local_memory_instructions(sass: str) -> dict:
    """``cuobjdump -sass`` output -> {arch: {kernel: number of local-memory loads/stores (STL / LDL = spills)}}."""
    import re

    counts, arch, function = {}, None, None
    for line in sass.splitlines():
        if m := re.search(r"arch = (sm_\d+a?)", line):
            arch = m.group(1)
            counts.setdefault(arch, {})
        elif m := re.search(r"Function : (\S+)", line):
            function = m.group(1)
            counts[arch][function] = 0
        elif function is not None and re.search(r"\b(STL|LDL)(\.[A-Z0-9.]+)?\s", line):
            counts[arch][function] += 1
    return counts


def test_parsers_read_cuobjdump_output():
    """The parsers below the spill test, on a fixed excerpt of cuobjdump 13 output (so they cannot pass vacuously)."""
    usage = parse_resource_usage(
        "arch = sm_90\n Function _Z3fooPf:\n  REG:40 STACK:8 SHARED:1024 LOCAL:8 CONSTANT[0]:400\n"
        "arch = sm_80\n Function _Z3barPf:\n  REG:30 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:400\n")
    assert usage == {"sm_90": {"_Z3fooPf": {"REG": 40, "STACK": 8, "SHARED": 1024, "LOCAL": 8, "CONSTANT[0]": 400}},
                     "sm_80": {"_Z3barPf": {"REG": 30, "STACK": 0, "SHARED": 0, "LOCAL": 0, "CONSTANT[0]": 400}}}
    counts = parse_local_memory_instructions(
        "\tarch = sm_90\n\t\tFunction : _Z3fooPf\n        /*0040*/    STL [R1], R2 ;\n"
        "        /*0050*/    LDL.LU R2, [R1] ;\n        /*0060*/    LDS R3, [R4] ;\n"
        "\tarch = sm_80\n\t\tFunction : _Z3barPf\n        /*0040*/    STG.E [R2.64], R5 ;\n")
    assert counts == {"sm_90": {"_Z3fooPf": 2}, "sm_80": {"_Z3barPf": 0}}


def test_extension_kernels_do_not_spill(ext):
    """Every kernel of lorweb_fast._C, for sm_80 and sm_90, uses no local memory: no stack frame, no spill stores or
    loads (read from the built binary with cuobjdump; needs no GPU)."""
    import subprocess

    tool = find_cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (PATH, $CUDA_HOME/bin or triton/backends/nvidia/bin)")
    built = {f"sm_{a.replace('.', '').replace('+PTX', '')}" for a in ops.cuda_build_arch_list().split(";")}
    missing = {"sm_80", "sm_90"} - built
    if missing:
        pytest.skip(f"lorweb_fast._C was built for TORCH_CUDA_ARCH_LIST={ops.cuda_build_arch_list()}, "
                    f"not for {sorted(missing)}")
    usage = parse_resource_usage(subprocess.run([tool, "--dump-resource-usage", ext.__file__], check=True,
                                                capture_output=True, text=True).stdout)
    local_ops = parse_local_memory_instructions(subprocess.run([tool, "-sass", ext.__file__], check=True,
                                                               capture_output=True, text=True).stdout)
    for arch in ("sm_80", "sm_90"):
        assert arch in usage, f"no {arch} code in {ext.__file__}: {sorted(usage)}"
        for kernel in KERNELS:
            assert any(kernel in name for name in usage[arch]), f"{kernel} missing from the {arch} code"
        for name, res in usage[arch].items():
            assert res["LOCAL"] == 0 and res["STACK"] == 0, f"{arch} {name} uses local memory: {res}"
            assert local_ops[arch].get(name) == 0, f"{arch} {name} has {local_ops[arch].get(name)} STL/LDL spills"


def test_kernel_resources_script_reads_the_extension_cubins(ext, tmp_path):
    """benchmarks/kernel_resources.py's cuobjdump path (its fallback where the driver API is missing) finds every
    extension kernel in the per-architecture cubins of the built binary."""
    import subprocess
    from pathlib import Path

    from lorweb_fast.testing import load_module_from_file

    tool = find_cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (PATH, $CUDA_HOME/bin or triton/backends/nvidia/bin)")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_resources.py"
    resources = load_module_from_file(path, "kernel_resources")
    subprocess.run([tool, "-xelf", "all", ext.__file__], check=True, cwd=tmp_path, capture_output=True)
    cubins = sorted(tmp_path.glob("*.cubin"))
    assert cubins, "no cubin extracted"
    for cubin in cubins:
        table = resources.resource_table(tool, cubin)
        for kernel in KERNELS:
            assert any(kernel in name for name in table), f"{kernel} missing from {cubin.name}"
        assert all(res["LOCAL"] == 0 for res in table.values())
