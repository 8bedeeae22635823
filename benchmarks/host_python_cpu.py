"""Python host time of the eager call path on a CPU, without a GPU: what lorweb_fast's own Python costs per call.

Runs the triton backend through the CPU interpreter's code path with every kernel launch stubbed out (nothing
computes: only the Python around the launches is timed), on small shapes (M=64, 128->128) so that the few torch
ops around the launches cost little. Rows:

* ``LoRWeBLinear.forward``: the module's own Python, with ``ops.lorweb_linear`` stubbed;
* ``launch wrapper``: ``kernels.mixed_lora._launch`` around a kernel that does nothing, with the forward's real
  launch arguments;
* ``fused forward / no_grad forward / forward+backward``: ``lorweb_linear(backend="triton")`` with the launches
  stubbed, through torch.library's dispatch of the registered op (``ops.EAGER_DIRECT = False``) and through the
  direct eager path, side by side in one run (rounds interleaved).

Minimum and median over rounds of the mean per call, in microseconds; the CPU, its load and Python's speed set the
numbers (a GPU host's are lower), the ratios between rows are what carries over. Not a GPU measurement: on a GPU,
``host_overhead.py`` measures host time with the real launches.

    python benchmarks/host_python_cpu.py [--rounds 7] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the triton backend accepts CPU tensors

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_mixed_lora: the records' provenance helpers
import bench_mixed_lora  # noqa: E402


def per_call_us(fn, calls: int, rounds: int) -> list[float]:
    for _ in range(max(3, calls // 10)):
        fn()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter_ns() - t0) / calls / 1e3)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=bench_mixed_lora.positive_int, default=7,
                    help="timing rounds per row; the minimum and the median are kept (default 7)")
    ap.add_argument("--json", default=None, help="write the rows here as JSON")
    args = ap.parse_args(argv)

    import lorweb_fast as lf
    from lorweb_fast import ops
    from lorweb_fast.kernels import mixed_lora as K

    why = ops._unavailable_reason("triton", torch.device("cpu"))
    if why is not None:
        print(f"host_python_cpu.py needs the Triton CPU interpreter: {why}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    bf = torch.bfloat16
    M, IN, OUT, N, R = 64, 128, 128, 32, 4
    x = torch.randn(1, M, IN, dtype=bf)
    base = torch.nn.Linear(IN, OUT, dtype=bf)
    rows = []

    def row(name, samples):
        rows.append({"row": name, "min_us": round(min(samples), 1), "median_us": round(statistics.median(samples), 1)})
        print(f"{name:52s} min {min(samples):8.1f} us   median {statistics.median(samples):8.1f} us", flush=True)

    # 1. the module's Python
    layer = lf.LoRWeBLinear(base, num_loras=N, rank=R, key_dim=16, query_dim=8)
    layer.set_coefficients(torch.rand(1, N))
    y_stub = torch.empty(1, M, OUT, dtype=bf)
    real = ops.lorweb_linear
    ops.lorweb_linear = lambda *a, **k: y_stub
    try:
        with torch.no_grad():
            row("LoRWeBLinear.forward (op stubbed)", per_call_us(lambda: layer(x), 2000, args.rounds))
    finally:
        ops.lorweb_linear = real

    # 2. the launch wrapper around a kernel that does nothing
    recorded = []
    real_launch = K._launch
    K._launch = lambda kernel, grid, *a, **kw: recorded.append((grid, a, kw))
    try:
        la, lb = layer.lora_A.detach().to(bf), layer.lora_B.detach().to(bf)
        K.forward(x[0], base.weight, base.bias, None, la, lb, torch.rand(1, N), 1.0, M, family="sm90")
    finally:
        K._launch = real_launch

    class NoKernel:
        def __getitem__(self, grid):
            return lambda *a, **kw: None

    grid, launch_args, launch_kwargs = recorded[-1]
    row("launch wrapper, per launch (kernel stubbed)",
        per_call_us(lambda: K._launch(NoKernel(), grid, *launch_args, **launch_kwargs), 2000, args.rounds))

    # 3. the fused call, registered op vs direct eager path, launches stubbed
    K._launch = lambda kernel, grid, *a, **kw: None
    try:
        w, b = base.weight.detach(), base.bias.detach()
        la = (torch.randn(N, IN, R) * IN ** -0.5).to(bf).requires_grad_(True)
        lb = torch.randn(N, R, OUT).to(bf).requires_grad_(True)
        c = torch.rand(1, N, requires_grad=True)
        dy = torch.randn(1, M, OUT, dtype=bf)

        def fwd():
            return lf.lorweb_linear(x, w, b, la, lb, c, 1.0, backend="triton")

        def fwd_no_grad():
            with torch.no_grad():
                return fwd()

        def fwd_bwd():
            fwd().backward(dy)

        has_direct = hasattr(ops, "EAGER_DIRECT")
        for name, fn, calls in (("fused forward, autograd on", fwd, 200), ("fused forward, no_grad", fwd_no_grad, 200),
                                ("fused forward+backward", fwd_bwd, 60)):
            samples = {False: [], True: []}
            for _ in range(args.rounds):
                for direct in ((False, True) if has_direct else (False,)):
                    if has_direct:
                        ops.EAGER_DIRECT = direct
                    samples[direct] += per_call_us(fn, calls, 1)
            row(f"{name}: registered op path", samples[False])
            if has_direct:
                row(f"{name}: direct eager path", samples[True])
                ops.EAGER_DIRECT = True
    finally:
        K._launch = real_launch
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"commit": bench_mixed_lora.git_commit(),
                       "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                       "device": bench_mixed_lora.device_name(torch.device("cpu")), "torch": torch.__version__,
                       "python": sys.version.split()[0], "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
