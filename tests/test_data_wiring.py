"""Behaviour of the training data and the official configuration that a mutation audit of lorweb_fast/data.py and
lorweb_fast/official_config.py found unpinned (each test failed a hand-made change that the rest of the suite let
pass): EXIF orientations, the unread-image list, relation ids, which files count as controls, the shared-control and
several-control reports, what skipped samples leave in the reports, grid-like strips, the ``data prepare`` cleanup
of temporary files and its metadata handling, ``data check``'s size table, filters and ``--max-analogies``. The
comment above each test names the mutant it kills. Every image is built here with PIL/numpy."""

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lorweb_fast import data
from lorweb_fast import official_config as oc
from lorweb_fast.data import AnalogyDataError, AnalogyFolder
from lorweb_fast.testing import analogy_sample, random_rgb_image, relation252k_folder

RAMP = (60, 40)


_sample = analogy_sample  # control/<name><ext>, target/<name>.png and its caption


def _quiet(fn):
    """``fn()`` with its warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


# ------------------------------------------------------------------------------------------- orientation
# mutant: _oriented_size swaps width and height for orientations (6, 8) only, not 5 and 7
@pytest.mark.parametrize("orientation", [5, 7])
def test_transposing_exif_orientations_swap_the_cell_size(tmp_path, orientation):
    """Orientations 5 (transpose) and 7 (transverse) turn the image by 90 degrees as 6 and 8 do: a b' stored 18 x 24
    is a 24 x 18 cell (official: the size of ``exif_transpose(Image.open(path))``,
    toolkit/data_transfer_object/data_loader.py ``FileItemDTO.__init__``), and its grid is 48 x 36."""
    root = _sample(tmp_path / "d", "s", (60, 14), (18, 24))
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.open(root / "target" / "s.png").convert("RGB").save(root / "target" / "s.png", exif=exif.tobytes())
    ds = AnalogyFolder(root, resize="long-edge", long_edge=64, multiple=16)
    assert ds.samples[0][4] == (48, 36)
    assert ds.full_grids(0)[1].size == (48, 36)


# ------------------------------------------------------------------------------------------- composition
# mutant: compose_grid pastes cells of another size without resizing them to the bottom-right cell's size
def test_compose_grid_resizes_cells_of_another_size_with_bicubic():
    """``compose_grid``: every cell takes the bottom-right cell's size (bicubic in its own mode, as ai-toolkit
    ``_create_box_analogy_image``), so a cell twice as large fills its quadrant and no more."""
    rng = np.random.default_rng(0)
    big, small = random_rgb_image(rng, 20, 16), random_rgb_image(rng, 10, 8)
    grid = np.asarray(data.compose_grid(big, small, small, small))
    assert grid.shape == (16, 20, 3)
    np.testing.assert_array_equal(grid[:8, :10], np.asarray(big.resize((10, 8), Image.BICUBIC)))
    np.testing.assert_array_equal(grid[:8, 10:], np.asarray(small))


# ------------------------------------------------------------------------------------------- unread images
# mutant: _unread_images counts every registered extension, also those Pillow only writes (.pdf, .palm)
def test_files_pillow_cannot_open_are_not_unread_images(tmp_path):
    """The unread-image list names image files the loader skips although Pillow could read them; a .pdf beside the
    targets (Pillow writes PDFs, it never opens them) is no image and is not named."""
    root = _sample(tmp_path / "d", "a", (60, 14), (24, 18))
    (root / "target" / "notes.pdf").write_bytes(b"%PDF-1.4\n")
    (root / "control" / "notes.pdf").write_bytes(b"%PDF-1.4\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert AnalogyFolder(root).unread_images == []


# mutant: _unread_images compares the extension case-sensitively (an upper-case .TIF is not named)
def test_upper_case_extensions_of_unread_images_are_named(tmp_path):
    """A target saved as b.TIF is skipped by the loader as b.tif is: it is named as well."""
    root = _sample(tmp_path / "d", "a", (60, 14), (24, 18))
    random_rgb_image(np.random.default_rng(3), 24, 18).save(root / "target" / "b.TIF", format="TIFF")
    with pytest.warns(UserWarning, match=r"1 image files under .* are not read"):
        ds = AnalogyFolder(root)
    assert [Path(p).name for p in ds.unread_images] == ["b.TIF"]


# --------------------------------------------------------------------------------------------- relation ids
# mutant: _read_relation_captions indexes the entries by str(analogy_id) (a number then matches a file name)
def test_relation_entries_with_a_numeric_id_match_no_sample(tmp_path):
    """Official toolkit/data_loader.py indexes analogy_metadata.json by the ``analogy_id`` value as it is and looks
    the sample's file name (a string) up in it: an entry ``{"analogy_id": 7}`` is never the caption of target/7.png,
    whose caption is the .txt beside it."""
    root = _sample(tmp_path / "d", "7", (60, 14), (24, 18), caption="from the txt")
    (root / data.RELATION_METADATA).write_text(json.dumps([{"analogy_id": 7, "edit_prompt": "from the metadata"}]))
    ds = AnalogyFolder(root)
    assert ds.samples[0][2] == "from the txt"


# ----------------------------------------------------------------------------------------------- controls
# mutant: the control list keeps anything with an image extension in control/, folders included
def test_a_folder_named_like_an_image_in_control_is_not_a_control(tmp_path):
    """control/a.jpg/ (a folder) beside control/a.png: the sample's control is the file a.png, the folder is not one
    of several controls, and a folder control/z.png/ is not listed as a control without a target."""
    root = _sample(tmp_path / "d", "a", (60, 14), (24, 18))
    (root / "control" / "a.jpg").mkdir()
    (root / "control" / "z.png").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = AnalogyFolder(root)
    assert ds.samples[0][0].name == "a.png"
    assert ds.several_controls == {} and ds.unused_controls == []


# mutant: several_controls also lists names that no target image has
def test_several_controls_of_a_name_without_target_are_not_reported_as_such(tmp_path):
    """control/z.jpg and control/z.png without a target z are controls without a target (never read), not a
    sample's several controls."""
    root = _sample(tmp_path / "d", "a", (60, 14), (24, 18))
    for ext in (".jpg", ".png"):
        random_rgb_image(np.random.default_rng(1), 60, 14).save(root / "control" / f"z{ext}")
    ds = _quiet(lambda: AnalogyFolder(root))
    assert ds.several_controls == {}
    assert sorted(p.name for p in ds.unused_controls) == ["z.jpg", "z.png"]
    report = _quiet(lambda: data.check_folder(root, progress=False))
    assert report["several_controls"] == {} and len(report["controls_without_target"]) == 2


# mutant: shared_controls names the last control of the name instead of the first (the one used)
def test_shared_controls_name_the_control_the_samples_use(tmp_path):
    """target/cat/0001.png and target/dog/0001.png with control/0001.jpg and control/0001.png: both samples use
    0001.jpg (the official lookup order: .jpg first), and ``shared_controls`` names that file."""
    root = _sample(tmp_path / "d", "x", (60, 14), (24, 18))
    for ext in (".png", ".jpg"):
        random_rgb_image(np.random.default_rng(1), 60, 14).save(root / "control" / f"0001{ext}")
    for k, sub in enumerate(("cat", "dog")):
        (root / "target" / sub).mkdir()
        random_rgb_image(np.random.default_rng(2 + k), 24, 18).save(root / "target" / sub / "0001.png")
    ds = _quiet(lambda: AnalogyFolder(root))
    used = {s[0].name for s in ds.samples if s[1].parent.name in ("cat", "dog")}
    assert used == {"0001.jpg"}
    assert ds.shared_controls == {str(root / "control" / "0001.jpg"): ["cat/0001", "dog/0001"]}


# ------------------------------------------------------------------------------------- skipped samples
# mutants: high_bit_depth_images / grid_like_strips keep the entries of samples skipped after the scan
def test_samples_skipped_by_data_check_leave_the_bit_depth_and_grid_like_lists(tmp_path):
    """A tall sample (no official query crop: skipped by ``data check --skip-bad``) with a 16-bit target and a
    control shaped like its target is not in ``high_bit_depth_images`` nor in ``grid_like_strips``: those list the
    samples that train; before the skip both name it."""
    root = _sample(tmp_path / "d", "ok", (300, 100), (100, 100), seed=1)
    _sample(root, "tall", (200, 440), (100, 220), seed=2)  # a control with its target's aspect ratio: grid-like
    deep = np.random.default_rng(0).integers(1000, 60000, size=(220, 100), dtype=np.uint16)
    Image.fromarray(deep).save(root / "target" / "tall.png")  # mode I;16
    ds = _quiet(lambda: AnalogyFolder(root))
    assert list(ds.grid_like_strips) == ["tall"] and len(ds.high_bit_depth_images) == 1
    report = _quiet(lambda: data.check_folder(root, skip_bad=True, progress=False))
    assert report["samples"] == 1 and report["skipped"] == 1
    assert report["high_bit_depth_images"] == {} and report["grid_like_strips"] == {}


# ------------------------------------------------------------------------------------------ layout grid
# mutant: layout="grid" checks the width's parity only
def test_layout_grid_refuses_an_odd_height(tmp_path):
    """``layout="grid"``: two grids of the same size with an odd height cannot be split into quadrants."""
    root = _sample(tmp_path / "d", "s", (40, 21), (40, 21))
    with pytest.raises(AnalogyDataError, match=r"are not two 2x2 grids of the same even size \(layout='grid'\)"):
        AnalogyFolder(root, resize="long-edge", layout="grid")


# mutant: a sample listed in analogy_metadata.json is a strip under every layout (not only under layout="auto")
def test_layout_grid_reads_a_listed_sample_as_a_grid(tmp_path):
    """``layout="grid"`` is the user's word: a same-size pair listed in analogy_metadata.json is read as a grid
    (under ``"auto"`` the listing makes it a strip)."""
    root = _sample(tmp_path / "d", "s", (64, 48), (64, 48))
    (root / data.RELATION_METADATA).write_text(json.dumps([{"analogy_id": "s", "edit_prompt": "e"}]))
    assert AnalogyFolder(root, resize="long-edge", layout="grid").samples[0][3] == "grid"
    assert _quiet(lambda: AnalogyFolder(root, resize="long-edge")).samples[0][3] == "strip"


# ------------------------------------------------------------------------------------------ grid-like strips
# mutants: the grid-like test takes shape < 1.1 only (a control relatively taller than its target is named), or a
# tolerance of 1.5 instead of GRID_LIKE_ASPECT_TOLERANCE = 1.1
@pytest.mark.parametrize("control_size, named", [((100, 105), True), ((100, 95), True), ((40, 40), False),
                                                  ((130, 100), False), ((100, 130), False)])
def test_grid_like_strips_have_their_targets_aspect_within_ten_percent(tmp_path, control_size, named):
    """A strip control is named grid-like when its aspect ratio is within a factor 1.1 of its 50 x 50 target's, on
    either side: 100 x 105 and 100 x 95 are; a 40 x 40 control beside a 40 x 20 target (twice as tall, relatively),
    and 130 x 100 or 100 x 130 (a factor 1.3) are not."""
    target = (40, 20) if control_size == (40, 40) else (50, 50)
    root = _sample(tmp_path / "d", "s", control_size, target)
    ds = _quiet(lambda: AnalogyFolder(root, resize="long-edge", long_edge=64))
    assert (list(ds.grid_like_strips) == ["s"]) is named


# ------------------------------------------------------------------------------------- data prepare cleanup
def _prepared(tmp_path) -> Path:
    relation252k_folder(tmp_path / "rel", {"cat-a": [(16, 12), (16, 12)]}, seed=2, ramp=RAMP)
    out = tmp_path / "out"
    data.prepare_relation252k(tmp_path / "rel", out, progress=False)
    return out


# mutants: the temporary-name pattern takes 7 random characters, ``match`` instead of ``fullmatch`` (a name that only
# starts like a temporary), or a folder with a temporary name (unlink fails on it)
def test_data_prepare_cleanup_removes_only_its_own_temporary_files(tmp_path):
    """A killed run's ``.<name>.<8 random characters>.tmp`` files are removed; names that merely resemble them (7 or
    9 random characters, something after .tmp) and a folder of that name are kept, and the run completes."""
    out = _prepared(tmp_path)
    ours = out / "control" / ".analogy_x.jpg.abcd1234.tmp"
    kept = [out / "control" / ".analogy_x.jpg.abcd123.tmp", out / "control" / ".analogy_x.jpg.abcd12345.tmp",
            out / "target" / ".analogy_x.txt.abcd1234.tmp.bak", out / ".analogy_metadata.json.abcd1234.tmpx"]
    for path in [ours, *kept]:
        path.write_text("x")
    folder = out / "target" / ".analogy_y.jpg.abcd1234.tmp"
    folder.mkdir()
    report = data.prepare_relation252k(tmp_path / "rel", out, progress=False)
    assert report["skipped"] == 1 and report["failed"] == []
    assert not ours.exists()
    assert all(p.read_text() == "x" for p in kept) and folder.is_dir()


# mutant: a cut temporary name counts only at the exact file-name limit (not up to 3 bytes short of it)
@pytest.mark.parametrize("short, removed", [(1, True), (3, True), (4, False)])
def test_data_prepare_cleanup_removes_cut_temporaries_up_to_three_bytes_short(tmp_path, short, removed):
    """``_files.temporary_prefix`` cuts a long name at a character boundary, so a cut temporary of a name with
    multi-byte characters can end 1 to 3 bytes short of the file-name limit: it is removed; 4 bytes short it is
    not a cut name (and is kept)."""
    from lorweb_fast._files import name_limit

    out = _prepared(tmp_path)
    limit = name_limit(out / "target")
    stem = ".analogy_" + "x" * (limit - short - len(".analogy_.abcd1234.tmp"))
    leftover = out / "target" / f"{stem}.abcd1234.tmp"
    assert len(os.fsencode(leftover.name)) == limit - short
    leftover.write_bytes(b"half")
    data.prepare_relation252k(tmp_path / "rel", out, progress=False)
    assert leftover.exists() is not removed


# mutant: an analogy_metadata.json that is JSON but not a list of analogy entries is used as the earlier entries
@pytest.mark.parametrize("text", ['{"analogy_id": "x"}', "[1, 2]", '[{"edit_prompt": "no id"}]'])
def test_data_prepare_rewrites_metadata_that_is_not_a_list_of_entries(tmp_path, text):
    """An existing analogy_metadata.json that parses but is not a list of analogy entries is warned about and
    rewritten with this run's analogies (the official script would fail on it)."""
    out = _prepared(tmp_path)
    expected = json.loads((out / "analogy_metadata.json").read_text())
    (out / "analogy_metadata.json").write_text(text)
    with pytest.warns(UserWarning, match="cannot read the existing .*analogy_metadata.json"):
        data.prepare_relation252k(tmp_path / "rel", out, progress=False)
    assert json.loads((out / "analogy_metadata.json").read_text()) == expected


# ------------------------------------------------------------------------------------------ data check decoding
# mutant: data check decodes only the target image of every sample (a truncated control passes it)
def test_data_check_decodes_the_control_image_too(tmp_path):
    """A strip control cut in half passes the folder scan (headers only) and would fail at its training step:
    ``data check`` decodes it and names it, or skips the sample with --skip-bad."""
    root = _sample(tmp_path / "d", "a", (300, 100), (100, 100))
    _sample(root, "b", (300, 100), (100, 100), seed=1, ext=".jpg")
    bad = root / "control" / "b.jpg"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    assert len(AnalogyFolder(root)) == 2
    with pytest.raises(AnalogyDataError, match=r"1 training samples cannot be used, e.g. b: .*b\.jpg is not a "
                                               r"readable image"):
        data.check_folder(root, progress=False)
    report = data.check_folder(root, skip_bad=True, progress=False)
    assert report["samples"] == 1 and "b.jpg is not a readable image" in report["problems"][0]


# ------------------------------------------------------------------------------------------ data check sizes
# mutant: the report's sizes are in first-seen order, not most common first (what "grid sizes:" prints)
def test_data_check_lists_the_most_common_sizes_first(tmp_path, capsys):
    """``sizes`` and ``training_sizes`` go from the most common to the least (the command prints the first ten):
    one 192 x 144 sample named first, then two 384 x 144 ones."""
    from lorweb_fast import cli

    root = _sample(tmp_path / "d", "a", (288, 72), (96, 72))
    _sample(root, "b", (576, 72), (192, 72), seed=1)
    _sample(root, "c", (576, 72), (192, 72), seed=2)
    report = _quiet(lambda: data.check_folder(root, progress=False))
    assert list(report["sizes"].items()) == [("384x144", 2), ("192x144", 1)]
    assert list(report["training_sizes"].values()) == [2, 1]
    assert _quiet(lambda: cli.main(["data", "check", str(root), "--quiet"])) == 0
    assert "grid sizes: 384x144 x2, 192x144 x1" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ data prepare input
# mutant: an entry left out by --filter-json is checked for its image first (a filtered-out entry counts as missing)
def test_filtered_out_entries_are_neither_pairs_nor_missing(tmp_path):
    """Official preprocess_data.py ``Relation252KDataset._load_all_samples`` drops the filtered image ids before it
    opens any image: an entry left out by the filter JSON is not reported missing, whether its image exists or
    not."""
    relation252k_folder(tmp_path / "rel", {"cat-a": [(16, 12), (16, 12), (16, 12)]}, seed=2, ramp=RAMP)
    labels_path = tmp_path / "rel" / "cat-a" / "Group1" / "labels.json"
    labels = json.loads(labels_path.read_text())
    labels.append(dict(labels[0], img_name="gone.png"))
    labels_path.write_text(json.dumps(labels))
    (tmp_path / "filter.json").write_text(json.dumps([{"image_id": "cat-a_img0.png"},
                                                      {"image_id": "cat-a_gone.png"}]))
    missing = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pairs = data.relation252k_pairs(tmp_path / "rel", filter_json=str(tmp_path / "filter.json"), progress=False,
                                        missing=missing)
    assert [p["image_id"] for p in pairs] == ["cat-a_img1.png", "cat-a_img2.png"] and missing == []


# mutant: the Relation252K decode check catches OSError only (Pillow's DecompressionBombError is a plain Exception)
def test_a_relation252k_image_over_the_pixel_limit_is_left_out(tmp_path, monkeypatch):
    """Official preprocess_data.py ``Relation252KDataset._load_all_samples`` drops an image whose crop raises any
    Exception: an image of more than twice ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (Pillow's DecompressionBombError)
    is left out and reported, the other pairs are kept."""
    relation252k_folder(tmp_path / "rel", {"cat-a": [(16, 12), (16, 12), (64, 48)]}, seed=2, ramp=RAMP)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # img2: 128 x 48 = 6144 pixels > 2 x 1000
    unreadable = []
    with pytest.warns(UserWarning, match="skipped 1 Relation252K images that cannot be decoded"):
        pairs = data.relation252k_pairs(tmp_path / "rel", progress=False, unreadable=unreadable)
    assert [p["image_id"] for p in pairs] == ["cat-a_img0.png", "cat-a_img1.png"]
    assert [Path(path).name for path, _ in unreadable] == ["img2.png"]
    assert unreadable[0][1].startswith("DecompressionBombError")


# mutant: max_samples_per_category=0 caps every category at no pair (instead of meaning no cap)
def test_a_zero_per_category_cap_reads_every_pair(tmp_path):
    """Official preprocess_data.py ``get_triplets`` caps only ``if max_samples_per_category and ...``: 0 (like
    None) reads every pair."""
    relation252k_folder(tmp_path / "rel", {"cat-a": [(16, 12)] * 3}, seed=2, ramp=RAMP)
    pairs = data.relation252k_pairs(tmp_path / "rel", max_samples_per_category=0, progress=False)
    assert len(pairs) == 3


# mutant: plan_analogies takes the categories in sorted order instead of first-seen order
def test_analogies_follow_the_first_seen_category_order():
    """Official ``create_analogy_dataset`` groups the pairs in a dict filled in pair order: the analogies of the
    category seen first come first (and take the first indices in their ids)."""
    pairs = [{"category": c, "image_id": f"{c}_{k}"} for c in ("zebra", "ant") for k in range(2)]
    assert [(a["category"], a["id"]) for a in data.plan_analogies(pairs)] == [
        ("zebra", "analogy_zebra_0_zebra_1_0000"), ("ant", "analogy_ant_0_ant_1_0001")]


# mutant: --max-analogies equal to the number of analogies still draws a random sample (which reorders them)
def test_max_analogies_equal_to_the_plan_keeps_the_plans_order():
    """Official preprocess_data.py ``create_analogy_dataset`` samples only when there are more analogies than
    ``max_analogies``: with exactly as many, the analogies (and their ids' indices) keep the pairing order."""
    pairs = [{"category": "c", "image_id": f"c_{k}"} for k in range(4)]
    plan = data.plan_analogies(pairs)
    capped = data.plan_analogies(pairs, max_analogies=len(plan), seed=1)
    assert [a["id"] for a in capped] == [a["id"] for a in plan]


# ================================================================================== official_config.py
# mutant: _bool takes only lower-case "true" strings
@pytest.mark.parametrize("text, activation", [("'True'", "softmax"), ("'true'", "softmax")])
def test_a_quoted_lora_softmax_reads_in_any_case(tmp_path, text, activation):
    """``lora_softmax`` written as the quoted string "true" (any case) reads as true, as the official code's
    truthiness does (a quoted "false", which the official code also reads as true, is refused:
    tests/test_inference_fidelity_fresh_audit.py)."""
    path = _official_yaml(tmp_path, lora_softmax=text)
    assert oc.read_config_yaml(path)["activation"] == activation


def test_a_quoted_false_lora_softmax_is_refused_in_any_case(tmp_path):
    """A quoted "FALSE" means false to its writer and true to the official code: refused, naming the field."""
    with pytest.raises(oc.LoRWeBConfigError, match="lora_softmax is the quoted string 'FALSE'"):
        oc.read_config_yaml(_official_yaml(tmp_path, lora_softmax="'FALSE'"))


# mutant: _bool also takes "yes" / "no" strings (and reads "yes" as false)
@pytest.mark.parametrize("text", ["'yes'", "'1'", "2"])
def test_a_lora_softmax_that_is_no_boolean_is_refused(tmp_path, text):
    """``lora_softmax`` must be a boolean or the string true / false: "yes", "1" or 2 are refused by name."""
    with pytest.raises(oc.LoRWeBConfigError, match="lora_softmax must be true or false"):
        oc.read_config_yaml(_official_yaml(tmp_path, lora_softmax=text))


def _official_yaml(tmp_path, **network_kwargs) -> Path:
    """A config.yaml shaped like the released one (LoRWeB_default_PROMPTS.yaml) with ``network_kwargs`` (YAML text
    values) replaced."""
    kwargs = {"lora_keys_dim": "8", "lora_heads": "1", "mixing_coeffs_type": "mean", "external_query": "true",
              "pooling_type": "avg", "query_projection_type": "linear", "loras_num": "3", "lora_softmax": "true",
              "query_mode": "cat-aa'b", "external_query_model": "openai/clip-vit-large-patch14", **network_kwargs}
    lines = "".join(f"        {k}: {v}\n" for k, v in kwargs.items())
    path = tmp_path / "config.yaml"
    path.write_text("job: extension\nconfig:\n  name: run\n  process:\n  - type: sd_trainer\n    network:\n"
                    "      type: attlora\n      linear: 2\n      linear_alpha: 2\n      network_kwargs:\n" + lines)
    return path


# mutant: _same compares numbers by value and type (an int and an equal float conflict)
def test_equal_numbers_of_different_types_do_not_conflict():
    """An explicit rank 4.0 and a config.yaml rank 4 say the same: no conflict; 4.5 and 4 do conflict."""
    settings = oc.resolve_settings({"rank": 4.0}, {"rank": 4})
    assert settings["rank"] == 4 and settings["sources"]["rank"] == "argument"
    with pytest.raises(oc.LoRWeBConfigError, match="conflicting num_loras: argument says 3 but config.yaml says 4"):
        oc.resolve_settings({"num_loras": 3}, {"num_loras": 4.0})


# mutant: _validate checks only value < 1 for the sizes (a fractional rank passes)
@pytest.mark.parametrize("key", ["num_loras", "rank", "key_dim", "heads"])
def test_fractional_sizes_are_refused(key):
    """num_loras, rank, key_dim and heads are positive integers: 2.5 is refused by name."""
    with pytest.raises(oc.LoRWeBConfigError, match=rf"{key} must be a positive integer, got 2.5"):
        oc.resolve_settings({key: 2.5})


# mutant: settings_from_metadata reads lorweb.heads through float() (a "2.0" written by someone else passes)
def test_metadata_heads_must_be_an_integer_string():
    """Our metadata writes ``lorweb.heads`` as an integer string: "2" reads, "2.0" or "two" is unreadable."""
    assert oc.settings_from_metadata({"lorweb.heads": "2"}) == {"heads": 2}
    for bad in ("2.0", "two"):
        with pytest.raises(oc.LoRWeBConfigError, match=rf"unreadable LoRWeB metadata lorweb.heads='{bad}'"):
            oc.settings_from_metadata({"lorweb.heads": bad})


# mutant: recorded_encoder_mismatch also reports the official default encoder (a checkpoint that names none)
def test_an_encoder_no_source_names_is_no_mismatch():
    """A checkpoint whose config and metadata name no encoder resolves to the official default (CLIP): a SigLIP
    encoder passed at load time is no mismatch, since the checkpoint never said which encoder it was trained
    with; one that names CLIP is a mismatch for a SigLIP encoder."""
    assert oc.recorded_encoder_mismatch(oc.resolve_settings(), "siglip") is None
    named = oc.resolve_settings(None, {"encoder": "openai/clip-vit-large-patch14"})
    assert oc.recorded_encoder_mismatch(named, "siglip") == \
        "the analogy encoder 'openai/clip-vit-large-patch14' (clip, says config.yaml)"


# mutant: encoder_family reads the name of a local folder without a config.json as a hub id
def test_a_local_folder_without_config_has_no_known_family(tmp_path):
    """A folder on this machine without a config.json cannot be told without loading it: None, even when its name
    says "clip"; the same name that is not on this machine is read as a hub id."""
    folder = tmp_path / "clip-copy"
    folder.mkdir()
    assert oc.encoder_family(folder) is None
    assert oc.encoder_family(tmp_path / "absent" / "clip-copy") == "clip"


# mutants: the written config.yaml loses external_query (the official trainer's default is False), the model's
# arch, or the ``extra`` entries (the trainer writes save.dtype through them)
def test_the_written_config_has_the_released_network_model_and_extra_blocks():
    """``official_config``: network_kwargs ``external_query: true`` (official
    extensions_built_in/flux_kontext.py defaults it to False; LoRWeB_default_PROMPTS.yaml sets it), the model block
    of LoRWeB_default_PROMPTS.yaml (FLUX.1-Kontext-dev, arch flux_kontext), and ``extra`` merged into process[0]."""
    doc = oc.official_config(oc.OFFICIAL_DEFAULTS, extra={"save": {"dtype": "float16"}})
    process = doc["config"]["process"][0]
    assert process["network"]["network_kwargs"]["external_query"] is True
    assert process["model"] == {"name_or_path": "black-forest-labs/FLUX.1-Kontext-dev", "arch": "flux_kontext"}
    assert process["save"] == {"dtype": "float16"}


# mutant: lorweb_fast's step folders match any name starting with "step-" (a "step-final" folder crashes int())
def test_step_folders_need_a_number():
    """checkpoints/step-<digits>/lorweb.safetensors is a step file; checkpoints/step-final/... is not one."""
    finals, stepped = oc.checkpoint_candidates(["checkpoints/step-final/lorweb.safetensors",
                                                "checkpoints/step-00000010/lorweb.safetensors"])
    assert finals == [] and stepped == ["checkpoints/step-00000010/lorweb.safetensors"]


# mutant: the final files are not sorted (the several-finals error lists them in listing order)
def test_several_final_files_are_named_in_sorted_order():
    """Two final checkpoints are ambiguous: the error names them sorted, whatever the listing order."""
    with pytest.raises(oc.LoRWeBConfigError, match=r"several final checkpoints \(a.safetensors, b.safetensors\)"):
        oc.pick_checkpoint_name(["b.safetensors", "a.safetensors"], "run")


# mutant: a .safetensors file in a sub-folder (other than checkpoints/step-N/) counts as a final checkpoint
def test_files_in_other_sub_folders_are_not_checkpoints():
    """Only the folder's own files and lorweb_fast's checkpoints/step-N/lorweb.safetensors are candidates: a
    samples/x.safetensors or a deeper file is neither a final nor a step file (no "several finals" error)."""
    names = ["lorweb.safetensors", "samples/x.safetensors", "a/b/c.safetensors", "checkpoints/x.safetensors"]
    assert oc.checkpoint_candidates(names) == (["lorweb.safetensors"], [])
    assert oc.pick_checkpoint_name(names, "run") == "lorweb.safetensors"


# mutants: find_checkpoint takes a step folder without its lorweb.safetensors (being written) for an unreadable file,
# or a folder named like a final file for a final file (each warned about as unreadable)
def test_folders_are_not_checkpoint_files_and_need_no_warning(tmp_path):
    """A run folder whose newest checkpoints/step-N/ holds no lorweb.safetensors yet, and a sub-folder named
    old.safetensors: the newest complete step file is chosen, without the unreadable-file warning."""
    import torch
    from safetensors.torch import save_file

    for step in (10, 20):
        (tmp_path / "checkpoints" / f"step-{step:08d}").mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "checkpoints" / "step-00000010" / "lorweb.safetensors"))
    (tmp_path / "old.safetensors").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weights, config = oc.find_checkpoint(tmp_path)
    assert weights == tmp_path / "checkpoints" / "step-00000010" / "lorweb.safetensors" and config is None
