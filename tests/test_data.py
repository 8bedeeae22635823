"""Training data: the official strip layout composed exactly as the official loader, finished 2x2 grids detected by
shape, ambiguous or broken samples named, bidirectional draws, ``lorweb-fast data check`` and ``data prepare`` on a
tiny synthetic Relation252K folder."""

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lorweb_fast import cli, data, demo
from lorweb_fast.data import AnalogyDataError, AnalogyFolder
from lorweb_fast.training import StepBatchSampler
from lorweb_fast.testing import random_rgb_image, relation252k_folder, smooth_rgb


def _strip_folder(root: Path, *, cells=((20, 14),), b_prime=(24, 18), seed=0, caption="make it red") -> Path:
    """control/<id>.png = a|a'|b strips (cell size per sample), target/<id>.png = b', target/<id>.txt."""
    rng = np.random.default_rng(seed)
    (root / "control").mkdir(parents=True, exist_ok=True)
    (root / "target").mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(cells):
        random_rgb_image(rng, 3 * w, h).save(root / "control" / f"s{i:02d}.png")
        random_rgb_image(rng, *b_prime).save(root / "target" / f"s{i:02d}.png")
        (root / "target" / f"s{i:02d}.txt").write_text(caption)
    return root


def _official_box_grid(strip: Image.Image, b_prime: Image.Image, swap: bool = False) -> np.ndarray:
    """Reference written from NVlabs/LoRWeB toolkit/dataloader_mixins.py ``_create_box_analogy_image`` with
    ``full_size_control_images: true``: the target size is b''s size (W, H); the strip is resized to (3W, H) with
    bicubic and cut into W-wide parts; a bidirectional swap exchanges parts 0<->1 and part 2<->b'; the grid is
    [part0 part1; part2 b'] with 2W x 2H pixels. The files are opened without conversion (``load_and_process_image``
    converts the finished grid), so the resize runs in the file's own mode and each cell becomes RGB only when it is
    pasted into the RGB grid (modelled here by ``convert("RGB")`` after the resize)."""
    w, h = b_prime.size
    wide = np.asarray(strip.resize((3 * w, h), Image.BICUBIC).convert("RGB"))
    parts = [wide[:, k * w:(k + 1) * w] for k in range(3)]
    last = np.asarray(b_prime.convert("RGB"))
    if swap:
        parts[0], parts[1] = parts[1], parts[0]
        parts[2], last = last, parts[2]
    return np.concatenate([np.concatenate(parts[:2], axis=1), np.concatenate([parts[2], last], axis=1)], axis=0)


def _official_control(target: np.ndarray, swapped: bool = False) -> np.ndarray:
    """Reference written from toolkit/dataloader_mixins.py ``load_control_image`` (box analogy): a CHW clone of the
    target tensor, bottom-left quadrant (split at h//2, w//2) copied into the bottom-right; for a bidirectional
    swap, the official tuple assignment of the two top quadrants, which goes through views of the same tensor."""
    t = torch.from_numpy(target.copy()).permute(2, 0, 1)
    _, h, w = t.shape
    t[:, h // 2:, w // 2:] = t[:, h // 2:, :w // 2]
    if swapped:
        t[:, :h // 2, :w // 2], t[:, :h // 2, w // 2:] = t[:, :h // 2, w // 2:], t[:, :h // 2, :w // 2]
    return t.permute(1, 2, 0).numpy()


# ------------------------------------------------------------------------------------------- composition
def test_strip_layout_composes_the_official_grids_exactly(tmp_path):
    root = _strip_folder(tmp_path / "d", cells=[(20, 14), (16, 16)], b_prime=(24, 18))
    ds = AnalogyFolder(root, long_edge=64, multiple=16, resize="long-edge")
    assert [s[3] for s in ds.samples] == ["strip", "strip"] and ds.samples[0][4] == (48, 36)
    for i in range(2):
        strip = Image.open(root / "control" / f"s{i:02d}.png")
        b_prime = Image.open(root / "target" / f"s{i:02d}.png")
        want_target = _official_box_grid(strip, b_prime)
        control, target = ds.full_grids(i)
        np.testing.assert_array_equal(np.asarray(target), want_target)
        np.testing.assert_array_equal(np.asarray(control), _official_control(want_target))

        # what the trainer sees: the grid resized to the training size, the control derived from the resized grid
        item = ds[i]
        size = ds.grid_size((48, 36))
        assert item["target"].size == item["control"].size == size == (64, 48)
        resized = np.asarray(Image.fromarray(want_target).resize(size, Image.BICUBIC))
        np.testing.assert_array_equal(np.asarray(item["target"]), resized)
        np.testing.assert_array_equal(np.asarray(item["control"]), _official_control(resized))
        assert item["caption"] == "make it red" and item["layout"] == "strip" and not item["swapped"]


@pytest.mark.parametrize("strip_mode, b_prime_mode", [("P", "L"), ("RGBA", "P"), ("L", "RGBA")])
def test_strips_in_other_modes_are_resized_before_conversion(tmp_path, strip_mode, b_prime_mode):
    """Palette, grey and RGBA files are resized in their own mode and converted when pasted, as the official loader
    (reference ``_official_box_grid``): a palette strip is resized with nearest (Pillow's rule for P), which converting
    to RGB first would not give."""
    root = _strip_folder(tmp_path / "d", cells=[(20, 14)], b_prime=(24, 18))
    rng = np.random.default_rng(1)
    for path, size, mode in ((root / "control" / "s00.png", (60, 14), strip_mode),
                             (root / "target" / "s00.png", (24, 18), b_prime_mode)):
        img = random_rgb_image(rng, *size)
        img = img.quantize(32) if mode == "P" else img.convert(mode)
        if mode == "RGBA":
            img.putalpha(Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8)))
        img.save(path)
    strip, b_prime = Image.open(root / "control" / "s00.png"), Image.open(root / "target" / "s00.png")
    assert (strip.mode, b_prime.mode) == (strip_mode, b_prime_mode)
    want = _official_box_grid(strip, b_prime)
    _, target = AnalogyFolder(root, long_edge=64, multiple=16, resize="long-edge").full_grids(0)
    np.testing.assert_array_equal(np.asarray(target), want)
    if strip_mode == "P":  # the order matters here: converting first and resizing with bicubic differs
        wide = np.asarray(strip.convert("RGB").resize((72, 18), Image.BICUBIC))
        assert not np.array_equal(want[:18, :48], wide[:, :48])


@pytest.mark.parametrize("mode", ["official", "reverse"])
def test_bidirectional_swap_matches_the_official_composition(tmp_path, mode):
    root = _strip_folder(tmp_path / "d", cells=[(20, 14)], b_prime=(20, 14))
    ds = AnalogyFolder(root, long_edge=40, multiple=8, bidirectional=mode, resize="long-edge")
    strip, b_prime = Image.open(root / "control" / "s00.png"), Image.open(root / "target" / "s00.png")
    want = _official_box_grid(strip, b_prime, swap=True)
    control, target = ds.full_grids(0, swap=True)
    np.testing.assert_array_equal(np.asarray(target), want)
    a, a_prime = want[:14, 20:], want[:14, :20]  # swapped grid: [a' a; b' b]
    b_prime_cell = want[14:, :20]
    got = np.asarray(control)
    if mode == "official":
        np.testing.assert_array_equal(got, _official_control(want, swapped=True))
        # the official view-aliasing leaves a in both top cells: [a a; b' b']
        np.testing.assert_array_equal(got[:14, :20], a)
        np.testing.assert_array_equal(got[:14, 20:], a)
    else:
        np.testing.assert_array_equal(got[:14], np.concatenate([a_prime, a], axis=1))
    np.testing.assert_array_equal(got[14:], np.concatenate([b_prime_cell, b_prime_cell], axis=1))
    item = ds[(0, True)]
    assert item["swapped"]
    resized = np.asarray(Image.fromarray(want).resize(item["target"].size, Image.BICUBIC))
    np.testing.assert_array_equal(np.asarray(item["target"]), resized)
    # swaps only with bidirectional on
    assert not AnalogyFolder(root, long_edge=40, multiple=8, resize="long-edge")[(0, True)]["swapped"]


def test_bidirectional_draws_are_deterministic_and_resume_exactly():
    draws = [data.bidirectional_swap(3, p) for p in range(400)]
    assert draws == [data.bidirectional_swap(3, p) for p in range(400)]
    assert 150 < sum(draws) < 250 and draws != [data.bidirectional_swap(4, p) for p in range(400)]
    full = StepBatchSampler(7, 3, seed=3, start_step=0, total_steps=6, world_size=2, rank=1, bidirectional=True)
    resumed = StepBatchSampler(7, 3, seed=3, start_step=4, total_steps=6, world_size=2, rank=1, bidirectional=True)
    assert list(full)[4:] == list(resumed)
    assert all(isinstance(k, tuple) and isinstance(k[1], bool) for batch in full for k in batch)
    plain = StepBatchSampler(7, 3, seed=3, start_step=0, total_steps=6, world_size=2, rank=1)
    assert [[k[0] for k in b] for b in full] == list(plain)


def test_grid_layout_still_works(tmp_path):
    root = demo.make_synthetic_analogies(tmp_path / "grid", 3)
    ds = AnalogyFolder(root, long_edge=64, resize="long-edge")
    assert {s[3] for s in ds.samples} == {"grid"}
    control, target = ds.full_grids(0)
    np.testing.assert_array_equal(np.asarray(target),
                                  np.asarray(Image.open(root / "target" / "0000.png").convert("RGB")))
    np.testing.assert_array_equal(np.asarray(control),
                                  np.asarray(Image.open(root / "control" / "0000.png").convert("RGB")))
    # a reversed draw of a finished grid: target [a' a; b' b], control [a' a; b' b']
    grid = np.asarray(target)
    a, a2, b, b2 = grid[:32, :32], grid[:32, 32:], grid[32:, :32], grid[32:, 32:]
    rev_control, rev_target = AnalogyFolder(root, resize="long-edge", bidirectional="reverse").full_grids(0, swap=True)
    np.testing.assert_array_equal(np.asarray(rev_target),
                                  np.concatenate([np.concatenate([a2, a], 1), np.concatenate([b2, b], 1)]))
    np.testing.assert_array_equal(np.asarray(rev_control),
                                  np.concatenate([np.concatenate([a2, a], 1), np.concatenate([b2, b2], 1)]))


# ---------------------------------------------------------------------------------------------- detection
def test_ambiguous_and_broken_samples_name_the_file(tmp_path):
    rng = np.random.default_rng(0)
    root = _strip_folder(tmp_path / "d", cells=[(20, 14)])
    random_rgb_image(rng, 50, 40).save(root / "control" / "s00.png")  # fits no grid: a strip of any width
    assert AnalogyFolder(root, resize="long-edge").samples[0][3] == "strip"
    random_rgb_image(rng, 60, 20).save(root / "control" / "s00.png")
    random_rgb_image(rng, 60, 20).save(root / "target" / "s00.png")  # same size and strip-shaped: which one?
    with pytest.raises(AnalogyDataError, match="s00.png .60x20. is ambiguous"):
        AnalogyFolder(root, resize="long-edge")
    assert AnalogyFolder(root, resize="long-edge", layout="grid").samples[0][3] == "grid"
    assert AnalogyFolder(root, resize="long-edge", layout="strip").samples[0][3] == "strip"
    random_rgb_image(rng, 61, 20).save(root / "control" / "s00.png")
    random_rgb_image(rng, 61, 20).save(root / "target" / "s00.png")  # two grids with an odd side
    with pytest.raises(AnalogyDataError, match="s00.png and .*s00.png are 61x20 grids with an odd side"):
        AnalogyFolder(root, resize="long-edge")


def test_a_truncated_image_is_named_by_data_check_and_at_its_draw(tmp_path, capsys):
    """A JPEG cut in half passes the header check of the folder scan (``Image.verify`` checks almost nothing for
    JPEG): ``data check`` decodes every image and names it (or skips the sample with --skip-bad), and drawing the
    sample raises AnalogyDataError naming the file (it was PIL's OSError without the path, at that sample's step)."""
    rng = np.random.default_rng(3)
    root = _strip_folder(tmp_path / "d", cells=[(20, 14), (20, 14)])
    bad = root / "target" / "s01.jpg"
    (root / "target" / "s01.png").unlink()
    random_rgb_image(rng, 64, 48).save(bad, quality=95)
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    ds = AnalogyFolder(root, resize="long-edge")  # headers only: the sample is there
    assert len(ds) == 2
    index = [ds.name(i) for i in range(2)].index("s01")
    with pytest.raises(AnalogyDataError, match=r"s01\.jpg is not a readable image .*truncated"):
        ds[index]
    with pytest.raises(AnalogyDataError, match=r"1 training samples cannot be used, e.g. s01: .*s01\.jpg is not a "
                                               r"readable image.*--skip-bad"):
        data.check_folder(root, resize="long-edge", progress=False)
    report = data.check_folder(root, resize="long-edge", progress=False, skip_bad=True)
    assert report["samples"] == 1 and report["skipped"] == 1
    assert len(report["problems"]) == 1 and "s01.jpg is not a readable image" in report["problems"][0]
    assert cli.main(["data", "check", str(root), "--resize", "long-edge", "--quiet"]) == 2
    assert "s01.jpg is not a readable image" in capsys.readouterr().err


def _corrupt_png_chunk_checksum(path: Path, chunk: bytes) -> None:
    """Flip one byte of the CRC of ``path``'s first ``chunk`` (e.g. b"IDAT"), leaving its data intact."""
    raw = bytearray(path.read_bytes())
    at = raw.index(chunk)
    length = int.from_bytes(raw[at - 4:at], "big")
    raw[at + 4 + length] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_png_with_a_bad_checksum_that_decodes_trains_as_officially(tmp_path):
    """ai-toolkit opens training images with ``Image.open(...).convert("RGB")`` (``_create_box_analogy_image``) and
    never calls ``Image.verify``; Pillow's decode does not check an IDAT chunk's CRC. A PNG whose only fault is that
    checksum is therefore trained on officially (its pixels intact): the folder scan keeps it and the draw gives its
    pixels, while a PNG cut short (which fails to decode as well) is still refused by name."""
    root = _strip_folder(tmp_path / "d", cells=[(20, 14), (20, 14)])
    target = root / "target" / "s01.png"
    pixels = np.asarray(Image.open(target).convert("RGB"))
    _corrupt_png_chunk_checksum(target, b"IDAT")
    with pytest.raises(SyntaxError, match="checksum"):  # what the header check saw: Image.verify refuses the file
        with Image.open(target) as im:
            im.verify()
    ds = AnalogyFolder(root, resize="long-edge")
    assert len(ds) == 2
    index = [ds.name(i) for i in range(2)].index("s01")
    _, grid = ds.full_grids(index)
    h, w = pixels.shape[:2]
    np.testing.assert_array_equal(np.asarray(grid)[-h:, -w:], pixels)  # b' is the target's pixels
    assert data.check_folder(root, resize="long-edge", progress=False)["samples"] == 2
    target.write_bytes(target.read_bytes()[:-40])  # now also cut short: no decode, refused at the scan
    with pytest.raises(AnalogyDataError, match=r"s01\.png is not a readable image"):
        AnalogyFolder(root, resize="long-edge")


def test_strips_of_any_width_are_cut_as_the_official_loader(tmp_path):
    """ai-toolkit ``_create_box_analogy_image`` resizes the strip to (3W, H) with bicubic, W x H = b''s size, and cuts
    it at multiples of W: a strip whose width is not divisible by 3 (here 61 px, or portrait cells) is read too."""
    rng = np.random.default_rng(1)
    for name, strip_size in (("odd", (61, 14)), ("portrait", (30, 40))):
        root = _strip_folder(tmp_path / name, cells=[(20, 14)])
        strip = random_rgb_image(rng, *strip_size)
        strip.save(root / "control" / "s00.png")
        target = Image.open(root / "target" / "s00.png").convert("RGB")
        ds = AnalogyFolder(root, resize="long-edge")
        assert ds.samples[0][3] == "strip"
        _, got = ds.full_grids(0)
        w, h = target.size
        wide = strip.resize((3 * w, h), Image.BICUBIC)
        want = np.concatenate([np.concatenate([np.asarray(wide)[:, :w], np.asarray(wide)[:, w:2 * w]], 1),
                               np.concatenate([np.asarray(wide)[:, 2 * w:], np.asarray(target)], 1)])
        np.testing.assert_array_equal(np.asarray(got), want)


def test_mixed_layouts_are_an_error(tmp_path):
    root = _strip_folder(tmp_path / "d", cells=[(20, 14)])
    grid = demo.make_synthetic_analogies(tmp_path / "grid", 1)
    shutil.copy(grid / "control" / "0000.png", root / "control" / "g0.png")
    shutil.copy(grid / "target" / "0000.png", root / "target" / "g0.png")
    shutil.copy(grid / "captions" / "0000.txt", root / "target" / "g0.txt")
    with pytest.raises(AnalogyDataError, match="mixes layouts .*g0.png is a 2x2 grid.*s00.png an a.a'.b strip"
                                               ".*--layout strip reads every control as a strip"):
        AnalogyFolder(root, resize="long-edge")


def test_a_strip_of_its_targets_size_reads_as_a_strip_when_named(tmp_path):
    """Portrait cells: a 3 x (10 x 20) strip is 30 x 20, the size of a 30 x 20 b' (data prepare writes such a sample
    when A's halves are narrower than C's). Detection takes it for a grid; beside ordinary strips the mixed-layouts
    error names ``--layout strip``, which reads it as the official loader does."""
    rng = np.random.default_rng(4)
    root = _strip_folder(tmp_path / "d", cells=[(20, 14)])
    random_rgb_image(rng, 30, 20).save(root / "control" / "s01.png")
    random_rgb_image(rng, 30, 20).save(root / "target" / "s01.png")
    (root / "target" / "s01.txt").write_text("x")
    with pytest.raises(AnalogyDataError, match="--layout strip"):
        AnalogyFolder(root, resize="long-edge")
    ds = AnalogyFolder(root, resize="long-edge", layout="strip")
    assert [s[3] for s in ds.samples] == ["strip", "strip"]
    assert ds.samples[1][4] == (60, 40)  # the grid of a 30 x 20 b'


def test_captions_are_normalised_as_the_official_loader(tmp_path):
    """Reference from NVlabs/LoRWeB toolkit/dataloader_mixins.py ``CaptionMixin.get_caption``: the raw caption is
    split on ',', every piece stripped, empty pieces dropped, and the pieces joined with ', '."""
    def reference(raw):
        tokens = [t.strip() for t in raw.split(",")]
        return ", ".join(t for t in tokens if t)

    raws = ["make it red", "  make it red\n", "make it red,bigger", "a , b,, c ,", ",", "", "one,\ntwo"]
    for raw in raws:
        assert data.official_caption(raw) == reference(raw), raw
    root = _strip_folder(tmp_path / "d", caption=" turn it ,, into   clay ,\n")
    assert AnalogyFolder(root)[0]["caption"] == "turn it, into   clay"
    # the official loader reads the file in text mode (universal newlines): \r\n and a lone \r arrive as \n
    (root / "target" / "s00.txt").write_bytes(b"make it\r\nred,\rbigger\r\n")
    assert AnalogyFolder(root)[0]["caption"] == reference("make it\nred,\nbigger\n") == "make it\nred, bigger"


def test_a_caption_with_a_utf8_byte_order_mark_keeps_it_with_a_warning(tmp_path):
    """A caption saved with a byte-order mark (Windows Notepad's UTF-8): the official loader reads captions as utf-8
    (toolkit/dataloader_mixins.py ``CaptionProcessingDTOMixin.load_caption``, ``open(..., encoding='utf-8')``), not
    utf-8-sig, and ``get_caption``'s ``strip`` keeps U+FEFF, so the mark reaches the text encoders: kept, with a
    warning naming the file; ``bom_captions`` lists it. A caption without one is not listed."""
    root = _strip_folder(tmp_path / "d")
    caption = root / "target" / "s00.txt"
    caption.write_bytes("\ufeffmake it red".encode("utf-8"))
    with pytest.warns(UserWarning, match=r"1 caption files begin with a UTF-8 byte-order mark \(e\.g\. .*s00\.txt\)"):
        data = AnalogyFolder(root)
    assert data.bom_captions == [caption] and data[0]["caption"] == "\ufeffmake it red"
    caption.write_text("make it red", encoding="utf-8")
    assert AnalogyFolder(root).bom_captions == []


def _official_samples(root: Path) -> list[tuple[Path, Path, str]]:
    """Reference written from NVlabs/LoRWeB toolkit/data_loader.py ``AiToolkitDataset.__init__`` (the samples: files
    under folder_path = target/ found by os.walk whose lower-cased name ends in .jpg/.jpeg/.png/.webp, minus those in
    a folder named "_controls"; analogy_metadata.json beside target/ keyed by analogy_id), toolkit/dataloader_mixins.py
    ``ControlFileItemDTOMixin.__init__`` (the control: control_path/<name without extension> + the first of
    .jpg, .jpeg, .png, .webp that exists) and ``CaptionProcessingDTOMixin.load_caption`` (the relation entry's
    edit_prompt when the name is in it, else <target path without extension>.txt when that file exists, else ''
    since the config sets no default_caption), before ``get_caption``'s comma clean-up. Sorted here (os.walk order is
    the file system's)."""
    import os

    relation = {e["analogy_id"]: e for e in json.loads((root / "analogy_metadata.json").read_text())}
    out = []
    for d, _, files in os.walk(root / "target"):
        for f in files:
            if f.lower().endswith((".jpg", ".jpeg", ".png", ".webp")) and os.path.basename(d) != "_controls":
                path = os.path.join(d, f)
                name = ".".join(os.path.basename(path).split(".")[:-1])
                control = next(root / "control" / (name + e) for e in (".jpg", ".jpeg", ".png", ".webp")
                               if (root / "control" / (name + e)).exists())
                txt = os.path.splitext(path)[0] + ".txt"
                caption = relation[name]["edit_prompt"] if name in relation else \
                    Path(txt).read_text() if os.path.exists(txt) else ""
                out.append((control, Path(path), caption))
    return sorted(out, key=lambda t: t[1])


def test_samples_are_found_from_target_as_the_official_loader(tmp_path):
    """The samples are the target images (nested folders too, "_controls" left out); a control is found by name
    with the official extension order (.jpg before .png); captions come from analogy_metadata.json first, then the
    .txt beside the target; a control image without a target is no sample (a warning says so)."""
    root = tmp_path / "d"
    rng = np.random.default_rng(3)
    for sub in ("control", "target/sub", "target/_controls"):
        (root / sub).mkdir(parents=True)
    for name, target in (("s00", "target/s00.png"), ("s01", "target/s01.jpg"), ("s02", "target/sub/s02.png"),
                         ("s03", "target/_controls/s03.png")):
        random_rgb_image(rng, 24, 18).save(root / target)
        random_rgb_image(rng, 60, 14).save(root / "control" / f"{name}.png")
        Path(root / target).with_suffix(".txt").write_text(f"txt of {name}")
    random_rgb_image(rng, 60, 14).save(root / "control" / "s00.jpg")  # official: .jpg is tried first
    random_rgb_image(rng, 60, 14).save(root / "control" / "s09.png")  # no target: not a sample
    (root / "analogy_metadata.json").write_text(json.dumps([{"analogy_id": "s00", "edit_prompt": "json of s00"},
                                                            {"analogy_id": "s77", "edit_prompt": "unused"}]))
    want = _official_samples(root)
    assert [(c.name, t.name, cap) for c, t, cap in want] == [("s00.jpg", "s00.png", "json of s00"),
                                                             ("s01.png", "s01.jpg", "txt of s01"),
                                                             ("s02.png", "s02.png", "txt of s02")]
    with pytest.warns(UserWarning, match=r"2 control images have no target image .*s03.png"), \
            pytest.warns(UserWarning, match=r"several control images share a target's name \(1 names\).*"
                                            r"s00: s00.jpg over s00.png"):
        ds = AnalogyFolder(root, resize="long-edge")
    assert [(c, t, cap) for c, t, cap, _, _ in ds.samples] == want
    assert [ds[i]["name"] for i in range(3)] == ["s00", "s01", "sub/s02"]  # unique: the path under target/
    assert [p.name for p in ds.unused_controls] == ["s03.png", "s09.png"]
    assert ds.several_controls == {"s00": [root / "control" / "s00.jpg", root / "control" / "s00.png"]}
    assert ds.shared_names == []
    # an upper-case extension, which the official (case-sensitive) lookup misses, is still found
    (root / "control" / "s01.png").rename(root / "control" / "s01.PNG")
    with pytest.warns(UserWarning, match="2 control images have no target"), \
            pytest.warns(UserWarning, match=r"share a target's name \(1 names\)"):
        assert AnalogyFolder(root, resize="long-edge").samples[1][0] == root / "control" / "s01.PNG"
    # an exact official extension still comes before an upper-case one that sorts earlier (.JPG vs .png)
    random_rgb_image(rng, 60, 14).save(root / "control" / "s01.png")
    (root / "control" / "s01.PNG").rename(root / "control" / "s01.JPG")
    with pytest.warns(UserWarning, match="control images have no target"), \
            pytest.warns(UserWarning, match=r"share a target's name \(2 names\).*s00: s00.jpg over s00.png"):
        assert AnalogyFolder(root, resize="long-edge").samples[1][0] == root / "control" / "s01.png"


def test_target_images_sharing_a_name_are_each_a_sample_with_a_warning(tmp_path, capsys):
    """target/s00.png and target/s00.jpg: the official loader (toolkit/data_loader.py ``AiToolkitDataset``, an
    os.walk of the dataset folder keeping every image file) makes each a sample, both finding control/s00.* and the
    same caption; ours too, with a warning, ``shared_names`` and the data check report naming them (the dump keeps
    both, by their file names)."""
    root = _strip_folder(tmp_path / "d", cells=((20, 14), (20, 14)))
    random_rgb_image(np.random.default_rng(5), 24, 18).save(root / "target" / "s00.jpg")
    (root / "control" / "s01.png").rename(root / "control" / "s01.webp")
    random_rgb_image(np.random.default_rng(6), 60, 14).save(root / "control" / "s01.jpeg")
    with pytest.warns(UserWarning, match=r"several target images share a name \(1 names\).*s00: s00.jpg, s00.png"), \
            pytest.warns(UserWarning, match=r"several control images share a target's name .*s01: s01.jpeg over"):
        ds = AnalogyFolder(root, resize="long-edge")
    assert [(c.name, t.name) for c, t, *_ in ds.samples] == [("s00.png", "s00.jpg"), ("s00.png", "s00.png"),
                                                            ("s01.jpeg", "s01.png")]
    assert ds.shared_names == ["s00"]
    assert ds.several_controls == {"s01": [root / "control" / "s01.jpeg", root / "control" / "s01.webp"]}
    report = data.check_folder(root, dump=tmp_path / "dump", progress=False)
    assert report["shared_names"] == ["s00"]
    assert report["several_controls"] == {"s01": [str(root / "control" / "s01.jpeg"),
                                                  str(root / "control" / "s01.webp")]}
    capsys.readouterr()
    assert cli.main(["data", "check", str(root), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "names shared by several target images (each a sample): 1, e.g. s00" in out
    assert "names with several control images (the first in the official order is used): 1, e.g. s01: s01.jpeg " \
           "over s01.webp" in out
    assert sorted(p.name for p in (tmp_path / "dump").glob("*_target.png")) == ["s00.jpg_target.png",
                                                                               "s00.png_target.png",
                                                                               "s01_target.png"]


def test_skipping_one_of_two_targets_sharing_a_name_keeps_the_others_missing_caption(tmp_path):
    """target/s00.jpg (truncated) and target/s00.png share the name s00 and have no caption: data check --skip-bad
    drops the .jpg and still lists s00 among the samples without a caption (the .png trains with an empty one);
    missing captions were filtered by name."""
    root = tmp_path / "d"
    for sub in ("control", "target"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(8)
    random_rgb_image(rng, 60, 14).save(root / "control" / "s00.png")
    random_rgb_image(rng, 24, 18).save(root / "target" / "s00.png")
    random_rgb_image(rng, 24, 18).save(root / "target" / "s00.jpg")
    data_bytes = (root / "target" / "s00.jpg").read_bytes()
    (root / "target" / "s00.jpg").write_bytes(data_bytes[:len(data_bytes) // 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = data.check_folder(root, skip_bad=True, resize="long-edge", progress=False)
    assert report["samples"] == 1 and report["skipped"] == 1 and "s00.jpg" in report["problems"][0]
    assert report["samples_without_caption"] == ["s00"] and report["shared_names"] == ["s00"]


@pytest.mark.parametrize("text, fragment", [("{not json", "is not valid JSON"), ('{"a": 1}', "must hold a JSON list"),
                                            ('[{"analogy_id": "x"}, {"id": "s00"}]', "entry 1 is not an object with "
                                                                                   "an 'analogy_id'")])
def test_bad_relation_metadata_is_named(tmp_path, text, fragment):
    root = _strip_folder(tmp_path / "d")
    (root / "analogy_metadata.json").write_text(text)
    with pytest.raises(AnalogyDataError, match=f"analogy_metadata.json.*{fragment}"):
        AnalogyFolder(root, resize="long-edge")


def test_relation_entries_are_checked_only_where_used(tmp_path):
    """As the official index: entries of other analogies (a non-string id, no edit_prompt) do not matter; a used
    entry without a string edit_prompt is that sample's problem (skippable)."""
    root = _strip_folder(tmp_path / "d", cells=[(20, 14), (20, 14)])
    (root / "analogy_metadata.json").write_text(json.dumps([{"analogy_id": 7, "edit_prompt": None},
                                                            {"analogy_id": "zz"},
                                                            {"analogy_id": "s01", "edit_prompt": "from json"}]))
    assert [s[2] for s in AnalogyFolder(root, resize="long-edge").samples] == ["make it red", "from json"]
    (root / "analogy_metadata.json").write_text(json.dumps([{"analogy_id": "s01", "edit_prompt": None}]))
    with pytest.raises(AnalogyDataError, match="sample s01: its entry in .* has no string 'edit_prompt'"):
        AnalogyFolder(root, resize="long-edge")
    with pytest.warns(UserWarning, match="skipping training sample s01"):
        assert len(AnalogyFolder(root, resize="long-edge", skip_bad=True)) == 1


def test_a_sample_without_caption_trains_with_an_empty_one_as_official(tmp_path, capsys):
    """As ``_official_samples`` (official ``load_caption``): no relation entry and no .txt -> the caption is ''. Ours
    warns and names the samples (``missing_captions``, data check); ``missing_caption="raise"`` makes it a broken
    sample (an error, or skipped with ``skip_bad``)."""
    root = _strip_folder(tmp_path / "d", cells=[(20, 14), (20, 14), (20, 14)])
    (root / "target" / "s01.txt").unlink()
    (root / "analogy_metadata.json").write_text(json.dumps([{"analogy_id": "s02", "edit_prompt": "from json"}]))
    (root / "target" / "s02.txt").unlink()  # the relation entry is enough
    want = _official_samples(root)
    assert [cap for _, _, cap in want] == ["make it red", "", "from json"]
    with pytest.warns(UserWarning, match=r"1 training samples have no caption and train with an empty one.*e\.g\. "
                                         r"s01.*--missing-caption raise"):
        ds = AnalogyFolder(root, resize="long-edge")
    assert [(c, t, cap) for c, t, cap, _, _ in ds.samples] == want
    assert ds.missing_captions == ["s01"] and ds[1]["caption"] == ""
    with pytest.raises(AnalogyDataError, match=r"sample s01 has no caption: .*missing_caption='raise'.*--skip-bad"):
        AnalogyFolder(root, resize="long-edge", missing_caption="raise")
    with pytest.warns(UserWarning, match="skipping training sample s01"):
        ds = AnalogyFolder(root, resize="long-edge", missing_caption="raise", skip_bad=True)
    assert ds.skipped == ["s01"] and ds.missing_captions == [] and len(ds) == 2
    # a sample skipped for another reason is not listed as trained with an empty caption
    (root / "control" / "s01.png").unlink()
    with pytest.warns(UserWarning, match="skipping training sample s01"):
        ds = AnalogyFolder(root, resize="long-edge", skip_bad=True)
    assert ds.missing_captions == [] and ds.skipped == ["s01"]
    with pytest.raises(ValueError, match=r"missing_caption must be one of \('empty', 'raise'\), got 'skip'"):
        AnalogyFolder(root, missing_caption="skip")
    shutil.copy(root / "control" / "s00.png", root / "control" / "s01.png")
    assert cli.main(["data", "check", str(root), "--quiet", "--resize", "long-edge"]) == 0
    text = capsys.readouterr().out
    assert "samples without a caption (trained with an empty one, as official): 1, e.g. s01" in text
    assert "captions: 2 non-empty, 1 empty" in text
    assert cli.main(["data", "check", str(root), "--quiet", "--resize", "long-edge", "--missing-caption", "raise"]) == 2
    assert "s01 has no caption" in capsys.readouterr().err


def test_bad_utf8_caption_is_named_and_skippable(tmp_path):
    root = _strip_folder(tmp_path / "d", cells=[(20, 14), (20, 14)])
    (root / "target" / "s01.txt").write_bytes(b"caf\xe9 au lait")
    with pytest.raises(AnalogyDataError, match=r"caption .*s01.txt is not valid UTF-8"):
        AnalogyFolder(root, resize="long-edge")
    with pytest.warns(UserWarning, match="skipping training sample s01"):
        ds = AnalogyFolder(root, skip_bad=True, resize="long-edge")
    assert len(ds) == 1 and ds.skipped == ["s01"]


# ----------------------------------------------------------------------------------------------- data check
def test_data_check_prints_counts_and_dumps_the_trainers_grids(tmp_path, capsys):
    root = _strip_folder(tmp_path / "d", cells=[(20, 14), (16, 16), (20, 14)])
    (root / "target" / "s02.txt").write_text("")
    out = tmp_path / "dump"
    assert cli.main(["data", "check", str(root), "--dump", str(out), "--quiet", "--resize", "long-edge"]) == 0
    text = capsys.readouterr().out
    assert "3 samples (0 skipped); layouts: strip 3" in text
    assert "48x36 x3" in text and "problems: 0" in text
    assert "captions: 2 non-empty, 1 empty, 1 distinct non-empty" in text
    ds = AnalogyFolder(root, resize="long-edge")
    for i, name in enumerate(("s00", "s01", "s02")):
        control, target = ds.full_grids(i)
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{name}_target.png")), np.asarray(target))
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{name}_control.png")), np.asarray(control))
    assert (out / "s00_caption.txt").read_text() == "make it red\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]

    (root / "target" / "s01.png").write_bytes(b"not an image")
    assert cli.main(["data", "check", str(root), "--quiet", "--resize", "long-edge"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "s01.png is not a readable image" in err
    assert cli.main(["data", "check", str(root), "--skip-bad", "--quiet", "--resize", "long-edge"]) == 0
    text = capsys.readouterr().out
    assert "2 samples (1 skipped)" in text and "problems: 1" in text and "s01.png is not a readable image" in text
    assert "control images without a target" not in text

    # a control without a target is no sample, and the report says so; a nested sample dumps as sub__<id>
    (root / "target" / "s01.png").unlink()
    (root / "target" / "sub").mkdir()
    shutil.move(root / "target" / "s02.png", root / "target" / "sub" / "s02.png")
    shutil.move(root / "target" / "s02.txt", root / "target" / "sub" / "s02.txt")
    assert cli.main(["data", "check", str(root), "--dump", str(tmp_path / "dump2"), "--quiet",
                     "--resize", "long-edge"]) == 0
    text = capsys.readouterr().out
    assert "2 samples (0 skipped)" in text and "control images without a target (not samples): 1, e.g." in text
    assert "s01.png" in text.split("without a target")[1]
    assert (tmp_path / "dump2" / "sub__s02_target.png").is_file()


# --------------------------------------------------------------------------------------------- data prepare
#: the tiny Relation252K of these tests: three categories, one with two sizes (lorweb_fast.testing.relation252k_folder)
RELATION_SPEC = {"cat-a": [(16, 12), (16, 12), (20, 10)], "cat-b": [(16, 12)], "cat-c": [(12, 12), (12, 12)]}


def _relation252k(root: Path) -> dict:
    """RELATION_SPEC as a Relation252K folder with the entries the official loader skips (an entry without image, a
    folder without groups); returns {image_id: (left, right) arrays}."""
    return relation252k_folder(root, RELATION_SPEC, seed=1, skipped_entries=True)


def test_data_prepare_relation252k_official_pairing(tmp_path, capsys):
    halves = _relation252k(tmp_path / "rel")
    out = tmp_path / "prepared"
    assert cli.main(["data", "prepare", str(tmp_path / "rel"), str(out), "--quiet"]) == 0
    assert "4 analogies: 4 written, 0 already there, 0 failed" in capsys.readouterr().out
    # official pairing: per category with >= 2 pairs, every i < j as (A = i, C = j), one running index
    want_ids = ["analogy_cat-a_img0.png_cat-a_img1.png_0000", "analogy_cat-a_img0.png_cat-a_img2.png_0001",
                "analogy_cat-a_img1.png_cat-a_img2.png_0002", "analogy_cat-c_img0.png_cat-c_img1.png_0003"]
    meta = json.loads((out / "analogy_metadata.json").read_text())
    assert [m["analogy_id"] for m in meta] == want_ids
    assert meta[1]["pair_A"]["image_id"] == "cat-a_img0.png" and meta[1]["pair_C"]["img_name"] == "img2.png"
    assert meta[1]["control_image_path"] == f"control/{want_ids[1]}.jpg" and meta[1]["direction"] == "forward"
    assert meta[1]["edit_prompt"] == "cat-a edit 0" and meta[1]["category"] == "cat-a"
    # strip a | a' | b at the smallest cell (Lanczos when a size differs), b' as is, the caption is A's instruction
    with Image.open(out / "control" / f"{want_ids[0]}.jpg") as im:
        assert im.size == (48, 12)
        strip = np.asarray(im, dtype=np.float64)
    a, a2 = halves["cat-a_img0.png"]
    b, b2 = halves["cat-a_img1.png"]
    want = np.concatenate([a, a2, b], axis=1).astype(np.float64)
    assert np.abs(strip - want).mean() < 3  # JPEG quality 95
    with Image.open(out / "control" / f"{want_ids[1]}.jpg") as im:
        assert im.size == (48, 10)  # min width 16, min height 10
    with Image.open(out / "target" / f"{want_ids[0]}.jpg") as im:
        assert im.size == (16, 12) and np.abs(np.asarray(im, dtype=np.float64) - b2).mean() < 3
    assert (out / "target" / f"{want_ids[0]}.txt").read_text() == "cat-a edit 0"
    # the trainer reads it as the official strip layout
    ds = AnalogyFolder(out, resize="long-edge")
    assert len(ds) == 4 and {s[3] for s in ds.samples} == {"strip"}

    # resumable: finished analogies are skipped, a missing file is rewritten
    (out / "target" / f"{want_ids[2]}.jpg").unlink()
    stamp = (out / "control" / f"{want_ids[0]}.jpg").stat().st_mtime_ns
    report = data.prepare_relation252k(tmp_path / "rel", out, progress=False)
    assert (report["written"], report["skipped"], report["failed"]) == (1, 3, [])
    assert (out / "control" / f"{want_ids[0]}.jpg").stat().st_mtime_ns == stamp
    assert len(json.loads((out / "analogy_metadata.json").read_text())) == 4

    # max_analogies: a seeded sample, reindexed
    report = data.prepare_relation252k(tmp_path / "rel", tmp_path / "two", max_analogies=2, seed=5, progress=False)
    ids = [m["analogy_id"] for m in json.loads((tmp_path / "two" / "analogy_metadata.json").read_text())]
    assert report["analogies"] == 2 and [i[-4:] for i in ids] == ["0000", "0001"]


def test_data_prepare_resizes_strip_cells_with_lanczos(tmp_path, monkeypatch):
    """Official: NVlabs/LoRWeB preprocess_data.py ``process_single_analogy`` resizes every cell of the a | a' | b strip
    whose size is not the smallest width x height of the three with ``Image.Resampling.LANCZOS`` and concatenates
    them. Reference written from it on the halves; the strip is compared as handed to the JPEG encoder (exactly),
    and the reference differs from a bicubic resize, so another filter fails the test."""
    _relation252k(tmp_path / "rel")
    rng = np.random.default_rng(7)  # noise, not the folder's smooth ramps (which every interpolating filter keeps)
    halves = {}
    for name, (w, h) in (("img0.png", (16, 12)), ("img2.png", (20, 10))):
        halves[name] = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(2)]
        Image.fromarray(np.concatenate(halves[name], axis=1)).save(tmp_path / "rel" / "cat-a" / "Group1" / name)
    saved = {}
    real_save = Image.Image.save

    def save(image, fp, *args, **kwargs):
        saved[Path(str(fp)).parent.name] = saved.get(Path(str(fp)).parent.name, []) + [image.copy()]
        return real_save(image, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    data.prepare_relation252k(tmp_path / "rel", tmp_path / "prepared", max_analogies=None, progress=False)
    # the second analogy: A = cat-a img0 (16 x 12 halves), C = cat-a img2 (20 x 10): every cell resized to 16 x 10
    a, a2 = halves["img0.png"]
    b, _ = halves["img2.png"]

    def reference(resample):
        return np.concatenate([np.asarray(Image.fromarray(x).resize((16, 10), resample)) for x in (a, a2, b)], axis=1)

    want = reference(Image.Resampling.LANCZOS)
    assert not np.array_equal(want, reference(Image.Resampling.BICUBIC))
    strips = [np.asarray(im) for im in saved["control"]]
    assert any(s.shape == want.shape and np.array_equal(s, want) for s in strips), [s.shape for s in strips]


@pytest.mark.parametrize("failing_save", [3, 2], ids=["second analogy's strip", "first analogy's target"])
def test_data_prepare_writes_atomically(tmp_path, monkeypatch, failing_save):
    """Every file is written to a temporary name and renamed; an analogy that fails (also after its control was
    written, when its target's save fails) leaves none of its files, so the folder never holds a control without its
    target; a rerun writes it."""
    _relation252k(tmp_path / "rel")
    out = tmp_path / "prepared"
    real_save = Image.Image.save
    calls = {"n": 0}

    def save(self, fp, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == failing_save:
            raise OSError("disk full")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    (out / "control").mkdir(parents=True)  # a killed run's control of the first analogy, without its target
    (out / "control" / "analogy_cat-a_img0.png_cat-a_img1.png_0000.jpg").write_bytes(b"orphan")
    report = data.prepare_relation252k(tmp_path / "rel", out, progress=False)
    (failed, error), = report["failed"]
    assert "disk full" in error
    assert not (out / "control" / f"{failed}.jpg").exists() and not (out / "target" / f"{failed}.jpg").exists()
    assert not [p for sub in ("control", "target") for p in (out / sub).iterdir() if p.name.startswith(".")]
    assert sorted(p.stem for p in (out / "control").iterdir()) == sorted(p.stem for p in (out / "target").glob("*.jpg"))
    monkeypatch.setattr(Image.Image, "save", real_save)
    report = data.prepare_relation252k(tmp_path / "rel", out, progress=False)
    assert (report["written"], report["failed"]) == (1, [])


def test_data_prepare_skips_undecodable_images_as_official(tmp_path, capsys):
    """Reference: NVlabs/LoRWeB preprocess_data.py ``Relation252KDataset._load_all_samples`` crops every image (which
    decodes it) and drops the pair when that raises (``print(...); continue``), before ``get_triplets`` applies the
    per-category cap: a truncated image is no pair, takes no place under --max-samples-per-category and shifts the
    analogy indices as officially."""
    _relation252k(tmp_path / "rel")
    bad = tmp_path / "rel" / "cat-a" / "Group1" / "img1.png"
    bad.write_bytes(bad.read_bytes()[:60])  # a truncated PNG: the header opens, the pixels do not decode
    out = tmp_path / "prepared"
    assert cli.main(["data", "prepare", str(tmp_path / "rel"), str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "2 analogies: 2 written, 0 already there, 0 failed" in text
    assert "1 source images could not be decoded" in text and "img1.png" in text
    ids = [m["analogy_id"] for m in json.loads((out / "analogy_metadata.json").read_text())]
    assert ids == ["analogy_cat-a_img0.png_cat-a_img2.png_0000", "analogy_cat-c_img0.png_cat-c_img1.png_0001"]
    with pytest.warns(UserWarning, match="skipped 1 Relation252K images that cannot be decoded"):
        pairs = data.relation252k_pairs(tmp_path / "rel", max_samples_per_category=2, progress=False)
    assert [p["image_id"] for p in pairs if p["category"] == "cat-a"] == ["cat-a_img0.png", "cat-a_img2.png"]


def test_data_prepare_removes_a_killed_runs_temporary_files_and_keeps_earlier_metadata(tmp_path):
    """Temporary files end in .tmp (never an image extension the trainer would read) and a killed run's leftovers
    (also the .tmp.jpg names of earlier versions) are removed on the next run. As the official script,
    analogy_metadata.json keeps the entries an earlier run wrote and appends the new ones."""
    _relation252k(tmp_path / "rel")
    out = tmp_path / "prepared"
    data.prepare_relation252k(tmp_path / "rel", out, max_analogies=1, seed=3, progress=False)
    first = json.loads((out / "analogy_metadata.json").read_text())
    (out / "target" / ".analogy_x.jpg.abc123de.tmp.jpg").write_bytes(b"half")  # an earlier version's name
    (out / "control" / ".analogy_y.jpg.def456gh.tmp").write_bytes(b"half")
    (out / ".analogy_metadata.json.ijkl0123.tmp").write_bytes(b"half")
    (out / "target" / ".notes.tmpl").write_text("mine")  # not a name data prepare writes: kept
    (out / "target" / ".cache.tmpdir").mkdir()
    report = data.prepare_relation252k(tmp_path / "rel", out, progress=False)
    left = [p.name for sub in ("control", "target", ".") for p in (out / sub).iterdir() if p.name.startswith(".")]
    assert sorted(left) == [".cache.tmpdir", ".notes.tmpl"]
    meta = json.loads((out / "analogy_metadata.json").read_text())
    data.prepare_relation252k(tmp_path / "rel", tmp_path / "fresh", progress=False)
    full = [m["analogy_id"] for m in json.loads((tmp_path / "fresh" / "analogy_metadata.json").read_text())]
    assert meta[:len(first)] == first  # the earlier run's entry (index 0000 of its own plan) stays first
    assert [m["analogy_id"] for m in meta[len(first):]] == [i for i in full if i != first[0]["analogy_id"]]
    # an analogy this run writes again replaces the earlier entry of its id (its files come from this run)
    rewritten = meta[-1]["analogy_id"]
    (out / "target" / f"{rewritten}.jpg").unlink()
    stale = [dict(m, edit_prompt="stale") if m["analogy_id"] == rewritten else m for m in meta]
    (out / "analogy_metadata.json").write_text(json.dumps(stale))
    data.prepare_relation252k(tmp_path / "rel", out, progress=False)
    again = json.loads((out / "analogy_metadata.json").read_text())
    assert [m["analogy_id"] for m in again] == [m["analogy_id"] for m in meta] and again == meta
    (out / "analogy_metadata.json").write_text("{broken")
    with pytest.warns(UserWarning, match="cannot read the existing .*analogy_metadata.json"):
        data.prepare_relation252k(tmp_path / "rel", out, progress=False)
    assert len(json.loads((out / "analogy_metadata.json").read_text())) == report["analogies"]


def test_data_prepare_bad_source(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["data", "prepare", str(tmp_path / "empty"), str(tmp_path / "o"), "--quiet"]) == 2
    assert "not a Relation252K folder" in capsys.readouterr().err


def test_data_commands_name_a_file_given_for_a_folder(tmp_path, capsys):
    """``data check FILE`` and ``data prepare FILE OUT`` said the path "does not exist"; it is a file."""
    (tmp_path / "afile").write_text("x")
    assert "training data folder " + str(tmp_path / "afile") + " is a file, not a folder" in \
        _one_error_line(capsys, ["data", "check", str(tmp_path / "afile"), "--quiet"])
    assert "Relation252K folder " + str(tmp_path / "afile") + " is a file, not a folder" in \
        _one_error_line(capsys, ["data", "prepare", str(tmp_path / "afile"), str(tmp_path / "o"), "--quiet"])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("inside", [".", "target", "control/sub"])
def test_data_check_refuses_a_dump_folder_inside_the_data(tmp_path, capsys, inside):
    """--dump inside DATA wrote *_target.png / *_control.png where the next data check or train reads samples
    (into target/: every dumped image became a sample without a control): refused, nothing written."""
    root = _strip_folder(tmp_path / "d", cells=[(20, 14), (16, 16)])
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    line = _one_error_line(capsys, ["data", "check", str(root), "--dump", str(root / inside), "--quiet",
                                    "--resize", "long-edge"])
    assert "is inside the training folder" in line and "choose a folder outside it" in line
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


def _one_error_line(capsys, argv) -> str:
    """Run the CLI, expect exit status 2 and one stderr line without a traceback; return that line."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


LABEL_CASES = {  # labels.json of cat-a -> the fragments the error names
    "missing field": ([{"img_name": "img0.png"}], ["entry 0 ('img0.png') has no 'edit_instruction' field"]),
    "missing description": ([{"img_name": "img0.png", "edit_instruction": "e", "left_image_description": "l"}],
                            ["entry 0 ('img0.png') has no 'right_image_description' field"]),
    "missing img_name": ([{"edit_instruction": "e"}], ["entry 0 has no 'img_name' field"]),
    "img_name not a string": ([{"img_name": 3}], ["entry 0: img_name must be a string, got 3"]),
    "entry not an object": (["img0.png"], ["entry 0 is a JSON str, not an object"]),
    "not a list": ({"img_name": "img0.png"}, ["holds a JSON dict, not a list of label objects"]),
}


@pytest.mark.parametrize("case", sorted(LABEL_CASES))
def test_data_prepare_names_an_incomplete_labels_entry(tmp_path, capsys, case):
    """The official preprocess_data.py stops with a KeyError on such entries: here one line names the file, the
    entry and the field, and nothing is written."""
    _relation252k(tmp_path / "rel")
    labels, fragments = LABEL_CASES[case]
    labels_path = tmp_path / "rel" / "cat-a" / "Group1" / "labels.json"
    labels_path.write_text(json.dumps(labels))
    line = _one_error_line(capsys, ["data", "prepare", str(tmp_path / "rel"), str(tmp_path / "out"), "--quiet"])
    assert str(labels_path) in line and all(f in line for f in fragments), line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cap", [None, 1, 2, 3, 4])
def test_parallel_decoding_keeps_the_sequential_pairs_cap_and_checks(tmp_path, cap):
    """relation252k_pairs decodes on several threads, in chunks of as many entries as the per-category cap still
    admits: the pairs, the unreadable images and the entries whose fields are checked are exactly those of the
    official one-by-one loop (preprocess_data.py ``_load_all_samples`` then ``get_triplets``' cap), written here as a
    small sequential reference: a truncated image takes no place under the cap, and an incomplete entry beyond the
    cap is never read."""
    root = tmp_path / "rel"
    _relation252k(root)
    group = root / "cat-z" / "Group1"
    group.mkdir(parents=True)
    rng = np.random.default_rng(3)
    labels = []
    for k in range(6):
        halves = [smooth_rgb(rng, 8, 8), smooth_rgb(rng, 8, 8)]
        Image.fromarray(np.concatenate(halves, axis=1)).save(group / f"z{k}.png")
        labels.append({"img_name": f"z{k}.png", "edit_instruction": f"e{k}", "left_image_description": "",
                       "right_image_description": ""})
    for k in (1, 2):  # truncated: the header opens, the pixels do not decode
        path = group / f"z{k}.png"
        path.write_bytes(path.read_bytes()[:60])
    del labels[5]["edit_instruction"]  # read only if the loop reaches it
    (group / "labels.json").write_text(json.dumps(labels))

    def sequential():  # the one-by-one loop for cat-z
        kept, unreadable, count = [], [], 0
        for k, entry in enumerate(labels):
            if cap and count >= cap:
                continue
            if "edit_instruction" not in entry:
                return "error"
            if k in (1, 2):
                unreadable.append(f"z{k}.png")
                continue
            count += 1
            kept.append(entry["img_name"])
        return kept, unreadable

    want = sequential()
    unreadable = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if want == "error":
            with pytest.raises(data.AnalogyDataError, match="edit_instruction"):
                data.relation252k_pairs(root, max_samples_per_category=cap, progress=False)
            return
        pairs = data.relation252k_pairs(root, max_samples_per_category=cap, progress=False, unreadable=unreadable)
    assert ([p["img_name"] for p in pairs if p["category"] == "cat-z"],
            [Path(path).name for path, _ in unreadable]) == want


def test_data_prepare_needs_only_img_name_for_entries_it_skips(tmp_path):
    """As the official script: an entry whose image is missing is skipped before its other fields are read."""
    _relation252k(tmp_path / "rel")
    labels_path = tmp_path / "rel" / "cat-a" / "Group1" / "labels.json"
    labels_path.write_text(json.dumps(json.loads(labels_path.read_text()) + [{"img_name": "gone.png"}]))
    assert data.prepare_relation252k(tmp_path / "rel", tmp_path / "out", progress=False)["analogies"] == 4


@pytest.mark.parametrize("text,fragment", [("[1, 2", "is not valid JSON (Expecting ',' delimiter"),
                                           ('{"image_id": "x"}', "must be a list of objects with an image_id"),
                                           ("[1]", "must be a list of objects with an image_id")])
def test_data_prepare_names_a_bad_filter_json(tmp_path, capsys, text, fragment):
    _relation252k(tmp_path / "rel")
    bad = tmp_path / "filter.json"
    bad.write_text(text)
    line = _one_error_line(capsys, ["data", "prepare", str(tmp_path / "rel"), str(tmp_path / "out"), "--quiet",
                                    "--filter-json", str(bad)])
    assert f"filter JSON {bad}" in line and fragment in line, line
    assert not (tmp_path / "out").exists()


def test_data_prepare_filter_categories_that_match_nothing(tmp_path, capsys):
    _relation252k(tmp_path / "rel")
    line = _one_error_line(capsys, ["data", "prepare", str(tmp_path / "rel"), str(tmp_path / "out"), "--quiet",
                                    "--filter-categories", "nope", "cat-x"])
    assert "no category of" in line and "matches the category filter (nope, cat-x)" in line, line
    assert "cat-a, cat-b, cat-c" in line and not (tmp_path / "out").exists()
    with pytest.warns(UserWarning, match="has no category nope"):  # a partial match keeps the known categories
        report = data.prepare_relation252k(tmp_path / "rel", tmp_path / "out", filter_categories=["nope", "cat-c"],
                                           progress=False)
    assert report["analogies"] == 1
    # categories that exist but give no analogy: the message says so (not that the filter matched nothing)
    line = _one_error_line(capsys, ["data", "prepare", str(tmp_path / "rel"), str(tmp_path / "out2"), "--quiet",
                                    "--filter-categories", "cat-b"])
    assert "no category has 2 or more usable pairs (the most in one category after the filters: 1;" in line, line


@pytest.mark.parametrize("option,value,fragment", [("--max-analogies", "0", "--max-analogies must be an integer >= 1"),
                                                   ("--max-samples-per-category", "-1",
                                                    "--max-samples-per-category must be an integer >= 1"),
                                                   ("--filter-json", "{tmp}/none.json", "none.json does not exist")])
def test_data_prepare_bad_option(tmp_path, capsys, option, value, fragment):
    _relation252k(tmp_path / "rel")
    line = _one_error_line(capsys, ["data", "prepare", str(tmp_path / "rel"), str(tmp_path / "out"), "--quiet",
                                    option, value.format(tmp=tmp_path)])
    assert fragment in line and not (tmp_path / "out").exists(), line


def test_data_prepare_out_is_a_file(tmp_path, capsys):
    _relation252k(tmp_path / "rel")
    (tmp_path / "out").write_text("mine")
    line = _one_error_line(capsys, ["data", "prepare", str(tmp_path / "rel"), str(tmp_path / "out"), "--quiet"])
    assert "is a file; give a folder" in line and (tmp_path / "out").read_text() == "mine"


def test_data_check_dump_onto_a_file_is_refused_up_front(tmp_path, capsys, monkeypatch):
    root = _strip_folder(tmp_path / "d")
    (tmp_path / "dump").write_text("mine")
    line = _one_error_line(capsys, ["data", "check", str(root), "--dump", str(tmp_path / "dump"), "--quiet",
                                    "--resize", "long-edge"])
    assert f"--dump {tmp_path / 'dump'} is a file; give a folder" in line, line
    assert (tmp_path / "dump").read_text() == "mine"
    read = []  # the API refuses it too, before reading a sample
    monkeypatch.setattr(data, "AnalogyFolder", lambda *a, **k: read.append(a))
    with pytest.raises(ValueError, match="dump .* is a file; give a folder"):
        data.check_folder(root, dump=tmp_path / "dump", progress=False)
    assert read == []


@pytest.mark.parametrize("option,value,fragment", [("--long-edge", "0", "--long-edge must be an integer >= 32, got 0"),
                                                   ("--long-edge", "16", "--long-edge must be an integer >= 32"),
                                                   ("--bucket-divisibility", "0",
                                                    "--bucket-divisibility must be an integer >= 2, got 0"),
                                                   ("--bucket-divisibility", "1",
                                                    "--bucket-divisibility must be an integer >= 2, got 1"),
                                                   ("--bucket-divisibility", "5",
                                                    "--bucket-divisibility must be even")])
def test_data_check_bad_option(tmp_path, capsys, option, value, fragment):
    """--long-edge takes the range lorweb-fast train accepts; the error names the option, not every image."""
    root = _strip_folder(tmp_path / "d")
    line = _one_error_line(capsys, ["data", "check", str(root), "--quiet", option, value])
    assert fragment in line and "s00" not in line, line


# ------------------------------------------------------------------------------------------ training size
_SDXL = np.array([[1024, 1024], [2048, 512], [1984, 512], [1920, 512], [1856, 512], [1792, 576], [1728, 576],
                  [1664, 576], [1600, 640], [1536, 640], [1472, 704], [1408, 704], [1344, 704], [1344, 768],
                  [1280, 768], [1216, 832], [1152, 832], [1152, 896], [1088, 896], [1088, 960], [1024, 960],
                  [960, 1024], [960, 1088], [896, 1088], [896, 1152], [832, 1152], [832, 1216], [768, 1280],
                  [768, 1344], [704, 1408], [704, 1472], [640, 1536], [640, 1600], [576, 1664], [576, 1728],
                  [576, 1792], [512, 1856], [512, 1920], [512, 1984], [512, 2048], [8192, 128], [128, 8192]])


def _reference_bucket(w, h, resolution, div):
    """Reference written from NVlabs/LoRWeB toolkit/buckets.py ``get_bucket_sizes`` (SDXL buckets times
    resolution / 1024, truncated, floored to multiples of ``div``) and ``get_bucket_for_image_size`` (resolution
    capped at int(sqrt(w h)); exact match, else the first bucket with the fewest cropped pixels after scaling by the
    larger ratio)."""
    res = min(resolution, int(np.sqrt(w * h)))
    sizes = (_SDXL * (res / 1024)).astype(np.int64)
    sizes -= sizes % div
    for bw, bh in sizes:
        if (bw, bh) == (w, h):
            return int(bw), int(bh)
    scale = np.maximum(sizes[:, 0] / w, sizes[:, 1] / h)
    nw, nh = (w * scale).astype(np.int64), (h * scale).astype(np.int64)
    removed = (nw - sizes[:, 0]) * nh + (nh - sizes[:, 1]) * nw
    bw, bh = sizes[int(np.argmin(removed))]
    return int(bw), int(bh)


def test_official_buckets_match_the_reference():
    rng = np.random.default_rng(0)
    sizes = [(512, 512), (1024, 768), (768, 1024), (640, 480), (1920, 1080), (300, 300), (2000, 500)]
    sizes += [tuple(int(v) for v in rng.integers(200, 2500, 2)) for _ in range(60)]
    for w, h in sizes:
        assert data.official_bucket(w, h, 512, 64) == _reference_bucket(w, h, 512, 64), (w, h)
    assert data.official_bucket(512, 512) == (512, 512) and data.official_bucket(1024, 1024) == (512, 512)
    with pytest.raises(AnalogyDataError, match="no training bucket"):
        data.official_bucket(20, 20, 512, 64)


def test_bucket_resize_is_the_official_training_size(tmp_path):
    """ai-toolkit (toolkit/dataloader_mixins.py ``setup_buckets`` and ``load_and_process_image``): the bucket comes
    from the b' file's size, the composed grid is resized with bicubic to ceil(W s) x ceil(H s),
    s = max(bucket W / W, bucket H / H), and centre-cropped at int((scaled - bucket) / 2)."""
    root = _strip_folder(tmp_path / "d", cells=[(40, 30)], b_prime=(100, 70))
    ds = AnalogyFolder(root, long_edge=64, bucket_divisibility=16)
    bw, bh = _reference_bucket(100, 70, 64, 16)
    s = max(bw / 100, bh / 70)
    sw, sh = int(np.ceil(100 * s)), int(np.ceil(70 * s))
    x0, y0 = int((sw - bw) / 2), int((sh - bh) / 2)
    full = _official_box_grid(Image.open(root / "control" / "s00.png"), Image.open(root / "target" / "s00.png"))
    want = np.asarray(Image.fromarray(full).resize((sw, sh), Image.BICUBIC))[y0:y0 + bh, x0:x0 + bw]
    item = ds[0]
    assert item["target"].size == (bw, bh) == ds.grid_size((200, 140))
    np.testing.assert_array_equal(np.asarray(item["target"]), want)
    np.testing.assert_array_equal(np.asarray(item["control"]), _official_control(want))
    # the default divisibility is the official 16, not the config's bucket_tolerance 64: resolution capped at
    # int(sqrt(100 * 70)) = 83 gives (96, 64) with 16 and (64, 64) with 64
    assert AnalogyFolder(root).grid_size((200, 140)) == _reference_bucket(100, 70, 512, 16) == (96, 64)
    assert AnalogyFolder(root, bucket_divisibility=64).grid_size((200, 140)) == (64, 64)
    small = _strip_folder(tmp_path / "small", cells=[(4, 4)], b_prime=(12, 8))
    with pytest.raises(AnalogyDataError, match="s00.png: an image of 12x8 has no training bucket"):
        AnalogyFolder(small)  # sides multiples of 16 at resolution int(sqrt(96)) = 9: nothing fits


def test_data_prepare_into_a_folder_in_use_is_refused_and_changes_nothing(tmp_path, capsys):
    """`data prepare` holds OUT/.lorweb-prepare.lock while it runs: a second one into the same folder (whose
    analogy_metadata.json the two would each rewrite without the other's entries) is refused naming the process
    that holds it and writes nothing; once the holder has ended the run goes ahead and leaves no lock file."""
    from lorweb_fast.testing import file_tree, hold_folder_lock

    _relation252k(tmp_path / "rel")
    out = tmp_path / "prepared"
    out.mkdir()
    holder = hold_folder_lock(out, data.PREPARE_LOCK_NAME, "data prepare run")
    try:
        before = file_tree(out)
        assert cli.main(["data", "prepare", str(tmp_path / "rel"), str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"{out} is in use by another data prepare run (process {holder.pid} on " in err, err
        assert file_tree(out) == before
    finally:
        holder.kill()
        holder.wait()
    assert cli.main(["data", "prepare", str(tmp_path / "rel"), str(out), "--quiet"]) == 0
    assert "4 analogies: 4 written" in capsys.readouterr().out
    assert not (out / data.PREPARE_LOCK_NAME).exists()
