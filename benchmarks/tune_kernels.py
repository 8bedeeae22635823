"""Sweep the Triton kernels' tile configurations on a GPU and write the winners to the committed table.

    python benchmarks/tune_kernels.py                   # on a GPU: writes kernels/configs/sm<cc>.json
    python benchmarks/tune_kernels.py --dry-run         # anywhere: lists the sweep, measures nothing
    python benchmarks/tune_kernels.py --kernels shrink_dy expand_dx --layers 15360:3072   # the backward only

For each token-wise METHOD.md layer shape (in, out), each R and dtype, every candidate configuration of each launch
role is timed in device time (the benchmark's Timer: median, no host overhead; x and dy rotated through a pool of
copies whose total exceeds twice the L2, at least 3 copies) at a representative token count (--tokens; the choice is
recorded by (in, out, R, dtype) only, never by M), each role in the mode it runs in: ``shrink`` (x a_cat^T) and
``expand`` (fused with the base GEMM, weight (out, in)) as in the forward; ``shrink_dy`` (dy b_cat^T with the
dcoeffs partials) and ``expand_dx`` (dy W + dZ a_cat, weight read as stored) as in the backward; ``grad_basis``.
When the forward roles are swept, the forward of the fused route is compared with the composed route (shrink + two
cuBLAS addmm) to set ``route``; ``expand_dx`` and ``grad_basis`` are not swept for a composed layer (its backward
runs them on cuBLAS). The table's current tiles of each role are timed in the same run; when the fastest candidate
beats them by more than --min-gain, the two are timed again alternately (--confirm-rounds rounds each, every timing
a median) and the candidate replaces the table's tiles only when the median of its rounds is below the table's by
more than --min-gain (a single timing's noise, about 1 % on the H200, no longer adopts a tie; the rounds are in the
summary's ``confirm``). Before it is timed, every configuration (the table's included) runs once with freshly loaded
kernels and is refused when a result differs from the float64 reference beyond the statistical bound of
lorweb_fast.testing, or (on a GPU) when a kernel it loaded spills registers: the tuner never writes a wrong or
spilling tile; the refusals are printed and recorded in the summary (``table_refused``, ``refused``), and a shape
whose refused table tiles no candidate replaces, or none of whose roles was timed within the budget, is not written
(the table keeps what it had there). The sweep stops at --budget-s (the best configuration found so far is kept,
after its confirmation rounds; unswept roles and shapes keep what the table had). The table's ``defaults`` are kept;
the swept shapes' entries are replaced, the others kept, and ``tuned`` becomes true; the table and the per-role
times (``<table>_summary.json`` beside an --out table, else ``benchmarks/results/tune_<family>_summary.json``) are
rewritten after every shape; both name the commit (LORWEB_COMMIT, else git HEAD), the Triton version and the date.
The launchers read the table at run time; nothing is autotuned at run time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_mixed_lora (Timer), kernel_resources
import bench_mixed_lora  # noqa: E402

#: the launchers' largest R and its fallback without Triton (--dry-run), shared with the layer benchmark
FALLBACK_MAX_FUSED_R, max_fused_r = bench_mixed_lora.FALLBACK_MAX_FUSED_R, bench_mixed_lora.max_fused_r

#: The token-wise METHOD.md layers. The norm modulations (3072 -> 9216 / 18432) see one row per sample, so they always
#: take the cuBLAS route (``choose_route``) and are swept only when named with --layers.
LAYERS = ((3072, 3072), (3072, 12288), (12288, 3072), (15360, 3072))
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
LORA_RANK = 4  # a power of two, as the Triton launchers need (lorweb_fast.kernels.mixed_lora.shrink)
#: Fewest copies of x and dy rotated through the timed calls; more where one copy is small (see ``pool_size``).
MIN_POOL = 3

SHRINK = [dict(block_m=bm, block_k=bk, split_k=sk, tma=t, num_warps=w, num_stages=s)
          for bm, bk, sk, t, w, s in itertools.product((64, 128), (64, 128), (1, 2), (0, 1), (8,), (3, 4))]
EXPAND = [dict(block_m=bm, block_n=bn, block_k=bk, group_m=8, tma=t, num_warps=w, num_stages=s)
          for (bm, bn, bk), t, w, s in itertools.product(
              ((128, 128, 64), (128, 256, 64), (64, 256, 64), (128, 128, 128)), (0, 1), (4, 8), (3, 4))]
GRAD_BASIS = [dict(block_m=bm, block_n=bn, split_m=sm, num_warps=w, num_stages=3)
              for bm, bn, sm, w in itertools.product((32, 64), (64, 128), (4, 8, 16), (8,))]
#: Candidates per launch role (the table's KERNEL_CONFIG_KEYS), in sweep order: the forward roles first, since the
#: route they decide says whether expand_dx runs at all.
CANDIDATES = {"shrink": SHRINK, "expand": EXPAND, "shrink_dy": SHRINK, "expand_dx": EXPAND, "grad_basis": GRAD_BASIS}
FORWARD_ROLES = ("shrink", "expand")
#: Roles a layer launches only on the fused route (a composed layer's backward K2 and K3 run on cuBLAS).
FUSED_ONLY_ROLES = ("expand_dx", "grad_basis")


def rank_type(text: str) -> int:
    """argparse type of --ranks: an R the fused launchers serve, N LoRAs of rank r = LORA_RANK, 1 <= N, R <= MAX_FUSED_R
    (shrink and expand raise for a larger R, and every candidate would be timed on a shape that never runs)."""
    value = bench_mixed_lora.positive_int(text)
    limit = max_fused_r()
    if value % LORA_RANK or value > limit:
        raise argparse.ArgumentTypeError(f"expected a multiple of r = {LORA_RANK} up to MAX_FUSED_R = {limit} (larger "
                                         f"R take the cuBLAS route), got {text}")
    return value


def parse_args(argv=None):
    b = bench_mixed_lora
    even_tokens, positive_int, seconds = b.even_rows, b.positive_int, b.seconds
    fraction = b.number_type(float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-s", type=seconds, default=420.0, help="stop sweeping after this many seconds (default "
                   "420, so that the sweep with its compilations ends within 8 minutes)")
    p.add_argument("--ranks", type=rank_type, nargs="+", default=[128],
                   help=f"R values to tune, multiples of r = {LORA_RANK} up to the launchers' MAX_FUSED_R (default: "
                   "128 = N 32 x r 4)")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=sorted(DTYPES),
                   help="dtypes to tune (default: bfloat16)")
    p.add_argument("--tokens", type=even_tokens, default=8192,
                   help="rows M used for timing, two samples of M/2 (not part of the table key)")
    p.add_argument("--layers", nargs="+", default=None, help="in:out pairs (default: the token-wise METHOD.md "
                   "layers, in this order)")
    p.add_argument("--kernels", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES),
                   help="launch roles to sweep (default: all); the others keep the table's values")
    p.add_argument("--out", default=None, help="table to write (default: kernels/configs/<family>.json in this "
                   "source tree)")
    p.add_argument("--min-gain", type=fraction, default=0.01, help="a candidate replaces the table's tiles only when "
                   "the median of its --confirm-rounds timings is below the table's by more than this fraction "
                   "(default 0.01)")
    p.add_argument("--confirm-rounds", type=positive_int, default=5, help="timings each of the fastest candidate and "
                   "the table's tiles, alternated, before a candidate is adopted (default 5)")
    p.add_argument("--dry-run", action="store_true", help="list the sweep and exit (no GPU needed)")
    return p.parse_args(argv)


def layers_from(args):
    if not args.layers:
        return LAYERS
    out = []
    for item in args.layers:
        try:
            a, b = item.split(":")
            k, n = int(a), int(b)
        except ValueError:
            raise SystemExit(f"--layers entries must look like 3072:3072, got {item!r}") from None
        if k <= 0 or n <= 0:
            raise SystemExit(f"--layers entries need in and out > 0, got {item!r}")
        out.append((k, n))
    return tuple(out)


def sweep_plan(args) -> list[dict]:
    """One item per distinct (layer, R, dtype), in the order given: the candidate counts of each role swept."""
    plan, seen = [], set()
    for (k, n), R, dtype in itertools.product(layers_from(args), args.ranks, args.dtypes):
        if (k, n, R, dtype) in seen:
            continue
        seen.add((k, n, R, dtype))
        plan.append(dict(layer=(k, n), R=R, dtype=dtype,
                         counts={name: len(c) for name, c in CANDIDATES.items() if name in args.kernels}))
    return plan


def merge_entries(old: list[dict], new: list[dict]) -> list[dict]:
    """The table's entries after a sweep: each new entry replaces the old one of its (in, out, R, dtype) in place,
    new keys are appended (a key given twice in ``new``: the last one), and entries the sweep did not touch are
    kept."""
    def key(e):
        return e["in"], e["out"], e["R"], e["dtype"]

    fresh = {key(e): e for e in new}
    merged = [fresh.pop(key(e), e) for e in old]
    return merged + list(fresh.values())


def print_plan(plan, args) -> None:
    total = sum(sum(item["counts"].values()) for item in plan)
    roles = ", ".join(f"{name} {len(CANDIDATES[name])}" for name in CANDIDATES if name in args.kernels)
    routes = len(plan) if any(name in args.kernels for name in FORWARD_ROLES) else 0
    print(f"tune_kernels: {len(plan)} shapes x ({roles}) candidates = at most {total} timings + {routes} route "
          f"comparisons; M = {args.tokens} for timing only; budget {args.budget_s:.0f} s")
    for item in plan:
        k, n = item["layer"]
        print(f"  in={k:<6} out={n:<6} R={item['R']:<4} {item['dtype']:<9} "
              + ", ".join(f"{name}: {c}" for name, c in item["counts"].items()))


def cache_bytes(device: torch.device) -> int:
    """The L2 the rotated inputs must exceed twice: the GPU's (the benchmark's l2_bytes); 0 off a GPU (the tests'
    CPU path, which times nothing real)."""
    if device.type != "cuda":
        return 0
    from bench_mixed_lora import l2_bytes

    return l2_bytes(device)


def pool_size(x_bytes: int, dy_bytes: int, l2: int) -> int:
    """Copies of x and of dy rotated through the timed calls: at least MIN_POOL, and enough that the copies of each
    exceed twice the L2 (a call never reads an input that the calls before it left in the cache), whatever --tokens
    is."""
    return max(MIN_POOL, 2 * l2 // max(1, min(x_bytes, dy_bytes)) + 1)


def confirm_gain(table_fn, best_fn, rounds: int, n_inputs: int) -> dict:
    """Time the table's tiles and the fastest candidate again, alternately (table first in even rounds, candidate
    first in odd ones, so a drift favours neither), ``rounds`` timings each, every timing itself a median; the
    adoption compares the medians of the rounds, not one timing of each."""
    table_ms, best_ms = [], []
    for r in range(rounds):
        pair = [(table_ms, table_fn), (best_ms, best_fn)]
        for times, fn in (pair if r % 2 == 0 else pair[::-1]):
            times.append(_bench(fn, n_inputs))
    return dict(rounds=rounds, table_ms=table_ms, best_ms=best_ms, table_median_ms=statistics.median(table_ms),
                best_median_ms=statistics.median(best_ms))


def _bench(fn, n_inputs: int = 1) -> float:
    """Median device milliseconds of ``fn(i)`` (i rotates over the input pool) without host overhead: the
    benchmark's Timer (calls enqueued behind a GPU sleep, CUDA events between them). Wall-clock timing such as
    ``do_bench`` measured the launchers' host cost instead of the kernels on the H200 (a 25 us shrink timed 0.3 ms)."""
    from bench_mixed_lora import Timer

    # at least one call per input of the pool: the Timer rotates over the first ``reps`` inputs only, and a pool
    # sized beyond twice the L2 (small --tokens) would otherwise be read partly, from L2
    return float(Timer(torch.device("cuda"), warmup=3, reps=max(15, n_inputs), budget_s=2.0).run(fn, n_inputs))


def role_references(name: str, x, dy, w, bias, a_cat, b_cat, coeffs, scale: float, rps: int, rank: int, u, z,
                    dz) -> list[tuple]:
    """The float64 results of launch role ``name`` on the tuner's inputs, as ``(label, ref, rss, depth, dtype)``
    tuples in the order ``role_outputs`` lists a call's outputs (``rss``: each entry's root-sum-of-squares of terms,
    ``depth``: its sum length, ``dtype``: the dtype its tolerance is derived from; see lorweb_fast.testing). The
    low-precision inputs, u, z and dz included, are upcast exactly, so a correct kernel differs only by roundings.

    Shapes: x (M, in), dy (M, out), w (out, in), bias (out,), a_cat (R, in), b_cat (R, out), coeffs (B, N) with
    M = B * rps and R = N * rank; u, z (M, R) the forward shrink's outputs; dz (M, R) backward K1's scaled output."""
    f64 = [t.double() for t in (x, dy, w, bias, a_cat, b_cat, u, z, dz)]
    X, DY, W, BIAS, A, B, U, Z, DZ = f64
    X2, DY2, W2, A2, B2 = (t * t for t in (X, DY, W, A, B))
    M, R = U.shape
    rows = torch.arange(M, device=X.device) // rps
    cols = torch.arange(R, device=X.device) // rank
    S = scale * coeffs.double()[rows][:, cols]  # (M, R) the scaling of each low-rank column
    dtype, n_in, n_out = x.dtype, x.shape[1], dy.shape[1]
    if name == "shrink":
        rss_u = (X2 @ A2.t()).sqrt()
        return [("u", X @ A.t(), rss_u, n_in, dtype), ("z", X @ A.t() * S, rss_u * S.abs(), n_in, dtype)]
    if name == "expand":
        return [("y", X @ W.t() + Z @ B + BIAS, (X2 @ W2.t() + Z * Z @ B2 + BIAS * BIAS).sqrt(), n_in + R, dtype)]
    if name == "shrink_dy":
        t, rss_t = DY @ B.t(), (DY2 @ B2.t()).sqrt()
        batch, n_loras = coeffs.shape
        dc = scale * (U * t).view(batch, rps, n_loras, rank).sum((1, 3))
        rss_dc = scale * (U * U * rss_t * rss_t).view(batch, rps, n_loras, rank).sum((1, 3)).sqrt()
        return [("dz", t * S, rss_t * S.abs(), n_out, dtype),
                ("dcoeffs", dc, rss_dc, n_out * rps * rank, torch.float32)]
    if name == "expand_dx":
        return [("dx", DY @ W + DZ @ A, (DY2 @ W2 + DZ * DZ @ A2).sqrt(), n_out + R, dtype)]
    if name == "grad_basis":
        n_loras = R // rank
        da = (DZ.t() @ X).view(n_loras, rank, n_in).transpose(1, 2)
        rss_da = ((DZ * DZ).t() @ X2).sqrt().view(n_loras, rank, n_in).transpose(1, 2)
        db = (Z.t() @ DY).view(n_loras, rank, n_out)
        rss_db = ((Z * Z).t() @ DY2).sqrt().view(n_loras, rank, n_out)
        return [("d_lora_a", da, rss_da, M, dtype), ("d_lora_b", db, rss_db, M, dtype)]
    raise ValueError(f"unknown launch role {name!r}")


def role_outputs(name: str, out, batch: int) -> list[torch.Tensor]:
    """A role call's outputs in ``role_references``' order (backward K1's dcoeffs partials, (M / G, N), summed per
    sample to (B, N): G depends on the tiles)."""
    if name == "shrink_dy":
        dz, partials = out[1], out[2]
        return [dz, partials.view(batch, -1, partials.shape[1]).sum(1)]
    return list(out) if name in ("shrink", "grad_basis") else [out]


def wrong_result(name: str, out, refs: list[tuple], batch: int) -> str | None:
    """None when every output of a role call lies within the statistical float64 bound of lorweb_fast.testing, else
    what is wrong (a tile configuration that computes a wrong result must never enter the table)."""
    from lorweb_fast.testing import assert_within_rss_bound

    try:
        for got, (label, ref, rss, depth, dtype) in zip(role_outputs(name, out, batch), refs, strict=True):
            assert_within_rss_bound(f"{name} {label}", got.double(), ref, rss, dtype, depth)
    except (AssertionError, ValueError) as exc:
        return str(exc)
    return None


def forget_loaded_kernels() -> None:
    """Empty the JIT functions' in-process caches, so that the next call loads (from Triton's disk cache, or by
    compiling) exactly the specializations it launches."""
    from kernel_resources import jit_functions

    for _, fn in jit_functions():
        fn.device_caches.clear()


def loaded_spills() -> dict[str, int]:
    """Spill bytes, as the driver reports them at load, of every specialization loaded since
    ``forget_loaded_kernels`` (keyed by kernel name); empty where Triton does not report them (the interpreter)."""
    from kernel_resources import loaded_specializations

    spills = {}
    for name, _, _, kernel in loaded_specializations():
        n = getattr(kernel, "n_spills", None)
        if n:
            spills[name] = max(spills.get(name, 0), int(n))
    return spills


def admissible(name: str, call, refs: list[tuple], batch: int, device: torch.device) -> str | None:
    """Run ``call()`` once with freshly loaded kernels: None when its results are right and (on a GPU) no kernel it
    loaded spills registers, else why the configuration is refused."""
    if device.type == "cuda":
        forget_loaded_kernels()
    out = call()
    problem = wrong_result(name, out, refs, batch)
    if problem is not None:
        return f"wrong result: {problem}"
    spills = loaded_spills() if device.type == "cuda" else {}
    if spills:
        return "spills registers: " + ", ".join(f"{k} {v} B" for k, v in sorted(spills.items()))
    return None


def summary_path(out_path: Path, explicit_out: bool) -> Path:
    """Where the per-role times go: beside an --out table, else under benchmarks/results/ (never into the
    package's configs/ folder, whose *.json files ship with the wheel)."""
    if explicit_out:
        return out_path.with_name(out_path.stem + "_summary.json")
    return Path(__file__).resolve().parent / "results" / f"tune_{out_path.stem}_summary.json"


def tune(args, device: torch.device = torch.device("cuda")) -> int:
    """Sweep and write the table (``device`` other than CUDA only for tests, which replace ``_bench``). The table and
    the summary are rewritten after every shape, so a sweep stopped from outside keeps the shapes it finished."""
    from bench_mixed_lora import device_name
    from kernel_resources import provenance

    from lorweb_fast._files import atomic_write
    from lorweb_fast.kernels import mixed_lora as K

    start = time.monotonic()
    origin = provenance()  # commit, triton, date: in the note and the summary
    family = K.gpu_family(device)
    if family == "default" and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        family = f"sm{major}{minor}"
    out_path = Path(args.out) if args.out else Path(__file__).resolve().parents[1] / "kernels" / "configs" / (
        f"{family}.json")
    summary_file = summary_path(out_path, bool(args.out))
    # the table the sweep starts from: the one it will overwrite, else the installed family's, else the defaults
    source = next(path for path in (out_path, K.config_path(family), K.config_path("default")) if path.is_file())
    base_table = json.loads(source.read_text())
    start_table = K.validate_table(base_table, str(source))
    if source == out_path and base_table.get("family") != family:
        # merged in and relabelled, the dispatcher would run this GPU's tiles on the other family's GPUs
        raise SystemExit(f"tune_kernels: --out {out_path} holds the table of GPU family "
                         f"{base_table.get('family')!r}, but this device is {family!r}: its measurements would be "
                         f"merged into it; use --out with a {family}.json path, or another file")
    print(f"tune_kernels: starting from {source}")
    plan = sweep_plan(args)
    print_plan(plan, args)
    entries, summary = [], []
    done = 0
    total = sum(sum(item["counts"].values()) for item in plan)

    l2 = cache_bytes(device)

    def out_of_budget() -> bool:
        return time.monotonic() - start > args.budget_s

    def write() -> None:
        swept = {}  # shape -> roles actually timed (not skipped, not cut off by the budget), of the written shapes
        written = {(e["in"], e["out"], e["R"], e["dtype"]) for e in entries}
        for r in summary:
            if (r["layer"][0], r["layer"][1], r["R"], r["dtype"]) in written:
                swept.setdefault(f"{r['layer'][0]}->{r['layer'][1]} R={r['R']} {r['dtype']}", []).append(r["role"])
        note = (f"Measured by benchmarks/tune_kernels.py on {device_name(device)} (commit {origin['commit']}, "
                f"torch {torch.__version__}, triton {origin['triton']}, {origin['date']}, M = {args.tokens} for "
                "timing; keys never depend on M): roles "
                + ("; ".join(f"{', '.join(roles)} of {shape}" for shape, roles in swept.items()) or "none")
                + ". Shapes not listed use the untuned defaults.")
        if base_table.get("tuned") and base_table.get("entries"):
            note += f" Before this sweep: {base_table['note']}"
        table = {"family": family, "tuned": True, "note": note, "defaults": base_table["defaults"],
                 "entries": merge_entries(base_table.get("entries", []), entries)}
        K.validate_table(table, str(out_path))
        if entries:  # a sweep that wrote no shape leaves the table as it was; atomically: a write cut short
            # (Ctrl-C, the run's timeout) would leave a truncated table that every Triton launch then refuses
            atomic_write(out_path, lambda tmp: tmp.write_text(json.dumps(table, indent=1) + "\n"))
        record = dict(device=device_name(device), torch=torch.__version__, **origin, tokens=args.tokens,
                      min_gain=args.min_gain, confirm_rounds=args.confirm_rounds, l2_bytes=l2, source=str(source),
                      table=str(out_path), roles=summary)
        atomic_write(summary_file, lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))

    for item in plan:
        (k, n), R, dtype = item["layer"], item["R"], DTYPES[item["dtype"]]
        if out_of_budget():
            print(f"budget of {args.budget_s:.0f} s reached: in={k} out={n} R={R} keeps what {source.name} has")
            continue
        g = torch.Generator(device="cpu").manual_seed(0)
        M, rps = args.tokens, args.tokens // 2
        size = torch.tensor([], dtype=dtype).element_size()
        pool = pool_size(M * k * size, M * n * size, l2)  # rotated: the copies of each exceed twice the L2
        xs = [torch.randn(M, k, generator=g).to(device, dtype) for _ in range(pool)]
        dys = [torch.randn(M, n, generator=g).to(device, dtype) for _ in range(pool)]
        x = xs[0]
        w = (torch.randn(n, k, generator=g) * k ** -0.5).to(device, dtype)
        bias = torch.randn(n, generator=g).to(device, dtype)
        a_cat = (torch.randn(R, k, generator=g) * k ** -0.5).to(device, dtype)
        b_cat = torch.randn(R, n, generator=g).to(device, dtype)
        coeffs = torch.softmax(torch.randn(2, R // LORA_RANK, generator=g), -1).to(device)
        u, z = K.shrink(x, a_cat, coeffs, 0.5, rps, LORA_RANK, out_features=n)
        dz = K.shrink(dys[0], b_cat, coeffs, 0.5, rps, LORA_RANK, u_in=u, out_features=k)[1]
        calls = {  # each role in the mode and layout it runs in (forward / backward K1, K2, K3)
            "shrink": lambda c, i: K.shrink(xs[i], a_cat, coeffs, 0.5, rps, LORA_RANK, config=c, out_features=n),
            "expand": lambda c, i: K.expand(xs[i], w, z, b_cat, bias=bias, config=c),
            "shrink_dy": lambda c, i: K.shrink(dys[i], b_cat, coeffs, 0.5, rps, LORA_RANK, u_in=u, config=c,
                                               out_features=k),
            "expand_dx": lambda c, i: K.expand(dys[i], w, dz, a_cat, weight_layout="in_out", config=c),
            "grad_basis": lambda c, i: K.grad_basis(dz, xs[i], z, dys[i], LORA_RANK, config=c),
        }

        def fused(i):
            zz = K.shrink(xs[i], a_cat, coeffs, 0.5, rps, LORA_RANK, config=rule["shrink"])[1]
            K.expand(xs[i], w, zz, b_cat, bias=bias, config=rule["expand"])

        def composed(i):
            zz = K.shrink(xs[i], a_cat, coeffs, 0.5, rps, LORA_RANK, config=rule["shrink"])[1]
            torch.addmm(bias, zz, b_cat).addmm_(xs[i], w.t())

        refs = {}  # role -> float64 references, computed when the role is first swept

        def refs_of(name):
            if name not in refs:
                refs[name] = role_references(name, xs[0], dys[0], w, bias, a_cat, b_cat, coeffs, 0.5, rps,
                                             LORA_RANK, u, z, dz)
            return refs[name]

        rule = dict(K.lookup_in(start_table, k, n, R, dtype, source.name))
        still_refused = []  # roles whose table tiles were refused and not replaced
        summarised = len(summary)  # the roles of this shape that get timed are appended from here
        forward_swept = [name for name in item["counts"] if name in FORWARD_ROLES]
        for name in item["counts"]:
            if name in FUSED_ONLY_ROLES and rule["route"] != "fused":
                print(f"  in={k} out={n}: {name} not swept (route {rule['route']}: the backward runs it on cuBLAS)")
                done += item["counts"][name]
                continue
            if out_of_budget():
                done += item["counts"][name]
                continue
            table_refused = None
            try:  # the table's current tiles, timed beside the candidates: a winner must beat them by --min-gain
                table_refused = admissible(name, lambda: calls[name](rule[name], 0), refs_of(name), coeffs.shape[0],
                                           device)
                if table_refused:  # said loudly: the committed table itself is wrong or spills at this shape
                    print(f"  in={k} out={n} R={R} {item['dtype']} {name}: THE TABLE'S TILES {rule[name]} "
                          f"{table_refused}")
                    table_ms = float("inf")
                else:
                    table_ms = _bench(lambda i: calls[name](rule[name], i), pool)
            except Exception as exc:
                print(f"  in={k} out={n} {name}: the table's tiles {rule[name]} failed ({type(exc).__name__})")
                table_ms = float("inf")
            best_ms, best = float("inf"), None
            refused_candidates = []  # [tiles, why] of the candidates the gate refused (in the summary)
            for cand in CANDIDATES[name]:
                done += 1
                if out_of_budget():
                    break
                try:
                    refused = admissible(name, lambda: calls[name](cand, 0), refs_of(name), coeffs.shape[0], device)
                    if refused:  # never timed, never adopted
                        print(f"  [{done}/{total}] {name} {cand}: refused ({refused})")
                        refused_candidates.append([cand, refused[:500]])
                        continue
                    ms = _bench(lambda i: calls[name](cand, i), pool)
                except Exception as exc:  # out of shared memory / registers for this tile: skip it
                    print(f"  [{done}/{total}] {name} {cand}: skipped ({type(exc).__name__})")
                    continue
                if ms < best_ms:
                    best_ms, best = ms, cand
                print(f"  [{done}/{total}] in={k} out={n} R={R} {item['dtype']} {name} {cand}: {ms:.4f} ms")
            adopted = best is not None and best != rule[name] and best_ms < table_ms * (1 - args.min_gain)
            confirm, verdict = None, ""
            if adopted and table_ms != float("inf"):  # one timing each is within the noise: time both again
                try:
                    confirm = confirm_gain(lambda i: calls[name](rule[name], i), lambda i: calls[name](best, i),
                                           args.confirm_rounds, pool)
                    adopted = confirm["best_median_ms"] < confirm["table_median_ms"] * (1 - args.min_gain)
                    verdict = (f"; {args.confirm_rounds} alternating rounds: table median "
                               f"{confirm['table_median_ms']:.4f} ms, best median {confirm['best_median_ms']:.4f} ms")
                except Exception as exc:
                    adopted = False
                    confirm = dict(rounds=args.confirm_rounds, error=f"{type(exc).__name__}: {exc}"[:500])
                    verdict = f"; confirmation failed ({type(exc).__name__})"
            summary.append(dict(layer=[k, n], R=R, dtype=item["dtype"], role=name, adopted=adopted,
                                table_ms=None if table_ms == float("inf") else table_ms, table_refused=table_refused,
                                refused=refused_candidates, best_ms=None if best is None else best_ms,
                                confirm=confirm, table=rule[name], best=best))
            print(f"  in={k} out={n} R={R} {item['dtype']} {name}: table {table_ms:.4f} ms, best {best_ms:.4f} ms"
                  + verdict + " -> " + ("adopted" if adopted else "table kept"))
            if adopted:
                rule[name] = best
            elif table_refused:
                still_refused.append(name)
            if forward_swept and name == forward_swept[-1] and not still_refused:  # fused or composed
                if out_of_budget():  # --budget-s already spent: the table's route stays, not timed again
                    print(f"  in={k} out={n}: route not compared (budget spent); keeps {rule['route']}")
                else:
                    rule["route"] = "fused" if _bench(fused, pool) <= _bench(composed, pool) else "composed"

        if len(summary) == summarised:  # no role of this shape was timed (the budget, or nothing for its route)
            why = "the budget ran out" if out_of_budget() else f"nothing to sweep on route {rule['route']}"
            print(f"in={k} out={n} R={R} {item['dtype']}: no role timed ({why}); keeps what {source.name} has")
            continue
        if still_refused:  # never written: the table keeps what it had for this shape, and the record says why
            print(f"in={k} out={n} R={R} {item['dtype']}: NOT WRITTEN: the table's {', '.join(still_refused)} tiles "
                  "are refused and no candidate replaced them (see table_refused in the summary)")
            write()
            continue
        entries.append({"in": k, "out": n, "R": R, "dtype": item["dtype"], "route": rule["route"],
                        **{name: rule[name] for name in CANDIDATES}})
        print(f"in={k} out={n} R={R} {item['dtype']}: route {rule['route']}")
        write()
    if not entries:
        print(f"nothing swept within --budget-s: {out_path} is unchanged")
        return 0
    changed = sum(r["adopted"] for r in summary)
    print(f"wrote {len(entries)} tuned entries to {out_path} ({changed} of {len(summary)} swept roles changed; "
          f"per-role times in {summary_file}) in {time.monotonic() - start:.0f} s")
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
