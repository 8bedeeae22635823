"""Guards for ``lorweb_fast/data.py`` found by a mutation audit: behaviour of the training dataset that the other data
tests left unpinned (EXIF orientation, which file is control and which target in the grid layout, reversed grid
draws, layout detection boundaries, caption lookup order, long-edge sizes, the sample order, ``data check``'s options
and errors, ``data prepare``'s filters, Lanczos strips and metadata). Every image is built here with PIL/numpy."""

import json
import warnings
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from lorweb_fast import data
from lorweb_fast.data import AnalogyDataError, AnalogyFolder
from lorweb_fast.testing import analogy_sample, random_rgb_image, relation252k_folder, smooth_rgb


_sample = analogy_sample  # control/<name><ext>, target/<name>.png and its caption


def _grid_folder(root: Path, n=1, size=(64, 48)) -> Path:
    """Grid layout: control [a a'; b b] and target [a a'; b b'] of the same size, distinct pixels."""
    for i in range(n):
        _sample(root, f"g{i}", size, size, seed=10 + i)
    return root


def _quiet(fn):
    """``fn()`` with its warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


# ------------------------------------------------------------------------------------------- orientation
def test_exif_orientation_sets_the_cell_size_and_the_pixels(tmp_path):
    """Official: toolkit/data_transfer_object/data_loader.py ``FileItemDTO.__init__`` takes the size of
    ``exif_transpose(Image.open(path))`` (the bucket comes from it) and dataloader_mixins.py
    ``load_and_process_image`` opens target and control with ``exif_transpose``: a b' stored 18 x 24 with
    orientation 6 is a 24 x 18 cell, and its pixels arrive transposed."""
    root = _sample(tmp_path / "d", "s00", (60, 14), (18, 24))
    stored = Image.open(root / "target" / "s00.png").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(root / "target" / "s00.png", exif=exif.tobytes())
    b_prime = ImageOps.exif_transpose(Image.open(root / "target" / "s00.png"))
    assert b_prime.size == (24, 18)
    ds = AnalogyFolder(root, resize="long-edge", long_edge=64, multiple=16)
    assert ds.samples[0][4] == (48, 36)
    _, target = ds.full_grids(0)
    np.testing.assert_array_equal(np.asarray(target)[18:, 24:], np.asarray(b_prime.convert("RGB")))
    assert AnalogyFolder(root, long_edge=64)[0]["target"].size == data.official_bucket(24, 18, 64)


# ------------------------------------------------------------------------------------------- grid layout
def test_grid_layout_items_keep_control_and_target_apart(tmp_path):
    """``dataset[i]`` of a finished grid: the control is the control file, the target the target file, each resized
    to the training size with bicubic (the files are RGBA here: they arrive RGB, as ai-toolkit converts them)."""
    root = _grid_folder(tmp_path / "d")
    rng = np.random.default_rng(5)
    for sub in ("control", "target"):
        img = Image.open(root / sub / "g0.png").convert("RGBA")
        img.putalpha(Image.fromarray(rng.integers(0, 256, (48, 64), dtype=np.uint8)))
        img.save(root / sub / "g0.png")
    ds = AnalogyFolder(root, resize="long-edge", long_edge=32, multiple=8)
    item = ds[0]
    assert item["layout"] == "grid" and item["target"].size == (32, 24)
    for key in ("control", "target"):
        want = Image.open(root / key / "g0.png").convert("RGB").resize((32, 24), Image.BICUBIC)
        assert item[key].mode == "RGB"
        np.testing.assert_array_equal(np.asarray(item[key]), np.asarray(want))
    control, target = ds.full_grids(0)
    assert control.mode == target.mode == "RGB"


def test_a_reversed_grid_draw_is_reversed(tmp_path):
    """A bidirectional draw of a finished grid: target [a' a; b' b] (``swap_grid``), control with b' in both bottom
    cells (``bidirectional="reverse"``), at the training size."""
    root = _grid_folder(tmp_path / "d")
    ds = AnalogyFolder(root, resize="long-edge", long_edge=32, multiple=8, bidirectional="reverse")
    item = ds[(0, True)]
    assert item["swapped"]
    full = data.swap_grid(Image.open(root / "target" / "g0.png").convert("RGB"))
    want = np.asarray(full.resize((32, 24), Image.BICUBIC))
    np.testing.assert_array_equal(np.asarray(item["target"]), want)
    np.testing.assert_array_equal(np.asarray(item["control"])[12:, 16:], want[12:, :16])


def test_full_grids_swap_needs_bidirectional(tmp_path):
    """``full_grids(i, swap=True)`` of a dataset without bidirectional draws is the plain sample, as ``dataset[(i,
    True)]``."""
    root = _sample(tmp_path / "d", "s00", (60, 14), (24, 18))
    ds = AnalogyFolder(root, resize="long-edge")
    for got, want in zip(ds.full_grids(0, swap=True), ds.full_grids(0)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_control_from_target_refuses_odd_sides():
    """An odd grid cannot be split into quadrants: AnalogyDataError, not a shifted copy."""
    with pytest.raises(AnalogyDataError, match="even sides.*got 31x20"):
        data.control_from_target(Image.new("RGB", (31, 20)))
    with pytest.raises(AnalogyDataError, match="even sides.*got 30x21"):
        data.control_from_target(Image.new("RGB", (30, 21)))


# --------------------------------------------------------------------------------------- layout detection
@pytest.mark.parametrize("size", [(30, 12), (45, 16)])
def test_same_size_strip_shaped_pairs_are_ambiguous_from_aspect_2_5(tmp_path, size):
    """``STRIP_MIN_ASPECT``: a same-size pair with a width divisible by 3 and at least 2.5 times its height is
    ambiguous (30 x 12 is exactly 2.5, 45 x 16 is 2.8)."""
    root = _sample(tmp_path / "d", "s00", size, size)
    with pytest.raises(AnalogyDataError, match=rf"s00.png \({size[0]}x{size[1]}\) is ambiguous"):
        AnalogyFolder(root, resize="long-edge")


def test_same_size_grids_with_an_odd_height_are_refused(tmp_path):
    """Two grids of the same size need even sides: an odd height is named as the odd width is."""
    root = _sample(tmp_path / "d", "s00", (40, 21), (40, 21))
    with pytest.raises(AnalogyDataError, match="are 40x21 grids with an odd side"):
        AnalogyFolder(root, resize="long-edge")


def test_a_control_of_another_height_is_a_strip(tmp_path):
    """A control whose width equals its target's but whose height differs is a strip, not a grid."""
    root = _sample(tmp_path / "d", "s00", (48, 20), (48, 36))
    ds = AnalogyFolder(root, resize="long-edge")
    assert ds.samples[0][3] == "strip" and ds.samples[0][4] == (96, 72)


@pytest.mark.parametrize("control_size, target_size", [((41, 20), (41, 20)), ((40, 22), (40, 20))])
def test_layout_grid_refuses_odd_or_unequal_grids(tmp_path, control_size, target_size):
    """``layout="grid"``: control and target must be two grids of the same even size."""
    root = _sample(tmp_path / "d", "s00", control_size, target_size)
    with pytest.raises(AnalogyDataError, match=r"are not two 2x2 grids of the same even size \(layout='grid'\)"):
        AnalogyFolder(root, resize="long-edge", layout="grid")


# ---------------------------------------------------------------------------------------- samples, captions
def test_upper_case_target_extensions_are_samples(tmp_path):
    """Official toolkit/data_loader.py ``AiToolkitDataset.__init__``: ``file.lower().endswith(extensions)``: a
    target named s00.PNG is a sample."""
    root = _sample(tmp_path / "d", "s00", (60, 14), (24, 18))
    (root / "target" / "s00.png").rename(root / "target" / "s00.PNG")
    assert [t.name for _, t, *_ in AnalogyFolder(root, resize="long-edge").samples] == ["s00.PNG"]


def test_samples_are_ordered_by_their_path_under_target(tmp_path):
    """Sample indices follow the sorted path under target/ ("a/z" before "b"), not the bare file name."""
    root = _sample(tmp_path / "d", "b", (60, 14), (24, 18))
    (root / "target" / "a").mkdir()
    _sample(root, "z", (60, 14), (24, 18), seed=1)
    (root / "target" / "z.png").rename(root / "target" / "a" / "z.png")
    (root / "target" / "z.txt").rename(root / "target" / "a" / "z.txt")
    ds = AnalogyFolder(root, resize="long-edge")
    assert [ds.name(i) for i in range(len(ds))] == ["a/z", "b"]


def test_caption_lookup_prefers_captions_over_control(tmp_path):
    """After the .txt beside the target: ``captions/<id>.txt``, then ``control/<id>.txt`` (``CAPTION_DIRS``)."""
    root = _sample(tmp_path / "d", "s00", (60, 14), (24, 18), caption=None)
    (root / "captions").mkdir()
    (root / "captions" / "s00.txt").write_text("from captions")
    (root / "control" / "s00.txt").write_text("from control")
    assert AnalogyFolder(root, resize="long-edge").samples[0][2] == "from captions"
    (root / "captions" / "s00.txt").unlink()
    assert AnalogyFolder(root, resize="long-edge").samples[0][2] == "from control"


def test_the_caption_beside_the_target_wins_over_ours(tmp_path):
    """Official toolkit/dataloader_mixins.py ``CaptionProcessingDTOMixin.load_caption`` reads only the .txt beside the
    target image (after the relation metadata): our ``captions/`` and ``control/`` folders are fallbacks and never
    override it."""
    root = _sample(tmp_path / "d", "s00", (60, 14), (24, 18), caption="beside the target")
    for sub in ("captions", "control"):
        (root / sub).mkdir(exist_ok=True)
        (root / sub / "s00.txt").write_text(f"from {sub}")
    assert AnalogyFolder(root, resize="long-edge").samples[0][2] == "beside the target"


def test_relation_prompts_are_normalised_as_official(tmp_path):
    """Official dataloader_mixins.py: ``load_caption`` takes the entry's ``edit_prompt`` raw and ``get_caption`` splits
    it on commas, strips the pieces, drops empty ones and joins them with ", " (as a .txt caption)."""
    root = _sample(tmp_path / "d", "s00", (60, 14), (24, 18), caption=None)
    (root / "analogy_metadata.json").write_text(json.dumps([{"analogy_id": "s00",
                                                             "edit_prompt": " make it red ,, bigger \n"}]))
    assert AnalogyFolder(root, resize="long-edge")[0]["caption"] == "make it red, bigger"


# ------------------------------------------------------------------------------------------ errors, options
def test_a_folder_whose_every_sample_is_skipped_is_an_error(tmp_path):
    """skip_bad drops broken samples, but a folder with none left is an AnalogyDataError."""
    root = _sample(tmp_path / "d", "s00", (60, 14), (24, 18))
    (root / "control" / "s00.png").unlink()
    with pytest.raises(AnalogyDataError, match=r"no usable training samples in .* \(1 skipped\)"):
        _quiet(lambda: AnalogyFolder(root, resize="long-edge", skip_bad=True))


@pytest.mark.parametrize("kwargs, fragment", [({"resize": "crop"}, "resize must be one of"),
                                              ({"layout": "row"}, "layout must be one of"),
                                              ({"bidirectional": "yes"}, "bidirectional must be one of"),
                                              ({"bucket_divisibility": 5}, "bucket_divisibility must be even"),
                                              ({"resize": "long-edge", "multiple": 5}, "multiple must be even"),
                                              ({"resize": "long-edge", "multiple": 0}, "multiple")])
def test_bad_dataset_options_are_refused(tmp_path, kwargs, fragment):
    """Options outside their choices are a ValueError naming the option, before any sample is read."""
    root = _sample(tmp_path / "d", "s00", (60, 14), (24, 18))
    with pytest.raises(ValueError, match=fragment):
        AnalogyFolder(root, **kwargs)


def _truncate(path: Path):
    """Replace the target image ``path`` (.png) by a JPEG cut in half: its header passes the folder scan, its pixels
    do not decode (what ``data check`` decodes completely)."""
    path.unlink()
    jpeg = path.with_suffix(".jpg")
    random_rgb_image(np.random.default_rng(9), 64, 48).save(jpeg, quality=95)
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])


def test_data_check_names_the_first_undecodable_sample(tmp_path):
    """Several samples that do not decode: the error counts them and names the first in sample order."""
    root = tmp_path / "d"
    for i in range(3):
        _sample(root, f"s{i:02d}", (60, 14), (24, 18), seed=i)
    _truncate(root / "target" / "s00.png")
    _truncate(root / "target" / "s02.png")
    with pytest.raises(AnalogyDataError, match=r"2 training samples cannot be used, e.g. s00: .*s00\.jpg"):
        data.check_folder(root, resize="long-edge", progress=False)


def test_data_check_all_samples_undecodable_with_skip_bad_is_an_error(tmp_path):
    """``data check --skip-bad`` where no sample decodes: an error, not a report of 0 samples."""
    root = _sample(tmp_path / "d", "s00", (60, 14), (24, 18))
    _truncate(root / "target" / "s00.png")
    with pytest.raises(AnalogyDataError, match=r"no usable training samples .*\(1 skipped\)"):
        data.check_folder(root, resize="long-edge", skip_bad=True, progress=False)


def test_data_check_skipped_samples_are_not_listed_as_uncaptioned(tmp_path):
    """A sample without a caption that is skipped as undecodable does not train, so it is not reported as training
    with an empty caption."""
    root = tmp_path / "d"
    _sample(root, "s00", (60, 14), (24, 18))
    _sample(root, "s01", (60, 14), (24, 18), seed=1, caption=None)
    _truncate(root / "target" / "s01.png")
    report = data.check_folder(root, resize="long-edge", skip_bad=True, progress=False)
    assert report["samples"] == 1 and report["samples_without_caption"] == []


def test_data_check_training_sizes_follow_long_edge_and_divisibility(tmp_path):
    """``training_sizes`` are the sizes the trainer uses with the given options (official bucket of the 100 x 70
    b' cell: (96, 64) at divisibility 16, (64, 64) at 64; long edge 64 with bucket (48, 32))."""
    root = _sample(tmp_path / "d", "s00", (120, 30), (100, 70))

    def sizes(**kw):
        return data.check_folder(root, progress=False, **kw)["training_sizes"]

    assert sizes() == {"96x64": 1}
    assert sizes(bucket_divisibility=64) == {"64x64": 1}
    assert sizes(long_edge=64) == {f"{data.official_bucket(100, 70, 64)[0]}x{data.official_bucket(100, 70, 64)[1]}": 1}
    assert sizes(long_edge=64) != sizes()
    assert sizes(resize="long-edge", long_edge=64) == {"64x32": 1}  # 200 x 140 -> 64 x 44.8 -> multiples of 32


def test_bucket_ties_keep_the_first_bucket():
    """Official toolkit/buckets.py ``get_bucket_for_image_size``: the closest bucket is replaced only when it removes
    strictly fewer pixels (``removed_pixels < min_removed_pixels``), so among equal ones the first in the SDXL list
    wins: 368 x 384 -> (368, 368) (not (336, 368)), 384 x 368 -> (368, 368), 336 x 528 -> (336, 496)."""
    assert data.official_bucket(368, 384) == (368, 368)
    assert data.official_bucket(384, 368) == (368, 368)
    assert data.official_bucket(336, 528) == (336, 496)


# --------------------------------------------------------------------------------------------- long edge
def test_long_edge_sizes_round_to_the_nearest_multiple_and_keep_one(tmp_path):
    """``resize="long-edge"``: the long edge is ``long_edge``, the other side rounded to the nearest multiple of
    ``multiple`` (60 x 44 at 64 / 16: 46.9 -> 48) and at least one multiple (400 x 8: 1.3 -> 32, not 0)."""
    ds = AnalogyFolder(_sample(tmp_path / "d", "s00", (60, 14), (24, 18)), resize="long-edge", long_edge=64,
                       multiple=16)
    assert ds.grid_size((60, 44)) == (64, 48)
    assert ds.grid_size((44, 60)) == (48, 64)
    ds.multiple = 32
    assert ds.grid_size((400, 8)) == (64, 32)
    assert ds.grid_size((8, 400)) == (32, 64)


# -------------------------------------------------------------------------------------------- draws
def test_bidirectional_draws_are_a_fair_coin():
    """Official ``_create_box_analogy_image``: ``random.random() < 0.5``: over 20000 positions the share of reversed
    draws is 0.5 within 0.015 (about 4 standard deviations)."""
    share = sum(data.bidirectional_swap(0, p) for p in range(20000)) / 20000
    assert abs(share - 0.5) < 0.015


# ------------------------------------------------------------------------------------------ data prepare
#: the smooth halves of these tests ramp along both axes (lorweb_fast.testing.smooth_rgb)
RAMP = (60, 40)


def _relation252k(root: Path, spec=None) -> dict:
    """A one-category Relation252K folder (lorweb_fast.testing.relation252k_folder); {image_id: (left, right)}."""
    return relation252k_folder(root, spec or {"cat-a": [(16, 12), (16, 12), (20, 10)]}, seed=2, ramp=RAMP)


def test_data_prepare_strips_are_resized_with_lanczos(tmp_path):
    """Official preprocess_data.py ``process_single_analogy``: every cell that differs from the smallest width and
    height is resized with ``Image.Resampling.LANCZOS``, the strip saved as JPEG quality 95; here the written strip
    decodes to exactly the reference's JPEG."""
    halves = _relation252k(tmp_path / "rel")
    out = tmp_path / "out"
    data.prepare_relation252k(tmp_path / "rel", out, progress=False)
    aid = "analogy_cat-a_img0.png_cat-a_img2.png_0001"  # A: 16 x 12 halves, C: 20 x 10 -> cells 16 x 10
    a, a2 = halves["cat-a_img0.png"]
    b, _ = halves["cat-a_img2.png"]
    cells = [Image.fromarray(c).resize((16, 10), Image.Resampling.LANCZOS) for c in (a, a2, b)]
    buf = BytesIO()
    Image.fromarray(np.concatenate([np.asarray(c) for c in cells], axis=1)).save(buf, "JPEG", quality=95)
    with Image.open(out / "control" / f"{aid}.jpg") as got:
        np.testing.assert_array_equal(np.asarray(got), np.asarray(Image.open(buf)))


@pytest.mark.parametrize("case", ["out is src", "out inside src", "control is a file", "target is a file",
                                  "metadata is a folder"])
def test_data_prepare_refuses_an_output_it_cannot_use_before_writing(tmp_path, capsys, case):
    """``data prepare`` into the Relation252K folder itself (or inside it) would write the training layout among
    the source images; an output whose control / target is a file, or whose analogy_metadata.json is a folder,
    failed with a raw FileExistsError / IsADirectoryError (the latter after every image was written). Each is a
    one-line usage error (exit status 2) before anything is written, from the CLI and from the function."""
    from lorweb_fast import cli
    from lorweb_fast.validation import UsageError

    src = tmp_path / "rel"
    _relation252k(src)
    out = {"out is src": src, "out inside src": src / "cat-a" / "Group1" / "out"}.get(case, tmp_path / "out")
    if case in ("control is a file", "target is a file"):
        out.mkdir()
        (out / case.split()[0]).write_text("x")
    elif case == "metadata is a folder":
        (out / "analogy_metadata.json").mkdir(parents=True)
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    fragment = {"out is src": "or inside one of its categories", "out inside src": "or inside one of its categories",
                "control is a file": "control is a file",
                "target is a file": "target is a file", "metadata is a folder": "analogy_metadata.json is not a file"}
    with pytest.raises(UsageError, match=fragment[case]):
        data.prepare_relation252k(src, out, progress=False)
    assert cli.main(["data", "prepare", str(src), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert fragment[case] in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == before
    if case == "out is src":  # a sub-folder of the source that is no category is never read as one: accepted
        assert _quiet(lambda: data.prepare_relation252k(src, src / "prepared", progress=False))["written"] == 3
        assert _quiet(lambda: data.prepare_relation252k(src, src / "prepared", progress=False))["skipped"] == 3


def test_data_prepare_writes_an_analogy_whose_file_name_just_fits_the_limit(tmp_path):
    """A 109-character category gives 254-byte file names (``<id>.jpg``), which fit the 255-byte limit and which the
    official script writes; the temporary name ``.<name>.<random>.tmp`` is cut to fit instead of failing the
    analogy with "File name too long", and a killed run's cut temporary is still recognised and removed."""
    cat = "c" * 109
    relation252k_folder(tmp_path / "rel", {cat: [(16, 12), (16, 12)]}, seed=2, ramp=RAMP)
    out = tmp_path / "out"
    (out / "target").mkdir(parents=True)
    aid = f"analogy_{cat}_img0.png_{cat}_img1.png_0000"
    assert len(f"{aid}.jpg") == 254
    from lorweb_fast._files import temporary_prefix

    leftover = out / "target" / (temporary_prefix(out / "target" / f"{aid}.jpg") + "abcd1234.tmp")
    assert len(leftover.name.encode()) == 255
    leftover.write_bytes(b"half")
    mine = out / "target" / ".analogy_notes.abcd1234.tmp"  # temporary-shaped, but short and not a prepared name
    mine.write_text("mine")
    report = data.prepare_relation252k(tmp_path / "rel", out, progress=False)
    assert (report["analogies"], report["written"], report["failed"]) == (1, 1, [])
    assert (out / "control" / f"{aid}.jpg").is_file() and (out / "target" / f"{aid}.txt").is_file()
    assert not leftover.exists() and mine.read_text() == "mine"


def test_data_prepare_counts_entries_without_images_and_categories_left_out(tmp_path, capsys):
    """Labels entries whose image file is missing and categories left with fewer than --min-pairs-per-category
    usable pairs are skipped as in the official script, but no longer silently: warnings, the report
    (``missing``, ``categories_left_out``) and the command's output count them; when nothing is left, the error
    says how many entries had no image."""
    from lorweb_fast import cli

    src = tmp_path / "rel"
    relation252k_folder(src, {"cat-a": [(16, 12)], "cat-b": [(16, 12), (16, 12)]}, seed=2, ramp=RAMP,
                        skipped_entries=True)
    (src / "cat-z" / "Group1").mkdir(parents=True)  # a category whose only entry has no image: 0 usable pairs
    (src / "cat-z" / "Group1" / "labels.json").write_text(json.dumps([{"img_name": "gone.png"}]))
    with pytest.warns(UserWarning) as caught:
        report = data.prepare_relation252k(src, tmp_path / "out", progress=False)
    messages = " | ".join(str(w.message) for w in caught)
    assert "skipped 3 Relation252K labels entries whose image file is missing" in messages
    assert "2 categories have fewer than 2 usable pairs and give no analogies (e.g. cat-a: 1" in messages
    assert sorted(Path(m).relative_to(src).as_posix() for m in report["missing"]) == [
        "cat-a/Group1/missing.png", "cat-b/Group1/missing.png", "cat-z/Group1/gone.png"]
    assert report["categories_left_out"] == {"cat-a": 1, "cat-z": 0} and report["analogies"] == 1
    assert _quiet(lambda: cli.main(["data", "prepare", str(src), str(tmp_path / "out2"), "--quiet"])) == 0
    out = capsys.readouterr().out
    assert "3 labels entries have no image file and were left out" in out
    assert "2 categories with fewer than 2 usable pairs were left out: cat-a (1), cat-z (0)" in out
    # with a cap of one pair per category, the entries after the one that completed it are never reached
    pairs_missing = []
    _quiet(lambda: data.relation252k_pairs(src, max_samples_per_category=1, missing=pairs_missing, progress=False))
    assert [Path(m).relative_to(src).as_posix() for m in pairs_missing] == ["cat-z/Group1/gone.png"]
    with pytest.raises(AnalogyDataError, match=r"the most in one category after the filters: 1; labels entries "
                                               r"without their image: 1, images that do not decode: 0"):
        _quiet(lambda: data.prepare_relation252k(src, tmp_path / "out3", filter_categories=["cat-a"],
                                                 progress=False))


def test_data_prepare_splits_odd_widths_at_half_the_width(tmp_path):
    """Official ``_split_concatenated_image``: left = (0, 0, width // 2, h), right = (width // 2, 0, width, h); a
    33 px wide image gives a 16 px a and a 17 px a' (then resized to the smallest cell with Lanczos)."""
    group = tmp_path / "rel" / "cat" / "Group1"
    group.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(2):
        Image.fromarray(smooth_rgb(rng, 33, 12, ramp=RAMP)).save(group / f"img{k}.png")
    (group / "labels.json").write_text(json.dumps([{"img_name": f"img{k}.png", "edit_instruction": "e",
                                                     "left_image_description": "", "right_image_description": ""}
                                                    for k in range(2)]))
    data.prepare_relation252k(tmp_path / "rel", tmp_path / "out", progress=False)
    aid = "analogy_cat_img0.png_cat_img1.png_0000"
    with Image.open(tmp_path / "out" / "control" / f"{aid}.jpg") as im:
        assert im.size == (48, 12)
    with Image.open(tmp_path / "out" / "target" / f"{aid}.jpg") as im:
        assert im.size == (17, 12)


def test_data_prepare_max_analogies_follows_the_seed(tmp_path):
    """``max_analogies`` keeps a sample drawn with ``seed``: the same seed gives the same analogies, and the seeds
    0..9 do not all give the same ones (6 analogies, 2 kept)."""
    _relation252k(tmp_path / "rel", {"cat-a": [(16, 12)] * 4})
    pairs = data.relation252k_pairs(tmp_path / "rel", progress=False)
    chosen = [[(x["A"]["image_id"], x["C"]["image_id"]) for x in data.plan_analogies(pairs, max_analogies=2, seed=s)]
              for s in range(10)]
    assert chosen[3] == [(x["A"]["image_id"], x["C"]["image_id"])
                         for x in data.plan_analogies(pairs, max_analogies=2, seed=3)]
    assert len({tuple(c) for c in chosen}) > 1


def test_data_prepare_filter_json_leaves_images_out(tmp_path):
    """Official ``get_triplets(filter_json)``: entries whose ``image_id`` (``<category>_<img_name>``) is listed are
    left out before the pairing."""
    _relation252k(tmp_path / "rel")
    (tmp_path / "f.json").write_text(json.dumps([{"image_id": "cat-a_img1.png"}, {"other": 1}]))
    report = data.prepare_relation252k(tmp_path / "rel", tmp_path / "out", filter_json=str(tmp_path / "f.json"),
                                       progress=False)
    ids = [m["analogy_id"] for m in json.loads((tmp_path / "out" / "analogy_metadata.json").read_text())]
    assert report["analogies"] == 1 and ids == ["analogy_cat-a_img0.png_cat-a_img2.png_0000"]


def test_data_prepare_refuses_a_non_string_edit_instruction(tmp_path):
    """A used labels entry whose ``edit_instruction`` is not a string is named (it would become the caption)."""
    _relation252k(tmp_path / "rel")
    labels_path = tmp_path / "rel" / "cat-a" / "Group1" / "labels.json"
    labels = json.loads(labels_path.read_text())
    labels[1]["edit_instruction"] = 5
    labels_path.write_text(json.dumps(labels))
    with pytest.raises(AnalogyDataError, match=r"entry 1 \('img1.png'\): edit_instruction must be a string, got 5"):
        data.prepare_relation252k(tmp_path / "rel", tmp_path / "out", progress=False)


def test_data_prepare_failed_analogies_are_not_in_the_metadata(tmp_path, monkeypatch):
    """An analogy whose files could not be written is reported as failed and left out of analogy_metadata.json."""
    _relation252k(tmp_path / "rel")
    real = data.write_analogy

    def write(analogy, out):
        if analogy["id"].endswith("_0001"):
            raise OSError("disk full")
        return real(analogy, out)

    monkeypatch.setattr(data, "write_analogy", write)
    report = data.prepare_relation252k(tmp_path / "rel", tmp_path / "out", progress=False)
    ids = [m["analogy_id"] for m in json.loads((tmp_path / "out" / "analogy_metadata.json").read_text())]
    assert [f for f, _ in report["failed"]] == ["analogy_cat-a_img0.png_cat-a_img2.png_0001"]
    assert ids == ["analogy_cat-a_img0.png_cat-a_img1.png_0000", "analogy_cat-a_img1.png_cat-a_img2.png_0002"]



def _relation252k_modes(root: Path, modes: list) -> dict:
    """One category of side-by-side 16 x 12 | 16 x 12 images, image k saved in PIL mode ``modes[k]``; returns
    {k: (left, right)} as the images that were saved (in their modes)."""
    group = root / "cat" / "Group1"
    group.mkdir(parents=True)
    rng = np.random.default_rng(5)
    halves, labels = {}, []
    for k, mode in enumerate(modes):
        halves_rgb = [smooth_rgb(rng, 16, 12, ramp=RAMP), smooth_rgb(rng, 16, 12, ramp=RAMP)]
        whole = Image.fromarray(np.concatenate(halves_rgb, axis=1)).convert(mode)
        whole.save(group / f"img{k}.png")
        halves[k] = (whole.crop((0, 0, 16, 12)), whole.crop((16, 0, 32, 12)))
        labels.append({"img_name": f"img{k}.png", "edit_instruction": f"edit {k}", "left_image_description": "",
                       "right_image_description": ""})
    (group / "labels.json").write_text(json.dumps(labels))
    return halves


def _official_strip_jpeg(cells) -> np.ndarray:
    """Reference written from NVlabs/LoRWeB preprocess_data.py ``process_single_analogy``: RGBA and modes other
    than RGB / L -> RGB, L kept; the channel count of the first cell's array decides, RGB arrays converted to L after
    an L first cell; numpy concatenation; JPEG quality 95 in the resulting mode. Returns the decoded JPEG."""
    arrays = []
    for img in cells:
        if img.mode == "RGBA" or img.mode not in ("RGB", "L"):
            img = img.convert("RGB")
        arrays.append(np.array(img))
    channels = arrays[0].shape[2] if arrays[0].ndim == 3 else 1
    same = [np.array(Image.fromarray(a).convert("L")) if a.ndim == 3 and channels == 1 else a for a in arrays]
    buf = BytesIO()
    Image.fromarray(np.concatenate(same, axis=1)).save(buf, "JPEG", quality=95)
    with Image.open(buf) as im:
        return np.asarray(im.convert(im.mode))


def test_data_prepare_keeps_the_official_colour_modes(tmp_path):
    """Greyscale sources as the official ``process_single_analogy``: an L first cell makes a greyscale (L) strip, its
    colour cells converted to L; an L cell after a colour first cell fails the analogy (left out of the metadata); an
    L b' is saved as an L JPEG. Images 0 and 2 are RGB, 1 and 3 greyscale; analogies are the pairs i < j."""
    halves = _relation252k_modes(tmp_path / "rel", ["RGB", "L", "RGB", "L"])
    out = tmp_path / "out"
    report = data.prepare_relation252k(tmp_path / "rel", out, progress=False)
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    ids = {p: f"analogy_cat_img{p[0]}.png_cat_img{p[1]}.png_{i:04d}" for i, p in enumerate(pairs)}
    failed = {pair for pair in pairs if (ids[pair] in {f for f, _ in report["failed"]})}
    assert failed == {(0, 1), (0, 3), (2, 3)}, report["failed"]
    assert all("greyscale" in why for _, why in report["failed"])
    listed = {m["analogy_id"] for m in json.loads((out / "analogy_metadata.json").read_text())}
    assert listed == {ids[p] for p in pairs if p not in failed}
    for (i, j) in [(0, 2), (1, 2), (1, 3)]:
        (a, a2), (b, b2) = halves[i], halves[j]
        with Image.open(out / "control" / f"{ids[i, j]}.jpg") as got:
            assert got.mode == ("L" if i in (1, 3) else "RGB")
            np.testing.assert_array_equal(np.asarray(got), _official_strip_jpeg([a, a2, b]))
        with Image.open(out / "target" / f"{ids[i, j]}.jpg") as got:
            assert got.mode == b2.mode


def test_data_prepare_target_modes_as_official(tmp_path):
    """b' as the official ``process_single_analogy`` saves it: RGBA converted to RGB, other modes saved as they are,
    so a palette (P) b' cannot be written as JPEG and its analogy fails; a palette a / b cell becomes RGB."""
    halves = _relation252k_modes(tmp_path / "rel", ["RGB", "P", "RGBA"])
    out = tmp_path / "out"
    report = data.prepare_relation252k(tmp_path / "rel", out, progress=False)
    assert [f for f, _ in report["failed"]] == ["analogy_cat_img0.png_cat_img1.png_0000"]
    assert "P" in report["failed"][0][1]
    for i, aid in ((0, "analogy_cat_img0.png_cat_img2.png_0001"), (1, "analogy_cat_img1.png_cat_img2.png_0002")):
        (a, a2), (b, _) = halves[i], halves[2]
        with Image.open(out / "control" / f"{aid}.jpg") as got:
            assert got.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(got), _official_strip_jpeg([a, a2, b]))
        with Image.open(out / "target" / f"{aid}.jpg") as got:
            assert got.mode == "RGB"
    assert not (out / "control" / "analogy_cat_img0.png_cat_img1.png_0000.jpg").exists()


def test_data_check_dump_keeps_samples_that_share_a_name(tmp_path):
    """target/s.png and target/s.jpg are two samples (as the official loader lists them): the dump wrote both to
    s_target.png, the second replacing the first; each now keeps its extension in its file names."""
    root = _grid_folder(tmp_path / "d", n=1)
    with Image.open(root / "target" / "g0.png") as im:
        im.save(root / "target" / "g0.jpg", quality=95)
    report = _quiet(lambda: data.check_folder(root, dump=tmp_path / "dump", progress=False))
    assert report["samples"] == 2
    assert sorted(p.name for p in (tmp_path / "dump").iterdir()) == sorted(
        f"g0.{ext}_{kind}" for ext in ("jpg", "png") for kind in ("caption.txt", "control.png", "target.png"))


def test_data_check_dump_keeps_a_nested_sample_and_a_flat_one_of_the_same_written_name(tmp_path):
    """target/sub/x.png and target/sub__x.png both write as sub__x (``/`` written ``__``): the second in sample
    order takes sub__x~2 instead of replacing the first's files, and each dumped target is its own sample's."""
    root = _grid_folder(tmp_path / "d", n=1)
    (root / "target" / "sub").mkdir()
    for k, (target, control) in enumerate((("sub/x.png", "x.png"), ("sub__x.png", "sub__x.png"))):
        size = (64 + 16 * k, 48)
        random_rgb_image(np.random.default_rng(20 + k), *size).save(root / "target" / target)
        random_rgb_image(np.random.default_rng(30 + k), *size).save(root / "control" / control)
    report = _quiet(lambda: data.check_folder(root, dump=tmp_path / "dump", progress=False))
    assert report["samples"] == 3
    dumped = {p.name for p in (tmp_path / "dump").iterdir()}
    assert {f"{n}_{kind}" for n in ("g0", "sub__x", "sub__x~2")
            for kind in ("caption.txt", "control.png", "target.png")} == dumped
    with Image.open(tmp_path / "dump" / "sub__x_target.png") as first, \
            Image.open(tmp_path / "dump" / "sub__x~2_target.png") as second:
        assert (first.size, second.size) == ((64, 48), (80, 48))  # sub/x.png sorts before sub__x.png


def test_data_check_dump_keeps_samples_whose_names_differ_only_in_case_apart(tmp_path):
    """target/A.png and target/a.png are two samples here (a case-sensitive file system); dumped as A_* and a_*
    they would overwrite each other on a case-insensitive one (macOS, Windows), so the second in sample order
    takes a~2."""
    root = _grid_folder(tmp_path / "d", n=1)
    for k, name in enumerate(("A", "a")):
        _sample(root, name, (64 + 16 * k, 48), (64 + 16 * k, 48), seed=40 + k)
    report = _quiet(lambda: data.check_folder(root, dump=tmp_path / "dump", progress=False))
    assert report["samples"] == 3
    dumped = {p.name for p in (tmp_path / "dump").iterdir()}
    kinds = ("caption.txt", "control.png", "target.png")
    assert {f"{n}_{kind}" for n in ("g0", "A", "a~2") for kind in kinds} == dumped
    with Image.open(tmp_path / "dump" / "A_target.png") as first, \
            Image.open(tmp_path / "dump" / "a~2_target.png") as second:
        assert (first.size, second.size) == ((64, 48), (80, 48))  # "A.png" sorts before "a.png"


def test_data_prepare_fails_an_analogy_whose_id_holds_a_path_separator(tmp_path):
    """An img_name in a sub-folder of Group1/ ("sub/img0.png") gives an id with "/": its files were written into
    sub-folders of control/ and target/ that the training loader cannot pair ("has no control image"); the analogy
    now fails, as in the official script (whose save into the missing sub-folder fails), and nothing is written."""
    group = tmp_path / "rel" / "cat" / "Group1"
    (group / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = []
    for k in range(2):
        Image.fromarray(smooth_rgb(rng, 32, 12, ramp=RAMP)).save(group / "sub" / f"img{k}.png")
        labels.append({"img_name": f"sub/img{k}.png", "edit_instruction": "e", "left_image_description": "l",
                       "right_image_description": "r"})
    (group / "labels.json").write_text(json.dumps(labels))
    report = data.prepare_relation252k(tmp_path / "rel", tmp_path / "out", progress=False)
    assert report["written"] == 0 and len(report["failed"]) == 1
    assert "path separator" in report["failed"][0][1]
    assert [p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file()] == \
        ["analogy_metadata.json"]
    assert not list((tmp_path / "out" / "control").iterdir()) and not list((tmp_path / "out" / "target").iterdir())


def test_data_check_refuses_what_train_refuses_for_the_official_query_crops(tmp_path, capsys):
    """A portrait b' (100 x 220 in a strip of 300 x 220) gives a training grid at most half as wide as it is tall:
    the official training crops (s = H // 2) leave a' empty, so ``lorweb-fast train`` refuses it (or skips it with
    --skip-bad); ``data check`` with the same options reports the same sample, and passes it for a query source or
    mode that does not cut a' (as train does)."""
    from lorweb_fast import cli

    root = tmp_path / "d"
    _sample(root, "ok", (300, 100), (100, 100), seed=1)
    _sample(root, "tall", (300, 220), (100, 220), seed=2)
    with pytest.raises(AnalogyDataError, match=r"1 training samples cannot be used, e.g. tall: .*too tall"):
        _quiet(lambda: data.check_folder(root, progress=False))
    report = _quiet(lambda: data.check_folder(root, skip_bad=True, progress=False))
    assert report["samples"] == 1 and report["skipped"] == 1 and "too tall" in report["problems"][0]
    for options in ({"query_source": "images"}, {"query_mode": "aa'bb'"}):
        assert _quiet(lambda: data.check_folder(root, progress=False, **options))["samples"] == 2
    assert _quiet(lambda: cli.main(["data", "check", str(root), "--quiet", "--skip-bad"])) == 0
    assert "problems: 1" in capsys.readouterr().out
    assert _quiet(lambda: cli.main(["data", "check", str(root), "--quiet", "--query-source", "images"])) == 0
    assert "problems: 0" in capsys.readouterr().out


def test_images_the_loader_does_not_read_are_named(tmp_path, capsys):
    """A .tif / .bmp target or control (Pillow reads them; the official extension list does not): the sample list
    is the official one, and a warning, the report and ``data check``'s output name the unread files."""
    from lorweb_fast import cli

    root = _sample(tmp_path / "d", "a", (60, 14), (24, 18))
    random_rgb_image(np.random.default_rng(3), 24, 18).save(root / "target" / "b.tif")
    random_rgb_image(np.random.default_rng(4), 60, 14).save(root / "control" / "b.bmp")
    with pytest.warns(UserWarning, match=r"2 image files under .* are not read: only .png, .jpg, .jpeg, .webp "
                                         r".*b\.bmp"):
        ds = AnalogyFolder(root)
    assert [ds.name(i) for i in range(len(ds))] == ["a"]
    assert [Path(p).name for p in ds.unread_images] == ["b.bmp", "b.tif"]
    assert _quiet(lambda: cli.main(["data", "check", str(root), "--quiet"])) == 0
    assert "image files not read (extension not one of .png, .jpg, .jpeg, .webp): 2, e.g." in capsys.readouterr().out
    assert AnalogyFolder(_sample(tmp_path / "clean", "a", (60, 14), (24, 18))).unread_images == []


def test_nested_targets_sharing_a_file_name_are_named_with_their_one_control(tmp_path):
    """target/cat/0001.png and target/dog/0001.png both take control/0001.png (the official lookup, by file name in
    control/): both are samples, with a warning naming the control and the two targets, and ``data check``'s
    ``shared_controls``; a single nested target, or two files of one folder, are not reported."""
    root = _sample(tmp_path / "d", "x", (60, 14), (24, 18))
    random_rgb_image(np.random.default_rng(1), 60, 14).save(root / "control" / "0001.png")
    for k, sub in enumerate(("cat", "dog")):
        (root / "target" / sub).mkdir()
        random_rgb_image(np.random.default_rng(2 + k), 24, 18).save(root / "target" / sub / "0001.png")
        (root / "target" / sub / "0001.txt").write_text(f"{sub} edit")
    with pytest.warns(UserWarning, match=r"share a file name and so one control image .*0001\.png for cat/0001, "
                                         r"dog/0001"):
        ds = AnalogyFolder(root)
    assert sorted(ds.name(i) for i in range(len(ds))) == ["cat/0001", "dog/0001", "x"]
    assert {s[1].relative_to(root).as_posix(): s[0].name for s in ds.samples}["target/dog/0001.png"] == "0001.png"
    report = _quiet(lambda: data.check_folder(root, progress=False))
    assert report["shared_controls"] == {str(root / "control" / "0001.png"): ["cat/0001", "dog/0001"]}
    (root / "target" / "dog" / "0001.png").unlink()
    assert _quiet(lambda: AnalogyFolder(root)).shared_controls == {}


def test_controls_shaped_like_their_target_are_named_as_grid_like_strips(tmp_path):
    """A finished 2x2 grid saved at twice its target's size is read as an a|a'|b strip (official: another size
    than the target) and stretched threefold: a warning and the report name it. Ordinary strips, and the strips
    ``data prepare`` writes (cells at the smallest width and height of a, a', b; b' as it is, so their shapes may
    differ widely, and one may even have its target's size: listed in analogy_metadata.json, it is read as the strip
    it is, not as a grid), are not named."""
    root = _sample(tmp_path / "d", "g", (128, 128), (64, 64))
    _sample(root, "s", (72, 20), (24, 18), seed=1)
    _sample(root, "t", (96, 32), (48, 64), seed=2)  # a prepared strip whose b' is portrait
    with pytest.warns(UserWarning, match=r"1 controls of another size than their target have the target's aspect "
                                         r"ratio.*e\.g\. g: control 128x128, target 64x64"):
        ds = AnalogyFolder(root)
    assert list(ds.grid_like_strips) == ["g"] and {s[3] for s in ds.samples} == {"strip"}
    assert list(_quiet(lambda: data.check_folder(root, progress=False))["grid_like_strips"]) == ["g"]
    src = tmp_path / "rel"
    relation252k_folder(src, {"cat-a": [(10, 30), (30, 30), (16, 12), (40, 8)]}, seed=2, ramp=RAMP)  # A 10x30, C
    # 30x30: cells 10x30, a 30x30 strip beside a 30x30 b', shaped like a grid
    data.prepare_relation252k(src, tmp_path / "prepared", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepared = AnalogyFolder(tmp_path / "prepared", resize="long-edge", long_edge=64)
    assert prepared.grid_like_strips == {} and {s[3] for s in prepared.samples} == {"strip"}
    first = next(s for s in prepared.samples if s[1].stem.endswith("_0000"))
    with Image.open(first[0]) as control, Image.open(first[1]) as target:
        assert control.size == target.size == (30, 30)  # the same size, still the strip it is (not a 2x2 grid)


def test_grid_like_controls_under_layout_strip_are_told_to_use_another_layout(tmp_path):
    """layout="strip" reads a control of its target's size as a strip too (grid-like): the warning does not call it
    "of another size than their target" nor advise saving it at its target's size (it is), but names the layouts
    that read it as a grid; one of another size is told both."""
    root = _sample(tmp_path / "d", "g", (30, 30), (30, 30))
    with pytest.warns(UserWarning, match=r"^1 controls have the target's aspect ratio, like a finished 2x2 grid "
                                         r"\(e\.g\. g: control 30x30, target 30x30\).*use layout 'auto' or 'grid' "
                                         r"\(--layout\), each control at its target's size$"):
        ds = AnalogyFolder(root, layout="strip", resize="long-edge", long_edge=64)
    assert ds.grid_like_strips == {"g": "control 30x30, target 30x30"}
    assert _quiet(lambda: AnalogyFolder(root, resize="long-edge", long_edge=64)).grid_like_strips == {}  # a grid


def test_sixteen_bit_images_are_named_before_they_train_nearly_white(tmp_path):
    """A 16-bit greyscale PNG target (mode I;16) converts to RGB as in the official loader, which clips every value
    above 255: the sample trains almost white. It stays a sample (official), with a warning and a ``data check``
    entry naming the file and its mode; 8-bit samples are not named."""
    root = _sample(tmp_path / "d", "a", (60, 14), (24, 18))
    _sample(root, "b", (60, 14), (24, 18), seed=1)
    deep = np.random.default_rng(0).integers(1000, 60000, size=(18, 24), dtype=np.uint16)
    Image.fromarray(deep).save(root / "target" / "b.png")  # uint16: mode I;16
    with Image.open(root / "target" / "b.png") as im:
        assert im.mode.startswith("I")
        assert np.asarray(im.convert("RGB")).mean() > 250  # what the conversion does to it
    with pytest.warns(UserWarning, match=r"1 images have more than 8 bits per channel \(e\.g\. .*b\.png: mode I"):
        ds = AnalogyFolder(root)
    assert len(ds) == 2 and [Path(p).name for p in ds.high_bit_depth_images] == ["b.png"]
    report = _quiet(lambda: data.check_folder(root, progress=False))
    assert [Path(p).name for p in report["high_bit_depth_images"]] == ["b.png"]
    (root / "target" / "b.png").unlink()
    _sample(root, "b", (60, 14), (24, 18), seed=1)
    assert _quiet(lambda: AnalogyFolder(root)).high_bit_depth_images == {}


def test_symlinked_target_folders_are_not_entered_and_are_named(tmp_path, capsys):
    """Official: toolkit/data_loader.py lists the dataset with ``os.walk`` (symlinked folders not followed): a
    symlinked sub-folder of target/ gives no samples, as there, but a warning, ``AnalogyFolder.unfollowed_links``
    and ``data check``'s report name it; a symlinked image file is read."""
    import os

    from lorweb_fast import cli

    root = _sample(tmp_path / "d", "a", (60, 14), (24, 18))
    elsewhere = _sample(tmp_path / "other", "b", (60, 14), (24, 18))
    os.symlink(elsewhere / "target", root / "target" / "linked")
    os.symlink(elsewhere / "target" / "b.png", root / "target" / "c.png")
    os.symlink(elsewhere / "control" / "b.png", root / "control" / "c.png")
    with pytest.warns(UserWarning, match=r"1 symlinked folders under .*target are not entered, as in the official "
                                         r"loader \(os\.walk\): .*linked"):
        ds = AnalogyFolder(root)
    assert sorted(ds.name(i) for i in range(len(ds))) == ["a", "c"]
    assert [p.name for p in ds.unfollowed_links] == ["linked"]
    assert _quiet(lambda: cli.main(["data", "check", str(root), "--quiet"])) == 0
    assert "symlinked folders under target/ not entered (as the official loader): 1, e.g." in capsys.readouterr().out
    assert AnalogyFolder(_sample(tmp_path / "clean", "a", (60, 14), (24, 18))).unfollowed_links == []


def test_data_prepare_a_file_name_the_file_system_refuses_fails_that_analogy_only(tmp_path, monkeypatch):
    """An analogy whose file names the output's file system refuses (EINVAL, as vfat for some characters;
    ENAMETOOLONG) is listed as failed, naming the cause, and the run goes on to write analogy_metadata.json; an
    output that cannot take files (ENOSPC) still stops the run."""
    import errno
    import os

    _relation252k(tmp_path / "rel")
    real = data.write_analogy

    def write(analogy, out, code=errno.EINVAL):
        if analogy["id"].endswith("_0001"):
            path = out / "control" / f"{analogy['id']}.jpg"
            raise OSError(code, os.strerror(code), str(path))
        return real(analogy, out)

    monkeypatch.setattr(data, "write_analogy", write)
    report = data.prepare_relation252k(tmp_path / "rel", tmp_path / "out", progress=False)
    assert [f for f, _ in report["failed"]] == ["analogy_cat-a_img0.png_cat-a_img2.png_0001"]
    assert "refuses its file names (Invalid argument)" in report["failed"][0][1]
    ids = [m["analogy_id"] for m in json.loads((tmp_path / "out" / "analogy_metadata.json").read_text())]
    assert ids == ["analogy_cat-a_img0.png_cat-a_img1.png_0000", "analogy_cat-a_img1.png_cat-a_img2.png_0002"]
    monkeypatch.setattr(data, "write_analogy", lambda analogy, out: write(analogy, out, errno.ENOSPC))
    with pytest.raises(OSError, match="No space left"):
        data.prepare_relation252k(tmp_path / "rel", tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2" / "analogy_metadata.json").exists()
