"""Resources of the lorweb_fast kernels as the GPU driver loaded them: registers, spills, shared memory.

    python benchmarks/kernel_resources.py --out resources.json [--m 8192 --in-features 3072 --out-features 3072]

Runs one forward+backward per fused backend at the given shape (bf16, N=32, r=4), then records
  * every Triton kernel compiled in this process (the launchers in ``lorweb_fast.kernels``): ``n_regs``,
    ``n_spills`` and shared bytes of each specialization, which Triton reads from the driver when it loads the cubin;
  * every kernel of the CUDA extension ``lorweb_fast._C``: its cubin for this GPU is extracted with cuobjdump and
    loaded through the driver API (cuda-bindings), and cuFuncGetAttribute gives registers, local (spill) bytes and
    static shared bytes; where cuda-bindings is missing, cuobjdump's resource table of the same cubin is used and the
    entry says so (``"source": "cuobjdump"``).
The report names the device, the torch, CUDA and Triton versions, the commit (LORWEB_COMMIT, else git HEAD) and the
date. Exits with status 1 when a backend failed to run or a kernel list holds an error entry instead of kernels (the
report is written all the same, and the closing line counts real kernels only); needs a CUDA GPU, exits with status 2
and a message otherwise. --m must be even (two samples of M/2 rows).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def provenance() -> dict:
    """{"commit", "triton", "date"} of this run: the commit from LORWEB_COMMIT, else git HEAD of this checkout (see
    bench_mixed_lora.git_commit), else "unknown"; the installed Triton's version (None without Triton); the UTC
    date."""
    from bench_mixed_lora import git_commit, installed_triton_version

    return {"commit": git_commit(), "triton": installed_triton_version(),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def problems(report: dict) -> list[str]:
    """What went wrong in a report: each backend that failed to run, each error entry of a kernel list."""
    found = [f"backend {name}: {status}" for name, status in report["backends"].items() if status != "ran"]
    for key in ("triton_kernels", "cuda_extension_kernels"):
        found += [f"{key}: {row['error']}" for row in report[key] if "error" in row]
    return found


def run_backends(m: int, in_features: int, out_features: int) -> dict:
    """One forward+backward per fused backend, so that every kernel they launch is compiled and loaded."""
    import lorweb_fast as lf
    from lorweb_fast.testing import random_problem

    status = {}
    p = random_problem(2, m // 2, in_features, out_features, 32, 4, torch.bfloat16, device="cuda")
    for backend in ("triton", "cuda"):
        try:
            x = p["x"].detach().clone().requires_grad_(True)
            a = p["lora_a"].detach().clone().requires_grad_(True)
            b = p["lora_b"].detach().clone().requires_grad_(True)
            y = lf.lorweb_linear(x, p["weight"], p["bias"], a, b, p["coeffs"], p["scale"], backend=backend)
            y.backward(torch.randn_like(y))
            torch.cuda.synchronize()
            status[backend] = "ran"
        except Exception as exc:  # recorded, not hidden: the report says which backend could not run
            status[backend] = f"failed: {type(exc).__name__}: {exc}"
    return status


def jit_functions() -> list[tuple[str, object]]:
    """(name, JITFunction) of every Triton JIT function in lorweb_fast.kernels.mixed_lora (autotuner / heuristics
    wrappers unwrapped, each function once)."""
    from triton.runtime.jit import JITFunction

    import lorweb_fast.kernels.mixed_lora as mod

    found = []
    for attr in dir(mod):
        fn = getattr(mod, attr)
        while fn is not None and not isinstance(fn, JITFunction):
            fn = getattr(fn, "fn", None)
        if fn is not None and all(fn is not other for _, other in found):
            found.append((attr, fn))
    return found


def loaded_specializations():
    """(name, device, specialization key, compiled kernel) of every specialization loaded in this process, its
    driver attributes (``n_regs``, ``n_spills``) read (Triton reads them when it loads the cubin)."""
    for attr, fn in jit_functions():
        for device, caches in list(getattr(fn, "device_caches", {}).items()):
            cache = caches[0] if isinstance(caches, tuple) else caches
            for key, kernel in list(cache.items()):
                try:
                    kernel._init_handles()
                except Exception:
                    pass
                yield attr, device, key, kernel


def triton_kernels() -> list[dict]:
    """Every compiled specialization of every Triton JIT function in lorweb_fast.kernels.mixed_lora."""
    try:
        specializations = list(loaded_specializations())
    except Exception as exc:
        return [{"error": f"Triton kernels not importable: {exc}"}]
    found = []
    for attr, device, key, kernel in specializations:
        meta = getattr(kernel, "metadata", None)
        found.append({
            "kernel": attr, "device": str(device), "specialization": str(key)[:300],
            "registers": getattr(kernel, "n_regs", None), "spills": getattr(kernel, "n_spills", None),
            "shared_bytes": getattr(meta, "shared", None), "num_warps": getattr(meta, "num_warps", None),
            "num_stages": getattr(meta, "num_stages", None), "source": "triton (driver load)"})
    return found


def find_cuobjdump() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    candidates = [shutil.which("cuobjdump"), CUDA_HOME and str(Path(CUDA_HOME) / "bin" / "cuobjdump")]
    try:
        import triton

        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and Path(c).is_file()), None)


def resource_table(tool: str, cubin: Path) -> dict:
    """cuobjdump --dump-resource-usage of one cubin -> {mangled name: {"REG": .., "SHARED": .., "LOCAL": ..}}."""
    out = subprocess.run([tool, "--dump-resource-usage", str(cubin)], check=True, capture_output=True,
                         text=True).stdout
    table, function = {}, None
    for line in out.splitlines():
        line = line.strip()
        if m := re.fullmatch(r"Function (\S+):", line):
            function = m.group(1)
        elif function and line.startswith("REG:"):
            table[function] = {k: int(v) for k, v in re.findall(r"([A-Z_\[\]0-9]+):(\d+)", line)}
            function = None
    return table


def extension_kernels() -> list[dict]:
    """The kernels of lorweb_fast._C for this GPU, with the driver's attributes when cuda-bindings is present."""
    try:
        import lorweb_fast._C as ext
    except ImportError as exc:
        return [{"error": f"lorweb_fast._C not built: {exc}"}]
    tool = find_cuobjdump()
    if tool is None:
        return [{"error": "cuobjdump not found"}]
    major, minor = torch.cuda.get_device_capability()
    arch = f"sm_{major}{minor}"
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([tool, "-xelf", "all", ext.__file__], check=True, cwd=tmp, capture_output=True)
        cubins = sorted(Path(tmp).glob(f"*{arch}*.cubin"))
        if not cubins:
            return [{"error": f"no {arch} cubin in {ext.__file__} (only PTX or other architectures)"}]
        rows = []
        for cubin in cubins:
            table = resource_table(tool, cubin)
            driver = driver_attributes(cubin, list(table))
            for name, res in table.items():
                row = {"kernel": name, "arch": arch, "registers": res.get("REG"), "local_bytes": res.get("LOCAL"),
                       "stack_bytes": res.get("STACK"), "shared_bytes": res.get("SHARED"), "source": "cuobjdump"}
                if name in driver:
                    row.update(driver[name], source="driver (cuFuncGetAttribute)")
                rows.append(row)
        return rows


def driver_attributes(cubin: Path, names: list[str]) -> dict:
    """{name: {"registers", "local_bytes", "shared_bytes"}} from the driver, or {} without cuda-bindings."""
    try:
        from cuda.bindings import driver as cu
    except ImportError:
        return {}
    torch.cuda.init()
    torch.empty(1, device="cuda")  # the primary context is current on this thread
    err, module = cu.cuModuleLoad(str(cubin).encode())
    if err != cu.CUresult.CUDA_SUCCESS:
        return {}
    attrs = {"registers": cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_NUM_REGS,
             "local_bytes": cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES,
             "shared_bytes": cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES}
    out = {}
    try:
        for name in names:
            err, fn = cu.cuModuleGetFunction(module, name.encode())
            if err != cu.CUresult.CUDA_SUCCESS:
                continue
            values = {}
            for key, attr in attrs.items():
                err, value = cu.cuFuncGetAttribute(attr, fn)
                if err == cu.CUresult.CUDA_SUCCESS:
                    values[key] = int(value)
            out[name] = values
    finally:
        cu.cuModuleUnload(module)
    return out


def main(argv=None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or loaded from a file by tests
    from bench_mixed_lora import even_rows, positive_int

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--m", type=even_rows, default=8192, help="rows, two samples of M/2 (default 8192)")
    p.add_argument("--in-features", type=positive_int, default=3072, help="layer in_features (default 3072)")
    p.add_argument("--out-features", type=positive_int, default=3072, help="layer out_features (default 3072)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel_resources.py needs a CUDA GPU (none is visible to torch)", file=sys.stderr)
        return 2
    ran = run_backends(args.m, args.in_features, args.out_features)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
              **provenance(), "shape": {"M": args.m, "in": args.in_features, "out": args.out_features, "N": 32, "r": 4,
                        "dtype": "bf16"},
              "backends": ran, "triton_kernels": triton_kernels(), "cuda_extension_kernels": extension_kernels()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    triton_rows = [k for k in report["triton_kernels"] if "error" not in k]
    extension_rows = [k for k in report["cuda_extension_kernels"] if "error" not in k]
    spills = [k for k in triton_rows if k.get("spills")] + [k for k in extension_rows if k.get("local_bytes")]
    print(f"{len(triton_rows)} Triton and {len(extension_rows)} extension kernels; "
          f"{len(spills)} with spills or local memory -> {args.out}")
    for k in spills:
        print("  spills:", k)
    failed = problems(report)
    for line in failed:
        print("  FAILED:", line, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
