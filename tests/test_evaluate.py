import json
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from pipeline.config import DecodeConfig
from pipeline.eval.evaluate import evaluate, output_names
from pipeline.eval.metrics import score_captions
from pipeline.io.errors import PipelineError

from conftest import ROOT

REFS = {"a": ["a dog runs on the grass .", "A dog is running."], "b": ["Two men talk on a bench", "two men talking"]}


def test_scores_without_java_say_what_is_missing():
    scores, notes = score_captions({"a": "a dog runs on the grass", "b": "two men talk on a bench"}, REFS, java=False)
    assert set(scores) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}
    assert scores["BLEU-4"] == pytest.approx(100.0, abs=1e-3) and scores["ROUGE-L"] == pytest.approx(100.0)
    assert any("Java not found: METEOR and SPICE left out" in n for n in notes)
    worse, _ = score_captions({"a": "a cat", "b": "a bench"}, REFS, java=False)
    assert all(worse[k] < scores[k] for k in scores)


@pytest.mark.skipif(shutil.which("java") is None, reason="needs a Java runtime for PTBTokenizer and METEOR")
def test_scores_with_java_include_meteor():
    scores, notes = score_captions({"a": "A dog runs on the grass.", "b": "a cat"}, REFS)
    assert {"METEOR", "BLEU-4", "CIDEr", "ROUGE-L"} <= set(scores) and 0 < scores["METEOR"] < 100
    assert all("Java not found" not in n for n in notes)


def test_evaluate_writes_coco_results_scores_and_references(trained_run):
    out, root = trained_run
    result = evaluate(out / "run" / "best.pt", "test", DecodeConfig(beam_size=2), progress=False)
    captions = json.loads(result["captions"].read_text())
    assert result["captions"].name == "best-test-beam2.captions.json" and len(captions) == 10
    assert set(captions[0]) == {"image_id", "caption"}
    saved = json.loads(result["scores_file"].read_text())
    assert saved["scores"] == result["scores"] and saved["split"] == "test" and "BLEU-4" in saved["scores"]
    coco = json.loads(result["references"].read_text())  # COCO caption annotation format
    assert result["references"].name == "best-test-beam2.references.json" and coco["type"] == "captions"
    assert sorted(i["id"] for i in coco["images"]) == sorted(c["image_id"] for c in captions)
    assert all(isinstance(c["image_id"], int) for c in captions)  # the synthetic corpus's imgid
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    truth = {
        str(e["imgid"]): [s["raw"] for s in e["sentences"]]
        for e in json.loads((root / "dataset_synthetic.json").read_text())["images"]
    }
    for image in coco["images"]:
        assert [a["caption"] for a in coco["annotations"] if a["image_id"] == image["id"]] == truth[str(image["id"])]
    with pytest.raises(PipelineError, match="no features for split 'dev'"):
        evaluate(out / "run" / "best.pt", "dev", progress=False)


def test_caption_cli_with_attention_plots_and_a_bad_file(trained_run, tmp_path):
    out, root = trained_run
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    big = tmp_path / "big.png"
    Image.open(root / "images" / "00003.jpg").resize((640, 300)).convert("RGBA").save(big)
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "cli.py"),
            "caption",
            str(root / "images" / "00001.jpg"),
            str(bad),
            str(big),
            "--checkpoint",
            str(out / "run" / "best.pt"),
            "--attention-plot",
            str(tmp_path / "att.png"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert f"{bad}: error: not an image" in proc.stderr and "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{root / 'images' / '00001.jpg'}: ")
    for name in ("att-00001.png", "att-big.png"):
        figure = Image.open(tmp_path / name)
        assert figure.size[0] > 300 and figure.size[1] > 150


def test_output_names_carry_every_decoding_setting_off_its_default(tmp_path):
    ckpt = tmp_path / "run" / "best.pt"
    names = [
        output_names(ckpt, "dev", settings, None, str(tmp_path / "f"), None)["captions"].name
        for settings in (
            DecodeConfig(),
            DecodeConfig(max_len=30),
            DecodeConfig(length_penalty=1.0),
            DecodeConfig(allow_unk=True),
            DecodeConfig(block_trigrams=True),
            DecodeConfig(beam_size=5, length_penalty=0.0, allow_unk=True, block_trigrams=True),
        )
    ]
    assert names == [
        "best-dev-beam3.captions.json",
        "best-dev-beam3-len30.captions.json",
        "best-dev-beam3-lp1.captions.json",
        "best-dev-beam3-unk.captions.json",
        "best-dev-beam3-blocktrigrams.captions.json",
        "best-dev-beam5-lp0-unk-blocktrigrams.captions.json",
    ]
