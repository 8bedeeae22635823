"""Sweep the Triton kernels' tile configurations on a GPU and write the winners to the committed table.

    python benchmarks/tune_kernels.py                   # on a GPU: writes kernels/configs/sm<cc>.json
    python benchmarks/tune_kernels.py --dry-run         # anywhere: lists the sweep, measures nothing

For each METHOD.md layer shape (in, out), each R and dtype, every candidate configuration of ``shrink``, ``expand``
(fused with the base GEMM) and ``grad_basis`` is timed in device time (the benchmark's Timer: median, no host
overhead, inputs rotated) at a representative token count (--tokens; the choice is recorded by (in, out, R, dtype)
only, never by M), and the forward of the fused route is compared with the composed route (shrink + two cuBLAS
addmm) to set ``route``. The sweep stops at
--budget-s (the best configuration found so far is kept; unswept shapes keep the table's defaults). The table's
``defaults`` are kept; ``entries`` are replaced by the measured winners and ``tuned`` becomes true. The launchers
read the table at run time; nothing is autotuned at run time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_mixed_lora (its Timer) sits beside this file

LAYERS = ((3072, 3072), (3072, 12288), (12288, 3072), (15360, 3072), (3072, 18432), (3072, 9216))
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
LORA_RANK = 4
POOL = 3  # inputs x rotated per call: 3 x (8192 x 3072 bf16) = 150 MB, more than an H100/H200 L2

SHRINK = [dict(block_m=bm, block_k=bk, split_k=sk, tma=t, num_warps=w, num_stages=s)
          for bm, bk, sk, t, w, s in itertools.product((64, 128), (64, 128), (1, 2), (0, 1), (8,), (3, 4))]
EXPAND = [dict(block_m=bm, block_n=bn, block_k=bk, group_m=8, tma=t, num_warps=w, num_stages=s)
          for (bm, bn, bk), t, w, s in itertools.product(
              ((128, 128, 64), (128, 256, 64), (64, 256, 64), (128, 128, 128)), (0, 1), (4, 8), (3, 4))]
GRAD_BASIS = [dict(block_m=bm, block_n=bn, split_m=sm, num_warps=w, num_stages=3)
              for bm, bn, sm, w in itertools.product((32, 64), (64, 128), (4, 8, 16), (8,))]
CANDIDATES = {"shrink": SHRINK, "expand": EXPAND, "grad_basis": GRAD_BASIS}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-s", type=float, default=420.0, help="stop sweeping after this many seconds (default "
                   "420, so that the sweep with its compilations ends within 8 minutes)")
    p.add_argument("--ranks", type=int, nargs="+", default=[128], help="R values to tune (default: 128 = N 32 x r 4)")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=sorted(DTYPES))
    p.add_argument("--tokens", type=int, default=8192, help="rows M used for timing (not part of the table key)")
    p.add_argument("--layers", nargs="+", default=None, help="in:out pairs (default: the METHOD.md layers)")
    p.add_argument("--out", default=None, help="table to write (default: kernels/configs/<family>.json in this "
                   "source tree)")
    p.add_argument("--dry-run", action="store_true", help="list the sweep and exit (no GPU needed)")
    return p.parse_args(argv)


def layers_from(args):
    if not args.layers:
        return LAYERS
    out = []
    for item in args.layers:
        try:
            a, b = item.split(":")
            out.append((int(a), int(b)))
        except ValueError:
            raise SystemExit(f"--layers entries must look like 3072:3072, got {item!r}") from None
    return tuple(out)


def sweep_plan(args) -> list[dict]:
    """One item per (layer, R, dtype): the candidates of each kernel."""
    plan = []
    for (k, n), R, dtype in itertools.product(layers_from(args), args.ranks, args.dtypes):
        if R % LORA_RANK:
            raise SystemExit(f"--ranks must be multiples of r = {LORA_RANK}, got {R}")
        plan.append(dict(layer=(k, n), R=R, dtype=dtype, counts={name: len(c) for name, c in CANDIDATES.items()}))
    return plan


def print_plan(plan, args) -> None:
    total = sum(sum(item["counts"].values()) for item in plan)
    print(f"tune_kernels: {len(plan)} shapes x (shrink {len(SHRINK)}, expand {len(EXPAND)}, grad_basis "
          f"{len(GRAD_BASIS)}) candidates = {total} timings + {len(plan)} route comparisons; "
          f"M = {args.tokens} for timing only; budget {args.budget_s:.0f} s")
    for item in plan:
        k, n = item["layer"]
        print(f"  in={k:<6} out={n:<6} R={item['R']:<4} {item['dtype']:<9} "
              + ", ".join(f"{name}: {c}" for name, c in item["counts"].items()))


def _bench(fn, n_inputs: int = 1) -> float:
    """Median device milliseconds of ``fn(i)`` (i rotates over the input pool) without host overhead: the
    benchmark's Timer (calls enqueued behind a GPU sleep, CUDA events between them). Wall-clock timing such as
    ``do_bench`` measured the launchers' host cost instead of the kernels on the H200 (a 25 us shrink timed 0.3 ms)."""
    from bench_mixed_lora import Timer

    return float(Timer(torch.device("cuda"), warmup=3, reps=15, budget_s=2.0).run(fn, n_inputs))


def tune(args) -> int:
    from lorweb_fast.kernels import mixed_lora as K

    device = torch.device("cuda")
    family = K.gpu_family(device)
    if family == "default":
        major, minor = torch.cuda.get_device_capability(device)
        family = f"sm{major}{minor}"
    out_path = Path(args.out) if args.out else Path(__file__).resolve().parents[1] / "kernels" / "configs" / (
        f"{family}.json")
    base_table = json.loads((out_path if out_path.exists() else K.config_path("default")).read_text())
    plan = sweep_plan(args)
    print_plan(plan, args)
    start = time.monotonic()
    entries = []
    done = 0
    total = sum(sum(item["counts"].values()) for item in plan)
    for item in plan:
        (k, n), R, dtype = item["layer"], item["R"], DTYPES[item["dtype"]]
        if time.monotonic() - start > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s reached: in={k} out={n} R={R} keeps the defaults")
            continue
        g = torch.Generator(device="cpu").manual_seed(0)
        M, rps = args.tokens, args.tokens // 2
        xs = [torch.randn(M, k, generator=g).to(device, dtype) for _ in range(POOL)]  # rotated: more than the L2
        x = xs[0]
        w = (torch.randn(n, k, generator=g) * k ** -0.5).to(device, dtype)
        bias = torch.randn(n, generator=g).to(device, dtype)
        a_cat = (torch.randn(R, k, generator=g) * k ** -0.5).to(device, dtype)
        b_cat = torch.randn(R, n, generator=g).to(device, dtype)
        coeffs = torch.softmax(torch.randn(2, R // LORA_RANK, generator=g), -1).to(device)
        u, z = K.shrink(x, a_cat, coeffs, 0.5, rps, LORA_RANK, out_features=n)
        dy = torch.randn(M, n, generator=g).to(device, dtype)
        calls = {
            "shrink": lambda c, i: K.shrink(xs[i], a_cat, coeffs, 0.5, rps, LORA_RANK, config=c, out_features=n),
            "expand": lambda c, i: K.expand(xs[i], w, z, b_cat, bias=bias, config=c),
            "grad_basis": lambda c, i: K.grad_basis(z, xs[i], z, dy, LORA_RANK, config=c),
        }
        rule = dict(K.lookup(k, n, R, dtype, family))
        best = {}
        for name, cands in CANDIDATES.items():
            best_ms = float("inf")
            for cand in cands:
                done += 1
                if time.monotonic() - start > args.budget_s:
                    break
                try:
                    ms = _bench(lambda i: calls[name](cand, i), POOL)
                except Exception as exc:  # out of shared memory / registers for this tile: skip it
                    print(f"  [{done}/{total}] {name} {cand}: skipped ({type(exc).__name__})")
                    continue
                if ms < best_ms:
                    best_ms, best[name] = ms, cand
                print(f"  [{done}/{total}] in={k} out={n} R={R} {item['dtype']} {name} {cand}: {ms:.4f} ms")
            if name in best:
                rule[name] = best[name]
        def fused(i):
            zz = K.shrink(xs[i], a_cat, coeffs, 0.5, rps, LORA_RANK, config=rule["shrink"])[1]
            K.expand(xs[i], w, zz, b_cat, bias=bias, config=rule["expand"])

        def composed(i):
            zz = K.shrink(xs[i], a_cat, coeffs, 0.5, rps, LORA_RANK, config=rule["shrink"])[1]
            torch.addmm(bias, zz, b_cat).addmm_(xs[i], w.t())

        rule["route"] = "fused" if _bench(fused, POOL) <= _bench(composed, POOL) else "composed"
        entries.append({"in": k, "out": n, "R": R, "dtype": item["dtype"], "route": rule["route"],
                        **{name: rule[name] for name in CANDIDATES}})
        print(f"in={k} out={n} R={R} {item['dtype']}: route {rule['route']}")
    table = {"family": family, "tuned": True,
             "note": (f"Measured by benchmarks/tune_kernels.py on {torch.cuda.get_device_name(device)} "
                      f"(torch {torch.__version__}, M = {args.tokens} for timing; keys never depend on M). "
                      "Shapes not listed use the untuned defaults."),
             "defaults": base_table["defaults"], "entries": entries}
    K.validate_table(table, str(out_path))
    out_path.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {len(entries)} tuned entries to {out_path} in {time.monotonic() - start:.0f} s")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        print_plan(sweep_plan(args), args)
        return 0
    if not torch.cuda.is_available():
        print("tune_kernels.py needs a CUDA GPU (it times kernels); none is visible to torch. "
              "Use --dry-run to list the sweep.", file=sys.stderr)
        return 2
    return tune(args)


if __name__ == "__main__":
    sys.exit(main())
