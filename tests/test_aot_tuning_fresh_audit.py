"""Fresh audit of the AOT checks and the kernel tuning code (lorweb_fast/aot.py, benchmarks/tune_kernels.py,
kernels/mixed_lora.py's table reading). CPU only; the compile tests build a handful of sm_90 / sm_86 specializations
with Triton's compiler and bundled ptxas (seconds each, no GPU)."""

import copy
import importlib
import json
import sys
import tempfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from lorweb_fast import aot  # noqa: E402
from lorweb_fast.kernels import mixed_lora as K  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def _tuner():
    sys.path.insert(0, str(BENCH_DIR))
    try:
        return importlib.import_module("tune_kernels")
    finally:
        sys.path.remove(str(BENCH_DIR))


# ------------------------------------------------------------------------------------ AOT coverage of the tables
@pytest.mark.parametrize("arch", sorted(aot.ARCHS))
def test_aot_enumeration_reaches_every_default_rule_at_its_largest_R(arch):
    """lorweb_fast/aot.py:plan claims to compile "every Triton specialization the dispatcher would launch" for the
    committed table of the family (README "AOT checks"; kernels/configs/sm80.json's note: the defaults are "checked
    ... by the AOT compiler report"). The dispatcher (kernels/mixed_lora.py:choose_route / lookup) serves every
    R <= MAX_FUSED_R = 512 with the first default rule whose max_R covers it, so each default rule must be compiled
    by the AOT at least at its largest R (the largest accumulator). Today aot.RANKS stops at 256: the bf16/fp16
    rule with max_R = 512 (block_m 64, block_k 32, grad_basis 32 x 32) is never compiled, and the fp32 max_R = 512
    rule only at R = 256 -- and those tiles spill at R = 512 / 288 (see the next test)."""
    family = aot.ARCHS[arch][0]
    table = K.load_table(family)
    reached = set()
    for layer in aot.LAYERS:
        for R in aot.RANKS:
            for dtype in aot.DTYPES:
                rule = K.lookup(*layer, R, getattr(torch, dtype), family)
                for i, default in enumerate(table["defaults"]):
                    if rule is default:
                        reached.add((i, dtype, R))
    missing = []
    for i, rule in enumerate(table["defaults"]):
        for dtype in rule["dtypes"]:
            # at its largest R, or at all where every enumerated layer has an exact entry at that R (sm90: bf16 R=128)
            at_max = (i, dtype, rule["max_R"]) in reached or (
                rule["max_R"] in aot.RANKS and any((j, d) == (i, dtype) for j, d, _ in reached))
            if not at_max:
                missing.append(f"defaults[{i}] ({dtype}, max_R={rule['max_R']}): reached at R = "
                               f"{sorted(R for j, d, R in reached if (j, d) == (i, dtype)) or 'never'}")
    assert not missing, f"{family}: default rules the AOT never compiles at their largest R:\n" + "\n".join(missing)


def _compile_failures(arch, R, dtype):
    """check_entry failures of every shrink / grad_basis launch the dispatcher makes for layer 3072 -> 3072 at R in
    ``dtype`` (the expand kernels do not depend on R and are covered by the AOT report)."""
    failures = []
    for e, res in aot.compiled_r_dependent_launches(arch, (3072, 3072), R, dtype):
        full = dict(e, shared_bytes=res["shared_bytes"], spill_bytes=res["spill_bytes"], registers=res["registers"])
        for why in aot.check_entry(full, res["ptx"], arch):
            failures.append(f"{e['kernel']} {e['pass']} R={R} {dtype} {e['config']}: {why}")
    return failures


@pytest.mark.parametrize("R", [512, 288])
def test_committed_sm90_bf16_tiles_for_large_R_pass_the_aot_checks(R):
    """The sm90.json bf16 default rule for 256 < R <= 512 is what the dispatcher launches for e.g. N = 32 LoRAs of
    rank 16 (the paper's capacity ablation) or N = 128 of rank 4 (kernels/mixed_lora.py:forward / backward, route
    "fused" since R <= MAX_FUSED_R). Its kernels must pass the same hardware checks as every other entry
    (lorweb_fast/aot.py:check_entry: no spills, wgmma, streaming loads). Today, compiled for sm_90a with Triton's
    ptxas: the shrink spills 224-704 bytes at R = 512, the grad_basis kernel 8032 bytes at R = 288 (R0 = 256,
    R1 = 32), plus no wgmma / 8-byte loads in grad_basis (BLOCK_N = 32). (Once MAX_FUSED_R is lowered instead, no
    shrink / grad_basis launch is recorded and this passes.)"""
    failures = _compile_failures(90, R, "bfloat16")
    assert not failures, "\n".join(failures)


def test_default_table_fp32_expand_does_not_spill_on_the_gpus_it_serves():
    """kernels/configs/default.json serves every GPU without its own table (sm_86 / sm_89: A10, RTX 3090/4090,
    L40S; kernels/mixed_lora.py:gpu_family) and its note says the tiles were "checked ... by the AOT compiler report",
    but lorweb_fast/aot.py:plan only ever loads sm80.json / sm90.json. Its fp32 forward expand (64 x 64 x 32,
    8 warps) spills 16 bytes on sm_86 and sm_89 -- the very tile sm80.json and sm90.json moved to block_k 16 after
    the AOT check found the same spill (sm90.json's note). Expected: the default table's fp32 expand compiles
    without spills for sm_86."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    arch = 86
    backend = make_backend(GPUTarget("cuda", arch, 32))
    p = aot._meta_problem(3072, 3072, 128, "float32")
    launches = aot._record_launches(K.forward, p["x"], p["weight"], p["bias"], None, p["lora_a"], p["lora_b"],
                                    p["coeffs"], 0.5, p["rows_per_sample"], family="default")
    spills = []
    for launch in launches:
        if launch.kernel is not K._expand_kernel:
            continue
        spec = aot._specialize(launch, backend)
        compiled = triton.compile(ASTSource(K._expand_kernel, spec.signature, spec.constexprs, spec.attrs),
                                  target=GPUTarget("cuda", arch, 32),
                                  options=dict(spec.options, enable_fp_fusion=K.FP_FUSION))
        with tempfile.TemporaryDirectory() as work:
            res = aot.ptxas_resources(compiled.asm["ptx"], f"sm_{arch}", Path(work), aot.ptxas_for(arch))
        if res["spill_bytes"]:
            spills.append(f"{aot._config_of(spec)}: {res['spill_bytes']} bytes of spills")
    assert launches and not spills, spills


# --------------------------------------------------------------------------------------- table validation
def _good_table(family="sm90"):
    return copy.deepcopy(json.loads(K.config_path(family).read_text()))


def test_duplicate_table_entries_are_refused():
    """kernels/mixed_lora.py:validate_table: two entries for the same (in, out, R, dtype) are ambiguous --
    lookup_in silently takes the first and the second is dead (e.g. two tuning sessions' tables merged by hand, or a
    copy-paste). A malformed table is refused with a ConfigError naming the file (README "Tuning": "a malformed
    table raises a ConfigError naming the file and key"); expected: the duplicate is refused, naming its key."""
    table = _good_table()
    dup = copy.deepcopy(table["entries"][0])
    dup["route"] = "composed" if dup["route"] == "fused" else "fused"
    table["entries"].append(dup)
    with pytest.raises(K.ConfigError, match="duplicate|twice|more than once|repeats the key"):
        K.validate_table(table, "dup.json")


def test_a_default_rule_shadowed_by_an_earlier_one_is_refused():
    """kernels/mixed_lora.py:validate_table / lookup_in: "the first default with the dtype in dtypes and
    R <= max_R applies", so a default rule after one that covers all its (dtype, R) is never used. A table whose
    bf16 max_R = 512 rule comes first silently runs the R = 512 tiles for R = 16 too and ignores the two tuned
    smaller rules. Expected: a ConfigError naming the unreachable rule."""
    table = _good_table()
    defaults = table["defaults"]
    big = next(i for i, r in enumerate(defaults) if "bfloat16" in r["dtypes"] and r["max_R"] == K.MAX_FUSED_R)
    defaults.insert(0, defaults.pop(big))
    with pytest.raises(K.ConfigError, match="defaults"):
        K.validate_table(table, "shadowed.json")


# ------------------------------------------------------------------------------------------------- the tuner
def _stub_tuner(tk, monkeypatch):
    """tune() on CPU: launchers replaced by shape-only stubs, every configuration admitted, each timing 1 ms."""
    def shrink(x, a_cat, coeffs, scale, rps, rank, u_in=None, config=None, out_features=None):
        m, r = x.shape[0], a_cat.shape[0]
        if u_in is None:
            return torch.zeros(m, r), torch.zeros(m, r)
        return None, torch.zeros(m, r), torch.zeros(m, coeffs.shape[1])

    monkeypatch.setattr(K, "shrink", shrink)
    monkeypatch.setattr(K, "expand", lambda x, w, z, b, bias=None, config=None, weight_layout=None:
                        torch.zeros(x.shape[0], b.shape[1]))
    monkeypatch.setattr(tk, "role_references", lambda name, *a: [])
    monkeypatch.setattr(tk, "admissible", lambda name, call, refs, batch, device: (call(), None)[1])
    monkeypatch.setattr(tk, "_bench", lambda fn, n_inputs=1: 1.0)
    monkeypatch.setattr(tk, "CANDIDATES", {role: c[:2] for role, c in tk.CANDIDATES.items()})


def test_tuner_table_write_is_atomic(monkeypatch, tmp_path):
    """benchmarks/tune_kernels.py:tune rewrites the committed table after every shape ("so a sweep stopped from
    outside keeps the shapes it finished") with ``Path.write_text`` straight onto the table: a stop (Ctrl-C, kill,
    a full disk) during that write leaves a truncated kernels/configs/<family>.json, and then every Triton launch
    of the package fails with "not valid JSON" (kernels/mixed_lora.py:load_table). Expected: the table is replaced
    atomically (as lorweb_fast.aot writes report.json, via lorweb_fast._files.atomic_write): after an interrupted
    write the file still holds a valid table."""
    tk = _tuner()
    _stub_tuner(tk, monkeypatch)
    out = tmp_path / "sm_test.json"
    out.write_text(json.dumps(_good_table("default")))
    real_write_text = Path.write_text

    def interrupted_write(self, data, *a, **kw):
        if self.parent == tmp_path and data.startswith("{") and '"entries"' in data:
            real_write_text(self, data[: len(data) // 2], *a, **kw)
            raise KeyboardInterrupt
        return real_write_text(self, data, *a, **kw)

    monkeypatch.setattr(Path, "write_text", interrupted_write)
    args = tk.parse_args(["--layers", "48:40", "--tokens", "64", "--ranks", "8", "--dtypes", "float32",
                          "--out", str(out), "--kernels", "shrink"])
    with pytest.raises(KeyboardInterrupt):
        tk.tune(args, device=torch.device("cpu"))
    monkeypatch.undo()
    K.validate_table(json.loads(out.read_text()), str(out))  # a table, the old or the new, never half of one


def test_tuner_refuses_to_relabel_another_familys_table(monkeypatch, tmp_path):
    """benchmarks/tune_kernels.py:tune starts from the --out table and writes ``"family": <this GPU's family>`` into
    it: run on one GPU with --out naming another family's table (say an H200 with --out kernels/configs/sm80.json),
    it silently writes tiles measured on that GPU into the other family's table and relabels it (the dispatcher,
    kernels/mixed_lora.py:load_table, does not compare the field with the file either, so an A100 then runs H200
    tiles). Expected: the tuner refuses (SystemExit / ValueError naming both families) and leaves the file as it
    was. On CPU the tuner's family is "default", so an sm80 table stands for the other family here."""
    tk = _tuner()
    _stub_tuner(tk, monkeypatch)
    out = tmp_path / "sm80.json"
    before = json.dumps(_good_table("sm80"))
    out.write_text(before)
    args = tk.parse_args(["--layers", "48:40", "--tokens", "64", "--ranks", "8", "--dtypes", "float32",
                          "--out", str(out), "--kernels", "shrink"])
    try:
        tk.tune(args, device=torch.device("cpu"))
    except (SystemExit, ValueError):
        pass
    assert out.read_text() == before, f"the sm80 table was rewritten as family {json.loads(out.read_text())['family']!r}"
