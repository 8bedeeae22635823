"""Run by tests/test_training.py under ``accelerate launch``: trains through ``lorweb_fast.training.train`` (what
``lorweb-fast train`` runs) and writes this rank's LoRWeB parameters to OUT/rank<i>.safetensors.

argv: the TrainConfig as JSON, then an optional mode:
- ``fsdp2-cpu``: accelerate enables FSDP only on accelerators, so on a CPU gloo group this turns its FSDP2 path on
  by hand (the same plugin ``accelerate launch --use_fsdp --fsdp_version 2`` builds, transformer-block wrapping)
  before ``train`` runs; everything after that is accelerate's own FSDP2 preparation.
- ``no-auto-wrap`` (with ``fsdp2-cpu``): no auto-wrap policy, only the root module is sharded.
- ``resume-at=K``: first train to step K, then continue with ``resume=True`` in the same process.
- ``nan-on-last-rank-call=K``: the last rank's K-th training loss is NaN (the other ranks' stay finite).
- ``slow-main-prepare``: the main process starts ``prepare_output`` 5 s late; the others write
  OUT/../prepare-rank<i>.txt: "old run" when ``checkpoints/`` still exists as they start reading OUT.
"""

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from lorweb_fast import lorweb_state_dict, training
from lorweb_fast.training import TrainConfig, train

cfg = TrainConfig(**json.loads(sys.argv[1]))
modes = sys.argv[2:]

if "fsdp2-cpu" in modes:
    state = Accelerator(cpu=True, mixed_precision=cfg.mixed_precision).state  # the process-wide state train() uses
    assert state.distributed_type == DistributedType.MULTI_CPU, state.distributed_type
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState does for FSDP
    wrap = None if "no-auto-wrap" in modes else "transformer_based_wrap"
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy=wrap, reshard_after_forward=True)
    if cfg.mixed_precision != "no":
        plugin.set_mixed_precision(cfg.mixed_precision)  # as AcceleratorState does
    state.fsdp_plugin = plugin

for mode in modes:
    # the launcher's environment (a PartialState made here, before train's Accelerator, would set up another state)
    if mode.startswith("nan-on-last-rank-call=") and int(os.environ["RANK"]) == int(os.environ["WORLD_SIZE"]) - 1:
        poisoned_call, real_loss, calls = int(mode.split("=")[1]), training.flow_matching_loss, []

        def poisoned(*args, **kwargs):
            calls.append(1)
            loss = real_loss(*args, **kwargs)
            return loss * float("nan") if len(calls) == poisoned_call else loss

        training.flow_matching_loss = poisoned
if "slow-main-prepare" in modes:
    real_prepare = training.prepare_output

    def slow_prepare(cfg, *, main_process=True, **kwargs):
        if main_process:
            time.sleep(5)
        else:
            seen = "old run" if (Path(cfg.out) / "checkpoints").exists() else "clean"
            (Path(cfg.out).parent / f"prepare-rank{os.environ['RANK']}.txt").write_text(seen)
        return real_prepare(cfg, main_process=main_process, **kwargs)

    training.prepare_output = slow_prepare
for mode in modes:
    if mode.startswith("resume-at="):
        train(dataclasses.replace(cfg, steps=int(mode.split("=")[1])))
        cfg = dataclasses.replace(cfg, resume=True)
transformer = train(cfg)["transformer"]

state = PartialState()
tensors = {k: v.contiguous() for k, v in lorweb_state_dict(transformer).items()}
meta = {"world_size": str(state.num_processes), "backend": str(state.backend),
        "distributed_type": str(state.distributed_type),
        "sharded": str(all(isinstance(p, DTensor) for p in transformer.parameters())),
        # the gradient-reduction dtypes of the FSDP2 units (train() sets fp32 under bf16/fp16 mixed precision)
        "reduce_dtypes": ",".join(sorted({str(m._get_fsdp_state()._mp_policy.reduce_dtype)
                                          for m in transformer.modules() if hasattr(m, "_get_fsdp_state")})),
        # accelerate's mixed-precision forward (autocast, fp32 outputs) is undone when train() returns
        "forward_restored": str(not {"forward", "_original_forward", "_is_accelerate_prepared"}
                                & set(transformer.__dict__))}
save_file(tensors, f"{cfg.out}/rank{state.process_index}.safetensors", metadata=meta)
if torch.distributed.is_initialized():  # as the end of `lorweb-fast train` (cli.run_train): every rank exits cleanly
    torch.distributed.destroy_process_group()
