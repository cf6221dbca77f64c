import json
import warnings

import pytest

from pipeline.features.datasets import load_flickr8k, load_karpathy, load_records, make_synthetic, synthetic_captions
from pipeline.io.errors import PipelineError

from conftest import FLICKR8K, karpathy_json, need_shared, tiny_flickr8k


def test_flickr8k_real_release_files():
    root = need_shared(FLICKR8K)
    with pytest.warns(UserWarning) as caught:
        records = load_flickr8k(root)
    messages = [str(w.message) for w in caught]
    assert any("skipped 5 caption line(s)" in m and "line 6731: 2258277193_586949ec62.jpg.1" in m for m in messages)
    assert any("91 captioned image(s) are in no split file" in m for m in messages)
    by_split = {s: [r for r in records if r.split == s] for s in ("train", "dev", "test")}
    assert [len(v) for v in by_split.values()] == [6000, 1000, 1000]
    assert all(len(r.captions) == 5 for r in records)
    first = by_split["train"][0]
    assert first.image_path == root / "Flicker8k_Dataset" / first.image_id
    assert len({r.image_id for r in records}) == 8000


def test_flickr8k_groups_captions_and_skips_orphans(tmp_path):
    root = tiny_flickr8k(
        tmp_path,
        ["a.jpg#0\tA dog .", "a.jpg#1\tA cat .", "b.jpg#0\tSnow .", "a.jpg.1#0\tquirk line", "c.jpg#0\tin no split"],
    )
    with pytest.warns(UserWarning) as caught:
        records = load_flickr8k(root)
    assert "line 4: a.jpg.1" in str(caught[0].message) and "(c.jpg)" in str(caught[1].message)
    assert [(r.image_id, r.split, r.captions) for r in records] == [
        ("a.jpg", "train", ("A dog .", "A cat .")),
        ("b.jpg", "dev", ("Snow .",)),
    ]


def test_karpathy_json(tmp_path):
    path = karpathy_json(
        tmp_path,
        [
            {
                "filepath": "val2014",
                "filename": "x.jpg",
                "cocoid": 7,
                "split": "restval",
                "sentences": [{"raw": "A man.", "tokens": ["a", "man"]}, {"tokens": ["two", "men"]}],
            },
            {"filename": "y.jpg", "imgid": 3, "split": "test", "sentences": [{"raw": "Snow."}]},
        ],
    )
    records = load_karpathy(path, tmp_path / "images")
    assert [(r.image_id, r.split, r.captions, r.image_path) for r in records] == [
        ("7", "train", ("A man.", "two men"), tmp_path / "images" / "val2014" / "x.jpg"),
        ("3", "test", ("Snow.",), tmp_path / "images" / "y.jpg"),
    ]


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"filename": "x.jpg", "split": "test", "sentences": [{"raw": 5}]}, "malformed entry .*raw must be a string"),
        ({"filename": "x.jpg", "split": ["train"], "sentences": [{"raw": "A."}]}, "filename, filepath and split must"),
        ({"filename": 12, "split": "test", "sentences": [{"raw": "A."}]}, "filename, filepath and split must be"),
        ({"filename": "x.jpg", "filepath": None, "split": "test", "sentences": []}, "filename, filepath and split"),
        ({"filename": "x.jpg", "split": "test", "sentences": [{"tokens": "a dog"}]}, "tokens must be a list of str"),
        ({"filename": "x.jpg", "split": "test", "sentences": []}, r"\(x.jpg\): has no sentences"),
    ],
)
def test_a_malformed_karpathy_entry_is_named(tmp_path, entry, message):
    with pytest.raises(PipelineError, match=rf"dataset_coco.json: images\[1\].*{message}"):
        load_karpathy(
            karpathy_json(tmp_path, [{"filename": "a.jpg", "split": "val", "sentences": [{"raw": "A."}]}, entry]),
            tmp_path,
        )


def test_files_saved_with_a_byte_order_mark_read_as_without(tmp_path):
    """Windows editors save UTF-8 with a byte-order mark: it is not part of the first line or key."""
    root = tiny_flickr8k(tmp_path, ["a.jpg#0\tA dog .", "b.jpg#0\tSnow ."])
    for path in (root / "Flickr8k_text").iterdir():
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert [r.image_id for r in load_flickr8k(root)] == ["a.jpg", "b.jpg"]
    path = karpathy_json(tmp_path, [{"filename": "y.jpg", "split": "test", "sentences": [{"raw": "Snow."}]}])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert [r.captions for r in load_karpathy(path, tmp_path)] == [("Snow.",)]


@pytest.mark.parametrize(
    "dataset, json_name, image_folder, entry, image_id",
    [
        ("flickr30k", "dataset_flickr30k.json", "flickr30k-images", {"filename": "1000092795.jpg", "imgid": 7}, "7"),
        (
            "coco",
            "dataset_coco.json",
            "val2014",
            {"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "imgid": 7, "cocoid": 391895},
            "391895",
        ),
    ],
)
def test_flickr30k_and_coco_in_their_usual_layout(tmp_path, dataset, json_name, image_folder, entry, image_id):
    sentences = [{"tokens": ["a", "man", "rides"], "raw": "A man rides.", "imgid": 0, "sentid": 0}]
    karpathy_json(tmp_path, [dict(entry, split="restval", sentences=sentences, sentids=[0])], json_name)
    (record,) = load_records(dataset, tmp_path)
    assert record.image_id == image_id
    assert record.image_path == tmp_path / image_folder / entry["filename"]
    assert (record.split, record.captions) == ("train", ("A man rides.",))
    with pytest.raises(
        PipelineError, match=f"{json_name}: missing; get it from https://cs.stanford.edu/.*caption_datasets.zip"
    ):
        load_records(dataset, tmp_path / "elsewhere")


def test_synthetic_captions_name_the_drawn_objects(small_corpus):
    json_path, root = small_corpus
    data = json.loads(json_path.read_text())
    records = load_karpathy(json_path, root)
    assert [sum(r.split == s for r in records) for s in ("train", "val", "test")] == [40, 10, 10]
    for entry, record in zip(data["images"], records):
        scene = [(c, s, tuple(cell)) for c, s, cell in entry["objects"]]
        assert record.captions == synthetic_captions(scene)
        assert record.image_path.exists()
    from PIL import Image

    # the drawn colour is at the named cell: e.g. 'red' at the top left means a red-dominant pixel there
    colour, _, (row, col) = scene[0]
    img = Image.open(records[-1].image_path).convert("RGB")
    r, g, b = img.getpixel((col * 112 + 56, row * 112 + 56))
    dominant = {"red": r > 150 > g, "green": g > r and g > b, "blue": b > 150 > r, "yellow": r > 150 and g > 150 > b}
    assert dominant[colour]


def test_synthetic_is_deterministic_and_reused(tmp_path):
    a = make_synthetic(tmp_path / "a", sizes={"train": 3}, seed=1)
    b = make_synthetic(tmp_path / "b", sizes={"train": 3}, seed=1)
    assert json.loads(a.read_text())["images"] == json.loads(b.read_text())["images"]
    mtime = a.stat().st_mtime_ns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert make_synthetic(tmp_path / "a", sizes={"train": 3}, seed=1) == a
    assert a.stat().st_mtime_ns == mtime
