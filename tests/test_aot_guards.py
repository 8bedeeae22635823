"""Fast guards of lorweb_fast.aot's own logic: launch recording, JIT specialization, the plan of one small shape,
ptxas output parsing (a fake ptxas), the hardware checks on synthetic PTX, the compile cache, the report, the summary
and the CLI exit status. CPU-only; one tiny real compile per architecture."""

import json
import re
import stat
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

from lorweb_fast import aot  # noqa: E402
from lorweb_fast.kernels import mixed_lora as K  # noqa: E402


# ------------------------------------------------------------------------------------------ recording and tracing
def test_record_launches_restores_the_launcher_even_on_error():
    """_record_launches records (kernel, args, kwargs, grid) and puts K._launch back, also when the call raises."""
    original = K._launch

    def fn():
        K._launch("kern", (3, 1), 1, 2, BLOCK=4)
        K._launch("kern2", (5,), 7)

    rec = aot._record_launches(fn)
    assert K._launch is original
    assert [(r.kernel, r.args, r.kwargs, r.grid) for r in rec] == [("kern", (1, 2), {"BLOCK": 4}, (3, 1)),
                                                                   ("kern2", (7,), {}, (5,))]

    def boom():
        raise KeyError("x")

    with pytest.raises(KeyError):
        aot._record_launches(boom)
    assert K._launch is original


def test_as_traced_switches_and_restores():
    """_as_traced(K, True) makes K.traced answer True and restores it; _as_traced(K, False) leaves it alone."""
    original = K.traced
    with aot._as_traced(K, False):
        assert K.traced is original
    with aot._as_traced(K, True):
        assert K.traced() is True
    assert K.traced is original
    with pytest.raises(RuntimeError):
        with aot._as_traced(K, True):
            raise RuntimeError
    assert K.traced is original


# ------------------------------------------------------------------------------------------------ specialization
@triton.jit(do_not_specialize=["n2"], do_not_specialize_on_alignment=["Y"])
def _spec_probe_kernel(X, Y, n, n2, one, odd, BLOCK: tl.constexpr):
    pass


def _spec(*, BLOCK=64, num_warps=4, num_stages=2, n=32):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    x = torch.empty(64, device="meta")
    launch = aot.Launch(_spec_probe_kernel, (x, x, n, 32, 1, 7),
                        dict(BLOCK=BLOCK, num_warps=num_warps, num_stages=num_stages))
    return aot._specialize(launch, make_backend(GPUTarget("cuda", 90, 32)))


def test_specialize_mirrors_the_jit():
    """Ints equal to 1 become constexprs, 16-divisible ints and aligned pointers get divisibility hints at their own
    argument index, do_not_specialize / do_not_specialize_on_alignment are honoured, options keep both num_warps and
    num_stages."""
    s = _spec()
    assert s.name == "_spec_probe_kernel"
    assert s.signature == {"X": "*fp32", "Y": "*fp32", "n": "i32", "n2": "i32", "one": "constexpr", "odd": "i32",
                           "BLOCK": "constexpr"}
    assert s.constexprs == {"one": 1, "BLOCK": 64}
    assert s.attrs == {(0,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]]}
    assert s.options == {"num_warps": 4, "num_stages": 2}
    assert aot._config_of(s) == {"BLOCK": 64, "num_warps": 4, "num_stages": 2}


def test_specialization_key_covers_constexprs_options_and_hints():
    """Launches differing only in a constexpr, num_warps, num_stages or a divisibility hint get different keys;
    identical launches the same key."""
    base = _spec().key
    assert _spec().key == base
    assert len({base, _spec(BLOCK=128).key, _spec(num_warps=8).key, _spec(num_stages=3).key, _spec(n=33).key}) == 5


# ---------------------------------------------------------------------------------------------------------- plan
@pytest.fixture(scope="module")
def small_plan():
    return {arch: aot.plan(arch, layers=((3072, 3072),), ranks=(128,), dtypes=("bfloat16",)) for arch in (90, 80)}


def test_plan_restores_the_patched_launcher_and_tracer(small_plan):
    """After planning, kernels.mixed_lora launches and decides tracing for real again."""
    import inspect

    assert K._launch.__name__ == "_launch" and inspect.getmodule(K._launch) is K
    assert K.traced.__name__ == "traced" and not K.traced()


def test_plan_entries_and_specializations(small_plan):
    """Entries are unique, each names a specialization of its kernel whose config it carries; identical
    specializations are shared; all four passes are planned."""
    for arch, (entries, specs) in small_plan.items():
        keys = [json.dumps(e, sort_keys=True) for e in entries]
        assert len(keys) == len(set(keys)), arch
        assert {e["pass"] for e in entries} == {"fwd", "bwd", "fwd_compiled", "bwd_compiled"}
        for e in entries:
            spec = specs[e["_key"]]
            assert spec.name == e["kernel"] and e["config"] == aot._config_of(spec)
            assert set(spec.options) == {"num_warps", "num_stages"} <= set(e["config"]) or e["kernel"].endswith(
                "_finish_kernel")
            assert e["layer"] == [3072, 3072] and e["R"] == 128 and e["dtype"] == "bfloat16"
            assert all(k.isupper() for k in e["config"] if k not in ("num_warps", "num_stages")), e["config"]
            for name, ty in spec.signature.items():
                if ty == "constexpr":
                    assert name in spec.constexprs
        assert len(specs) < len(entries)
        assert {e["_key"] for e in entries} == set(specs)


def test_plan_problem_shapes(small_plan):
    """The planned problems have R // 4 rank-4 LoRAs (kernel R and RANK constexprs), both dcoeffs epilogues in the
    backward (per block for 4096-row samples, per row for the 8-row samples) and a weightless backward (a delta-only
    expand)."""
    for arch, (entries, _) in small_plan.items():
        shrinks = [e for e in entries if e["kernel"].startswith("_shrink")]
        assert shrinks and all(e["config"]["R"] == 128 and e["config"]["RANK"] == aot.LORA_RANK for e in shrinks)
        for pass_name in ("bwd", "bwd_compiled"):
            dc = {e["config"]["DCOEFFS"] for e in shrinks if e["pass"] == pass_name}
            assert dc == {K.DC_PER_ROW.value, K.DC_PER_BLOCK.value}, (arch, pass_name, dc)
            expands = [e for e in entries if e["pass"] == pass_name and e["kernel"].startswith("_expand")]
            assert {e["config"]["HAS_X1"] for e in expands} == {True, False}, (arch, pass_name)
        fwd = [e for e in entries if e["pass"] == "fwd" and e["kernel"].startswith("_expand")]
        assert {(e["config"]["HAS_X1"], e["config"]["HAS_BIAS"], e["config"]["HAS_BASE"]) for e in fwd} == {
            (True, True, False), (True, False, False), (False, False, True), (False, False, False)}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_planned_backward_gets_the_u_the_forward_saves(dtype):
    """The planned backward's saved u is what the forward returns (``saved_u_dtype``: fp32 for fp16 inputs), so the
    backward K1 specializations compiled and checked are the ones that run (a u in the input dtype planned fp16
    ``U: *fp16`` kernels that never run and missed the ``U: *fp32`` ones that do)."""
    p = aot._meta_problem(3072, 3072, 128, dtype)
    out = {}

    def forward(**kwargs):
        out["y"], out["u"], out["z"] = K.forward(p["x"], p["weight"], p["bias"], None, p["lora_a"], p["lora_b"],
                                                 p["coeffs"], 0.5, p["rows_per_sample"], **kwargs)

    aot._record_launches(forward, family="sm90")
    assert out["u"].dtype == p["u"].dtype == K.saved_u_dtype(getattr(torch, dtype))
    assert out["z"].dtype == p["z"].dtype == getattr(torch, dtype)


def test_plan_tma_only_eager_on_sm90(small_plan):
    """sm_90's eager passes take the TMA kernels, the *_compiled passes (traced) the pointer kernels; sm_80 never
    plans TMA. The launches are planned for the asked GPU family."""
    entries90 = small_plan[90][0]
    tma = {(e["pass"], e["kernel"]) for e in entries90 if "_tma" in e["kernel"]}
    assert ("fwd", "_expand_tma_kernel") in tma and ("bwd", "_expand_tma_kernel") in tma
    assert not any(p.endswith("_compiled") for p, _ in tma)
    assert not any("_tma" in e["kernel"] for e in small_plan[80][0])
    # the two families' tables differ for this shape: the entries carry each family's tiles
    cfg = {arch: {json.dumps(e["config"], sort_keys=True) for e in small_plan[arch][0]
                  if e["pass"] == "fwd_compiled" and e["kernel"] == "_shrink_kernel"} for arch in (90, 80)}
    assert cfg[90] != cfg[80]


# ------------------------------------------------------------------------------------------------ ptxas parsing
def _fake_bin(tmp_path, monkeypatch, output, rc=0, names=("ptxas-blackwell", "ptxas")):
    """Make aot.triton_bin point at fake ptxas scripts in tmp_path printing ``output`` and exiting with ``rc``;
    each records its argv in <name>.argv."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for name in names:
        exe = bindir / name
        exe.write_text(f"#!{sys.executable}\nimport sys, json\n"
                       f"open({str(bindir / (name + '.argv'))!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
                       f"sys.stderr.write({output!r})\nsys.exit({rc})\n")
        exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(aot, "triton_bin", lambda name: bindir / name)
    return bindir


PTXAS_OK = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
            "ptxas info    : Function properties for k\n"
            "    24 bytes stack frame, 136 bytes spill stores, 72 bytes spill loads\n"
            "ptxas info    : Used 255 registers, used 1 barriers, 16 bytes smem\n")


def test_ptxas_resources_parses_registers_and_spills(tmp_path, monkeypatch):
    """Registers (all digits) and spill bytes = spill stores + spill loads; the gpu name and the input are passed
    to the ptxas given."""
    bindir = _fake_bin(tmp_path, monkeypatch, PTXAS_OK)
    res = aot.ptxas_resources(".version 8.0\n", "sm_90a", tmp_path, bindir / "ptxas")
    assert res == {"registers": 255, "spill_bytes": 208, "ptxas": "ptxas"}
    argv = json.loads((bindir / "ptxas.argv").read_text())
    assert argv[:3] == ["--gpu-name", "sm_90a", "-v"]
    assert (tmp_path / "_ptxas_input.ptx").read_text() == ".version 8.0\n"
    assert not (bindir / "ptxas-blackwell.argv").exists()


def test_the_ptxas_is_the_one_triton_builds_the_arch_with():
    """The registers and spills come from the ptxas Triton assembles the arch's cubins with
    (triton.backends.nvidia.compiler.get_ptxas; the newer ptxas-blackwell allocated 188 registers where Triton 3.8's
    sm_90 cubin, built by its plain ptxas, has 190): sm_80 by the bundled ptxas and sm_100 by ptxas-blackwell in
    every Triton; sm_90 by ptxas up to Triton 3.8 and by ptxas-blackwell from Triton 3.9."""
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    for arch in (80, 90, 100):
        assert aot.ptxas_for(arch) == Path(get_ptxas(arch).path)
    assert aot.ptxas_for(80).name == "ptxas" and aot.ptxas_for(100).name == "ptxas-blackwell"
    version = tuple(int(v) for v in re.findall(r"\d+", triton.__version__)[:2])
    assert aot.ptxas_for(90).name == ("ptxas-blackwell" if version >= (3, 9) else "ptxas")


def test_ptxas_failure_is_reported(tmp_path, monkeypatch):
    """A non-zero ptxas exit raises, even when its output has parsable lines."""
    bindir = _fake_bin(tmp_path, monkeypatch, PTXAS_OK + "ptxas error   : bad\n", rc=255)
    with pytest.raises(RuntimeError, match="failed on sm_80"):
        aot.ptxas_resources("x", "sm_80", tmp_path, bindir / "ptxas")


@pytest.mark.parametrize("output", [
    "ptxas info    : Used 40 registers, used 0 barriers\n",  # no spill line
    "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n",  # no register line
])
def test_ptxas_unparsable_output_raises(tmp_path, monkeypatch, output):
    """Output missing either the register or the spill line is an error, not a silent zero."""
    bindir = _fake_bin(tmp_path, monkeypatch, output)
    with pytest.raises(RuntimeError, match="could not parse"):
        aot.ptxas_resources("x", "sm_80", tmp_path, bindir / "ptxas")


# ------------------------------------------------------------------------------------------------- real compile
@triton.jit
def _aot_guard_dot_kernel(X, P, U, M, KRED, stride_xm, stride_pk,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, KRED, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + rows[:, None] * stride_xm + ks[None, :])
        p = tl.load(P + ks[:, None] * stride_pk + cols[None, :])
        acc += tl.dot(x, p)
    tl.store(U + rows[:, None] * BLOCK_R + cols[None, :], acc.to(tl.bfloat16))


@pytest.mark.parametrize("arch", [90, 80])
def test_compile_specialization_reports_real_resources(arch, tmp_path, monkeypatch):
    """One tiny pipelined bf16 GEMM compiled for the target: its shared memory (non-zero), ptxas registers for the
    target's gpu name (sm_90a PTX does not assemble for another name), no spills, PTX and TTIR."""
    monkeypatch.setattr(K, "_aot_guard_dot_kernel", _aot_guard_dot_kernel, raising=False)
    sig = {"X": "*bf16", "P": "*bf16", "U": "*bf16", "M": "i32", "KRED": "i32", "stride_xm": "i32",
           "stride_pk": "i32", "BLOCK_M": "constexpr", "BLOCK_K": "constexpr", "BLOCK_R": "constexpr"}
    spec = aot.Specialization("_aot_guard_dot_kernel", sig, {"BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_R": 64},
                              {(i,): [["tt.divisibility", 16]] for i in range(7)},
                              {"num_warps": 4, "num_stages": 3}, "guard")
    res = aot.compile_specialization(spec, arch, tmp_path)
    assert res["shared_bytes"] > 0 and res["registers"] > 0 and res["spill_bytes"] == 0
    assert f".target {aot.ARCHS[arch][1]}" in res["ptx"] and "tt.func public @_aot_guard_dot_kernel" in res["ttir"]
    assert ("wgmma.mma_async" in res["ptx"]) == (arch == 90)


# ------------------------------------------------------------------------------------------------------- checks
def _loop(*body, wgmma=True):
    return "\n".join(["$L__BB0_1:", *body, "\twgmma.mma_async.sync.aligned;" if wgmma else "\tmma.sync.aligned;",
                      "\t@%p1 bra $L__BB0_1;", "\tret;"])


WIDE = _loop("\tld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];")
NARROW = _loop("\tld.global.b16 { %rs1 }, [ %rd1 + 0 ];")


def _entry(kernel="_shrink_kernel", dtype="bfloat16", shared=0, spills=0):
    return {"kernel": kernel, "dtype": dtype, "shared_bytes": shared, "spill_bytes": spills}


@pytest.mark.parametrize("arch,limit", [(80, 163 * 1024), (90, 227 * 1024)])
def test_shared_memory_limit_is_exact(arch, limit):
    """Shared memory up to the SM's limit (163 KiB on sm_80, 227 KiB on sm_90) passes; one byte more fails."""
    assert aot.check_entry(_entry(shared=limit), WIDE, arch) == []
    assert aot.check_entry(_entry(shared=limit + 1), WIDE, arch) == [f"shared memory {limit + 1} B > {limit} B"]


def test_spills_fail_for_every_kernel():
    """Any spill bytes fail the entry, GEMM or not."""
    assert aot.check_entry(_entry(spills=4), WIDE, 90) == ["4 bytes of register spills"]
    assert aot.check_entry(_entry("_grad_basis_finish_kernel", spills=8), "", 80) == ["8 bytes of register spills"]


def test_wgmma_required_only_for_half_precision_on_sm90():
    """bf16 and fp16 GEMMs need wgmma on sm_90; fp32 GEMMs and any sm_80 GEMM do not."""
    no_wgmma = _loop("\tld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];", wgmma=False)
    for dtype in ("bfloat16", "float16"):
        assert aot.check_entry(_entry(dtype=dtype), no_wgmma, 90) == ["no wgmma on sm_90"], dtype
        assert aot.check_entry(_entry(dtype=dtype), no_wgmma, 80) == [], dtype
    assert aot.check_entry(_entry(dtype="float32"), no_wgmma, 90) == []


@pytest.mark.parametrize("kernel", ["_shrink_kernel", "_shrink_tma_kernel", "_expand_kernel", "_expand_tma_kernel",
                                    "_grad_basis_kernel"])
def test_every_gemm_kernel_gets_the_load_checks(kernel):
    """Each GEMM-type kernel fails on a narrow main-loop load and on a kernel with no loop loads."""
    assert aot.check_entry(_entry(kernel), WIDE, 90) == []
    assert aot.check_entry(_entry(kernel), NARROW, 90) == [
        "main-loop loads narrower than 16 bytes: ['ld.global.b16 (2 B)']"]
    assert aot.check_entry(_entry(kernel), "\twgmma.mma_async;\n\tld.global.v4.b32 {%r1}, [%rd1];", 90) == [
        "no global loads found in any loop"]


def test_non_gemm_kernels_skip_the_load_checks():
    """The finish kernel (not GEMM-type) is not held to wgmma or wide main-loop loads."""
    assert aot.check_entry(_entry("_grad_basis_finish_kernel"), NARROW.replace("wgmma", "x"), 90) == []


@pytest.mark.parametrize("op,operands,nbytes,wide", [
    ("ld.global.v4.b32", "{ %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ]", 16, True),
    ("ld.global.nc.v2.b64", "{ %rd1, %rd2 }, [ %rd3 ]", 16, True),
    ("ld.global.v4.f32", "{ %f1, %f2, %f3, %f4 }, [ %rd1 ]", 16, True),
    ("ld.global.v2.u32", "{ %r1, %r2 }, [ %rd1 ]", 8, False),
    ("ld.global.b64", "{ %rd1 }, [ %rd2 ]", 8, False),
    ("ld.global.b16", "{ %rs1 }, [ %rd2 ]", 2, False),
    ("cp.async.cg.shared.global", "[ %r1 + 0 ], [ %rd1 + 0 ], 0x10, %r2", 16, True),
    ("cp.async.ca.shared.global", "[ %r1 + 0 ], [ %rd1 + 0 ], 16", 16, True),
    ("cp.async.ca.shared.global", "[ %r1 + 0 ], [ %rd1 + 0 ], 0x8, %r2", 8, True),
    ("cp.async.ca.shared.global", "[ %r1 + 0 ], [ %rd1 + 0 ], 4, %r2", 4, False),
    ("cp.async.bulk.tensor.2d.shared::cluster.global.tile", "[ %r1 ], [ %rd1, { %r2, %r3 } ], [ %r4 ]", 1 << 20,
     True),
])
def test_load_width_and_streaming_classification(op, operands, nbytes, wide):
    """Bytes per thread (vector count x element width, cp.async's decimal or hex size, TMA counted wide) and the
    thresholds: cp.async streams from 8 bytes, vector loads from 16."""
    assert aot._load_bytes(op, operands) == nbytes
    assert aot.wide_load(op, nbytes) is wide


def test_loop_detection():
    """Only backward branches (bra or bra.uni) make loops: loads around a forward branch are not loop loads, and a
    forward branch inside a loop does not hide the loop's loads."""
    forward = "\n".join(["\t@%p1 bra $L__BB0_2;", "\tld.global.b16 { %rs1 }, [ %rd1 ];", "$L__BB0_2:",
                         "\tld.global.b16 { %rs2 }, [ %rd2 ];", "\tret;"])
    assert aot.loop_loads(forward) == []
    # a forward branch inside a loop (a guarded block) is no inner loop: the loop's loads still count
    guarded = "\n".join(["$L__BB0_1:", "\tld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 ];", "\t@%p2 bra $L__BB0_3;",
                          "\tld.global.b16 { %rs1 }, [ %rd2 ];", "$L__BB0_3:", "\t@%p1 bra $L__BB0_1;"])
    assert aot.loop_loads(guarded) == [("ld.global.v4.b32", 16), ("ld.global.b16", 2)]
    # an outer (tile) loop around an inner main loop: only the innermost loop's loads count
    nested = "\n".join(["$L__BB0_1:", "\tld.global.b16 { %rs1 }, [ %rd2 ];", "$L__BB0_2:",
                         "\tld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 ];", "\t@%p1 bra $L__BB0_2;",
                         "\t@%p3 bra $L__BB0_1;"])
    assert aot.loop_loads(nested) == [("ld.global.v4.b32", 16)]
    uni = "\n".join(["$L__BB0_3:", "\tld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 ];",
                      "\tcp.async.ca.shared.global [ %r5 + 0 ], [ %rd2 + 0 ], 0x8, %r6;", "\tbra.uni $L__BB0_3;"])
    assert aot.loop_loads(uni) == [("ld.global.v4.b32", 16), ("cp.async.ca.shared.global", 8)]
    tma = _loop("\tcp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [ %r1 ], "
                "[ %rd1, { %r2, %r3 } ], [ %r4 ];")
    assert aot.check_entry(_entry("_expand_tma_kernel"), tma, 90) == []


# ---------------------------------------------------------------------------------------------- cache and report
def _fake_specs(*names):
    return {f"k{i}": aot.Specialization(name, {}, {}, {}, {"num_warps": 4}, f"k{i}") for i, name in enumerate(names)}


def test_compile_all_caches_per_arch(monkeypatch):
    """Each (arch, specialization) compiles once per process; another arch compiles again."""
    calls = []

    def job(j):
        spec, arch = j
        calls.append((arch, spec.key))
        return spec.key, {"arch": arch, "key": spec.key}

    monkeypatch.setattr(aot, "_COMPILED", {})
    monkeypatch.setattr(aot, "_compile_job", job)
    specs = _fake_specs("_a", "_b")
    assert aot.compile_all(specs, 80, jobs=1, progress=False) == {
        "k0": {"arch": 80, "key": "k0"}, "k1": {"arch": 80, "key": "k1"}}
    assert aot.compile_all(specs, 80, jobs=1, progress=False)["k1"] == {"arch": 80, "key": "k1"}
    assert calls == [(80, "k0"), (80, "k1")]
    assert aot.compile_all(specs, 90, jobs=1, progress=False)["k0"] == {"arch": 90, "key": "k0"}
    assert calls[2:] == [(90, "k0"), (90, "k1")]


def test_build_report_rejects_unknown_arch(tmp_path):
    """build_report refuses an architecture it has no limits for, with a ValueError naming the choices."""
    with pytest.raises(ValueError, match=r"one of \[80, 90\], got 70"):
        aot.build_report(70, tmp_path / "out")


def _stub_pipeline(monkeypatch, arch_results):
    entries = [dict(kernel="_shrink_kernel", layer=[3072, 3072], dtype="bfloat16", R=64, config={"num_warps": 4},
                    _key="k0", **{"pass": "fwd"}),
               dict(kernel="_shrink_kernel", layer=[3072, 12288], dtype="bfloat16", R=64, config={"num_warps": 4},
                    _key="k0", **{"pass": "bwd_compiled"}),
               dict(kernel="_grad_basis_finish_kernel", layer=[3072, 3072], dtype="float16", R=16,
                    config={"num_warps": 2}, _key="k1", **{"pass": "bwd"})]
    monkeypatch.setattr(aot, "plan", lambda arch, layers, ranks, dtypes: (entries, _fake_specs(
        "_shrink_kernel", "_grad_basis_finish_kernel")))
    monkeypatch.setattr(aot, "compile_all", lambda specs, arch, jobs, progress: arch_results)


def test_build_report_fields(tmp_path, monkeypatch):
    """Each entry's report fields come from its own plan entry and its specialization's compile result; the PTX
    goes to <kernel>-<key>.ptx; report.json holds the returned report."""
    results = {"k0": dict(shared_bytes=1000, registers=128, spill_bytes=8, ptx=WIDE, ttir="ttir0"),
               "k1": dict(shared_bytes=0, registers=40, spill_bytes=0, ptx="// finish", ttir="ttir1")}
    _stub_pipeline(monkeypatch, results)
    out = tmp_path / "out"
    report = aot.build_report(80, out, progress=False)
    assert report["arch"] == 80 and report["triton"] == triton.__version__
    assert report["kernels"] == [
        {"kernel": "_shrink_kernel", "pass": "fwd", "layer": [3072, 3072], "dtype": "bfloat16", "R": 64,
         "config": {"num_warps": 4}, "shared_bytes": 1000, "registers": 128, "spill_bytes": 8,
         "ptx": "shrink_kernel-k0.ptx"},
        {"kernel": "_shrink_kernel", "pass": "bwd_compiled", "layer": [3072, 12288], "dtype": "bfloat16", "R": 64,
         "config": {"num_warps": 4}, "shared_bytes": 1000, "registers": 128, "spill_bytes": 8,
         "ptx": "shrink_kernel-k0.ptx"},
        {"kernel": "_grad_basis_finish_kernel", "pass": "bwd", "layer": [3072, 3072], "dtype": "float16", "R": 16,
         "config": {"num_warps": 2}, "shared_bytes": 0, "registers": 40, "spill_bytes": 0,
         "ptx": "grad_basis_finish_kernel-k1.ptx"}]
    assert (out / "shrink_kernel-k0.ptx").read_text() == WIDE
    assert (out / "grad_basis_finish_kernel-k1.ptx").read_text() == "// finish"
    assert json.loads((out / "report.json").read_text()) == report


def test_build_report_removes_an_earlier_reports_ptx_files(tmp_path, monkeypatch):
    """A report written into a folder that holds an earlier report: the PTX files the earlier report.json named and
    this one does not are removed (the folder held 26 PTX files for a report naming 10); other files stay."""
    results = {"k0": dict(shared_bytes=1000, registers=128, spill_bytes=8, ptx=WIDE, ttir="ttir0"),
               "k1": dict(shared_bytes=0, registers=40, spill_bytes=0, ptx="// finish", ttir="ttir1")}
    _stub_pipeline(monkeypatch, results)
    out = tmp_path / "out"
    out.mkdir()
    (out / "expand_kernel-old.ptx").write_text("// stale")
    (out / "shrink_kernel-k0.ptx").write_text("// stale, rewritten")
    (out / "report.json").write_text(json.dumps({"kernels": [{"ptx": "expand_kernel-old.ptx"},
                                                              {"ptx": "shrink_kernel-k0.ptx"}]}))
    (out / "notes.txt").write_text("mine")
    aot.build_report(80, out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["grad_basis_finish_kernel-k1.ptx", "notes.txt", "report.json",
                                                     "shrink_kernel-k0.ptx"]
    assert (out / "shrink_kernel-k0.ptx").read_text() == WIDE


@pytest.mark.parametrize("argv,fragment", [(["--jobs", "-1"], "--jobs must be >= 0"),
                                           (["--out", "{file}"], "is a file; give a folder")])
def test_main_refuses_bad_options_in_one_line(tmp_path, capsys, argv, fragment):
    """--jobs -1 ran serially without a word; --out naming a file was a FileExistsError traceback: both are
    argparse errors (exit status 2) before anything compiles."""
    (tmp_path / "afile").write_text("x")
    argv = [a.replace("{file}", str(tmp_path / "afile")) for a in argv]
    with pytest.raises(SystemExit) as exc:
        aot.main(["--arch", "90", *(["--out", str(tmp_path / "o")] if "--out" not in argv else []), *argv])
    assert exc.value.code == 2 and fragment in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _write_report(out, arch, kernels, files):
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text)
    report = {"arch": arch, "triton": triton.__version__, "kernels": kernels}
    (out / "report.json").write_text(json.dumps(report))
    return report


def _k(kernel, ptx, dtype="bfloat16", spills=0, pass_name="fwd"):
    return {"kernel": kernel, "pass": pass_name, "layer": [3072, 3072], "dtype": dtype, "R": 64, "config": {},
            "shared_bytes": 100, "registers": 64, "spill_bytes": spills, "ptx": ptx}


def test_summarize_one_line_per_specialization_with_verdict(tmp_path):
    """One line per distinct PTX file, 'OK' when the checks pass, 'FAIL: <why>' when not; the checks use the
    report's architecture (no wgmma fails a bf16 GEMM on sm_90 only)."""
    no_wgmma = WIDE.replace("wgmma.mma_async", "mma")
    kernels = [_k("_shrink_kernel", "a.ptx"), _k("_shrink_kernel", "a.ptx", pass_name="bwd"),
               _k("_expand_kernel", "b.ptx"), _k("_grad_basis_finish_kernel", "c.ptx", spills=8)]
    files = {"a.ptx": WIDE, "b.ptx": no_wgmma, "c.ptx": ""}
    lines = aot.summarize(_write_report(tmp_path / "r90", 90, kernels, files), tmp_path / "r90")
    assert len(lines) == 3
    assert lines[0].startswith("_shrink_kernel") and lines[0].endswith(" OK") and "wgmma=True" in lines[0]
    assert lines[1].endswith("FAIL: no wgmma on sm_90") and "wgmma=False" in lines[1]
    assert lines[2].endswith("FAIL: 8 bytes of register spills") and "spills=8" in lines[2]
    lines = aot.summarize(_write_report(tmp_path / "r80", 80, kernels, files), tmp_path / "r80")
    assert [line.endswith(" OK") for line in lines] == [True, True, False]


@pytest.mark.parametrize("spills,code", [(0, 0), (8, 1)])
def test_main_exit_status_and_summary(tmp_path, monkeypatch, capsys, spills, code):
    """main exits 1 when a check fails, 0 otherwise; prints the per-specialization lines unless --quiet, and the
    totals line always."""
    out = tmp_path / "aot"
    kernels = [_k("_shrink_kernel", "a.ptx"), _k("_shrink_kernel", "a.ptx", pass_name="bwd"),
               _k("_grad_basis_finish_kernel", "c.ptx", spills=spills)]
    report = _write_report(out, 90, kernels, {"a.ptx": WIDE, "c.ptx": ""})
    monkeypatch.setattr(aot, "build_report", lambda arch, out_dir, progress, jobs: report)
    assert aot.main(["--arch", "90", "--out", str(out)]) == code
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 3 and printed[0].endswith(" OK")
    assert printed[-1] == (f"3 entries, 2 distinct specializations for sm_90; {int(bool(spills))} failing checks; "
                           f"report: {out / 'report.json'}")
    assert aot.main(["--arch", "90", "--out", str(out), "--quiet"]) == code
    assert capsys.readouterr().out.splitlines() == printed[-1:]


def test_compiles_with_the_eager_launches_fp_fusion(small_plan, tmp_path, monkeypatch):
    """``compile_specialization`` passes ``kernels.mixed_lora.FP_FUSION`` to triton.compile, as the eager launches
    do: a shrink kernel's scaling epilogue has fp32 fma instructions with it on and none with it off."""

    _, specs = small_plan[90]
    shrinks = [s for s in specs.values() if s.name == "_shrink_kernel"]
    counts = []
    for spec in shrinks:
        fused = aot.compile_specialization(spec, 90, tmp_path)["ptx"]
        monkeypatch.setattr(K, "FP_FUSION", False)
        unfused = aot.compile_specialization(spec, 90, tmp_path)["ptx"]
        monkeypatch.setattr(K, "FP_FUSION", True)
        counts.append((len(re.findall(r"\bfma\.rn\.f32\b", fused)), len(re.findall(r"\bfma\.rn\.f32\b", unfused))))
        if counts[-1][0]:
            break
    assert counts[-1][0] > 0 and counts[-1][1] == 0, counts


def test_ptxas_for_falls_back_on_a_triton_without_the_arch_argument(monkeypatch):
    """A Triton whose get_ptxas takes no arch (or has none) gets its bundled binaries by the same rule as Triton 3.6+
    (the plain ptxas below sm_100) instead of failing every compile with a TypeError."""
    import triton.backends.nvidia.compiler as compiler

    monkeypatch.setattr(compiler, "get_ptxas", lambda: None)
    assert aot.ptxas_for(90) == aot.triton_bin("ptxas") and aot.ptxas_for(100) == aot.triton_bin("ptxas-blackwell")
    monkeypatch.delattr(compiler, "get_ptxas")
    assert aot.ptxas_for(80) == aot.triton_bin("ptxas")
