"""FLUX-block benchmark: one FLUX.1 double block + one single block with LoRWeB on every targeted linear layer.

Scenarios (rows named by ``scenario`` and ``impl``):
  train         forward + backward with gradient checkpointing (training at 512 px, batch 6 on GPU), LoRWeB params
                trainable, base frozen, the block input's gradient computed in every row; the coefficients are
                computed inside the step, as in training (lorweb_fast's set_query without its finiteness check,
                a host synchronisation that this device-time timer would misread)
  infer         one denoising step without gradients (1024 px, batch 1 on GPU)
  infer_merged  the batch-1 merged fast path (lorweb_fast.merged) against the base block
  coeffs        computing the coefficients once per generation (set_query, one batched computation) against once
                per layer call (what a per-layer formulation pays on every forward)
Implementations: ``base`` (the blocks without adapter), ``official`` (the official einsum formulation at the block's
dtype, coefficients computed in every layer call), ``official_as_run`` (what official training executes: fp32 LoRWeB
parameters, x cast to fp32, the einsum in fp32 without TF32, added to the base output, coefficients computed in every
layer call; METHOD.md) and ``lorweb_fast`` (default backend, coefficients from set_query).
Peak memory is the CUDA allocator's peak above what was allocated before the step (GPU only), with the previous
step's gradients freed first (the step allocates them again).
Before timing, each fast path's block output (lorweb_fast, lorweb_fast inside merged(), official_as_run) is checked
against the official formulation in float64.
Attention runs without cuDNN's SDPA kernels, as `lorweb-fast train` does by default (on an H200 with torch 2.11 their
backward returned NaN in training and hit an illegal memory access in this benchmark's train step);
``--cudnn-attention`` turns them on.

Without a GPU it runs a small CPU default labelled CPU. Results (rewritten after every row, ``complete`` false until
the last, so that a run stopped by its time limit keeps its rows): benchmarks/results/flux_block_*.json and .md, and
(``--profile``, on by default on a GPU) ``*_profile.txt``: torch.profiler's kernel tables of one training step of
the base block and of lorweb_fast's, and the kernels that make the difference (time in lorweb_fast's step minus the
same kernel's time in the base step).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mixed_lora import (DTYPES, RESULTS_DIR, Timer, device_clocks, device_name, git_commit,  # noqa: E402
                              installed_triton_version, nonnegative_int, positive_int, profile_averages,
                              profile_sort_key, safe_file_stem, seconds, tf32_matmuls, tf32_off)

import lorweb_fast as lf  # noqa: E402
from lorweb_fast.layer import LoRWeBLinear  # noqa: E402
from lorweb_fast.testing import tolerance  # noqa: E402

GPU = dict(dim=3072, heads=24, head_dim=128, axes=(16, 56, 56), train_batch=6, train_img=2048, train_txt=512,
           infer_img=8192, infer_txt=512, query_dim=2304)
CPU = dict(dim=128, heads=2, head_dim=64, axes=(16, 24, 24), train_batch=2, train_img=96, train_txt=16,
           infer_img=192, infer_txt=16, query_dim=96)
#: Longest chain of roundings through one double + one single block, counted in linear layers (norm modulation,
#: attention projections, output projection, MLP in and out, for each block) for the float64 comparison bound.
CHAINED_LAYERS = 8


class OfficialEinsumLinear(LoRWeBLinear):
    """The official formulation: coefficients from the query in every call, then one einsum per layer."""

    query: torch.Tensor | None = None

    def forward(self, x):
        coeffs = self.coefficients_from_query(self.query).to(x.dtype)
        eq = "bsi,nir,bn,nro->bso" if x.dim() == 3 else "bi,nir,bn,nro->bo"
        delta = torch.einsum(eq, x, self.lora_A.to(x.dtype), coeffs, self.lora_B.to(x.dtype)) * self.scale
        return self.base_layer(x) + delta


class OfficialAsRunLinear(LoRWeBLinear):
    """The official training path: fp32 LoRWeB parameters (masters), x cast to fp32, the einsum in fp32, rounded to
    the block dtype and added to the base layer's output; coefficients from the query in every call."""

    query: torch.Tensor | None = None

    def forward(self, x):
        coeffs = self.coefficients_from_query(self.query.float())
        eq = "bsi,nir,bn,nro->bso" if x.dim() == 3 else "bi,nir,bn,nro->bo"
        delta = torch.einsum(eq, x.float(), self.lora_A, coeffs, self.lora_B) * self.scale
        # as the official forward (toolkit/network_mixins.py): the fp32 delta rounded to the block dtype, then added
        return self.base_layer(x) + delta.to(x.dtype)


class TwoBlocks(nn.Module):
    """One double block and one single block, under the module names FLUX uses (so the default targets match)."""

    def __init__(self, cfg):
        super().__init__()
        from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

        self.transformer_blocks = nn.ModuleList([FluxTransformerBlock(cfg["dim"], cfg["heads"], cfg["head_dim"])])
        self.single_transformer_blocks = nn.ModuleList([FluxSingleTransformerBlock(cfg["dim"], cfg["heads"],
                                                                                   cfg["head_dim"])])
        self.gradient_checkpointing = False

    def forward(self, img, txt, temb, rotary):
        for block in (self.transformer_blocks[0], self.single_transformer_blocks[0]):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                txt, img = checkpoint(block, img, txt, temb, rotary, use_reentrant=False)
            else:
                txt, img = block(img, txt, temb, rotary)
        return img


def make_inputs(cfg, batch, img_tokens, txt_tokens, device, dtype, seed=0):
    try:  # its home since diffusers deprecated the embeddings import (a FutureWarning in 0.42)
        from diffusers.models.transformers.transformer_flux import FluxPosEmbed
    except ImportError:  # older diffusers
        from diffusers.models.embeddings import FluxPosEmbed

    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.zeros(txt_tokens, 3), torch.randint(0, 64, (img_tokens, 3), generator=g).float()])
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=list(cfg["axes"]))(ids)
    return dict(img=torch.randn(batch, img_tokens, cfg["dim"], generator=g).to(device, dtype),
                txt=torch.randn(batch, txt_tokens, cfg["dim"], generator=g).to(device, dtype),
                temb=torch.randn(batch, cfg["dim"], generator=g).to(device, dtype),
                rotary=(cos.to(device), sin.to(device)),
                query=torch.randn(batch, cfg["query_dim"], generator=g).to(device))


def build_models(cfg, device, dtype):
    torch.manual_seed(0)
    base = TwoBlocks(cfg).to(device, dtype).requires_grad_(False)
    ours = copy.deepcopy(base)
    lf.inject_lorweb(ours, lf.LoRWeBConfig(query_dim=cfg["query_dim"]))
    with torch.no_grad():
        for layer in lf.lorweb_layers(ours).values():
            layer.lora_B.normal_(0, 0.02)  # trained-like, non-zero basis
    ours.to(device, dtype)
    official = copy.deepcopy(ours)
    for layer in lf.lorweb_layers(official).values():
        layer.__class__ = OfficialEinsumLinear
    as_run = fp32_masters(ours)  # the official trainer's fp32 masters; the base layer keeps the block dtype
    for layer in lf.lorweb_layers(as_run).values():
        layer.__class__ = OfficialAsRunLinear
    return base, ours, official, as_run


def fp32_masters(model):
    """A deep copy of ``model`` with its LoRWeB tensors in float32 and the base in its own dtype: what the trainer
    trains (fp32 masters, as the official ``AttLoRAModule``)."""
    masters = copy.deepcopy(model)
    for layer in lf.lorweb_layers(masters).values():
        for t in layer.lorweb_tensors().values():
            t.data = t.data.float()
    return masters


def set_official_query(model, query):
    for layer in lf.lorweb_layers(model).values():
        layer.query = query


def lorweb_params(model):
    return [p for layer in lf.lorweb_layers(model).values() for p in layer.lorweb_tensors().values()]


#: the factor (a power of two: exact, undone exactly) by which the checks multiply every lora_B: the benchmark's
#: trained-like basis moves a layer's output by about 1/25 of its bf16 rounding bound, below what any check sees
CHECK_BASIS_GAIN = 128


@contextlib.contextmanager
def amplified_basis(*models, gain=CHECK_BASIS_GAIN):
    """Every LoRWeB layer's lora_B in ``models`` multiplied by ``gain`` inside the block, divided back on exit
    (bit-exact for a power of two)."""
    tensors = [layer.lora_B for model in models for layer in lf.lorweb_layers(model).values()]
    with torch.no_grad():
        for t in tensors:
            t.mul_(gain)
    try:
        yield
    finally:
        with torch.no_grad():
            for t in tensors:
                t.div_(gain)


def check_block(ours, official, inputs, dtype, name="lorweb_fast"):
    """lorweb_fast's (official_as_run's, or lorweb_fast's inside ``merged()``) block output against the official
    formulation in float64; for lorweb_fast also every LoRWeB layer's output against float64 from the input it
    received (``check_layer_outputs``): in bf16 the adapter's share of the block output lies below the block's
    rounding noise, so the block comparison alone would pass a wrong or missing mixture. Both checks run with the
    basis amplified (``amplified_basis``), so that the mixture moves each output by more than its rounding bound."""
    with amplified_basis(ours, official):
        _check_block(ours, official, inputs, dtype, name)


def _check_block(ours, official, inputs, dtype, name):
    ref_model = copy.deepcopy(official).double()
    set_official_query(ref_model, inputs["query"].double())
    captured = []
    hooks = [layer.register_forward_hook(lambda m, args, out, n=n: captured.append((n, m, args[0], out)))
             for n, layer in lf.lorweb_layers(ours).items()]  # every row: official_as_run's layers too
    with torch.no_grad():
        if name.startswith("lorweb_fast"):
            lf.set_query(ours, inputs["query"])
        else:
            set_official_query(ours, inputs["query"])
        try:
            with lf.merged(ours) if name == "lorweb_fast_merged" else contextlib.nullcontext():
                got = ours(inputs["img"], inputs["txt"], inputs["temb"], inputs["rotary"]).double()
        finally:
            for hook in hooks:
                hook.remove()
        check_layer_outputs(captured, name)  # after merged(): the original weights are back
        ref = ref_model(inputs["img"].double(), inputs["txt"].double(), inputs["temb"].double(),
                        tuple(t.double() for t in inputs["rotary"]))
    bound = CHAINED_LAYERS * tolerance(dtype, inputs["img"].shape[-1] * 4) * ref.abs().max()
    err = (got - ref).abs().max()
    if not err <= bound:
        raise AssertionError(f"{name} block output differs from the float64 official formulation by "
                             f"{err.item():.3e} > {bound.item():.3e}")
    del ref_model


def check_layer_outputs(captured, name):
    """Each captured (layer name, LoRWeBLinear, input x (..., in), output y (..., out)) against float64:
    ``x W^T + b + scale * sum_n coeffs[b, n] (x A_n) B_n`` with the layer's set coefficients, entry by entry within
    the rounding bound of the outputs' dtype for sums of in + N r terms and within the statistical
    (root-sum-of-squares) bound (``testing.check_forward``, as the layer benchmark's gates)."""
    from lorweb_fast.testing import check_forward

    for layer_name, layer, x, y in captured:
        # official_as_run's layers compute their coefficients from the query in every call
        coeffs = layer.coefficients if layer.coefficients is not None else layer.coefficients_from_query(
            layer.query.float())
        check_forward(f"{name} layer {layer_name} output", y,
                      dict(x=x, weight=layer.base_layer.weight, bias=layer.base_layer.bias, lora_a=layer.lora_A,
                           lora_b=layer.lora_B, coeffs=coeffs, scale=layer.scale))


def peak_mb(device, fn, release=None):
    """The allocator's peak above what is allocated before ``fn()``; ``release()`` first frees what a step frees
    and allocates again (the gradients of the timed steps), so that the step's own allocations are all counted."""
    if device.type != "cuda":
        return None
    if release is not None:
        release()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20


def _self_times_us(avgs, device: torch.device) -> dict:
    """{name: (self time in us, calls)}: on a GPU the device-side events only (kernels, memcpy/memset; as
    torch.profiler's own total: a CPU op also carries its kernels' device time, which would count them twice),
    on CPU every op's CPU self time."""
    from torch.autograd import DeviceType

    if device.type != "cuda":
        return {e.key: (e.self_cpu_time_total, e.count) for e in avgs}
    return {e.key: (e.self_device_time_total, e.count) for e in avgs
            if e.device_type == DeviceType.CUDA and not e.is_user_annotation}


def adapter_cost_table(base_avgs, ours_avgs, device: torch.device, rows: int = 25) -> str:
    """The kernels (device self time on a GPU, CPU self time otherwise) that separate lorweb_fast's step from the
    base block's: per name, the time in lorweb_fast's step minus the time in the base step, largest first."""
    base, ours = _self_times_us(base_avgs, device), _self_times_us(ours_avgs, device)
    total_base = sum(t for t, _ in base.values())
    total_ours = sum(t for t, _ in ours.values())
    deltas = sorted(((ours.get(k, (0.0, 0))[0] - base.get(k, (0.0, 0))[0], k) for k in set(base) | set(ours)),
                    reverse=True)
    unit = "device" if device.type == "cuda" else "CPU"
    lines = [f"== where lorweb_fast's training step spends its extra time ({unit} self time, us): "
             f"base {total_base:.0f}, lorweb_fast {total_ours:.0f}, difference {total_ours - total_base:.0f}",
             f"{'lorweb_fast - base':>19} {'lorweb_fast':>12} {'base':>10} {'calls ours/base':>16}  name"]
    for delta, key in deltas[:rows]:
        (t_ours, n_ours), (t_base, n_base) = ours.get(key, (0.0, 0)), base.get(key, (0.0, 0))
        lines.append(f"{delta:>19.1f} {t_ours:>12.1f} {t_base:>10.1f} {f'{n_ours}/{n_base}':>16}  {key[:110]}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--warmup", type=nonnegative_int, default=None,
                   help="discarded warm-up steps (default GPU 5, CPU 1)")
    p.add_argument("--reps", type=positive_int, default=None, help="timed steps (default GPU 20, CPU 5)")
    p.add_argument("--budget-s", type=seconds, default=None, help="time budget per row (default GPU 10, CPU 1)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where to write results")
    p.add_argument("--tag", default=None, help="file name stem")
    p.add_argument("--total-budget-s", type=seconds, default=None,
                   help="start no new row after this many seconds (the rest are recorded as skipped)")
    p.add_argument("--cudnn-attention", action="store_true",
                   help="let attention use cuDNN's SDPA kernels (off by default, as in lorweb-fast train)")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                   help="write *_profile.txt: kernel tables of one training step, base block and lorweb_fast, and "
                   "their difference per kernel (default: on a GPU)")
    args = p.parse_args(argv)
    cudnn_sdp = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(args.cudnn_attention)  # as training (training.TrainConfig.cudnn_attention)
    try:
        with tf32_off():
            return run(args)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(cudnn_sdp)


def run(args) -> dict:
    """The benchmark, with the cuDNN SDPA and TF32 settings already chosen by ``main``."""
    from tqdm import tqdm

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    cfg = GPU if on_gpu else CPU
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    timer = Timer(device, args.warmup if args.warmup is not None else (5 if on_gpu else 1),
                  args.reps if args.reps is not None else (20 if on_gpu else 5),
                  args.budget_s if args.budget_s is not None else (10.0 if on_gpu else 1.0))
    base, ours, official, as_run = build_models(cfg, device, dtype)
    train_in = make_inputs(cfg, cfg["train_batch"], cfg["train_img"], cfg["train_txt"], device, dtype)
    infer_in = make_inputs(cfg, 1, cfg["infer_img"], cfg["infer_txt"], device, dtype, seed=1)
    check_inputs = make_inputs(cfg, 2, 40, 8, device, dtype, seed=2)
    check_block(ours, official, check_inputs, dtype)
    check_block(as_run, official, check_inputs, dtype, name="official_as_run")
    check_block(ours, official, {k: v if k == "rotary" else v[:1] for k, v in check_inputs.items()}, dtype,
                name="lorweb_fast_merged")  # the merged fast path is for one analogy
    # the trainer's arithmetic: fp32 LoRWeB masters on the block-dtype base (a cast of the basis per layer call)
    ours_masters = fp32_masters(ours) if dtype != torch.float32 else None
    if ours_masters is not None:
        check_block(ours_masters, official, check_inputs, dtype, name="lorweb_fast_fp32_masters")

    def train_step(model, impl, inp):
        model.gradient_checkpointing = True
        params = lorweb_params(model)
        for q in params:
            q.requires_grad_(True)
            q.grad = None
        # the input gradient in every row (as for every block but the first of the model; the base block needs
        # something to differentiate), so that the rows do the same backward work apart from the adapter's
        x = inp["img"].detach().requires_grad_(True)
        if impl.startswith("lorweb_fast"):
            # without the finiteness check, a host synchronisation: under this timer (steps enqueued behind a GPU
            # sleep) it would count host time as device time; the trainer keeps it
            lf.set_query(model, inp["query"], check_finite=False)
        elif impl in ("official", "official_as_run"):
            set_official_query(model, inp["query"])
        model(x, inp["txt"], inp["temb"], inp["rotary"]).float().square().mean().backward()

    def infer_step(model, impl, inp):
        with torch.no_grad():
            model(inp["img"], inp["txt"], inp["temb"], inp["rotary"])

    commit = git_commit()
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    triton_version = installed_triton_version()
    import diffusers  # the blocks are diffusers' own (TwoBlocks)

    static = dict(diffusers=diffusers.__version__, python=sys.version.split()[0], cudnn=torch.backends.cudnn.version(),
                  opt_einsum=bool(torch.backends.opt_einsum.is_available() and torch.backends.opt_einsum.enabled))
    layers = list(lf.lorweb_layers(ours).values())
    slug = "cpu" if not on_gpu else "".join(c if c.isalnum() else "-" for c in device_name(device)).strip("-").lower()
    stem = args.tag or safe_file_stem(f"flux_block_{slug}_{date[:10]}_{commit}")
    profile_text = None

    def write(complete: bool) -> tuple[dict, list[str]]:
        """Write the record (JSON, markdown, profile) of the rows so far: after every row, so that a run cut short by
        its time limit keeps what it measured (``complete`` false until the last row). Returns (record, table)."""
        record = dict(label="GPU" if on_gpu else "CPU", device=device_name(device), torch=torch.__version__,
                      triton=triton_version, cuda=torch.version.cuda, commit=commit, date=date,
                      dtype=str(dtype).replace("torch.", ""), config=cfg, layers=len(layers),
                      clocks=device_clocks(device), tf32=tf32_matmuls(),
                      cudnn_attention=args.cudnn_attention,
                      timing=("device time per step (events behind an enqueued torch.cuda._sleep), median"
                              if on_gpu else "wall-clock per step, median"),
                      backend=lf.ops.resolve_backend(None, device), **static, complete=complete, results=rows)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
        ref = {(r["scenario"], r["impl"]): r["median_ms"] for r in rows}
        lines = [f"# FLUX block benchmark ({record['label']})", "", f"- device: {record['device']}",
                 f"- torch {record['torch']}, triton {record['triton']}, CUDA {record['cuda']}, cuDNN "
                 f"{record['cudnn']}, diffusers {record['diffusers']}, Python {record['python']}; opt_einsum "
                 f"{'on' if record['opt_einsum'] else 'off'} (the einsum rows' contraction order)",
                 f"- date: {date}; commit: {commit}; dtype: {record['dtype']}; backend: {record['backend']}; "
                 f"cuDNN attention: {'on' if args.cudnn_attention else 'off'}",
                 f"- {len(layers)} LoRWeB layers; config: {cfg}", ""]
        if not on_gpu:
            lines += ["**CPU run: these numbers say nothing about GPU speed.**", ""]
        if not complete:
            lines += ["**Partial record: the run stopped before its last row.**", ""]
        lines += ["| scenario | impl | median ms | × base | × official | × official_as_run | peak MB |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            if r.get("skipped"):
                lines.append(f"| {r['scenario']} | {r['impl']} | skipped: {r['skip_reason']} | | | | |")
                continue
            base_ms = ref.get((r["scenario"], "base")) or ref.get((r["scenario"], "per_layer_call"))
            off_ms, as_run_ms = ref.get((r["scenario"], "official")), ref.get((r["scenario"], "official_as_run"))
            peak = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
            lines.append(f"| {r['scenario']} | {r['impl']} | {r['median_ms']:.3f}"
                         + (" (host-bound)" if r.get("host_bound") else "") + " | "
                         + (f"{r['median_ms'] / base_ms:.3f}" if base_ms else "-") + " | "
                         + (f"{r['median_ms'] / off_ms:.3f}" if off_ms else "-") + " | "
                         + (f"{r['median_ms'] / as_run_ms:.3f}" if as_run_ms else "-") + f" | {peak} |")
        (args.out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
        if profile_text is not None:
            header = (f"FLUX block training step ({record['label']}; {record['device']}; torch {record['torch']}; "
                      f"commit {commit}; backend {record['backend']}; config {cfg})\n\n")
            (args.out_dir / f"{stem}_profile.txt").write_text(header + profile_text)
        return record, lines

    rows = []
    started = time.perf_counter()

    def out_of_budget():
        return bool(rows) and args.total_budget_s is not None and time.perf_counter() - started > args.total_budget_s

    models = (("base", base), ("official", official), ("official_as_run", as_run), ("lorweb_fast", ours))
    jobs = [("train", impl, m) for impl, m in models]
    if ours_masters is not None:
        jobs.append(("train", "lorweb_fast_fp32_masters", ours_masters))
    jobs += [("infer", impl, m) for impl, m in models]
    jobs += [("infer_merged", "base", base), ("infer_merged", "lorweb_fast_merged", ours)]
    bar = tqdm(total=len(jobs) + 2, desc="bench_flux_block", unit="row", disable=None)
    for scenario, impl, model in jobs:
        bar.set_postfix_str(f"{scenario} {impl}")
        tqdm.write(f"bench_flux_block: {scenario} {impl}", file=sys.stderr)  # names the row a crash happened in
        if out_of_budget():
            rows.append(dict(scenario=scenario, impl=impl, median_ms=None, peak_mem_mb=None, skipped=True,
                             skip_reason="--total-budget-s spent"))
            bar.update(1)
            write(False)
            continue
        inp = train_in if scenario == "train" else infer_in
        if scenario != "train":
            lf.set_query(ours, inp["query"])  # once per generation
            set_official_query(official, inp["query"])
            set_official_query(as_run, inp["query"])
        step = (lambda i, m=model, im=impl, x=inp: train_step(m, im, x)) if scenario == "train" else \
            (lambda i, m=model, im=impl, x=inp: infer_step(m, im, x))
        release = (lambda m=model: [setattr(q, "grad", None) for q in lorweb_params(m)]) if scenario == "train" \
            else None
        if impl == "lorweb_fast_merged":
            with lf.merged(ours):
                ms, host_bound, peak = timer.run(step, 1), timer.host_bound, peak_mb(device, lambda: step(0))
        else:
            ms, host_bound, peak = timer.run(step, 1), timer.host_bound, peak_mb(device, lambda: step(0), release)
        rows.append(dict(scenario=scenario, impl=impl, median_ms=ms, peak_mem_mb=peak, host_bound=host_bound))
        bar.update(1)
        write(False)
    if args.profile if args.profile is not None else on_gpu:
        if out_of_budget():
            profile_text = "skipped: --total-budget-s spent\n"
        else:  # one training step of the base block and of lorweb_fast's, and the kernels that differ
            tqdm.write("bench_flux_block: profiling the training step", file=sys.stderr)
            avgs = {impl: profile_averages(lambda i, m=model, im=impl: train_step(m, im, train_in), device, warmup=1)
                    for impl, model in (("base", base), ("lorweb_fast", ours))}
            profile_text = "".join(
                f"== train {impl}: torch.profiler, one step after warm-up\n"
                + a.table(sort_by=profile_sort_key(device), row_limit=30) + "\n" for impl, a in avgs.items())
            profile_text += adapter_cost_table(avgs["base"], avgs["lorweb_fast"], device)
        write(False)
    # Coefficients: once per generation (batched) against once per layer call (every forward pays this).
    query = infer_in["query"]
    with torch.no_grad():
        rows.append(dict(scenario="coeffs", impl="set_query_once",
                         median_ms=timer.run(lambda i: lf.set_query(ours, query, check_finite=False), 1),
                         peak_mem_mb=None,  # without its host-syncing check, as the per-layer row has none
                         host_bound=timer.host_bound))
        bar.update(1)
        write(False)
        rows.append(dict(scenario="coeffs", impl="per_layer_call",
                         median_ms=timer.run(lambda i: [layer.coefficients_from_query(query) for layer in layers], 1),
                         peak_mem_mb=None, host_bound=timer.host_bound))
        bar.update(1)
    bar.close()
    record, lines = write(True)
    print("\n".join(lines))
    return record


if __name__ == "__main__":
    main()
