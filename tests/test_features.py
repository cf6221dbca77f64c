import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pipeline.features import folder, shards
from pipeline.features.datasets import load_karpathy
from pipeline.features.encoders import build_encoder
from pipeline.features.extract import FeatureConfig, decoding_workers, extract_features
from pipeline.features.images import Preprocess, open_rgb
from pipeline.io.errors import PipelineError

from conftest import FLICKR8K, ROOT, need_shared, run_cli

FAST = dict(encoder="squeezenet1_1", weights="random", shard_size=16, batch_size=5, num_workers=2)


@pytest.fixture(scope="module")
def corpus_with_bad_images(small_corpus, tmp_path_factory):
    """The small corpus plus a zero-byte, a truncated, a text and a missing image in train: (json, root)."""
    json_path, root = small_corpus
    data = json.loads(json_path.read_text())
    bad = tmp_path_factory.mktemp("bad")
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("hello\n")
    (bad / "trunc.jpg").write_bytes((root / "images" / "00000.jpg").read_bytes()[:2000])
    for n, name in enumerate(["zero.jpg", "text.jpg", "trunc.jpg", "missing.jpg"]):
        data["images"].insert(
            3 + 5 * n,
            {
                "filepath": str(bad),
                "filename": name,
                "imgid": 1000 + n,
                "split": "train",
                "sentences": [{"raw": "a red circle at the top left"}],
            },
        )
    path = bad / "dataset_with_bad.json"
    path.write_text(json.dumps(data))
    return path, root


@pytest.fixture(scope="module")
def extracted(corpus_with_bad_images, tmp_path_factory):
    json_path, root = corpus_with_bad_images
    out = tmp_path_factory.mktemp("features")
    summary = extract_features(load_karpathy(json_path, root), out, FeatureConfig(**FAST), "synthetic", progress=False)
    return out, summary, load_karpathy(json_path, root)


@pytest.mark.parametrize("mode", ["center-crop", "resize"])
def test_extraction_warns_where_centre_crops_would_cut_the_borders(small_corpus, tmp_path, mode, recwarn):
    json_path, root = small_corpus  # 224x224 images
    config = FeatureConfig(**FAST, preprocess=mode)
    extract_features(load_karpathy(json_path, root), tmp_path, config, "synthetic", ["val"], progress=False)

    def border_warnings():
        return [w for w in recwarn if "`preprocess='resize'` keeps them whole" in str(w.message)]

    assert len(border_warnings()) == (mode == "center-crop")
    extract_features(load_karpathy(json_path, root), tmp_path, config, "synthetic", ["val"], progress=False)
    assert len(border_warnings()) == (mode == "center-crop")  # nothing left to encode: no second warning


def test_shards_manifest_and_text(extracted):
    out, summary, records = extracted
    manifest = folder.load_manifest(out)
    assert (manifest["grid"], manifest["L"], manifest["D"], manifest["dtype"]) == ([13, 13], 169, 512, "float16")
    assert manifest["encoder"]["name"] == "squeezenet1_1" and len(manifest["encoder"]["weights_sha256"]) == 64
    assert manifest["preprocess"] == {"mode": "center-crop", "image_size": 224} and manifest["precision"] == "fp32"
    assert {s: e["images"] for s, e in manifest["splits"].items()} == {"train": 40, "val": 10, "test": 10}
    train = manifest["splits"]["train"]["shards"]
    assert [e["file"] for e in train] == [f"train/shard-0000{k}.h5" for k in range(3)]  # 44 planned / 16
    ids = []
    for entry in train:
        assert entry["sha256"] == shards.file_sha256(out / entry["file"])
        with h5py.File(out / entry["file"]) as f:
            assert f["annotations"].dtype == np.float16 and f["annotations"].shape[1:] == (169, 512)
            ids += [s.decode() for s in f["image_ids"][:]]
    assert ids == [
        r.image_id for r in records if r.split == "train" and r.image_id not in ("1000", "1001", "1002", "1003")
    ]
    captions = json.loads((out / folder.CAPTIONS).read_text())
    assert captions["val"][records[-11].image_id]["tokens"][0][:2] == ["a", records[-11].captions[0].split()[1]]
    assert json.loads((out / folder.VOCAB).read_text())["words"][:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert summary.per_split == {"train": 40, "val": 10, "test": 10} and summary.images == 60


def test_bad_images_are_reported_and_the_rest_go_on(extracted):
    out, summary, _ = extracted
    reasons = {f["image_id"]: f["reason"] for f in summary.failures}
    assert set(reasons) == {"1000", "1001", "1002", "1003"}
    assert reasons["1000"] == "empty file (0 bytes)" and reasons["1001"].startswith("not an image")
    assert reasons["1002"].startswith("truncated") and reasons["1003"].startswith("missing")
    report = (out / folder.BAD_IMAGES).read_text().splitlines()
    assert report[0] == "split\timage_id\tpath\treason" and len(report) == 5
    assert any(line.startswith("train\t1003\t") and line.endswith("missing (no such file)") for line in report)


def test_stored_values_are_the_encoder_output(extracted):
    out, _, records = extracted
    rec = [r for r in records if r.split == "val"][3]
    encoder = build_encoder("squeezenet1_1", "random")
    with torch.inference_mode():
        expected = encoder(Preprocess().transform()(open_rgb(rec.image_path))[None])[0]
    data = shards.AnnotationShards(out, "val")
    i = data.image_ids.index(rec.image_id)
    torch.testing.assert_close(data[i], expected, atol=2e-2, rtol=2e-3)  # float16 storage


def test_reader_with_two_workers(extracted):
    out, _, _ = extracted
    data = shards.AnnotationShards(out, "train")
    assert len(data) == 40 and data.grid == (13, 13) and data[0].dtype == torch.float32
    with h5py.File(out / "train/shard-00001.h5") as f:
        direct = torch.from_numpy(f["annotations"][:].astype(np.float32))
    batches = list(DataLoader(data, batch_size=7, num_workers=2))
    read = torch.cat(batches)
    n0 = len(h5py.File(out / "train/shard-00000.h5")["image_ids"])
    torch.testing.assert_close(read[n0 : n0 + len(direct)], direct, rtol=0, atol=0)
    pairs = shards.CaptionPairs(data)
    assert len(pairs) == 80 and set(pairs.lengths()) <= set(range(6, 30))
    a, caption, i = pairs[3]
    assert caption[0] == data.vocab.start and caption[-1] == data.vocab.end and torch.equal(a, data[i])
    assert data.vocab.decode(caption) == data.vocab.decode(data.captions[i][1])
    with pytest.raises(PipelineError, match="no features for split 'dev'"):
        shards.AnnotationShards(out, "dev")


def test_in_process_decoding_threads_write_the_same_shards(extracted, tmp_path):
    """The CPU default decodes in the main process (a thread per core; no worker processes):
    the shards hold the same values, image order and failures as with 2 decoding workers."""
    out, summary, records = extracted
    assert decoding_workers(FeatureConfig(), torch.device("cpu")) == 0
    assert decoding_workers(FeatureConfig(num_workers=3), torch.device("cpu")) == 3
    assert decoding_workers(FeatureConfig(), torch.device("cuda")) == min(8, os.cpu_count())
    again = extract_features(
        records, tmp_path, FeatureConfig(**dict(FAST, num_workers=None)), "synthetic", progress=False
    )
    assert again.images == summary.images and again.failures == summary.failures
    for split in ("train", "val", "test"):
        a, b = shards.AnnotationShards(out, split), shards.AnnotationShards(tmp_path, split)
        assert a.image_ids == b.image_ids and all(torch.equal(a[i], b[i]) for i in range(len(a)))
    with pytest.raises(PipelineError, match=r"`num_workers`: -1 is not in the range 0<=x<=64"):
        FeatureConfig(num_workers=-1)


def test_rerun_skips_finished_shards_and_refuses_other_settings(extracted, corpus_with_bad_images):
    out, _, _ = extracted
    records = load_karpathy(*corpus_with_bad_images)
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/*.h5")}
    again = extract_features(records, out, FeatureConfig(**FAST), "synthetic", progress=False)
    assert again.images == 0 and len(again.failures) == 4
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*.h5")} == mtimes
    with pytest.raises(PipelineError, match="different encoder"):
        extract_features(records, out, FeatureConfig(**dict(FAST, encoder="vgg16")), "synthetic", progress=False)
    with pytest.raises(PipelineError, match="different dtype, shard_size"):
        extract_features(records, out, FeatureConfig(**dict(FAST, shard_size=8, dtype="float32")), "synthetic")
    with pytest.raises(PipelineError, match=r"different precision \(precision=fp32\)"):
        extract_features(records, out, FeatureConfig(**dict(FAST, precision="bf16")), "synthetic")
    with pytest.raises(PipelineError, match="unknown split.*dev.*has train, val, test"):
        extract_features(records, out, FeatureConfig(**FAST), "synthetic", ["train", "dev"])
    text = {p: p.read_bytes() for p in (out / folder.VOCAB, out / folder.CAPTIONS, out / folder.MANIFEST)}
    with pytest.raises(PipelineError, match=r"different min_count \(min_count=\d+\)"):
        extract_features(records, out, FeatureConfig(**dict(FAST, min_count=1)), "synthetic")
    with pytest.raises(PipelineError, match=r"its \w+ shards were made from a different image list"):
        extract_features([r for r in records if r is not records[0]], out, FeatureConfig(**FAST), "synthetic")
    changed = [r for r in records if r.split != "test" or r is not records[-1]]  # a split not asked for
    assert records[-1].split == "test"
    with pytest.raises(PipelineError, match=r"its test shards were made from a different image list.*another `out`"):
        extract_features(changed, out, FeatureConfig(**FAST), "synthetic", ["train"])
    assert {p: p.read_bytes() for p in text} == text and {p: p.stat().st_mtime_ns for p in out.glob("*/*.h5")} == mtimes


@pytest.mark.parametrize(
    "device, precision, recorded",
    [
        ("cpu", "bf16", "bf16"),
        pytest.param("cuda", "auto", "fp16", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
    ],
)
def test_autocast_features_are_recorded_and_close_to_fp32(
    extracted, small_corpus, tmp_path, device, precision, recorded
):
    """--precision autocasts the encoder (CUDA's default with float16 storage is fp16): values
    within 2% of fp32 (and not equal to them), the precision in the manifest."""
    records = load_karpathy(*small_corpus)
    config = FeatureConfig(**dict(FAST, device=device, precision=precision))
    extract_features(records, tmp_path, config, "synthetic", ["val"], progress=False)
    assert folder.load_manifest(tmp_path)["precision"] == recorded
    fp32, cast = shards.AnnotationShards(extracted[0], "val"), shards.AnnotationShards(tmp_path, "val")
    assert cast.image_ids == fp32.image_ids
    a, b = (torch.stack([s[i] for i in range(len(s))]) for s in (fp32, cast))
    assert 1e-4 < ((b - a).norm() / a.norm()).item() < 2e-2


def _features_args(json_path, root, out, *extra):
    return [
        "features",
        "--dataset",
        "karpathy",
        "--karpathy-json",
        str(json_path),
        "--image-dir",
        str(root),
        "--encoder",
        "squeezenet1_1",
        "--weights",
        "random",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def test_cli_exit_status_with_bad_images(corpus_with_bad_images, tmp_path):
    args = _features_args(*corpus_with_bad_images, tmp_path / "f", "--splits", "train", "--shard-size", "50")
    proc = run_cli(*args)
    out, err = proc.communicate()
    assert proc.returncode == 1 and "features: 40 images extracted" in out and "0 failed" not in out
    assert "4 images could not be used" in err and "skipped" in out + err and "--skip-bad-images" in err
    proc = run_cli(*args, "--skip-bad-images")
    out, err = proc.communicate()
    assert proc.returncode == 0 and "0 images extracted" in out and "4 images could not be used" in err
    assert folder.load_manifest(tmp_path / "f")["splits"].keys() == {"train"}
    proc = run_cli(*_features_args(*corpus_with_bad_images, tmp_path / "f", "--splits", "val", "--shard-size", "50"))
    proc.communicate()
    assert proc.returncode == 0  # val has no bad image; the train failures stay in the report
    assert folder.load_manifest(tmp_path / "f")["splits"].keys() == {"train", "val"}
    assert len((tmp_path / "f" / "bad_images.tsv").read_text().splitlines()) == 5


def test_cli_bad_option_is_one_line(tmp_path):
    proc = run_cli("features", "--dataset", "flickr8k", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"))
    _, err = proc.communicate()
    assert proc.returncode == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"Error: {tmp_path}/Flickr8k_text/Flickr8k.token.txt: missing")


def test_vgg19_on_full_size_originals(tmp_path):
    originals = need_shared(FLICKR8K / "originals")
    names = sorted(p.name for p in originals.glob("*.jpg"))[:4]
    assert any(Image.open(originals / n).size != (224, 224) for n in names)
    path = tmp_path / "originals.json"
    path.write_text(
        json.dumps({"images": [{"filename": n, "split": "train", "sentences": [{"raw": "a photo"}]} for n in names]})
    )
    summary = extract_features(
        load_karpathy(path, originals),
        tmp_path / "f",
        FeatureConfig(encoder="vgg19", weights="random", batch_size=2, num_workers=0),
        "karpathy",
        progress=False,
    )
    data = shards.AnnotationShards(tmp_path / "f", "train")
    assert summary.images == 4 and data[3].shape == (196, 512) and data.grid == (14, 14)


def test_the_rebuild_command_names_the_damaged_shards_split_and_folder(tmp_path):
    """The recorded command is the last run's: it may have extracted another split, or run where
    the folder was before it moved."""
    for recorded in ("python cli.py features --splits dev --out old", "python cli.py features --splits=dev --out=old"):
        hint = folder.rebuild_hint(tmp_path / "f", {"command": recorded}, "train")
        assert hint == f"python cli.py features --out {tmp_path / 'f'} --splits train" or hint == (
            f"python cli.py features --splits train --out {tmp_path / 'f'}"
        )
    assert folder.rebuild_hint(tmp_path, {"command": "python cli.py features"}, "test").endswith(
        f"--out {tmp_path} --splits test"
    )


@pytest.mark.parametrize("damage", ["truncate", "alter"])
def test_damaged_shard_is_named_refused_and_rebuilt(small_corpus, tmp_path, damage):
    """`verify` and the reader name a truncated or altered shard and the command that rebuilds
    it; that command (the recorded features run) re-extracts only that shard, to the same values."""
    args = _features_args(*small_corpus, tmp_path / "f", "--splits", "train", "--shard-size", "16")
    proc = run_cli(*args)
    assert proc.communicate() and proc.returncode == 0
    before = shards.AnnotationShards(tmp_path / "f", "train")
    values = [before[i] for i in range(len(before))]
    manifest = folder.load_manifest(tmp_path / "f")
    shard = tmp_path / "f" / "train" / "shard-00001.h5"
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF  # one byte in the middle of the annotations
    shard.write_bytes(bytes(data))

    proc = run_cli("verify", str(tmp_path / "f"))
    _, err = proc.communicate()
    assert proc.returncode == 1
    assert err.startswith(f"{shard}: truncated or altered") and manifest["command"] in err
    assert manifest["command"].startswith("python ") and "--shard-size 16" in manifest["command"]
    with pytest.raises(PipelineError, match="shard-00001.h5: truncated or altered") as refused:
        shards.AnnotationShards(tmp_path / "f", "train")
    assert str(refused.value) == err.strip()

    rebuild = subprocess.run(
        manifest["command"].replace("python ", f"{sys.executable} ", 1),
        shell=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert rebuild.returncode == 0, rebuild.stderr
    assert "features: 16 images extracted" in rebuild.stdout and "extracting it again" in rebuild.stderr
    proc = run_cli("verify", str(tmp_path / "f"))
    out, _ = proc.communicate()
    assert proc.returncode == 0 and "is whole (train 40 images in 3 shards" in out
    after = shards.AnnotationShards(tmp_path / "f", "train")
    assert all(torch.equal(a, after[i]) for i, a in enumerate(values))
