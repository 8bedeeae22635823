"""Host (CPU) time per call of each implementation: what an eager, launch-bound model pays besides the kernels.

    python benchmarks/host_overhead.py [--out benchmarks/results/host_overhead] [--calls 40] [--profile]

On a GPU only. For every implementation of bench_mixed_lora (linear, torch, triton, cuda, shrink, expand) and
both modes (forward; forward+backward), the calls are enqueued while a ``torch.cuda._sleep`` holds the GPU, so no
call waits for the device: the median wall time of one call is its host cost. Shape: the target layer (3072->3072,
N=32, r=4, bf16) at M=1024 (launch-bound in practice; host cost does not depend on M). Writes OUT.json and OUT.md;
with --profile also OUT_profile.txt (cProfile of the triton, shrink and expand calls, by own time).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mixed_lora import (RESULTS_DIR, Impl, Timer, device_name, git_commit,  # noqa: E402
                              installed_triton_version, make_problem, make_step, positive_int)

IMPLS = ("linear", "torch", "triton", "cuda", "shrink", "expand")
FORWARD_ONLY = ("shrink", "expand")


def busy_gpu_for(step, n_inputs: int, calls: int) -> None:
    """Enqueue a GPU sleep longer than ``calls`` steps take to enqueue (sized from three warm-up calls, capped at 2 s),
    so that none of them waits for the device."""
    warm = []
    for i in range(3):
        t0 = time.perf_counter()
        step(i % n_inputs)
        warm.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    torch.cuda._sleep(int(Timer.cycles_per_ms() * min(2000.0, 50.0 + 3.0 * max(warm) * calls)))


def host_ms(step, n_inputs: int, calls: int) -> float:
    """Median host milliseconds of one ``step`` while the GPU is held busy by a sleep (no call blocks on it)."""
    busy_gpu_for(step, n_inputs, calls)
    times = []
    for i in range(calls):
        t0 = time.perf_counter()
        step(i % n_inputs)
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(RESULTS_DIR / "host_overhead"),
                    help="output path without extension: OUT.json, OUT.md (default benchmarks/results/host_overhead)")
    ap.add_argument("--calls", type=positive_int, default=40, help="calls timed per implementation (default 40)")
    ap.add_argument("--tokens", type=positive_int, default=1024, help="rows M of the input (default 1024)")
    ap.add_argument("--profile", action="store_true",
                    help="also write OUT_profile.txt: cProfile of the triton, shrink and expand calls")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("host_overhead.py needs a CUDA GPU (host cost is measured against a busy device)", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    cfg = dict(M=args.tokens, in_features=3072, out_features=3072, N=32, r=4)
    problem = make_problem(cfg, torch.bfloat16, device)
    rows, profiles = [], []
    for name in IMPLS:
        impl = Impl(name, device, torch.bfloat16)
        for mode in ("fwd", "fwd_bwd"):
            if impl.skip_reason or (mode == "fwd_bwd" and name in FORWARD_ONLY):
                continue
            step, n_inputs = make_step(impl, problem, mode)
            ms = host_ms(step, n_inputs, args.calls)
            rows.append({"impl": name, "mode": mode, "host_ms": round(ms, 4)})
            print(f"{name:8s} {mode:8s} host {ms * 1e3:8.1f} us/call", flush=True)
            if args.profile and name in ("triton", "shrink", "expand"):
                prof = cProfile.Profile()
                busy_gpu_for(step, n_inputs, args.calls)
                prof.enable()
                for i in range(args.calls):
                    step(i % n_inputs)
                prof.disable()
                torch.cuda.synchronize()
                buf = io.StringIO()
                pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
                profiles.append(f"== {name} ({mode}), {args.calls} calls\n{buf.getvalue()}")
    rows += op_path_rows(problem, args.calls)
    rows += breakdown(problem, args.calls)
    linear = {r["mode"]: r["host_ms"] for r in rows if r["impl"] == "linear"}
    record = {"device": device_name(device), "torch": torch.__version__,
              "triton": installed_triton_version() or "-",
              "commit": git_commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "shape": cfg, "dtype": "bf16", "calls": args.calls, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [f"# Host time per call ({record['device']}, torch {record['torch']}, triton {record['triton']}, "
             f"commit {record['commit']}, {record['date']})", "",
             f"M={cfg['M']}, {cfg['in_features']}->{cfg['out_features']}, N={cfg['N']}, r={cfg['r']}, bf16; median of "
             f"{args.calls} calls enqueued behind a GPU sleep (no call waits for the device).", "",
             "| impl | mode | host us/call | x linear |", "|---|---|---|---|"]
    for r in rows:
        ref = linear.get(r["mode"])
        lines.append(f"| {r['impl']} | {r['mode']} | {r['host_ms'] * 1e3:.1f} | "
                     f"{r['host_ms'] / ref:.1f} |" if ref else f"| {r['impl']} | {r['mode']} | "
                     f"{r['host_ms'] * 1e3:.1f} | - |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if profiles:
        Path(str(out) + "_profile.txt").write_text("\n".join(profiles))
    print(f"wrote {out}.json, .md" + (", _profile.txt" if profiles else ""))
    return 0


def op_path_rows(problem: dict, calls: int) -> list[dict]:
    """The fused backends through torch.library's dispatch of their registered ops (``ops.EAGER_DIRECT = False``,
    as every eager call ran before the direct path), side by side with the default rows above in the same run."""
    from lorweb_fast import ops

    out = []
    device = problem["x"].device
    for name in ("triton", "cuda"):
        impl = Impl(name, device, torch.bfloat16)
        if impl.skip_reason:
            continue
        ops.EAGER_DIRECT = False
        try:
            for mode in ("fwd", "fwd_bwd"):
                step, n_inputs = make_step(impl, problem, mode)
                ms = host_ms(step, n_inputs, calls)
                out.append({"impl": f"{name} (registered op path)", "mode": mode, "host_ms": round(ms, 4)})
                print(f"{name} (registered op path) {mode:8s} host {ms * 1e3:8.1f} us/call", flush=True)
        finally:
            ops.EAGER_DIRECT = True
    return out


def breakdown(problem: dict, calls: int) -> list[dict]:
    """Where the triton forward's host time goes: the launchers without the registered op
    (``mixed_lora.forward``: basis packing, shrink, expand), the op called directly (``ops.lorweb_linear``, without
    the benchmark's Impl wrapper) with Python's garbage collector on and off (the first record put "triton (gc off)"
    at 223 us against 478 us for the triton row, which also differs by the wrapper; these two rows separate the
    two), and the forward's recorded kernel launches replayed as bare ``kernel[grid](...)`` calls (Triton's own JIT
    dispatch, with none of lorweb_fast's Python around it)."""
    import gc

    from lorweb_fast import ops
    from lorweb_fast.aot import _record_launches

    if ops._unavailable_reason("triton", problem["x"].device) is not None:
        return []
    from lorweb_fast.kernels import mixed_lora as K

    x = problem["x"]
    x2d, rows_per_sample = x.reshape(-1, x.shape[-1]), x.shape[1]
    args = (problem["weight"], problem["bias"], None, problem["lora_a"], problem["lora_b"],
            problem["coeffs"].float(), float(problem["scale"]), rows_per_sample)

    def launchers(i):
        with torch.no_grad():
            K.forward(x2d, *args)

    def op_direct(i):
        with torch.no_grad():
            ops.lorweb_linear(x, problem["weight"], problem["bias"], problem["lora_a"], problem["lora_b"],
                              problem["coeffs"], problem["scale"], backend="triton")

    # the forward's kernel launches, replayed below without any lorweb_fast Python around them
    recorded = _record_launches(K.forward, x2d, *args)

    def jit_launches_only(i):
        for launch in recorded:
            launch.kernel[launch.grid](*launch.args, **launch.kwargs)

    out = []
    for name, fn, gc_off in (("mixed_lora.forward", launchers, False),
                             ("triton op, called directly", op_direct, False), ("triton (gc off)", op_direct, True),
                             (f"triton JIT launches alone ({len(recorded)})", jit_launches_only, False)):
        if gc_off:
            gc.disable()
        try:
            ms = host_ms(fn, 1, calls)
        finally:
            gc.enable()
        out.append({"impl": name, "mode": "fwd", "host_ms": round(ms, 4)})
        print(f"{name:20s} fwd host {ms * 1e3:8.1f} us/call", flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
