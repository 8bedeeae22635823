"""Defects found by an independent review of ``lorweb_fast/data.py`` (training-data reading). Each test fails on the
code it was written against and describes what the user sees and what they should see. Tiny local images only."""

import io
import os
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from lorweb_fast import cli
from lorweb_fast.data import AnalogyDataError, AnalogyFolder, check_folder


def _quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def _exif_pillow_cannot_rewrite() -> bytes:
    """EXIF with orientation 6 and a known tag (StripByteCounts, a LONG) stored with another type (ASCII "hello"),
    as cameras and editors write now and then (Pillow issues #6799, #8965): Pillow reads it, but
    ``ImageOps.exif_transpose`` re-serialises the EXIF after rotating and raises struct.error there."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010E] = "hello"  # ImageDescription, ASCII
    raw = exif.tobytes()
    at = raw.find(b"\x01\x0e\x00\x02")  # big-endian tag id 0x010E, type 2 (ASCII)
    assert at > 0
    return raw[:at] + b"\x01\x17" + raw[at + 2:]  # now tag 0x0117 (StripByteCounts) holding ASCII


def test_a_photo_whose_exif_pillow_cannot_rewrite_trains_or_is_named_by_data_check(tmp_path):
    """Now: the folder scan and ``data check`` accept the sample (report without problems), then every training
    draw of it (``dataset[i]``, ``full_grids``, ``data check --dump``) dies with a bare ``struct.error: required
    argument is not an integer`` from ``ImageOps.exif_transpose`` re-writing the EXIF it does not need, in the middle
    of a run. Should: the pixels are rotated by the orientation tag without re-serialising the EXIF (the image
    decodes fine), or else the file is an AnalogyDataError naming it that ``data check`` already reports."""
    root = tmp_path / "d"
    (root / "control").mkdir(parents=True)
    (root / "target").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (192, 384, 3), dtype=np.uint8)).save(root / "control" / "x.png")
    b_prime = Image.fromarray(rng.integers(0, 256, (128, 192, 3), dtype=np.uint8))  # 192x128, shown 128x192
    b_prime.save(root / "target" / "x.jpg", exif=_exif_pillow_cannot_rewrite())
    (root / "target" / "x.txt").write_text("make it red")

    ds = _quiet(lambda: AnalogyFolder(root))
    assert ds.samples[0][4] == (256, 384)  # the orientation is read: a 128x192 cell
    report = _quiet(lambda: check_folder(root, skip_bad=True, progress=False))
    try:
        item = ds[0]
    except AnalogyDataError as exc:  # acceptable: named, and data check said so first
        assert "x.jpg" in str(exc)
        assert report["problems"], "data check passed a sample that fails at every training draw"
    else:
        assert item["target"].size == item["control"].size
        _, target = ds.full_grids(0)
        assert target.size == (256, 384)
        with Image.open(root / "target" / "x.jpg") as im:  # orientation 6: what exif_transpose would give
            want = im.convert("RGB").transpose(Image.Transpose.ROTATE_270)
        np.testing.assert_array_equal(np.asarray(target.crop((128, 192, 256, 384))), np.asarray(want))


def test_data_check_prints_a_non_utf8_file_name_instead_of_failing(tmp_path, monkeypatch, capsys):
    """A file name that is not UTF-8 (a Latin-1 ``caf\\xe9.png`` from an old zip archive) is a legitimate sample on
    Linux: the dataset and the trainer take it. Now: ``lorweb-fast data check`` under a UTF-8 locale (stdout errors
    "strict", e.g. en_US.UTF-8) validates the folder, then dies while printing the report with ``error: 'utf-8'
    codec can't encode character '\\udce9' ... surrogates not allowed`` and exit status 2, the rest of the report
    lost. Should: the name is printed escaped (``caf\\udce9`` / ``caf\\xe9``) and the command ends with status 0."""
    if sys.platform == "win32":
        pytest.skip("non-UTF-8 file names are a POSIX matter")
    root = tmp_path / "d"
    (root / "control").mkdir(parents=True)
    (root / "target").mkdir()
    name = os.fsdecode(b"caf\xe9.png")
    Image.new("RGB", (96, 32), (1, 2, 3)).save(root / "control" / name, format="PNG")
    Image.new("RGB", (32, 32), (4, 5, 6)).save(root / "target" / name, format="PNG")  # no caption: listed by name

    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    monkeypatch.setattr(sys, "stdout", out)
    status = _quiet(lambda: cli.main(["data", "check", str(root), "--quiet"]))
    err = capsys.readouterr().err
    text = out.buffer.getvalue().decode("utf-8", errors="replace")
    assert status == 0, err
    assert "samples without a caption" in text and "caf" in text


@pytest.mark.parametrize("long_edge", [0, None])
def test_a_bad_long_edge_is_refused_as_an_option_not_blamed_on_the_images(tmp_path, long_edge):
    """``AnalogyFolder`` checks ``layout``, ``resize``, ``bucket_divisibility`` and ``multiple`` but not
    ``long_edge``. Now: ``long_edge=0`` makes every sample "an image of 32x32 has no training bucket at resolution 0
    ... (too small); use --resize long-edge" (the images are blamed, and the advice is wrong), ``long_edge=None`` a
    bare ``TypeError: '<' not supported between instances of 'NoneType' and 'int'`` from ``min``. Should: a
    ValueError (TypeError for None) naming ``long_edge`` before any sample is read, as the other options get."""
    root = tmp_path / "d"
    (root / "control").mkdir(parents=True)
    (root / "target").mkdir()
    Image.new("RGB", (96, 32), (1, 2, 3)).save(root / "control" / "x.png")
    Image.new("RGB", (32, 32), (4, 5, 6)).save(root / "target" / "x.png")
    (root / "target" / "x.txt").write_text("make it red")
    with pytest.raises(TypeError if long_edge is None else ValueError, match="long_edge must be an integer") as caught:
        _quiet(lambda: AnalogyFolder(root, long_edge=long_edge))
    assert not isinstance(caught.value, AnalogyDataError), str(caught.value)
    assert "x.png" not in str(caught.value)
