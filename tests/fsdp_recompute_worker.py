"""One-process FSDP2 (gloo) run for test_training.py::test_fsdp2_checkpointed_blocks_recompute_with_cast_inputs.

    python tests/fsdp_recompute_worker.py PORT hook|nohook

Two sharded blocks with a bf16 MixedPrecisionPolicy, called through non-reentrant activation checkpointing with an
fp32 side input made inside the root (as FLUX's rotary embedding is), then backward. Prints one JSON line: the
dtypes each block saw on every call (forward and recompute), the largest gradient difference from the same model run
without checkpointing, or the error the backward raised.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from lorweb_fast.training import cast_block_inputs_in_recompute

SEEN = []


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x, rope):
        SEEN.append(str(rope[0].dtype))
        return self.lin(x) * rope[0] + rope[1]


class Root(nn.Module):
    def __init__(self, use_checkpoint: bool):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.use_checkpoint = use_checkpoint

    def forward(self, x):
        rope = (torch.linspace(0.5, 1.5, 8), torch.linspace(-1.0, 1.0, 8))
        for block in self.blocks:
            x = checkpoint(block, x, rope, use_reentrant=False) if self.use_checkpoint else block(x, rope)
        return x


def grads(use_checkpoint: bool, hook: bool):
    torch.manual_seed(0)
    model = Root(use_checkpoint)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    hooked = cast_block_inputs_in_recompute(model) if hook else 0
    if hook:
        assert cast_block_inputs_in_recompute(model) == 0  # a second call adds no hooks
    model(torch.randn(4, 8)).float().square().sum().backward()
    return hooked, [p.grad.full_tensor().clone() for p in model.parameters()], model


def direct_cast(model) -> list:
    """The added hook called by hand on fp32 inputs (positional, a tuple, a keyword): the dtypes it returns."""
    block = model.blocks[0]
    hook = block._forward_pre_hooks[block._lorweb_recompute_cast.id]
    args, kwargs = hook(block, (torch.ones(2), (torch.ones(2), 3)), {"rope": torch.ones(2), "n": torch.arange(2)})
    return [str(args[0].dtype), str(args[1][0].dtype), str(kwargs["rope"].dtype), str(kwargs["n"].dtype)]


def main() -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        _, reference, _ = grads(use_checkpoint=False, hook=False)
        SEEN.clear()
        result = {}
        try:
            hooked, got, model = grads(use_checkpoint=True, hook=sys.argv[2] == "hook")
            result["hooked"] = hooked
            result["max_grad_diff"] = max((a - b).abs().max().item() for a, b in zip(reference, got))
            if hooked:
                result["direct_cast"] = direct_cast(model)
        except Exception as exc:  # reported to the test, which decides
            result["error"] = f"{type(exc).__name__}: {exc}"[:300]
        result["seen"] = SEEN
        print(json.dumps(result))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
