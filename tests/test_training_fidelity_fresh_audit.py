"""Fresh audit of training fidelity against NVlabs/LoRWeB.

The audit found no training behaviour that disagrees with the official code (the known, documented deviations are in
the README table "Official LoRWeB vs lorweb_fast defaults"). The tests below are PINS, not defect tests: they pass now
and hold official behaviour that a reader of the official source could easily "fix" the wrong way and that no other
test holds.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
from PIL import Image

from lorweb_fast.data import AnalogyFolder


def _nested_strip_sample(root, *, txt: str = "from the txt file", relation: dict | None = None):
    """target/sub/x.png (b', 24x18) with control/x.png (a|a'|b strip, 60x14) and target/sub/x.txt; optionally an
    analogy_metadata.json beside control/ and target/."""
    rng = np.random.default_rng(0)
    (root / "control").mkdir(parents=True)
    (root / "target" / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (14, 60, 3), dtype=np.uint8)).save(root / "control" / "x.png")
    Image.fromarray(rng.integers(0, 256, (18, 24, 3), dtype=np.uint8)).save(root / "target" / "sub" / "x.png")
    (root / "target" / "sub" / "x.txt").write_text(txt)
    if relation is not None:
        (root / "analogy_metadata.json").write_text(json.dumps([relation]))
    return root


def _caption(root) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = AnalogyFolder(root, resize="long-edge", long_edge=64)
    assert len(ds) == 1 and ds.name(0) == "sub/x"
    return ds[0]["caption"]


def test_pin_relation_caption_is_keyed_by_the_target_basename_and_wins_over_the_txt(tmp_path):
    """PIN (passes now). Official toolkit/dataloader_mixins.py ``CaptionProcessingDTOMixin.load_caption`` with
    ``enable_relation_captions: true`` (LoRWeB_default_PROMPTS.yaml; the index is built in toolkit/data_loader.py
    ``AiToolkitDataset.__init__`` as ``{i['analogy_id']: i}``): the lookup key is
    ``'.'.join(os.path.basename(path).split('.')[:-1])``, the target's *file* stem without its folder, and the
    relation ``edit_prompt`` is taken before the ``.txt`` beside the target. So a nested target ``target/sub/x.png``
    takes the entry ``"x"`` (not ``"sub/x"``, which is lorweb_fast's sample *name*), over ``target/sub/x.txt``.
    lorweb_fast.data.AnalogyFolder._caption uses ``target.stem``: at risk if it were switched to the sample name."""
    root = _nested_strip_sample(tmp_path / "a", relation={"analogy_id": "x", "edit_prompt": "from , the metadata"})
    assert _caption(root) == "from, the metadata"  # and normalised as get_caption does


def test_pin_relation_entry_named_by_the_nested_path_matches_nothing(tmp_path):
    """PIN (passes now). Same official rule: an entry ``"sub/x"`` is never the key of ``target/sub/x.png`` (the
    official key has no folder), so the caption falls back to ``target/sub/x.txt``
    (``os.path.splitext(self.path)[0] + caption_ext``)."""
    root = _nested_strip_sample(tmp_path / "b", relation={"analogy_id": "sub/x", "edit_prompt": "from the metadata"})
    assert _caption(root) == "from the txt file"
