"""Ahead-of-time compilation of every Triton kernel specialization the dispatcher would launch, without a GPU.

    python -m lorweb_fast.aot --arch 90 --out aot_sm90

For each METHOD.md layer shape (LAYERS), each R in RANKS (r = 4) and each dtype, the forward and backward op bodies
(``lorweb_fast.kernels.mixed_lora.forward`` / ``backward``: with and without weight, bias and base, both dcoeffs
modes) run on meta tensors with the launcher replaced by a recorder, once as in eager mode and once as while
torch.compile traces them (passes ``fwd_compiled`` / ``bwd_compiled``: no TMA, the pointer kernels with the TMA
entries' tiles), so the recorded launches are exactly what the dispatcher and the committed tile table choose for that
GPU family. Each launch's arguments are specialised the way Triton's JIT does (``native_specialize_impl``: integers
equal to 1 become constants, 16-divisible integers and aligned pointers get divisibility hints), identical
specializations are compiled once with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, and
the PTX is assembled for registers and spills by the ptxas Triton itself uses for that arch (``ptxas_for``).

``DIR/report.json``::

    {"arch", "triton", "kernels": [{"kernel", "pass": "fwd"|"bwd"|"fwd_compiled"|"bwd_compiled", "layer": [in, out],
      "dtype", "R", "config",
      "shared_bytes", "registers", "spill_bytes", "ptx": "<file name in DIR>"}]}

plus the PTX files (one per distinct specialization; entries that share a specialization share the file).
``check_entry`` holds the hardware checks that tests/test_aot.py asserts for every entry.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ._files import atomic_write

#: (in, out) of the FLUX.1 LoRA target layers (METHOD.md): attention projections, MLP up/down, the single blocks'
#: proj_out (15360 -> 3072), and the 2-D norm modulations: the double blocks' norm1 / norm1_context.linear
#: (3072 -> 18432 = 6 x 3072) and the single blocks' norm.linear (3072 -> 9216 = 3 x 3072).
LAYERS = ((3072, 3072), (3072, 12288), (12288, 3072), (15360, 3072), (3072, 18432), (3072, 9216))
RANKS = (16, 64, 96, 128, 256)
LORA_RANK = 4
DTYPES = ("bfloat16", "float16", "float32")
ARCHS = {80: ("sm80", "sm_80", 163 * 1024), 90: ("sm90", "sm_90a", 227 * 1024)}
#: Representative token count for the recorded launches. M is never part of a specialization except through its
#: divisibility by 16 (8192 = 2 x 4096 image tokens of FLUX at 1024 px).
M_TOKENS, BATCH = 8192, 2
#: Rows per sample of a second backward problem (M_TOKENS rows, 1024 samples) that no BLOCK_M divides: its K1 stores
#: the dcoeffs partials per row (DC_PER_ROW), the variant odd sequence lengths run.
PER_ROW_ROWS_PER_SAMPLE = 8
GEMM_KERNELS = ("_shrink_kernel", "_shrink_tma_kernel", "_expand_kernel", "_expand_tma_kernel", "_grad_basis_kernel")


@dataclass
class Launch:
    """One recorded kernel launch: the JIT kernel, its positional and keyword arguments, and its grid."""
    kernel: object
    args: tuple
    kwargs: dict
    grid: tuple = ()


@dataclass
class Specialization:
    """One distinct compilation: its key and, once compiled, its resources and PTX."""
    name: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    key: str
    result: dict = field(default_factory=dict)


def _record_launches(fn, *args, **kwargs) -> list[Launch]:
    """The launches ``fn(*args, **kwargs)`` makes, recorded in order with ``mixed_lora._launch`` replaced (nothing
    runs)."""
    from lorweb_fast.kernels import mixed_lora as K

    recorded: list[Launch] = []
    original = K._launch
    K._launch = lambda kernel, grid, *a, **kw: recorded.append(Launch(kernel, a, kw, grid))
    try:
        fn(*args, **kwargs)
    finally:
        K._launch = original
    return recorded


@contextlib.contextmanager
def _as_traced(K, traced: bool):
    """While ``traced``: the launchers decide as while torch.compile traces them (no TMA descriptors)."""
    original = K.traced
    if traced:
        K.traced = lambda *args: True
    try:
        yield
    finally:
        K.traced = original


def _specialize(launch: Launch, backend) -> Specialization:
    """Mirror Triton's JIT specialization of one launch's arguments."""
    from triton._C.libtriton import native_specialize_impl

    fn = launch.kernel
    options = {k: launch.kwargs[k] for k in ("num_warps", "num_stages") if k in launch.kwargs}
    values = list(launch.args) + [launch.kwargs[p.name] for p in fn.params[len(launch.args):]]
    signature, constexprs, attrs = {}, {}, {}
    for i, (param, value) in enumerate(zip(fn.params, values)):
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
            continue
        ty, spec = native_specialize_impl(type(backend), value, False, not param.do_not_specialize,
                                          not param.do_not_specialize_on_alignment)
        signature[param.name] = ty
        if ty == "constexpr":
            constexprs[param.name] = value
        elif isinstance(spec, str):
            parsed = backend.parse_attr(spec)
            if parsed:
                attrs[(i,)] = parsed
    key_src = json.dumps([fn.__name__, signature, {k: repr(v) for k, v in constexprs.items()},
                          {str(k): v for k, v in attrs.items()}, options], sort_keys=True)
    return Specialization(fn.__name__, signature, constexprs, attrs, options,
                          hashlib.sha256(key_src.encode()).hexdigest()[:16])


def _meta_problem(in_features, out_features, R, dtype, batch=BATCH):
    """Meta tensors of one layer problem, M = M_TOKENS rows, n = R // LORA_RANK basis LoRAs, in ``dtype`` (a torch
    dtype name) except coeffs: x (M, in), weight (out, in), bias (out,), lora_a (n, in, r), lora_b (n, r, out),
    coeffs (batch, n) fp32, u and z (M, R) (u in the dtype the forward saves it in: ``saved_u_dtype``, fp32 for
    fp16), dy and base (M, out); rows_per_sample = M // batch."""
    import torch

    from lorweb_fast.kernels.mixed_lora import saved_u_dtype

    dt = getattr(torch, dtype)
    meta = dict(device="meta", dtype=dt)
    n = R // LORA_RANK
    rows_per_sample = M_TOKENS // batch
    return dict(
        x=torch.empty(M_TOKENS, in_features, **meta), weight=torch.empty(out_features, in_features, **meta),
        bias=torch.empty(out_features, **meta), lora_a=torch.empty(n, in_features, LORA_RANK, **meta),
        lora_b=torch.empty(n, LORA_RANK, out_features, **meta),
        coeffs=torch.empty(batch, n, device="meta", dtype=torch.float32), rows_per_sample=rows_per_sample,
        u=torch.empty(M_TOKENS, R, device="meta", dtype=saved_u_dtype(dt)), z=torch.empty(M_TOKENS, R, **meta),
        dy=torch.empty(M_TOKENS, out_features, **meta), base=torch.empty(M_TOKENS, out_features, **meta))


def plan(arch: int, layers=LAYERS, ranks=RANKS, dtypes=DTYPES):
    """(entries, specializations) for ``arch``: entries in report order, each ``{kernel, layer: [in, out], dtype, R,
    config, pass, _key}`` (distinct), and ``{key: Specialization}`` deduplicated."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    from lorweb_fast.kernels import mixed_lora as K

    family = ARCHS[arch][0]
    backend = make_backend(GPUTarget("cuda", arch, 32))
    specs: dict[str, Specialization] = {}
    entries = []
    for in_f, out_f in layers:
        for R in ranks:
            for dtype in dtypes:
                p = _meta_problem(in_f, out_f, R, dtype)
                q = _meta_problem(in_f, out_f, R, dtype, batch=M_TOKENS // PER_ROW_ROWS_PER_SAMPLE)
                calls = {
                    "fwd": [(K.forward, (p["x"], p["weight"], p["bias"], None, p["lora_a"], p["lora_b"], p["coeffs"],
                                         0.5, p["rows_per_sample"])),
                            (K.forward, (p["x"], p["weight"], None, None, p["lora_a"], p["lora_b"], p["coeffs"],
                                         0.5, p["rows_per_sample"])),
                            (K.forward, (p["x"], None, None, p["base"], p["lora_a"], p["lora_b"], p["coeffs"], 0.5,
                                         p["rows_per_sample"])),
                            (K.forward, (p["x"], None, None, None, p["lora_a"], p["lora_b"], p["coeffs"], 0.5,
                                         p["rows_per_sample"]))],
                    "bwd": [(K.backward, (p["dy"], p["x"], p["weight"], p["lora_a"], p["lora_b"], p["coeffs"],
                                          p["u"], p["z"], 0.5, p["rows_per_sample"])),
                            (K.backward, (q["dy"], q["x"], q["weight"], q["lora_a"], q["lora_b"], q["coeffs"],
                                          q["u"], q["z"], 0.5, q["rows_per_sample"])),
                            (K.backward, (p["dy"], p["x"], None, p["lora_a"], p["lora_b"], p["coeffs"],
                                          p["u"], p["z"], 0.5, p["rows_per_sample"]))],
                }
                # "_compiled": the same calls as torch.compile traces them (``kernels.mixed_lora.traced``): the
                # pointer kernels with the tiles of the table's TMA entries
                calls.update({f"{name}_compiled": fns for name, fns in list(calls.items())})
                for pass_name, fns in calls.items():
                    for fn, args in fns:
                        with _as_traced(K, pass_name.endswith("_compiled")):
                            launches = _record_launches(fn, *args, family=family)
                        for launch in launches:
                            spec = _specialize(launch, backend)
                            spec = specs.setdefault(spec.key, spec)
                            entry = dict(kernel=spec.name, layer=[in_f, out_f], dtype=dtype, R=R,
                                         config=_config_of(spec))
                            entry["pass"] = pass_name
                            entry["_key"] = spec.key
                            if entry not in entries:
                                entries.append(entry)
    return entries, specs


def _config_of(spec: Specialization) -> dict:
    """The tile configuration of a specialization: its upper-case int / bool constexprs plus num_warps, num_stages."""
    cfg = {k: v for k, v in spec.constexprs.items() if isinstance(v, (int, bool)) and k.isupper()}
    cfg.update(spec.options)
    return cfg


def triton_bin(name: str) -> Path:
    """The path of the binary ``name`` bundled with Triton (backends/nvidia/bin)."""
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def ptxas_for(arch: int) -> Path:
    """The ptxas Triton assembles ``arch``'s cubins with (``triton.backends.nvidia.compiler.get_ptxas``: the bundled
    ``ptxas`` below sm_100, ``ptxas-blackwell`` from sm_100, or what TRITON_PTXAS_PATH names), so the registers and
    spills reported are those of the binary Triton builds there (another ptxas version allocates differently)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return Path(get_ptxas(arch).path)
    except (ImportError, TypeError, AttributeError):  # an older Triton (get_ptxas() without the arch, or none):
        return triton_bin("ptxas-blackwell" if arch >= 100 else "ptxas")  # its bundled binaries, by the same rule


def ptxas_resources(ptx: str, gpu_name: str, workdir: Path, exe: Path) -> dict:
    """``{"registers", "spill_bytes" (stores + loads), "ptxas": exe's name}`` from ``exe -v`` (``ptxas_for(arch)``:
    the ptxas Triton uses for that arch) assembling ``ptx`` for ``gpu_name`` in ``workdir``; RuntimeError when it
    fails or its output does not parse."""
    exe = Path(exe)
    src = workdir / "_ptxas_input.ptx"
    src.write_text(ptx)
    proc = subprocess.run([str(exe), "--gpu-name", gpu_name, "-v", str(src), "-o", str(workdir / "_ptxas.cubin")],
                          capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{exe.name} failed on {gpu_name}:\n{out[-3000:]}")
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    if not regs or not spills:
        raise RuntimeError(f"could not parse {exe.name} -v output:\n{out[-3000:]}")
    return dict(registers=int(regs.group(1)), spill_bytes=int(spills.group(1)) + int(spills.group(2)),
                ptxas=exe.name)


def compile_specialization(spec: Specialization, arch: int, workdir: Path) -> dict:
    """Compile one specialization for ``arch``; returns ``{"shared_bytes", "ptx", "ttir", "registers",
    "spill_bytes", "ptxas"}``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lorweb_fast.kernels import mixed_lora as K

    fn = getattr(K, spec.name)
    src = ASTSource(fn, spec.signature, spec.constexprs, spec.attrs)
    # FP fusion as the eager launches pin it (kernels.mixed_lora.FP_FUSION)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(spec.options, enable_fp_fusion=K.FP_FUSION))
    ptx = compiled.asm["ptx"]
    res = ptxas_resources(ptx, ARCHS[arch][1], workdir, ptxas_for(arch))
    return dict(shared_bytes=int(compiled.metadata.shared), ptx=ptx, ttir=compiled.asm["ttir"], **res)


# ------------------------------------------------------------------------------------------------------- checks
_LABEL = re.compile(r"^\s*(\$L__\w+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")
_GLOBAL_LOAD = re.compile(r"\b(ld\.global[\w.:]*|cp\.async\.bulk\.tensor[\w.:]*|cp\.async\.c[ag][\w.:]*)\s+([^;]*);")


def _load_bytes(op: str, operands: str) -> int:
    """Bytes moved per thread by one global load instruction (TMA bulk copies count as wide)."""
    if op.startswith("cp.async.bulk"):
        return 1 << 20
    if op.startswith("cp.async"):
        size = re.search(r",\s*(0x[0-9a-fA-F]+|\d+)\s*(?:,|$)", operands)
        return int(size.group(1), 0) if size else 0
    vec = re.search(r"\.v(\d)", op)
    width = re.search(r"\.[bfsu](8|16|32|64)\b", op)
    return (int(vec.group(1)) if vec else 1) * (int(width.group(1)) // 8 if width else 0)


def wide_load(op: str, nbytes: int) -> bool:
    """A main-loop load that streams: TMA, an asynchronous copy of >= 8 bytes per thread (cp.async, which the
    pipeliner only emits for contiguous, aligned tiles) or a >= 16-byte vector load."""
    if op.startswith("cp.async"):
        return nbytes >= 8
    return nbytes >= 16


def loop_loads(ptx: str) -> list[tuple[str, int]]:
    """(instruction, bytes) of every global load inside an innermost loop body (a label reached by a later backward
    branch, with no other loop inside). Innermost loops are the main loops: in a persistent kernel the outer tile loop
    also holds the epilogue (bias, base), whose short row-vector loads are not part of the streaming."""
    lines = ptx.splitlines()
    labels = {}
    for i, line in enumerate(lines):
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = i
    loops = []
    for j, line in enumerate(lines):
        m = _BRANCH.search(line)
        if m and m.group(1) in labels and labels[m.group(1)] < j:
            loops.append((labels[m.group(1)], j))
    innermost = [(a, b) for a, b in loops
                 if not any((c, d) != (a, b) and a <= c and d <= b for c, d in loops)]
    found = []
    for a, b in innermost:
        for line in lines[a:b + 1]:
            for m in _GLOBAL_LOAD.finditer(line):
                found.append((m.group(1), _load_bytes(m.group(1), m.group(2))))
    return found


def compiled_r_dependent_launches(arch: int, layer: tuple, R: int, dtype: str) -> list[tuple[dict, dict]]:
    """[(plan entry, ``compile_specialization`` result)] for the eager launches of one layer at R in ``dtype`` whose
    kernels depend on R (the shrinks and grad_basis: the expand kernels are covered by the report at any R), each
    specialization compiled once (in a temporary folder). For checks of one R outside ``RANKS``."""
    import tempfile

    entries, specs = plan(arch, layers=(tuple(layer),), ranks=(R,), dtypes=(dtype,))
    results, out = {}, []
    for entry in entries:
        if entry["kernel"] in ("_expand_kernel", "_expand_tma_kernel") or entry["pass"].endswith("_compiled"):
            continue
        if entry["_key"] not in results:
            with tempfile.TemporaryDirectory() as work:
                results[entry["_key"]] = compile_specialization(specs[entry["_key"]], arch, Path(work))
        out.append((entry, results[entry["_key"]]))
    return out


def check_entry(entry: dict, ptx: str, arch: int) -> list[str]:
    """The hardware checks for one report entry; returns the list of failures (empty when it passes).

    * shared memory fits the SM (227 KiB on sm_90, 163 KiB on sm_80); no register spills;
    * on sm_90, bf16/fp16 GEMM-type kernels issue wgmma;
    * the main loops of GEMM-type kernels load through TMA (cp.async.bulk.tensor), cp.async (>= 8 bytes per thread)
      or 16-byte vector loads (ld.global[.nc].v4.b32 / .v2.b64) only (``wide_load``) -- a scalar gather (such as the
      former row-panel kernel's 2-byte ld.global.b16 loads of a (N, in, r) basis) fails."""
    failures = []
    limit = ARCHS[arch][2]
    if entry["shared_bytes"] > limit:
        failures.append(f"shared memory {entry['shared_bytes']} B > {limit} B")
    if entry["spill_bytes"]:
        failures.append(f"{entry['spill_bytes']} bytes of register spills")
    if entry["kernel"] in GEMM_KERNELS:
        if arch == 90 and entry["dtype"] in ("bfloat16", "float16") and "wgmma.mma_async" not in ptx:
            failures.append("no wgmma on sm_90")
        loads = loop_loads(ptx)
        narrow = sorted({f"{op} ({nbytes} B)" for op, nbytes in loads if not wide_load(op, nbytes)})
        if not loads:
            failures.append("no global loads found in any loop")
        elif narrow:
            failures.append(f"main-loop loads narrower than 16 bytes: {narrow}")
    return failures


# --------------------------------------------------------------------------------------------------------- driver
_COMPILED: dict = {}  # (arch, specialization key) -> compile result, cached per process


def _compile_job(job):
    """(key, ``compile_specialization`` result) of ``job`` = (specialization, arch), in a temporary work folder."""
    spec, arch = job
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lorweb_aot_") as work:
        return spec.key, compile_specialization(spec, arch, Path(work))


def compile_all(specs: dict, arch: int, jobs: int = 0, progress: bool = True) -> dict:
    """Compile the specializations not yet cached, with ``jobs`` worker processes (0: one per CPU core, at most 4);
    returns {key: ``compile_specialization`` result} for every key of ``specs``."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    from ._progress import progress_bar

    todo = [(spec, arch) for key, spec in specs.items() if (arch, key) not in _COMPILED]
    jobs = jobs or min(4, os.cpu_count() or 1)
    bar = progress_bar(total=len(todo), desc=f"compiling for sm_{arch}", disable=not progress or not todo)
    try:  # the bar closed on an error or Ctrl-C too (else redrawn under the message at exit)
        if jobs > 1 and len(todo) > 1:
            with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
                for key, res in pool.map(_compile_job, todo):
                    _COMPILED[(arch, key)] = res
                    bar.update()
        else:
            for job in todo:
                key, res = _compile_job(job)
                _COMPILED[(arch, key)] = res
                bar.update()
    finally:
        bar.close()
    return {key: _COMPILED[(arch, key)] for key in specs}


def _earlier_ptx_files(out: Path) -> set:
    """The PTX file names (plain ``*.ptx`` names in ``out``) the report.json already in ``out`` lists; none when
    there is no readable report."""
    try:
        kernels = json.loads((out / "report.json").read_text())["kernels"]
        names = {k["ptx"] for k in kernels}
    except (OSError, ValueError, RecursionError, KeyError, TypeError):
        return set()
    return {n for n in names if isinstance(n, str) and n.endswith(".ptx") and Path(n).name == n and n != ".ptx"}


def build_report(arch: int, out_dir, layers=LAYERS, ranks=RANKS, dtypes=DTYPES, progress: bool = True,
                 jobs: int = 0) -> dict:
    """Compile every specialization for ``arch``, write ``out_dir/report.json`` and the PTX files; return the report.
    Compilations are cached per process (the tests and the CLI share them)."""
    import triton

    if arch not in ARCHS:
        raise ValueError(f"--arch must be one of {sorted(ARCHS)}, got {arch}")
    from .validation import check_output_dir

    out = check_output_dir("--out", out_dir)  # a file: ValueError (UsageError) naming it
    out.mkdir(parents=True, exist_ok=True)
    earlier = _earlier_ptx_files(out)
    entries, specs = plan(arch, layers, ranks, dtypes)
    results = {}
    for key, res in compile_all(specs, arch, jobs, progress).items():
        ptx_name = f"{specs[key].name.strip('_')}-{key}.ptx"
        atomic_write(out / ptx_name, lambda tmp, text=res["ptx"]: tmp.write_text(text))  # never through a link
        results[key] = dict(res, ptx_file=ptx_name)
    written = {r["ptx_file"] for r in results.values()}
    for stale in earlier - written:  # an earlier report's PTX files, not any other .ptx in the folder
        (out / stale).unlink(missing_ok=True)
    kernels = []
    for e in entries:
        res = results[e["_key"]]
        kernels.append({"kernel": e["kernel"], "pass": e["pass"], "layer": e["layer"], "dtype": e["dtype"],
                        "R": e["R"], "config": e["config"], "shared_bytes": res["shared_bytes"],
                        "registers": res["registers"], "spill_bytes": res["spill_bytes"], "ptx": res["ptx_file"]})
    report = {"arch": arch, "triton": triton.__version__, "kernels": kernels}
    atomic_write(out / "report.json", lambda tmp: tmp.write_text(json.dumps(report, indent=1) + "\n"))
    return report


def summarize(report: dict, out_dir) -> list[str]:
    """One line per distinct kernel specialization: shared bytes, registers, spills, wgmma, check failures."""
    lines, seen = [], set()
    for e in report["kernels"]:
        if e["ptx"] in seen:
            continue
        seen.add(e["ptx"])
        ptx = (Path(out_dir) / e["ptx"]).read_text()
        fails = check_entry(e, ptx, report["arch"])
        lines.append(f"{e['kernel']:<22} {e['pass']} {e['dtype']:<8} R={e['R']:<3} shared={e['shared_bytes']:>6} "
                     f"regs={e['registers']:>3} spills={e['spill_bytes']} wgmma={'wgmma.mma_async' in ptx} "
                     f"{'OK' if not fails else 'FAIL: ' + '; '.join(fails)}")
    return lines


def main(argv: Optional[list] = None) -> int:
    """``python -m lorweb_fast.aot``: build the report, print the summary; exit status 1 when a check fails, 130
    after Ctrl-C (one line), 141 when the reader of its output has gone."""
    from .cli import run_writing_stdout

    def run() -> int:
        try:
            return _run(argv)
        except KeyboardInterrupt:
            sys.stderr.write(f"{PROG}: interrupted\n")
            return 130

    return run_writing_stdout(PROG, run)


#: the command's name in its usage and error lines
PROG = "python -m lorweb_fast.aot"


def _run(argv: Optional[list]) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, choices=sorted(ARCHS), required=True, help="80 (A100) or 90 (H100/H200)")
    parser.add_argument("--out", required=True, help="folder for report.json and the PTX files")
    parser.add_argument("--jobs", type=int, default=0,
                        help="compiler processes (default 0: CPU cores, at most 4)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar and no per-specialization lines (the closing line stays)")
    args = parser.parse_args(argv)
    if args.jobs < 0:
        parser.error(f"--jobs must be >= 0 (0: CPU cores, at most 4), got {args.jobs}")
    from .validation import MissingDependencyError, UsageError, check_output_dir, require

    try:
        require("triton", "compiling the kernels ahead of time")
        check_output_dir("--out", args.out)
    except (UsageError, MissingDependencyError) as exc:
        parser.error(str(exc))
    report = build_report(args.arch, args.out, progress=not args.quiet, jobs=args.jobs)
    failed = 0
    for line in summarize(report, args.out):
        failed += "FAIL" in line
        if not args.quiet:
            print(line)
    print(f"{len(report['kernels'])} entries, {len({e['ptx'] for e in report['kernels']})} distinct "
          f"specializations for sm_{args.arch}; {failed} failing checks; report: {Path(args.out) / 'report.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
