"""A fresh README.md accuracy audit (everything before "## Status"): claims the earlier README tests
(``tests/test_readme.py``, ``tests/test_readme_examples_audit.py``) do not check, read from README.md at test time and
compared with the code.

Each test here fails while the README and the code disagree and passes once either is brought in line.
"""

import re
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

import lorweb_fast as lf
from lorweb_fast import layer as layer_module

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BEFORE_STATUS = README[:README.index("\n## Status")]


class _RecordAddmm(TorchFunctionMode):
    """Records the (rows, in) shape of every in-place ``addmm_`` target: merged_weight_for's row blocks."""

    def __init__(self):
        super().__init__()
        self.blocks = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.addmm_:
            self.blocks.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def test_merge_blocks_are_as_large_as_the_readme_says_at_flux_width():
    """README.md, *Merge strategies*: "A merged weight is built in blocks of rows written into it (4 MiB of fp32 work
    each, or 1/8 of the layer's fp32 size when that is larger: 8 blocks at most; 4.7 MB at 3072→3072, ...)".

    lorweb_fast/layer.py ``LoRWeBLinear.merged_weight_for`` takes ``rows = max(MERGE_BLOCK_BYTES // (in * 4),
    ceil(out / MERGE_MAX_BLOCKS))``; the README once stated only the 4 MiB, which every FLUX.1 layer exceeds. The
    stated constants must be the code's, and the blocks of a FLUX.1-width 3072->3072 layer the stated 4.7 MB."""
    match = re.search(r"blocks\s+of\s+rows\s+written\s+into\s+it\s+\((\d+)\s+MiB\s+of\s+fp32\s+work\s+each,\s+or\s+"
                      r"1/(\d+)\s+of\s+the\s+layer's\s+fp32\s+size\s+when\s+that\s+is\s+larger:\s+\2\s+blocks\s+at\s+"
                      r"most;\s+([\d.]+)\s+MB\s+at\s+3072→3072", BEFORE_STATUS)
    assert match, "the README no longer states the merge block rule this test checks"
    claimed_bytes, claimed_blocks = int(match.group(1)) * 2 ** 20, int(match.group(2))
    assert (claimed_bytes, claimed_blocks) == (layer_module.MERGE_BLOCK_BYTES, layer_module.MERGE_MAX_BLOCKS)

    torch.manual_seed(0)
    layer = lf.LoRWeBLinear(torch.nn.Linear(3072, 3072, bias=False), num_loras=32, rank=4, key_dim=8, query_dim=6)
    with torch.no_grad():
        layer.lora_B.normal_()
    recorder = _RecordAddmm()
    with torch.no_grad(), recorder:
        layer.merged_weight_for(torch.rand(32))
    assert recorder.blocks, "merged_weight_for no longer builds its blocks with addmm_: update the recorder"
    assert len(recorder.blocks) <= claimed_blocks
    sizes = {rows * cols * 4 for rows, cols in recorder.blocks}
    assert max(sizes) == max(claimed_bytes, -(-3072 // claimed_blocks) * 3072 * 4)
    assert round(max(sizes) / 1e6, 1) == float(match.group(3))
