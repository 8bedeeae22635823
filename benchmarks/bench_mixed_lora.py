"""Side-by-side benchmark of the mixed-LoRA linear layer: forward and forward+backward time and peak memory.

Implementations (rows named by ``impl``):
  linear           nn.Linear alone: the floor
  official_einsum  the official LoRWeB formulation (METHOD.md), same dtype
  peft_lora        peft's LoRA Linear with rank N*r (one adapter of the same capacity, no per-sample mixing)
  torch            lorweb_fast, torch backend
  torch_compile    the torch backend under torch.compile
  triton           lorweb_fast, Triton backend
  cuda             lorweb_fast, CUDA C++ backend
An implementation that cannot run here is recorded as skipped, with the reason. Before an implementation is timed
its output (and, on a reduced row count, every gradient) is checked against the float64 reference.

On a GPU it runs the FLUX.1-Kontext layer shapes; without one it runs a small CPU default (under a minute) whose
results are labelled CPU. Results go to benchmarks/results/: a JSON record, a markdown table and a PNG plot.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import lorweb_fast as lf
from lorweb_fast import ops
from lorweb_fast.testing import check_against_reference, check_forward, random_problem

IMPLS = ("linear", "official_einsum", "peft_lora", "torch", "torch_compile", "triton", "cuda")
MODES = ("fwd", "fwd_bwd")
GPU_LAYER_SHAPES = ((3072, 3072), (3072, 12288), (12288, 3072), (15360, 3072))
GPU_M = (2048, 8192, 16384, 24576)
GPU_RANK_SWEEP = (16, 64, 128, 256)  # N*r at 3072->3072, M=8192, with r=4
CPU_LAYER_SHAPES = ((256, 256), (256, 1024), (1024, 256))
CPU_M = (256, 1024)
CPU_RANK_SWEEP = (16, 64, 128)
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Extra cost of the mixture over a frozen linear layer at 3072x3072 with N*r = 128 (METHOD.md).
FLOP_FLOOR = {"fwd": 1 + 128 * 2 / 3072, "fwd_bwd": 1.125}


# ------------------------------------------------------------------------------------------------- configs
def build_configs(args, on_gpu: bool) -> list[dict]:
    shapes = GPU_LAYER_SHAPES if on_gpu else CPU_LAYER_SHAPES
    ms = args.m or (GPU_M if on_gpu else CPU_M)
    sweep = GPU_RANK_SWEEP if on_gpu else CPU_RANK_SWEEP
    if args.shapes:
        shapes = tuple(tuple(int(v) for v in s.split("x")) for s in args.shapes)
    configs = [dict(M=m, in_features=i, out_features=o, N=args.num_loras, r=args.rank) for (i, o) in shapes
               for m in ms]
    if not args.no_rank_sweep:
        i, o = shapes[0]
        m = ms[min(1, len(ms) - 1)]
        for total in sweep:
            if total != args.num_loras * args.rank:
                configs.append(dict(M=m, in_features=i, out_features=o, N=total // args.rank, r=args.rank))
    return configs


def samples_for(m: int) -> tuple[int, int]:
    """(batch, seq) with batch * seq == m: 2 samples with different coefficients when m is even."""
    return (2, m // 2) if m % 2 == 0 else (1, m)


# --------------------------------------------------------------------------------------------- implementations
class Impl:
    """fn(x, weight, bias, lora_a, lora_b, coeffs, scale) -> y, for one implementation."""

    def __init__(self, name: str, device: torch.device, dtype: torch.dtype):
        self.name, self.device, self.dtype = name, device, dtype
        self.skip_reason = None
        self._compiled = None
        self._peft_cache = {}
        if name in ("triton", "cuda"):
            self.skip_reason = ops._unavailable_reason(name, device)
        elif name == "peft_lora":
            try:
                import peft  # noqa: F401
            except ImportError as exc:
                self.skip_reason = f"peft is not installed ({exc})"
        elif name == "torch_compile" and device.type == "cpu" and not os.environ.get("LORWEB_BENCH_COMPILE_CPU"):
            self.skip_reason = ("skipped on CPU: inductor's C++ compile of every shape would exceed the one-minute "
                                "CPU budget (set LORWEB_BENCH_COMPILE_CPU=1 to include it)")

    def __call__(self, x, weight, bias, lora_a, lora_b, coeffs, scale, peft_layer=None):
        if self.name == "linear":
            return F.linear(x, weight, bias)
        if self.name == "official_einsum":
            return F.linear(x, weight, bias) + torch.einsum("bsi,nir,bn,nro->bso", x, lora_a, coeffs.to(x.dtype), lora_b) * scale
        if self.name == "peft_lora":
            return peft_layer(x)
        if self.name == "torch_compile":
            if self._compiled is None:
                self._compiled = torch.compile(lambda *a: lf.lorweb_linear(*a, backend="torch"), dynamic=False)
            return self._compiled(x, weight, bias, lora_a, lora_b, coeffs, scale)
        return lf.lorweb_linear(x, weight, bias, lora_a, lora_b, coeffs, scale, backend=self.name)


def make_peft_layer(problem: dict, sample: int = 0):
    """peft LoRA Linear of rank N*r holding the basis with sample ``sample``'s mixture folded into lora_B."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear

    weight, bias, a, b = problem["weight"], problem["bias"], problem["lora_a"], problem["lora_b"]
    n, k, r = a.shape
    base = torch.nn.Linear(k, weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        base.weight.copy_(weight)
        if bias is not None:
            base.bias.copy_(bias)
    base.requires_grad_(False)
    cfg = LoraConfig(r=n * r, lora_alpha=n * r, target_modules=["base"])
    layer = PeftLoraLinear(base, adapter_name="default", config=cfg, r=n * r, lora_alpha=n * r)
    layer.to(device=weight.device, dtype=weight.dtype)
    scaling = ops.column_scaling(problem["coeffs"][sample], r, problem["scale"])  # (R,)
    a_cat, b_cat = ops.concat_basis(a, b)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a_cat.T)
        layer.lora_B["default"].weight.copy_((b_cat.float() * scaling[:, None]).T.to(b.dtype))
    return layer


# --------------------------------------------------------------------------------------------------- checking
def check_impl(impl: Impl, problem: dict, mode: str) -> None:
    """Raise AssertionError unless ``impl`` matches the float64 reference (forward; gradients on <= 512 rows)."""
    if impl.name == "linear":
        return
    p = dict(problem)
    peft_layer = None
    if impl.name == "peft_lora":  # peft cannot mix per sample: check it with one mixture shared by all samples
        p["coeffs"] = p["coeffs"][:1].expand_as(p["coeffs"]).contiguous()
        peft_layer = make_peft_layer(p)
    with torch.no_grad():
        y = impl(p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"], p["coeffs"], p["scale"], peft_layer)
    check_forward(f"{impl.name} output", y, p)
    if mode == "fwd_bwd" and impl.name not in ("peft_lora",):
        batch, seq = p["x"].shape[:2]
        rows = max(1, min(seq, 512 // batch))
        small = {**p, "x": p["x"][:, :rows].contiguous()}
        check_against_reference(lambda *a: impl(*a), small)


# ---------------------------------------------------------------------------------------------------- timing
class Timer:
    """Median of per-call times after warm-up, with inputs rotated through a pool larger than the L2 cache."""

    def __init__(self, device: torch.device, warmup: int, reps: int, budget_s: float):
        self.device, self.warmup, self.reps, self.budget_s = device, warmup, reps, budget_s

    def run(self, fn, n_inputs: int) -> float:
        cuda = self.device.type == "cuda"
        for i in range(self.warmup):  # discarded
            fn(i % n_inputs)
        if cuda:
            torch.cuda.synchronize()
        times = []
        start_all = time.perf_counter()
        for i in range(self.reps):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(i % n_inputs)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn(i % n_inputs)
                times.append((time.perf_counter() - t0) * 1e3)
            if i >= 4 and time.perf_counter() - start_all > self.budget_s:
                break
        return statistics.median(times)


def l2_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2 ** 20))
    return 32 * 2 ** 20


def measure(impl: Impl, problem: dict, mode: str, timer: Timer) -> tuple[float, float | None]:
    """(median ms, peak memory MB above the inputs) for one implementation and mode."""
    device = problem["x"].device
    x0 = problem["x"]
    n_inputs = max(1, min(8, math.ceil(2 * l2_bytes(device) / (x0.numel() * x0.element_size()))))
    xs = [x0] + [torch.randn_like(x0) for _ in range(n_inputs - 1)]
    training = mode == "fwd_bwd"
    leaves = {}
    if training:
        xs = [x.requires_grad_(True) for x in xs]
        for name in ("lora_a", "lora_b", "coeffs"):
            leaves[name] = problem[name].detach().clone().requires_grad_(impl.name not in ("linear", "peft_lora"))
    args = {**problem, **leaves}
    peft_layer = make_peft_layer(problem) if impl.name == "peft_lora" else None
    if peft_layer is not None and training:
        for p in (peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight):
            p.requires_grad_(True)
    out_shape = (*x0.shape[:-1], problem["weight"].shape[0])
    dy = torch.randn(out_shape, device=device, dtype=x0.dtype)
    grads = [t for t in leaves.values() if t.requires_grad]

    def step(i):
        x = xs[i]
        if training:
            x.grad = None
            for t in grads:
                t.grad = None
            y = impl(x, args["weight"], args["bias"], args["lora_a"], args["lora_b"], args["coeffs"], args["scale"],
                     peft_layer)
            y.backward(dy)
        else:
            with torch.no_grad():
                impl(x, args["weight"], args["bias"], args["lora_a"], args["lora_b"], args["coeffs"], args["scale"],
                     peft_layer)

    ms = timer.run(step, n_inputs)
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step(0)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
    return ms, peak


# ---------------------------------------------------------------------------------------------------- records
def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def ratio_table(results: list[dict]) -> str:
    keyed = {}
    for r in results:
        keyed[(r["mode"], r["M"], r["in"], r["out"], r["N"], r["r"], r["impl"])] = r
    lines = ["| mode | M | in→out | N·r | impl | median ms | × linear | × official_einsum | peak MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.get("skipped"):
            continue
        key = (r["mode"], r["M"], r["in"], r["out"], r["N"], r["r"])
        lin, ein = keyed.get((*key, "linear")), keyed.get((*key, "official_einsum"))
        vs_lin = f"{r['median_ms'] / lin['median_ms']:.3f}" if lin and not lin.get("skipped") else "-"
        vs_ein = f"{r['median_ms'] / ein['median_ms']:.3f}" if ein and not ein.get("skipped") else "-"
        peak = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.1f}"
        lines.append(f"| {r['mode']} | {r['M']} | {r['in']}→{r['out']} | {r['N'] * r['r']} | {r['impl']} | "
                     f"{r['median_ms']:.4f} | {vs_lin} | {vs_ein} | {peak} |")
    return "\n".join(lines)


def write_markdown(path: Path, record: dict) -> None:
    skipped = {r["impl"]: r["skip_reason"] for r in record["results"] if r.get("skipped")}
    text = [f"# Mixed-LoRA layer benchmark ({record['label']})", "",
            f"- device: {record['device']}", f"- torch {record['torch']}, triton {record['triton']}, "
            f"CUDA {record['cuda']}", f"- date: {record['date']}", f"- commit: {record['commit']}",
            f"- dtype: {record['dtype']}; times are medians of CUDA-event (GPU) or wall-clock (CPU) per-call "
            "timings after warm-up, inputs rotated beyond L2", "",
            f"FLOP floors at 3072×3072, N·r = 128: forward {FLOP_FLOOR['fwd']:.3f}× linear, forward+backward "
            f"{FLOP_FLOOR['fwd_bwd']:.3f}× linear (METHOD.md).", ""]
    if record["label"] == "CPU":
        text += ["**CPU run: these numbers say nothing about GPU speed.**", ""]
    if skipped:
        text += ["Skipped implementations:", ""] + [f"- `{k}`: {v}" for k, v in skipped.items()] + [""]
    text.append(ratio_table(record["results"]))
    path.write_text("\n".join(text) + "\n")


def write_plot(path: Path, record: dict) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in record["results"] if not r.get("skipped")]
    base = {(r["mode"], r["M"], r["in"], r["out"], r["N"], r["r"]): r["median_ms"] for r in rows
            if r["impl"] == "linear"}
    nr = record["default_nr"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), squeeze=False)
    colors = dict(zip(IMPLS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    shapes = sorted({(r["in"], r["out"]) for r in rows})
    styles = dict(zip(shapes, ["-", "--", ":", "-."] * 4))
    for ax, mode in zip(axes[0], MODES):
        for impl in IMPLS:
            if impl == "linear":
                continue
            for shape in shapes:
                pts = sorted((r["M"], r["median_ms"] / base[(mode, r["M"], r["in"], r["out"], r["N"], r["r"])])
                             for r in rows if r["impl"] == impl and r["mode"] == mode and (r["in"], r["out"]) == shape
                             and r["N"] * r["r"] == nr and (mode, r["M"], *shape, r["N"], r["r"]) in base)
                if len(pts) >= 1:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colors[impl],
                            ls=styles[shape], label=f"{impl} {shape[0]}→{shape[1]}")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(FLOP_FLOOR[mode], color="gray", ls="--", lw=0.8, label="FLOP floor (3072², N·r=128)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("time / nn.Linear")
        ax.set_title(f"{mode} ({record['dtype']}, N·r={nr})")
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"{record['device']} — {record['date']} — {record['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="compute dtype (default bf16)")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS), help="implementations to run")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="fwd and/or fwd_bwd")
    p.add_argument("--m", nargs="+", type=int, default=None,
                   help=f"token counts M (default GPU {GPU_M}, CPU {CPU_M})")
    p.add_argument("--shapes", nargs="+", default=None,
                   help="layer shapes as INxOUT, e.g. 3072x3072 (default: METHOD.md shapes on GPU, small on CPU)")
    p.add_argument("--num-loras", type=int, default=32, help="N basis LoRAs (default 32)")
    p.add_argument("--rank", type=int, default=4, help="rank r of each LoRA (default 4)")
    p.add_argument("--no-rank-sweep", action="store_true", help="skip the N*r sweep")
    p.add_argument("--warmup", type=int, default=None, help="discarded warm-up calls (default GPU 10, CPU 2)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per row (default GPU 50, CPU 7)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop timing a row after this many seconds (min 5 calls; default GPU 5, CPU 0.5)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where to write results")
    p.add_argument("--tag", default=None, help="file name stem (default: device_date_commit)")
    p.add_argument("--no-check", action="store_true", help="skip the correctness check against the reference")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from tqdm import tqdm

    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype]
    timer = Timer(device, args.warmup if args.warmup is not None else (10 if on_gpu else 2),
                  args.reps if args.reps is not None else (50 if on_gpu else 7),
                  args.budget_s if args.budget_s is not None else (5.0 if on_gpu else 0.5))
    impls = [Impl(name, device, dtype) for name in args.impls]
    configs = build_configs(args, on_gpu)
    results = []
    bar = tqdm(total=len(configs) * len(impls) * len(args.modes), desc="bench_mixed_lora", unit="row",
               disable=None)
    for cfg in configs:
        batch, seq = samples_for(cfg["M"])
        problem = random_problem(batch, seq, cfg["in_features"], cfg["out_features"], cfg["N"], cfg["r"], dtype,
                                 device=device, seed=cfg["M"] + cfg["N"])
        for mode in args.modes:
            for impl in impls:
                row = dict(impl=impl.name, mode=mode, M=cfg["M"], **{"in": cfg["in_features"]},
                           out=cfg["out_features"], N=cfg["N"], r=cfg["r"], dtype=args.dtype, median_ms=None,
                           peak_mem_mb=None)
                bar.set_postfix_str(f"{impl.name} {mode} M={cfg['M']} {cfg['in_features']}→{cfg['out_features']}")
                if impl.skip_reason:
                    row.update(skipped=True, skip_reason=impl.skip_reason)
                else:
                    if not args.no_check:
                        check_impl(impl, problem, mode)
                    row["median_ms"], row["peak_mem_mb"] = measure(impl, problem, mode, timer)
                results.append(row)
                bar.update(1)
        del problem
        if on_gpu:
            torch.cuda.empty_cache()
    bar.close()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit = git_commit()
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    record = dict(label="GPU" if on_gpu else "CPU", device=device_name(device), torch=torch.__version__,
                  triton=triton_version, cuda=torch.version.cuda, commit=commit, date=date, dtype=args.dtype,
                  default_nr=args.num_loras * args.rank, checked_against_reference=not args.no_check,
                  backend_status=lf.backend_status(), results=results)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    slug = "cpu" if not on_gpu else "".join(c if c.isalnum() else "-" for c in device_name(device)).strip("-")
    stem = args.tag or f"mixed_lora_{slug.lower()}_{date[:10]}_{commit}"
    (args.out_dir / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    write_markdown(args.out_dir / f"{stem}.md", record)
    plotted = write_plot(args.out_dir / f"{stem}.png", record)
    print(ratio_table(results))
    print(f"\nwrote {args.out_dir / stem}.json, .md" + (", .png" if plotted else ""), file=sys.stderr)
    return record


if __name__ == "__main__":
    main()
