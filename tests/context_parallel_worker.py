"""Worker of test_parallel.py: run on 2 CPU processes (gloo) by torch.multiprocessing.

Each rank builds the same tiny FLUX with LoRWeB layers, computes the single-process output, then enables diffusers'
context parallelism (the sequence split over the ranks: LoRWeB layers see (B, S/2, in)) and computes it again.
Writes {rank: (max abs difference, per-layer input shapes seen)} to a file.
"""

import json
import os
import sys

import torch


def main(rank, world_size, port, out_dir, mode):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        from diffusers import ContextParallelConfig

        import lorweb_fast as lf
        from lorweb_fast.testing import tiny_flux_with_lorweb

        # diffusers resolves a device as rank % torch.accelerator.device_count(), which is 0 on a CPU-only host;
        # one "device" (the CPU) per rank is what this run means.
        torch.accelerator.device_count = lambda: 1
        model = tiny_flux_with_lorweb()
        g = torch.Generator().manual_seed(0)
        batch = 2
        inputs = dict(hidden_states=torch.randn(batch, 8, 8, generator=g),
                      encoder_hidden_states=torch.randn(batch, 4, 24, generator=g),
                      pooled_projections=torch.randn(batch, 20, generator=g), timestep=torch.rand(batch, generator=g),
                      guidance=torch.full((batch,), 3.5), img_ids=torch.randn(8, 3, generator=g),
                      txt_ids=torch.zeros(4, 3))
        lf.set_query(model, torch.randn(batch, 12, generator=g))  # two different analogies
        with torch.no_grad():
            want = model(**inputs, return_dict=False)[0]
            if mode == "jit":
                with lf.merged(model, "jit"):
                    want_jit = model(**inputs, return_dict=False)[0]
        shapes = {}

        def record(name):
            def hook(module, args):
                shapes.setdefault(name, list(args[0].shape))  # returns None: the inputs stay as they are
            return hook

        layers = lf.lorweb_layers(model)
        for name in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp"):
            layers[name].register_forward_pre_hook(record(name))
        from lorweb_fast.parallel import enable_parallelism

        enable_parallelism(model, ContextParallelConfig(ulysses_degree=world_size))
        with torch.no_grad():
            if mode == "jit":
                with lf.merged(model, "jit"):
                    got = model(**inputs, return_dict=False)[0]
                want = want_jit
            else:
                got = model(**inputs, return_dict=False)[0]
        result = {"diff": float((got - want).abs().max()), "scale": float(want.abs().max()), "shapes": shapes}
        # a base weight sharded the way a tensor-parallel plan shards it (a DTensor with a Shard placement)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world_size,))
        layer = lf.LoRWeBLinear(torch.nn.Linear(4, 6), num_loras=2, rank=1, key_dim=4, query_dim=5)
        layer.set_coefficients(torch.rand(1, 2))
        layer.base_layer.weight = torch.nn.Parameter(distribute_tensor(layer.base_layer.weight.detach(), mesh,
                                                                       [Shard(0)]))
        try:
            layer(torch.randn(1, 2, 4))
            result["tp_refusal"] = None
        except NotImplementedError as exc:
            result["tp_refusal"] = str(exc)
    except Exception as exc:  # reported to the test
        import traceback

        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
