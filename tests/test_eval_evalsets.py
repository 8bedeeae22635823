"""Evaluation-set readers (folder layout, the released LoRWeB layout, Relation252k) and the runs-folder reader,
with their errors for missing/unreadable images and empty tasks."""

import json
import random

import pytest
from PIL import Image

from lorweb_fast.evaluation import evalsets as E
from lorweb_fast.evaluation import tiny


def test_folder_layout(tmp_path):
    root = tiny.make_folder_evalset(tmp_path / "ev", per_task=2)
    triplets = E.read_evalset(root)
    assert [t.key for t in triplets] == ["flip/000", "flip/001", "swap/000", "swap/001"]
    t = triplets[0]
    assert t.prompt == "mirror the image"
    assert t.a.load().size == (32, 32)
    assert t.a_prime.load().tobytes() == Image.open(root / "flip/000/a_prime.png").convert("RGB").tobytes()
    assert E.read_evalset(root, max_per_task=1, tasks=["swap"])[0].key == "swap/000"
    assert len(E.read_evalset(root, max_per_task=1)) == 2


def test_folder_layout_errors(tmp_path):
    root = tiny.make_folder_evalset(tmp_path / "ev", per_task=1)
    (root / "flip/000/b.png").unlink()
    with pytest.raises(E.EvalInputError, match=r"missing image .*flip/000/b\."):
        E.read_evalset(root)
    root = tiny.make_folder_evalset(tmp_path / "ev2", per_task=1)
    (root / "empty_task").mkdir()
    with pytest.raises(E.EvalInputError, match="task 'empty_task' has no triplets"):
        E.read_evalset(root)
    root = tiny.make_folder_evalset(tmp_path / "ev3", per_task=1)
    (root / "flip/000/prompt.txt").unlink()
    with pytest.raises(E.EvalInputError, match="missing prompt file .*prompt.txt"):
        E.read_evalset(root)
    with pytest.raises(E.EvalInputError, match="not found"):
        E.read_evalset(tmp_path / "nope")
    (tmp_path / "blank").mkdir()
    with pytest.raises(E.EvalInputError, match="no analogy triplets"):
        E.read_evalset(tmp_path / "blank")
    with pytest.raises(E.EvalInputError, match="tasks not found"):
        E.read_evalset(tiny.make_folder_evalset(tmp_path / "ev4", per_task=1), tasks=["zzz"])
    for sub in ("control", "target"):  # a training folder given by mistake
        (tmp_path / "train" / sub).mkdir(parents=True)
    with pytest.raises(E.EvalInputError, match="looks like a training folder"):
        E.read_evalset(tmp_path / "train")


def test_image_extensions_are_found_in_any_case(tmp_path):
    """find_image is case-insensitive (``a.Jpg`` as ``a.JPG`` and ``a.jpg``), as the training loader and infer are;
    the exact lower-case name wins over another spelling of the same extension."""
    root = tiny.make_folder_evalset(tmp_path / "ev", per_task=1)
    folder = root / "flip/000"
    (folder / "a.png").rename(folder / "a.Png")
    (t,) = [t for t in E.read_evalset(root) if t.key == "flip/000"]
    assert t.a.path == folder / "a.Png" and t.a.load().size
    (folder / "a.png").write_bytes((folder / "a.Png").read_bytes())
    if len(list(folder.glob("a.*"))) == 2:  # a case-sensitive file system holds both
        assert E.find_image(folder, "a") == folder / "a.png"


def test_a_crop_box_without_pixels_names_the_file(tmp_path):
    """A Relation252K half of a 1-pixel-wide image has no pixels: named with its size and box, not a 0-wide image."""
    from PIL import Image

    Image.new("RGB", (1, 4)).save(tmp_path / "thin.png")
    with pytest.raises(E.EvalInputError, match=r"thin.png \(1x4\) is too small for its crop box \(0, 0, 0.5, 1\): "
                                                r"the crop has no pixels \(0x4\)"):
        E.ImageRef(tmp_path / "thin.png", box=(0, 0, 0.5, 1)).load()
    from lorweb_fast.evaluation import generate

    with pytest.raises(E.EvalInputError, match=r"thin.png \(1x4\) is too small"):  # eval generate's size plan
        generate._ref_size(E.ImageRef(tmp_path / "thin.png", box=(0, 0, 0.5, 1)))


def test_unreadable_image_names_the_file(tmp_path):
    root = tiny.make_folder_evalset(tmp_path / "ev", per_task=1)
    (root / "flip/000/a.png").write_bytes(b"this is not a png")
    (t,) = [t for t in E.read_evalset(root) if t.key == "flip/000"]
    with pytest.raises(E.EvalInputError, match=r"flip/000/a.png is not a readable image"):
        t.a.load()


def make_lorweb_set(root, sizes):
    """The released layout: original/unsplash_<cat>/<stem>.jpg and decoded_random_inference_set/db_not_in_trainset/
    <cat>/<Prompt>/<a-stem>_<k>.png."""
    rng = random.Random(0)
    for stem, size in sizes.items():
        path = root / "data/original/unsplash_animals" / f"{stem}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        tiny.random_picture(rng, size).save(path)
    prompt_dir = root / "data/decoded_random_inference_set/db_not_in_trainset/animals/Add_a_flowing_mane"
    prompt_dir.mkdir(parents=True)
    for k in range(2):
        tiny.random_picture(rng, (48, 32)).save(prompt_dir / f"dog-aaa-unsplash_{k}.png")
    return root


def test_released_lorweb_layout(tmp_path):
    # a is 60x40 (aspect 1.5); b candidates: 1.5, 1.4, 1.538, 1.55 (within 0.15), 0.75 (not)
    close = {"cat-bbb-unsplash", "cow-ccc-unsplash", "elk-eee-unsplash", "fox-fff-unsplash"}
    root = make_lorweb_set(tmp_path / "set", {"dog-aaa-unsplash": (60, 40), "cat-bbb-unsplash": (90, 60),
                                              "cow-ccc-unsplash": (70, 50), "elk-eee-unsplash": (80, 52),
                                              "fox-fff-unsplash": (62, 40), "owl-ddd-unsplash": (30, 40)})
    assert E.detect_format(root) == "lorweb"
    triplets = E.read_evalset(root, seed=1)
    assert len(triplets) == 4  # 2 a' x 2 b
    tasks = {t.task for t in triplets}
    assert tasks == {"animals__Add_a_flowing_mane"}
    for t in triplets:
        assert t.prompt == "Add a flowing mane"
        assert t.a.path.name == "dog-aaa-unsplash.jpg"
        assert t.b.path.stem in close  # the aspect-ratio filter
        b = t.b.load()
        assert abs(b.width / b.height - 1.5) < 0.03  # cropped to a's aspect ratio
    for k in range(2):  # two different b per (a, a')
        assert len({t.b.path.stem for t in triplets if t.a_prime.path.stem.endswith(f"_{k}")}) == 2

    def choice(seed):
        return [(t.a_prime.path.name, t.b.path.name) for t in E.read_evalset(root, seed=seed)]

    # four close candidates, two drawn: the seed decides which, and the same seed repeats the choice
    assert choice(1) == choice(1) == [(t.a_prime.path.name, t.b.path.name) for t in triplets]
    assert any(choice(seed) != choice(1) for seed in range(2, 12))
def test_released_layout_pairs_file_and_errors(tmp_path):
    root = make_lorweb_set(tmp_path / "set", {"dog-aaa-unsplash": (60, 40), "cat-bbb-unsplash": (90, 60),
                                              "owl-ddd-unsplash": (30, 40)})
    with pytest.warns(UserWarning, match="aspect ratio within"):
        triplets = E.read_evalset(root)  # only one close b: the closest other completes the pair, with a warning
    assert any(t.extra.get("b_aspect_outside_tolerance") for t in triplets)
    pairs = tmp_path / "pairs.jsonl"
    base = "decoded_random_inference_set/db_not_in_trainset/animals/Add_a_flowing_mane"
    pairs.write_text("\n".join(json.dumps({"a_prime": f"{base}/dog-aaa-unsplash_{k}.png",
                                           "b": "original/unsplash_animals/owl-ddd-unsplash.jpg"}) for k in range(2)))
    fixed = E.read_evalset(root, pairs_file=pairs)
    assert [t.b.path.stem for t in fixed] == ["owl-ddd-unsplash"] * 2
    (root / "data/original/unsplash_animals/dog-aaa-unsplash.jpg").unlink()
    with pytest.raises(E.EvalInputError, match="source image .*unsplash_animals/dog-aaa-unsplash.<ext> is missing"):
        E.read_evalset(root)


def test_released_layout_task_filter_comes_before_the_pairs_file(tmp_path):
    """With --tasks, a pairs file needs entries for those tasks only; an unknown task is named."""
    root = make_lorweb_set(tmp_path / "set", {"dog-aaa-unsplash": (60, 40), "cat-bbb-unsplash": (90, 60),
                                              "owl-ddd-unsplash": (30, 40)})
    cape = root / "data/decoded_random_inference_set/db_not_in_trainset/animals/Add_a_cape"
    cape.mkdir()
    tiny.random_picture(random.Random(1), (48, 32)).save(cape / "dog-aaa-unsplash_0.png")
    pairs = tmp_path / "pairs.jsonl"
    base = "decoded_random_inference_set/db_not_in_trainset/animals/Add_a_flowing_mane"
    pairs.write_text("\n".join(json.dumps({"a_prime": f"{base}/dog-aaa-unsplash_{k}.png",
                                           "b": "original/unsplash_animals/owl-ddd-unsplash.jpg"}) for k in range(2)))
    mane = E.read_evalset(root, pairs_file=pairs, tasks=["animals__Add_a_flowing_mane"])
    assert [(t.task, t.b.path.stem) for t in mane] == [("animals__Add_a_flowing_mane", "owl-ddd-unsplash")] * 2
    with pytest.raises(E.EvalInputError, match="pairs file .* has no b for .*Add_a_cape/dog-aaa-unsplash_0.png"):
        E.read_evalset(root, pairs_file=pairs)
    with pytest.raises(E.EvalInputError, match=r"tasks not found in .*\['animals__Nope'\]"):
        E.read_evalset(root, pairs_file=pairs, tasks=["animals__Add_a_flowing_mane", "animals__Nope"])


def make_relation(root, tasks=("115-Colored Pencil Filter", "7-Add Hat"), per_task=3):
    rng = random.Random(0)
    for task in tasks:
        g = root / task / "Group1"
        g.mkdir(parents=True)
        labels = []
        for i in range(per_task):
            pair = Image.new("RGB", (64, 32))
            pair.paste(tiny.random_picture(rng, (32, 32)), (0, 0))
            pair.paste(tiny.random_picture(rng, (32, 32)), (32, 0))
            pair.save(g / f"{i}.jpg")
            labels.append({"img_name": f"{i}.jpg", "edit_instruction": f"{task} edit {i}",
                           "left_image_description": "l", "right_image_description": "r"})
        (g / "labels.json").write_text(json.dumps(labels))
    return root


def test_relation252k_unseen_tasks(tmp_path):
    root = make_relation(tmp_path / "rel")
    assert E.detect_format(root) == "relation252k"
    triplets = E.read_evalset(root)
    assert len(triplets) == 6 and {t.task for t in triplets} == {"115-Colored Pencil Filter", "7-Add Hat"}
    t = triplets[0]
    full = Image.open(t.a.path).convert("RGB")
    assert t.a.load().tobytes() == full.crop((0, 0, 32, 32)).tobytes()
    assert t.a_prime.load().tobytes() == full.crop((32, 0, 64, 32)).tobytes()
    assert t.b.path != t.a.path and t.b.load().size == (32, 32)
    assert t.prompt == f"{t.task} edit {t.a.path.stem}"
    assert len(E.read_evalset(root, tasks=["7-Add Hat"])) == 3


def test_task_filter_and_cap_keep_each_tasks_b_choices(tmp_path):
    """--tasks and --max-per-task only drop triplets: a task's b choices (and so its triplet ids) are the same as in
    the full set, so a resumed run with another --tasks adds no second set of triplets."""
    root = make_relation(tmp_path / "rel", tasks=("1-A", "2-B", "3-C"), per_task=5)
    for seed in range(4):
        full = [t.describe() for t in E.read_evalset(root, seed=seed)]
        for task in ("1-A", "2-B", "3-C"):
            alone = [t.describe() for t in E.read_evalset(root, seed=seed, tasks=[task])]
            assert alone == [d for d in full if d["task"] == task]
        some = [t.describe() for t in E.read_evalset(root, seed=seed, tasks=["3-C", "1-A"], max_per_task=2)]
        assert len(some) == 4 and all(d in full for d in some)
    # the choices do depend on the seed
    assert any([t.id for t in E.read_evalset(root, seed=s)] != [t.id for t in E.read_evalset(root, seed=0)]
               for s in range(1, 6))


def test_options_that_do_not_apply_are_refused(tmp_path):
    root = make_relation(tmp_path / "rel", tasks=("t",), per_task=2)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("")
    with pytest.raises(E.EvalInputError, match="pairs file .*pairs.jsonl.* released LoRWeB layout; .* relation252k"):
        E.read_evalset(root, pairs_file=pairs)
    with pytest.raises(E.EvalInputError, match=r"max_per_task \(--max-per-task\) must be >= 1, got 0"):
        E.read_evalset(root, max_per_task=0)


def test_relation252k_pairs_split_at_half_width_rounded_down(tmp_path):
    """Reference: NVlabs/LoRWeB preprocess_data.py splits a side-by-side pair at ``width // 2`` (left
    ``crop((0, 0, width // 2, height))``, right ``crop((width // 2, 0, width, height))``), also for odd widths."""
    root = make_relation(tmp_path / "rel", tasks=("t",), per_task=2)
    for width in (63, 65, 67):
        pair = tiny.random_picture(random.Random(width), (width, 20))
        pair.save(root / "t/Group1/0.png")
        (root / "t/Group1/labels.json").write_text(json.dumps([{"img_name": "0.png", "edit_instruction": "e"},
                                                               {"img_name": "1.jpg", "edit_instruction": "f"}]))
        (t,) = [t for t in E.read_evalset(root) if t.a.path.name == "0.png"]
        assert t.a.load().tobytes() == pair.crop((0, 0, width // 2, 20)).tobytes()
        assert t.a_prime.load().tobytes() == pair.crop((width // 2, 0, width, 20)).tobytes()


def test_repeated_triplet_ids_are_refused(tmp_path):
    """Two labels.json entries with one image (or two images with one name stem) would be one triplet folder."""
    root = make_relation(tmp_path / "rel", tasks=("t",), per_task=3)
    labels = json.loads((root / "t/Group1/labels.json").read_text())
    (root / "t/Group1/labels.json").write_text(json.dumps(labels + [labels[0]]))
    with pytest.raises(E.EvalInputError, match=r"triplet ids occur more than once \(t/0__"):
        E.read_evalset(root)


def test_relation252k_errors(tmp_path):
    root = make_relation(tmp_path / "rel", tasks=("solo",), per_task=1)
    with pytest.raises(E.EvalInputError, match=r"task 'solo' has 1 distinct pair images in .*labels.json "
                                               r"\(1 entries\)"):
        E.read_evalset(root, "relation252k")
    root = make_relation(tmp_path / "rel2", tasks=("t",), per_task=2)
    (root / "t/Group1/1.jpg").unlink()
    with pytest.raises(E.EvalInputError, match="image not found: .*t/Group1/1.jpg"):
        E.read_evalset(root, "relation252k")


def test_relation252k_one_image_listed_twice_is_not_an_analogy(tmp_path):
    """A task whose labels.json names one image twice (or once as "x.jpg" and once as "sub/../x.jpg") has no b
    other than a's own image: refused by name (it was an IndexError from ``random.choice([])``, or, through the
    alias, a self-analogy b = a); with a third image, the image listed twice is refused as a repeated triplet id."""
    root = make_relation(tmp_path / "rel", tasks=("t",), per_task=2)
    labels_path = root / "t/Group1/labels.json"
    labels = json.loads(labels_path.read_text())
    labels_path.write_text(json.dumps([labels[0], dict(labels[0], edit_instruction="again")]))
    with pytest.raises(E.EvalInputError, match=r"task 't' has 1 distinct pair images in .*\(2 entries\); an analogy "
                                               "needs 2"):
        E.read_evalset(root, "relation252k")
    (root / "t/Group1/sub").mkdir()
    labels_path.write_text(json.dumps([labels[0], dict(labels[0], img_name="sub/../0.jpg")]))
    with pytest.raises(E.EvalInputError, match=r"1 distinct pair images .*\(2 entries\)"):
        E.read_evalset(root, "relation252k")
    labels_path.write_text(json.dumps([labels[0], dict(labels[0], img_name="sub/../0.jpg"), labels[1]]))
    with pytest.raises(E.EvalInputError, match=r"triplet ids occur more than once \(t/0__1\): the same image is "
                                               "listed twice"):  # both entries of 0.jpg draw b = 1.jpg
        E.read_evalset(root, "relation252k")


def test_runs_reader(tmp_path):
    ev = tiny.make_folder_evalset(tmp_path / "ev", per_task=2)
    runs = tiny.make_runs_folder(tmp_path / "runs", ev)
    (runs / "run.json").write_text("{}")  # files at the top are ignored
    items = E.read_runs(runs)
    assert [i.key for i in items] == ["flip/000", "flip/001", "swap/000", "swap/001"]
    assert items[0].prompt == "mirror the image" and items[0].b_prime.name == "b_prime.png"
    (runs / "swap/001/b_prime.png").unlink()
    with pytest.raises(E.EvalInputError, match=r"missing image .*swap/001/b_prime.*unfinished generate run"):
        E.read_runs(runs)
    (runs / "swap/001").rename(tmp_path / "moved")
    (runs / "swap/000").rename(tmp_path / "moved2")
    with pytest.raises(E.EvalInputError, match="task 'swap' has no triplets"):
        E.read_runs(runs)
    with pytest.raises(E.EvalInputError, match="runs folder not found"):
        E.read_runs(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(E.EvalInputError, match=r"no triplets in runs folder .*empty \(expected "
                                               r"<task>/<id>/\{a,a_prime,b,b_prime\}\.<png\|jpg\|jpeg\|webp\|bmp>\)"):
        E.read_runs(tmp_path / "empty")


def test_text_files_that_are_not_utf8_name_the_file(tmp_path):
    """A prompt.txt or labels.json that is not UTF-8 was a bare "'utf-8' codec can't decode byte" error naming no
    file; a labels.json that is not a list of string fields was a TypeError traceback."""
    root = tiny.make_folder_evalset(tmp_path / "ev", per_task=1)
    (root / "flip/000/prompt.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(E.EvalInputError, match=r"prompt file .*flip/000/prompt.txt is not valid UTF-8"):
        E.read_evalset(root)
    runs = tiny.make_runs_folder(tmp_path / "runs", tiny.make_folder_evalset(tmp_path / "ev2", per_task=1))
    (runs / "swap/000/prompt.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(E.EvalInputError, match=r"prompt file .*swap/000/prompt.txt is not valid UTF-8"):
        E.read_runs(runs)
    group = tmp_path / "rel" / "task" / "Group1"
    group.mkdir(parents=True)
    (group / "labels.json").write_bytes(b'[{"img_name": "a.png", "edit_instruction": "caf\xe9"}]')
    with pytest.raises(E.EvalInputError, match=r"labels file .*labels.json is not valid UTF-8"):
        E.read_evalset(tmp_path / "rel", "relation252k")
    (group / "labels.json").write_text(json.dumps([{"img_name": 3, "edit_instruction": "e"}]))
    with pytest.raises(E.EvalInputError, match=r"entry 0 needs 'img_name' and 'edit_instruction' strings"):
        E.read_evalset(tmp_path / "rel", "relation252k")
    (group / "labels.json").write_text(json.dumps({"img_name": "a.png"}))
    with pytest.raises(E.EvalInputError, match=r"labels.json holds a JSON dict, not a list"):
        E.read_evalset(tmp_path / "rel", "relation252k")
