"""Peak host memory audit: the operations whose memory scales with the checkpoint or the model, on CPU.

``tests/test_repeated_use.py`` checks that repeated use does not grow memory (leaks); ``tests/test_merge_strategies.py``
counts the merge strategies' live tensor storage on a tiny model. This file measures the PEAK resident set size
(what ``top`` and the out-of-memory killer see) of one call, on models large enough that the numbers dominate the
noise, and compares it with what the operation needs.

Method. Every group of measurements runs in a fresh interpreter (this file run as a script, ``python
test_memory_audit.py CASE DIR``) with glibc's mmap threshold fixed at 1 MiB (``MALLOC_MMAP_THRESHOLD_``), so that
every tensor of 1 MiB or more is its own mapping, given back to the system when freed. Each operation is first run
once on the two-layer test model (lazy imports and caches are not counted); then, per measurement: ``gc.collect()``
and ``malloc_trim(0)``, the resident size read from ``/proc/self/statm`` as the baseline, the peak reset (``echo 5 >
/proc/self/clear_refs`` resets ``VmHWM``; checked here by a calibration: a 256 MiB temporary freed before the call
returns shows in the peak), the call, then ``VmHWM`` from ``/proc/self/status``: peak extra = VmHWM - baseline; held =
the resident size after the call (its result still referenced) minus the baseline. Pages of a safetensors file read
through its mapping count (file-backed, clean) as they do in RSS. Sizes: S32 / S16 = bytes of the LoRWeB tensors in
fp32 / 16 bits; "file" = the checkpoint file's tensor bytes; "layer" = one adapted base weight.

Models: the checkpoint stack (40 x nn.Linear(1024, 1024), N=32, r=16, key_dim=128, query_dim=2304: S32 = 206 MiB,
S16 = 103 MiB), a FluxTransformer2DModel from a config (2 double + 4 single blocks, hidden 512, the 52 default
targets, N=32, r=32, bf16: S16 = 214 MiB), the merge stack (8 x nn.Linear(3072, 3072), FLUX's commonest shape: one
layer 36 MiB fp32 / 18 MiB bf16, all 288 / 144 MiB) and the query stack (240 layers with the official N=32,
key_dim=128, query_dim=2304: att_lora_to_q weights 270 MiB fp32).

Measured (this machine, CPU, torch 2.14.1, safetensors 0.8.0; MiB, and x the size named):

| operation | peak extra | necessary | verdict |
|---|---|---|---|
| ``lorweb_state_dict`` | 0.1 | 0 (detached views) | ok |
| ``save_lorweb_weights`` fp32 -> fp32 | 8 (0.04 S32) | 0 | ok |
| save fp32 -> fp16 / fp32 -> bf16 | 109 / 110 (1.06 S16) | 1 x S16 (the converted state) | ok |
| save bf16 -> fp32 | 210 (1.02 S32) | 1 x S32 | ok |
| FLUX save bf16 -> fp16 | 229 (1.07 S16) | 1 x S16 | ok |
| save fp32 -> fp16 with ``aitk_hashes=True`` | 139 (1.3 S16); was 310 (3.0 S16) | 1 x S16 | ok |
| ``training._write_checkpoint`` fp16 (fp32 weights) | 139 (1.3 S16); was 313 (3.0 S16) | 1 x S16 | ok |
| ``training._write_checkpoint`` fp32 | 34 (0.16 S32); was 416 (2.0 S32) | ~0 | ok |
| load a file into loaded layers, same dtype (fp32 / bf16) | 210 / 106 (1.02 file) | the file's pages | ok |
| load an fp16 file into fp32 layers | 108 (1.0 file); was 310 (file + a staged S32) | the file | ok |
| load an fp32 file into bf16 layers | 214 (1.0 file); was 310 (file + a staged S16) | the file | ok |
| load a state dict, same dtype | 4 (0.02 S32) | 0 | ok |
| load an fp16 state dict into fp32 layers | 5 (0.02 S32); was 207 (a staged S32) | 0 (``copy_`` converts) | ok |
| fresh fp32 model, fp32 file | 414 = held 206 + 1.0 file | new layers + file | ok |
| fresh fp32 model, fp32 state dict | 207 = held 206 | new layers | ok |
| fresh fp32 model, bf16 file | 311 = held 206 + 1.0 file; was 516 | held + file | ok |
| fresh bf16 model, fp32 file | 310 = held 103 + 1.0 file; was 412 | held + file | ok |
| FLUX: fresh bf16 transformer, bf16 file | 429 = held 214 + 1.0 file | held + file | ok |
| FLUX: fresh bf16 transformer, fp16 file (official) | 428 = held 214 + 1.0 file; was 643 | held + file | ok |
| ``merged("full")`` / ``"offload"``, fp32 | 294 / 325 = all + 0.2 / 1.0 layer | all + one layer | ok |
| ``merged("full")`` / ``"offload"``, bf16 | 150 / 163 = all + 0.3 / 1.1 layers; was all + 5.0 | all + one layer | ok |
| ``merged("jit")`` fp32 / bf16 | 40 / 23 (1.07 / 1.2 layers); was 72 / 109 (2.0 / 6.0) | one merged layer | ok |
| ``fuse_lora()`` / ``unfuse_lora()`` | as "full"; holds all; gives all back | same | ok |
| ``set_query``, 240 layers, no_grad | 18 (0.06 x all att_lora_to_q); was 274 (1.01 x) | ~0 (240 x B x 32) | ok |
| ``set_query`` with autograd (training): held after | 5 | ~0 | ok |

"file": the tensor bytes of the file read; "held": what the call leaves (a fresh model's new layers); "was": before
the fixes this audit led to (sessions 34-35: the AI-Toolkit hashes read back from the written file; no clone of the
fp32 masters in a training checkpoint; a load stages only cross-device conversions, ``copy_`` converts on one device;
merged weights built in blocks of rows, ``lorweb_fast.layer.MERGE_BLOCK_BYTES``; ``set_query`` stacks
``lorweb_fast.model.QUERY_STACK_BYTES`` of query projections at a time). The bounds below are those the necessary
memory justifies plus room for allocator noise (``SLACK``, a quarter copy where per-tensor temporaries come in); each
catches one whole extra copy. Runtime: about 25 s on 2 idle cores, 56-80 s on busy ones (five measuring processes, two
at a time, one torch thread each), at most 1.6 GiB per process.
"""

import ctypes
import gc
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

MB = 2 ** 20
#: allocator and interpreter noise allowed on top of every bound (observed: under 8 MiB)
SLACK = 16 * MB
#: glibc: every allocation of this size or more is its own mapping, returned to the system when freed
MMAP_THRESHOLD = 1 << 20


# =============================================================================================== measuring side
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _settle() -> None:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


class Meter:
    """``meter(name, fn)`` runs ``fn()`` and records, in bytes over the resident size before it: ``peak`` (VmHWM),
    ``held`` (after it, its result still referenced) and, for an ``fn`` returning an int (a resident size it read
    at some point inside), ``inside``."""

    def __init__(self):
        self.results = {}

    def __call__(self, name, fn):
        _settle()
        base = _rss()
        _reset_peak()
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
        peak = _hwm() - base
        _settle()
        held = _rss() - base
        self.results[name] = {"peak": peak, "held": held, "base": base, "seconds": seconds,
                              "inside": out - base if isinstance(out, int) else None}
        print(f"{name:36s} peak {peak / MB:8.1f} MiB  held {held / MB:8.1f} MiB  {seconds:5.2f} s", file=sys.stderr)
        return out


def _stack(layers, dim, dtype, config=None):
    """``layers`` x nn.Linear(dim, dim) in ``dtype``, with LoRWeB injected by ``config`` (a non-zero lora_B)."""
    import torch
    from torch import nn

    import lorweb_fast as lf

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(dim, dim) for _ in range(layers)])
    if config is not None:
        lf.inject_lorweb(model, config)
        with torch.no_grad():
            for layer in lf.lorweb_layers(model).values():
                layer.lora_B.normal_(0, 0.01)
    return model.to(dtype).requires_grad_(False).eval()


def _numel(model) -> int:
    import lorweb_fast as lf

    return sum(t.numel() for t in lf.lorweb_state_dict(model).values())


def _warm_up(tmp):
    """Every measured operation once on the two-layer test model: lazy imports and caches are not measured."""
    import torch

    import lorweb_fast as lf
    from lorweb_fast import lora_api, training
    from lorweb_fast.testing import pair_query, tiny_pair_model

    model = tiny_pair_model()
    path = os.path.join(tmp, "warm.safetensors")
    lf.save_lorweb_weights(model, path, dtype=torch.float16, aitk_hashes=True)
    lf.load_lorweb_weights(model, path)
    lf.load_lorweb_weights(tiny_pair_model(), {k: v.clone() for k, v in lf.lorweb_state_dict(model).items()})
    training._write_checkpoint(Path(tmp) / "warm", 1, model, lf.lorweb_state_dict(model), {}, {}, 1,
                               save_dtype="fp16")
    with torch.no_grad():
        lf.set_query(model, pair_query())
        for strategy in ("full", "offload", "jit"):
            with lf.merged(model, strategy):
                model(torch.randn(1, 6))
        lora_api.fuse_lora(model)
        lora_api.unfuse_lora(model)


#: the checkpoint stack: S32 = 40 x (2 x 32 x 1024 x 16 + 32 x 128 + 128 x 2304) x 4 B = 206 MiB
CKPT = dict(layers=40, dim=1024, num_loras=32, rank=16, key_dim=128, query_dim=2304)


def _ckpt_config():
    import lorweb_fast as lf

    return lf.LoRWeBConfig(num_loras=CKPT["num_loras"], rank=CKPT["rank"], key_dim=CKPT["key_dim"],
                           query_dim=CKPT["query_dim"], target_modules=r"\d+")


def case_checkpoint(tmp):
    """Saves, training checkpoints and loads into already-loaded layers, on the checkpoint stack."""
    import torch

    import lorweb_fast as lf
    from lorweb_fast import training

    _warm_up(tmp)
    m = Meter()

    def calibration():  # 256 MiB, freed before the call returns
        torch.ones(64 * MB).sum()

    m("calibration", calibration)
    model = _stack(CKPT["layers"], CKPT["dim"], torch.float32, _ckpt_config())
    m("lorweb_state_dict", lambda: lf.lorweb_state_dict(model))
    files = {name: os.path.join(tmp, f"{name}.safetensors") for name in ("fp32", "fp16", "bf16")}
    for name, dtype in (("fp32", None), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        m(f"save fp32->{name}", lambda: lf.save_lorweb_weights(model, files[name], dtype=dtype))
    m("save fp32->fp16 aitk", lambda: lf.save_lorweb_weights(model, os.path.join(tmp, "aitk.safetensors"),
                                                              dtype=torch.float16, aitk_hashes=True))
    weights = lf.lorweb_state_dict(model)  # as train() passes them: the live parameters, detached
    for save_dtype in ("fp16", "fp32"):
        m(f"write_checkpoint {save_dtype}", lambda: training._write_checkpoint(
            Path(tmp) / f"run-{save_dtype}", 1, model, weights, {}, {}, 2, save_dtype=save_dtype))
    weights = None  # its views would keep the fp32 storages alive after the cast below
    for name in ("fp32", "fp16"):
        m(f"load file {name}->fp32", lambda: lf.load_lorweb_weights(model, files[name]))
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        state = {k: v.to(dtype, copy=True) for k, v in lf.lorweb_state_dict(model).items()}
        m(f"load dict {name}->fp32", lambda: lf.load_lorweb_weights(model, state))
        state = None
    model.to(torch.bfloat16)
    m("save bf16->fp32", lambda: lf.save_lorweb_weights(model, os.path.join(tmp, "up.safetensors"),
                                                         dtype=torch.float32))
    for name in ("bf16", "fp32"):
        m(f"load file {name}->bf16", lambda: lf.load_lorweb_weights(model, files[name]))
    return {"numel": _numel(model), "results": m.results}


def case_fresh(tmp):
    """Loads into models without LoRWeB layers (the checkpoint stack's base layers)."""
    import torch
    from safetensors.torch import load_file

    import lorweb_fast as lf

    _warm_up(tmp)
    model = _stack(CKPT["layers"], CKPT["dim"], torch.float32, _ckpt_config())
    numel = _numel(model)
    files = {name: os.path.join(tmp, f"{name}.safetensors") for name in ("fp32", "bf16")}
    lf.save_lorweb_weights(model, files["fp32"])
    lf.save_lorweb_weights(model, files["bf16"], dtype=torch.bfloat16)
    del model
    m = Meter()
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    for file, layers in (("fp32", "fp32"), ("bf16", "fp32"), ("fp32", "bf16")):
        model = _stack(CKPT["layers"], CKPT["dim"], dtypes[layers])
        m(f"fresh file {file}->{layers}", lambda: lf.load_lorweb_weights(model, files[file]))
        del model
    state = {k: v.clone() for k, v in load_file(files["fp32"]).items()}
    model = _stack(CKPT["layers"], CKPT["dim"], torch.float32)
    m("fresh dict fp32->fp32", lambda: lf.load_lorweb_weights(model, state))
    return {"numel": numel, "results": m.results}


#: a FluxTransformer2DModel of 2 double and 4 single blocks of width 512 (4 heads x 128)
FLUX = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=128,
            num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56))


def case_flux(tmp):
    """FluxTransformer2DModel from a config, the 52 default targets, N=32, r=32, bf16 (as inference runs it)."""
    import torch
    from diffusers import FluxTransformer2DModel

    import lorweb_fast as lf

    _warm_up(tmp)

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**FLUX).to(torch.bfloat16).requires_grad_(False).eval()
    names = lf.inject_lorweb(model, lf.LoRWeBConfig(rank=32))
    with torch.no_grad():
        for layer in lf.lorweb_layers(model).values():
            layer.lora_B.normal_(0, 0.01)
    numel = _numel(model)
    m = Meter()
    files = {name: os.path.join(tmp, f"flux-{name}.safetensors") for name in ("fp16", "bf16")}
    lf.save_lorweb_weights(model, files["bf16"])
    m("flux save bf16->fp16", lambda: lf.save_lorweb_weights(model, files["fp16"], dtype=torch.float16))
    for file in ("bf16", "fp16"):
        lf.remove_lorweb(model)  # the stock transformer again: a fresh model for the load
        m(f"flux fresh file {file}->bf16", lambda: lf.load_lorweb_weights(model, files[file]))
    return {"numel": numel, "layers": len(names), "results": m.results}


#: the merge stack: 8 x 3072 x 3072 (FLUX's to_q/k/v, to_out shape): 36 MiB per fp32 layer
MERGE = dict(layers=8, dim=3072)


def case_merge(tmp):
    """``merged`` in every strategy, ``fuse_lora`` / ``unfuse_lora``, on the merge stack in fp32, then in bf16."""
    import torch

    import lorweb_fast as lf
    from lorweb_fast import lora_api

    _warm_up(tmp)
    config = lf.LoRWeBConfig(num_loras=4, rank=4, key_dim=8, query_dim=6, target_modules=r"\d+")
    model = _stack(MERGE["layers"], MERGE["dim"], torch.float32, config)
    m = Meter()
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        model.to(dtype)
        x = torch.randn(1, 2, MERGE["dim"], dtype=dtype)
        with torch.no_grad():
            lf.set_query(model, torch.randn(1, 6))

            def block(strategy):
                with lf.merged(model, strategy):
                    model(x)
                    _settle()
                    return _rss()  # what the block holds

            for strategy in ("full", "offload", "jit"):
                m(f"{name} merged {strategy}", lambda: block(strategy))
            m(f"{name} fuse_lora", lambda: lora_api.fuse_lora(model))  # "full": merged() kept open
            m(f"{name} unfuse_lora", lambda: lora_api.unfuse_lora(model))
        weight = model[0].base_layer.weight
        out[name] = weight.numel() * weight.element_size()
    return {"layer": out, "results": m.results}


#: the query stack: 240 layers with the official N, key_dim and query_dim (tiny 32 x 32 base layers)
SETQ = dict(layers=240, dim=32, num_loras=32, key_dim=128, query_dim=2304)


def case_set_query(tmp):
    """``set_query`` on the query stack, without autograd (inference) and with it (training)."""
    import torch

    import lorweb_fast as lf

    _warm_up(tmp)
    config = lf.LoRWeBConfig(num_loras=SETQ["num_loras"], rank=4, key_dim=SETQ["key_dim"],
                             query_dim=SETQ["query_dim"], target_modules=r"\d+")
    model = _stack(SETQ["layers"], SETQ["dim"], torch.float32, config)
    query = torch.randn(1, SETQ["query_dim"])
    m = Meter()
    with torch.no_grad():
        m("set_query no_grad", lambda: lf.set_query(model, query))
    model.train()
    for layer in lf.lorweb_layers(model).values():
        for t in layer.lorweb_tensors().values():
            t.requires_grad_(True)
    m("set_query autograd", lambda: lf.set_query(model, query))
    to_q = sum(l.att_lora_to_q.weight.numel() * 4 for l in lf.lorweb_layers(model).values())
    return {"to_q": to_q, "results": m.results}


# ================================================================================================ test side
#: the measuring processes, longest first (two run at a time)
CASES = ("checkpoint", "flux", "fresh", "merge", "set_query")


def _clear_refs_works() -> bool:
    try:
        _reset_peak()
        return _hwm() > 0
    except OSError:
        return False


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    """{case: the case's measurements, or the error text of its process}: every case in a process of its own,
    two at a time."""
    if not sys.platform.startswith("linux") or not _clear_refs_works():
        pytest.skip("needs Linux's /proc/self/clear_refs (resetting VmHWM) to measure peak RSS")
    cases = [case for case in CASES if case != "flux" or importlib.util.find_spec("diffusers") is not None]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), PYTHONHASHSEED="0")
    folders = {case: tmp_path_factory.mktemp(f"memory-{case}") for case in cases}  # here: mktemp is no thread's

    def run(case):
        try:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), case, str(folders[case])],
                                  capture_output=True, text=True, env=env, cwd=str(folders[case]), timeout=600)
        finally:  # about 2.5 GB of checkpoints in all: not kept in pytest's last three base folders
            shutil.rmtree(folders[case], ignore_errors=True)
        if proc.returncode != 0:
            return f"{case} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        return json.loads(proc.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(cases, pool.map(run, cases)))
    # the numbers of this run, for the record (the module docstring's table)
    (tmp_path_factory.getbasetemp() / "memory_audit.json").write_text(json.dumps(results, indent=1))
    return results


def measured(audit, case):
    out = audit.get(case)
    if out is None:
        pytest.skip(f"{case}: not measured here")
    if isinstance(out, str):
        pytest.fail(out)
    return out


def mib(n) -> str:
    return f"{n / MB:.1f} MiB"


def assert_peak_within(result, bound, what):
    assert result["peak"] <= bound, (f"{what}: peak extra {mib(result['peak'])} > bound {mib(bound)} "
                                     f"(held after: {mib(result['held'])})")


def test_the_peak_meter_sees_a_short_lived_temporary(audit):
    r = measured(audit, "checkpoint")["results"]["calibration"]
    assert 256 * MB - 4 * MB <= r["peak"] <= 256 * MB + SLACK
    assert abs(r["held"]) <= SLACK


# ------------------------------------------------------------------------------------------------ saving
def lorweb_bytes(out, dtype_bytes):
    """Bytes of the measured model's LoRWeB tensors at ``dtype_bytes`` per value (S32: 4, S16: 2)."""
    return out["numel"] * dtype_bytes


def test_lorweb_state_dict_copies_nothing(audit):
    out = measured(audit, "checkpoint")
    assert_peak_within(out["results"]["lorweb_state_dict"], 0.05 * lorweb_bytes(out, 4) + SLACK, "lorweb_state_dict")


def test_save_in_the_layers_dtype_copies_nothing(audit):
    out = measured(audit, "checkpoint")
    # necessary: nothing (the tensors are written from the parameters); allowed: a quarter copy (per-tensor checks)
    assert_peak_within(out["results"]["save fp32->fp32"], 0.25 * lorweb_bytes(out, 4) + SLACK, "save fp32 -> fp32")


@pytest.mark.parametrize("name, saved_bytes", [("save fp32->fp16", 2), ("save fp32->bf16", 2),
                                               ("save bf16->fp32", 4)])
def test_save_with_a_dtype_conversion_needs_one_copy_in_the_saved_dtype(audit, name, saved_bytes):
    out = measured(audit, "checkpoint")
    r = out["results"][name]
    assert lorweb_bytes(out, saved_bytes) <= r["peak"] + SLACK  # the converted copy is there (the meter sees it)
    assert_peak_within(r, 1.25 * lorweb_bytes(out, saved_bytes) + SLACK, name)


def test_save_with_ai_toolkit_hashes_needs_one_copy_in_the_saved_dtype(audit):
    out = measured(audit, "checkpoint")
    assert_peak_within(out["results"]["save fp32->fp16 aitk"], 1.25 * lorweb_bytes(out, 2) + SLACK,
                       "save with aitk hashes")


@pytest.mark.parametrize("save_dtype, saved_bytes, need", [("fp16", 2, 1.25), ("fp32", 4, 0.25)])
def test_training_checkpoint_write_needs_at_most_one_copy_in_the_saved_dtype(audit, save_dtype, saved_bytes, need):
    """_write_checkpoint (weights, config.yaml, trainer_state.pt with the fp32 masters when saving fp16): the
    necessary memory is the converted copy in the saved dtype (none when it is the weights' dtype)."""
    out = measured(audit, "checkpoint")
    assert_peak_within(out["results"][f"write_checkpoint {save_dtype}"],
                       need * lorweb_bytes(out, saved_bytes) + SLACK, f"_write_checkpoint save_dtype={save_dtype}")


# ------------------------------------------------------------------------------------------------ loading
def load_bound(file_bytes, layer_bytes, held):
    """A load needs what it keeps (``held``: new layers) plus the checkpoint's own tensors (a file's pages, read
    through its mapping; none for a state dict) and one tensor's check temporaries; a quarter copy in the layers'
    dtype more is allowed, a whole one is caught."""
    return held + file_bytes + 0.25 * layer_bytes + SLACK


@pytest.mark.parametrize("name, file_bytes, layer_bytes", [
    ("load file fp32->fp32", 4, 4), ("load file bf16->bf16", 2, 2), ("load file fp16->fp32", 2, 4),
    ("load file fp32->bf16", 4, 2), ("load dict fp32->fp32", 0, 4), ("load dict fp16->fp32", 0, 4)])
def test_a_load_into_loaded_layers_needs_the_checkpoints_own_tensors_only(audit, name, file_bytes, layer_bytes):
    """A file: its pages; a state dict: nothing (``copy_`` converts in place)."""
    out = measured(audit, "checkpoint")
    r = out["results"][name]
    assert_peak_within(r, load_bound(lorweb_bytes(out, file_bytes), lorweb_bytes(out, layer_bytes), 0), name)


def test_loads_into_loaded_layers_leave_nothing_held(audit):
    """The values are copied into the layers' own tensors: whatever a load needs is given back when it returns."""
    results = measured(audit, "checkpoint")["results"]
    loads = {name: r["held"] for name, r in results.items() if name.startswith("load ")}
    assert len(loads) == 6
    assert all(abs(held) <= SLACK for held in loads.values()), {k: mib(v) for k, v in loads.items()}


@pytest.mark.parametrize("name, file_bytes, layer_bytes", [
    ("fresh file fp32->fp32", 4, 4), ("fresh dict fp32->fp32", 0, 4), ("fresh file bf16->fp32", 2, 4),
    ("fresh file fp32->bf16", 4, 2)])
def test_load_into_a_fresh_model_needs_the_new_layers_and_the_file(audit, name, file_bytes, layer_bytes):
    out = measured(audit, "fresh")
    layers = lorweb_bytes(out, layer_bytes)
    assert_peak_within(out["results"][name], load_bound(lorweb_bytes(out, file_bytes), layers, layers), name)


@pytest.mark.parametrize("case, name, layer_bytes", [
    ("fresh", "fresh file fp32->fp32", 4), ("fresh", "fresh file bf16->fp32", 4), ("fresh", "fresh file fp32->bf16", 2),
    ("fresh", "fresh dict fp32->fp32", 4), ("flux", "flux fresh file bf16->bf16", 2),
    ("flux", "flux fresh file fp16->bf16", 2)])
def test_a_fresh_load_keeps_one_copy_in_the_layers_dtype(audit, case, name, layer_bytes):
    """What a load into a model without LoRWeB layers leaves: the new layers, in the base weights' dtype."""
    out = measured(audit, case)
    layers, held = lorweb_bytes(out, layer_bytes), out["results"][name]["held"]
    assert 0.95 * layers - SLACK <= held <= 1.05 * layers + SLACK, mib(held)


def test_flux_save_with_a_conversion_needs_one_copy(audit):
    out = measured(audit, "flux")
    assert out["layers"] == 52
    assert_peak_within(out["results"]["flux save bf16->fp16"], 1.25 * lorweb_bytes(out, 2) + SLACK,
                       "FLUX save bf16 -> fp16")


@pytest.mark.parametrize("file", [
    "bf16",
    "fp16",
])
def test_flux_load_into_a_fresh_transformer_needs_the_new_layers_and_the_file(audit, file):
    out = measured(audit, "flux")
    layers = lorweb_bytes(out, 2)
    assert_peak_within(out["results"][f"flux fresh file {file}->bf16"], load_bound(layers, layers, layers),
                       f"FLUX load of a {file} file")  # the file (fp16 or bf16) and the layers: 2 bytes a value


# ------------------------------------------------------------------------------------------------ merging
DTYPES = ["float32", "bfloat16"]
#: lorweb_fast.layer.MERGE_BLOCK_BYTES: the fp32 work of one block of rows of a merged weight being built
MERGE_BLOCK = 4 * MB


def merge_results(audit, dtype):
    """(this dtype's measurements by operation, bytes of one adapted weight, of all of them)."""
    out = measured(audit, "merge")
    layer = out["layer"][dtype]
    results = {k.split(" ", 1)[1]: v for k, v in out["results"].items() if k.startswith(dtype + " ")}
    return results, layer, layer * MERGE["layers"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strategy", ["full", "offload"])
def test_merged_full_and_offload_hold_one_copy_of_the_adapted_weights(audit, strategy, dtype):
    """README: "full" = one copy of every adapted weight; "offload" = a host copy (on a CPU model the same memory);
    both plus one layer's merge temporaries: at most one layer and one block of fp32 work (``MERGE_BLOCK``; before
    the blocks, up to 3 fp32 copies of one layer: bf16 all + 5 layers)."""
    results, layer, total = merge_results(audit, dtype)
    r = results[f"merged {strategy}"]
    assert total - SLACK <= r["inside"] <= total + SLACK  # held inside the block: one copy
    assert abs(r["held"]) <= SLACK  # given back on exit
    assert_peak_within(r, total + layer + MERGE_BLOCK + SLACK, f'merged("{strategy}") {dtype}')


@pytest.mark.parametrize("dtype", DTYPES)
def test_merged_jit_needs_one_layers_merged_weight(audit, dtype):
    """README: "jit" = one layer's merged weight (each layer builds it inside its forward and frees it)."""
    results, layer, _ = merge_results(audit, dtype)
    assert_peak_within(results["merged jit"], 1.5 * layer + 2 * MERGE_BLOCK, f'merged("jit") {dtype}')


@pytest.mark.parametrize("dtype", DTYPES)
def test_merged_jit_holds_nothing_inside_the_block_or_after(audit, dtype):
    r = merge_results(audit, dtype)[0]["merged jit"]
    assert abs(r["inside"]) <= SLACK and abs(r["held"]) <= SLACK


@pytest.mark.parametrize("dtype", DTYPES)
def test_fuse_lora_holds_one_copy_and_unfuse_lora_gives_it_back(audit, dtype):
    """fuse_lora() is merged("full") kept open until unfuse_lora()."""
    results, layer, total = merge_results(audit, dtype)
    fuse, unfuse = results["fuse_lora"], results["unfuse_lora"]
    assert total - SLACK <= fuse["held"] <= total + SLACK
    assert_peak_within(fuse, total + layer + MERGE_BLOCK + SLACK, f"fuse_lora() {dtype}")
    assert -total - SLACK <= unfuse["held"] <= -total + SLACK  # every copy given back
    assert_peak_within(unfuse, SLACK, f"unfuse_lora() {dtype}")


# ------------------------------------------------------------------------------------------------ set_query
def test_set_query_needs_no_copy_of_the_query_projections(audit):
    """set_query stacks ``lorweb_fast.model.QUERY_STACK_BYTES`` (16 MiB) of query projections at a time: a bounded
    fraction of all of them (a whole stack would be 1.0 x)."""
    out = measured(audit, "set_query")
    assert_peak_within(out["results"]["set_query no_grad"], 0.1 * out["to_q"] + SLACK, "set_query (no_grad)")


def test_set_query_keeps_no_copy_of_the_query_projections_after_it_returns(audit):
    """Without autograd, and with it (training: the coefficients' graph does not keep the stacked projections)."""
    out = measured(audit, "set_query")
    for name in ("set_query no_grad", "set_query autograd"):
        r = out["results"][name]
        assert r["held"] <= 0.05 * out["to_q"] + SLACK, (name, mib(r["held"]))
        assert r["peak"] <= 0.1 * out["to_q"] + SLACK, (name, mib(r["peak"]))  # a stacked chunk, nothing more


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)  # two measuring processes share the CPU cores
    case, directory = sys.argv[1], sys.argv[2]
    started = time.time()
    result = globals()[f"case_{case}"](directory, *sys.argv[3:])
    result["seconds"] = time.time() - started
    print(json.dumps(result))
