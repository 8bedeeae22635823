"""Multi-GPU inference pieces: diffusers' context parallelism on 2 CPU processes (gloo) matches the single-process
run with LoRWeB layers seeing (B, S/2, in); tensor-parallel plans that shard wrapped layers raise clearly."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lorweb_fast as lf
from lorweb_fast import parallel
from lorweb_fast.testing import free_port, tiny_flux_config

diffusers = pytest.importorskip("diffusers")
WORKER = Path(__file__).with_name("context_parallel_worker.py")


@pytest.mark.parametrize("mode", ["fused", "jit"])
def test_context_parallel_matches_single_process(tmp_path, mode):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(rank), "2", str(port), str(tmp_path), mode],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert "error" not in result, (result.get("traceback"), logs[rank][-3000:])
        # the sequence is split: 8 image + 4 text tokens -> 6 per rank in the double block (per stream: 4 and 2),
        # 12 -> 6 in the single block; the batch of 2 analogies stays whole
        assert result["shapes"]["transformer_blocks.0.attn.to_q"] == [2, 4, 32]
        assert result["shapes"]["single_transformer_blocks.0.proj_mlp"] == [2, 6, 32]
        assert result["diff"] <= 1e-5 * max(1.0, result["scale"]), result
        # LoRWeBLinear refuses a base weight sharded by a tensor-parallel plan (a DTensor with Shard placement)
        assert "tensor-parallel sharded weight" in result["tp_refusal"]


def test_tensor_parallel_config_raises_before_sharding():
    from diffusers.models._modeling_parallel import TensorParallelConfig

    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(**tiny_flux_config()).eval()
    lf.inject_lorweb(model, lf.LoRWeBConfig(num_loras=3, rank=2, key_dim=8, query_dim=12))
    with pytest.raises(parallel.TensorParallelNotSupportedError, match="tensor parallelism is not supported"):
        parallel.enable_parallelism(model, TensorParallelConfig(tp_degree=2))
    assert getattr(model, "_parallel_config", None) is None  # nothing was applied
    hits = parallel.lorweb_layers_in_plan(model, model._tp_plan)
    assert "transformer_blocks.0.attn.to_q" in hits and "single_transformer_blocks.0.proj_out" in hits
    # a plan that only touches unwrapped layers is accepted by the check
    parallel.check_tensor_parallel(model, {"proj_out": "colwise"})
    lf.remove_lorweb(model)
    parallel.check_tensor_parallel(model)  # no LoRWeB layers: nothing to refuse
