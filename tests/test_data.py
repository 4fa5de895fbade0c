"""Every data set format `--data` accepts reads into the same image -> captions mapping."""

import json
from pathlib import Path

import pytest
from PIL import Image

from capcli.data.captions import load_captions
from capcli.errors import DataError


def image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), "red").save(path)
    return path


def names(captions) -> dict[str, list[str]]:
    return {p.name: c for p, c in captions.captions.items()}


def test_flickr8k_csv_with_quoting_and_images_subfolder(tmp_path):
    image(tmp_path / "images" / "a.jpg")
    image(tmp_path / "images" / "b.jpg")
    (tmp_path / "captions.txt").write_text(
        'image,caption\na.jpg,"A dog, running"\na.jpg,"He said ""hi"""\nb.jpg,A cat .\n')
    assert names(load_captions(tmp_path)) == {"a.jpg": ["A dog, running", 'He said "hi"'], "b.jpg": ["A cat ."]}


def test_flickr_token_file(tmp_path):
    image(tmp_path / "a.jpg")
    (tmp_path / "Flickr8k.token.txt").write_text("a.jpg#0\tA dog .\na.jpg#1\tA brown dog .\n")
    assert names(load_captions(tmp_path)) == {"a.jpg": ["A dog .", "A brown dog ."]}


def test_coco_captions_json(tmp_path):
    image(tmp_path / "images" / "000001.jpg")
    coco = {"images": [{"id": 1, "file_name": "000001.jpg"}],
            "annotations": [{"image_id": 1, "id": 9, "caption": "A plane."}, {"image_id": 1, "id": 10, "caption": "Jet"}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    assert names(load_captions(tmp_path / "captions.json")) == {"000001.jpg": ["A plane.", "Jet"]}


def test_jsonl_and_csv_manifests(tmp_path):
    image(tmp_path / "pics" / "x.png")
    (tmp_path / "m.jsonl").write_text('{"image": "pics/x.png", "caption": "one"}\n'
                                      '{"image": "pics/x.png", "caption": ["two", "three"]}\n')
    assert names(load_captions(tmp_path / "m.jsonl")) == {"x.png": ["one", "two", "three"]}
    (tmp_path / "m.csv").write_text("Image,Caption\npics/x.png,four\n")
    assert names(load_captions(tmp_path / "m.csv")) == {"x.png": ["four"]}


def test_folder_of_images_with_sidecar_captions(tmp_path):
    image(tmp_path / "a.jpg")
    image(tmp_path / "sub" / "b.png")
    image(tmp_path / "no-caption.jpg")
    (tmp_path / "a.jpg").with_suffix(".txt").write_text("a red square\n")
    (tmp_path / "sub" / "b.txt").write_text("first\nsecond\n")
    assert names(load_captions(tmp_path)) == {"a.jpg": ["a red square"], "b.png": ["first", "second"]}


def test_split_selects_images_and_reports_unknown_names(tmp_path):
    for n in "abc":
        image(tmp_path / f"{n}.jpg")
    (tmp_path / "captions.txt").write_text("image,caption\na.jpg,A\nb.jpg,B\nc.jpg,C\n")
    (tmp_path / "split.txt").write_text("a.jpg\nc.jpg\nzzz.jpg\n")
    data = load_captions(tmp_path, tmp_path / "split.txt")
    assert names(data) == {"a.jpg": ["A"], "c.jpg": ["C"]}
    assert "1 split names without captions or images (e.g. zzz.jpg)" in data.report()


def test_bad_rows_are_counted_and_good_rows_kept(tmp_path):
    image(tmp_path / "a.jpg")
    (tmp_path / "captions.txt").write_text(
        "image,caption\na.jpg,fine\na.jpg,fine\na.jpg,   \nmissing.jpg,gone\n../../etc/passwd,escape\n")
    data = load_captions(tmp_path)
    assert names(data) == {"a.jpg": ["fine"]}
    assert data.skipped == {"duplicate rows": 1, "empty captions": 1, "missing images": 1,
                            "paths outside the data folder": 1}


def test_unusable_data_stops_with_one_clear_message(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_captions(tmp_path / "nope")
    (tmp_path / "captions.csv").write_text("file,text\na.jpg,x\n")
    with pytest.raises(DataError, match="needs the columns 'image' and 'caption'"):
        load_captions(tmp_path / "captions.csv")
    (tmp_path / "bad.csv").write_bytes(b"image,caption\na.jpg,\xff\xfe\n")
    with pytest.raises(DataError, match="not UTF-8"):
        load_captions(tmp_path / "bad.csv")
    (tmp_path / "only-missing.csv").write_text("image,caption\nmissing.jpg,x\n")
    with pytest.raises(DataError, match="no usable images.*1 missing images"):
        load_captions(tmp_path / "only-missing.csv")


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside the project")
def test_real_data_sets_read_completely():
    train = load_captions(SHARED / "flickr8k", SHARED / "flickr8k" / "train.txt")
    assert len(train.captions) == 6000
    assert sum(len(c) for c in train.captions.values()) > 29_900
    coco = load_captions(SHARED / "coco-mini")
    assert (len(coco.captions), len(coco.pairs)) == (80, 400)


def test_manifest_rows_missing_fields_or_absolute_paths_are_counted(tmp_path):
    image(tmp_path / "a.jpg")
    (tmp_path / "captions.jsonl").write_text(
        '{"image": "a.jpg", "caption": "fine"}\n{"image": "a.jpg"}\n{"caption": "no image"}\n'
        '{"image": "/etc/passwd", "caption": "absolute"}\nnot json\n')
    data = load_captions(tmp_path / "captions.jsonl")
    assert names(data) == {"a.jpg": ["fine"]}
    assert data.skipped == {"empty captions": 1, "rows without an image": 1, "paths outside the data folder": 1,
                            "malformed rows": 1}
    assert "line 5: not a JSON object" in data.report()

    coco = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2}],
            "annotations": [{"image_id": 1, "caption": "fine"}, {"image_id": 1}, {"image_id": 2, "caption": "x"},
                            {"image_id": 9, "caption": "unknown image id"}, {"caption": "no id"}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    data = load_captions(tmp_path / "captions.json")
    assert names(data) == {"a.jpg": ["fine"]}
    assert sum(data.skipped.values()) == 4, data.skipped
