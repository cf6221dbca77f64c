"""What is safe: one command per output folder at a time, readers of a checkpoint being rewritten,
non-finite values stopped before they reach a checkpoint, captions kept as they come, what a
resume may change, and outputs whose ownership survives a kill at any moment."""

import fcntl
import json
import os
import shutil
import signal
import subprocess
import threading
import time

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import cli
from pipeline.checkpoint import save_checkpoint
from pipeline.features import folder
from pipeline.features.images import Preprocess, bound_aspect
from pipeline.io import atomic, folders
from pipeline.io.errors import PipelineError
from pipeline.serve.caption import JsonLines
from pipeline.train.loop import LAST, TrainConfig, train

from conftest import run_cli
from object_features import write_object_features


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    out = tmp_path_factory.mktemp("objects")
    write_object_features(out)
    return out


def _locked(folder) -> bool:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _wait_until_locked(folder, proc, seconds=120):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if folder.exists() and _locked(folder):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError(f"{folder} never locked")


def _train_args(features, out, *extra):
    return [
        "train",
        "--features",
        str(features),
        "--out",
        str(out),
        "--batch-size",
        "16",
        "--no-progress",
        "--embed-dim",
        "16",
        "--hidden-dim",
        "32",
        "--attention-dim",
        "16",
        "--val-beam-size",
        "1",
        *extra,
    ]


def _only_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_a_second_train_on_a_held_run_folder_stops_at_once(objects, tmp_path):
    args = _train_args(objects, tmp_path / "run", "--epochs", "3")
    first = run_cli(*args)
    _wait_until_locked(tmp_path / "run", first)
    second = CliRunner().invoke(cli.main, args)
    assert second.exit_code == 2 and first.poll() is None  # refused while the first still runs, not after it
    assert f"run: in use by PID {first.pid} (" in _only_line(second) and "cli.py train" in second.output
    assert first.wait(timeout=300) == 0, first.communicate()
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]  # one run's lines, nothing interleaved
    assert torch.load(tmp_path / "run" / LAST, weights_only=True)["position"]["epoch"] == 3


def _features_args(small_corpus, out, *extra):
    json_path, root = small_corpus
    return [
        "features",
        "--dataset",
        "karpathy",
        "--karpathy-json",
        str(json_path),
        "--image-dir",
        str(root),
        "--weights",
        "random",
        "--out",
        str(out),
        "--no-progress",
        "--workers",
        "0",
        *extra,
    ]


def test_a_second_features_on_a_held_folder_stops_at_once(small_corpus, tmp_path):
    """Same settings and other settings alike: the folder is one command's at a time, and the first
    command's result is whole."""
    out = tmp_path / "out"
    first = run_cli(*_features_args(small_corpus, out, "--encoder", "vgg19", "--batch-size", "1", "--shard-size", "8"))
    _wait_until_locked(out, first)
    for extra in (
        ("--encoder", "vgg19", "--batch-size", "1", "--shard-size", "8"),
        ("--encoder", "squeezenet1_1", "--dtype", "float32"),
    ):
        second = CliRunner().invoke(cli.main, _features_args(small_corpus, out, *extra))
        assert second.exit_code == 2 and f"out: in use by PID {first.pid} (" in _only_line(second)
    assert first.wait(timeout=600) == 0, first.communicate()
    manifest = folder.load_manifest(out)
    assert manifest["encoder"]["name"] == "vgg19" and manifest["dtype"] == "float16"
    assert sum(e["images"] for e in manifest["splits"].values()) == 60
    assert folder.check_shards(out, manifest, values=True) == []


def test_the_lock_of_a_killed_command_is_free_at_once(objects, tmp_path):
    proc = run_cli(*_train_args(objects, tmp_path / "run", "--epochs", "5"), start_new_session=True)
    _wait_until_locked(tmp_path / "run", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not _locked(tmp_path / "run")


def _captions_of(checkpoint, folder):
    result = CliRunner(env={"PATH": "/nonexistent"}).invoke(
        cli.main,
        ["evaluate", "--checkpoint", str(checkpoint), "--split", "val", "--no-progress", "--out-dir", str(folder)],
    )
    assert result.exit_code == 0, result.output
    return [c["caption"] for c in json.loads(next(folder.glob("*.captions.json")).read_text())]


def test_evaluate_and_caption_on_a_checkpoint_being_rewritten(trained_run, tmp_path):
    """While last.pt is replaced again and again by two different states, evaluate and caption
    read one whole state or the other: both succeed, with that state's captions."""
    out, root = trained_run
    a = torch.load(out / "run" / "best.pt", weights_only=True)
    b = torch.load(out / "run" / "best.pt", weights_only=True)
    for weights in (b["model"], b["ema"]):
        weights[next(k for k in weights if "embedding" in k)].mul_(-3)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    save_checkpoint(tmp_path / "a" / LAST, a), save_checkpoint(tmp_path / "b" / LAST, b)
    expected = [_captions_of(tmp_path / s / LAST, tmp_path / s) for s in ("a", "b")]
    assert expected[0] != expected[1]
    image = sorted((root / "images").glob("*.jpg"))[0]
    by_state = [
        CliRunner().invoke(cli.main, ["caption", str(image), "--checkpoint", str(tmp_path / s / LAST)]).output
        for s in ("a", "b")
    ]
    target, stop = tmp_path / "run" / LAST, threading.Event()
    target.parent.mkdir()
    save_checkpoint(target, a)

    def rewrite():
        n = 0
        while not stop.is_set():
            save_checkpoint(target, (a, b)[n % 2])
            n += 1

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        for k in range(3):
            assert _captions_of(target, tmp_path / f"eval{k}") in expected
            result = CliRunner().invoke(cli.main, ["caption", str(image), "--checkpoint", str(target)])
            assert result.exit_code == 0 and result.output in by_state, result.output
    finally:
        stop.set()
        writer.join()


def _nan_image(features, split="train", row=3):
    """Set one image's annotations to nan and record the shard's new checksum in the manifest, as
    if it had been extracted so; returns that image's id."""
    manifest = folder.load_manifest(features)
    entry = manifest["splits"][split]["shards"][0]
    with h5py.File(features / entry["file"], "r+") as f:
        f["annotations"][row] = np.nan
        image_id = f["image_ids"][row].decode()
    entry["sha256"] = atomic.file_sha256(features / entry["file"])
    (features / folder.MANIFEST).write_text(json.dumps(manifest))
    return image_id


def test_nan_annotations_are_named_by_verify_and_stop_training(trained_run, tmp_path):
    features = shutil.copytree(trained_run[0] / "features", tmp_path / "features")
    image_id = _nan_image(features)
    verify = CliRunner().invoke(cli.main, ["verify", str(features)])
    assert verify.exit_code == 1
    assert f"train/shard-00000.h5: image {image_id} (row 3) has non-finite annotation values" in _only_line(verify)
    result = CliRunner().invoke(
        cli.main, _train_args(features, tmp_path / "run", "--epochs", "2", "--checkpoint-every", "1")
    )
    assert result.exit_code == 2
    assert f"image {image_id} (row 3) has non-finite annotation values" in _only_line(result)
    assert not (tmp_path / "run" / "best.pt").exists()
    state = torch.load(tmp_path / "run" / LAST, weights_only=True)
    assert all(t.isfinite().all() for part in ("model", "ema") for t in state[part].values() if t.is_floating_point())


def test_a_non_finite_loss_stops_training_before_the_weights_change(objects, tmp_path, monkeypatch):
    import pipeline.train.steps as steps

    objective, calls = steps.objective, []

    def diverging(*args, **kwargs):
        loss, stats = objective(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan"), stats) if len(calls) == 3 else (loss, stats)

    monkeypatch.setattr(steps, "objective", diverging)
    _stopped_at_step_3(
        objects,
        tmp_path / "run",
        r"epoch 1, step 3: the loss \(nan\) or the gradient norm .* is not finite \(minibatch of images ",
    )


def _stopped_at_step_3(objects, out, message):
    """Train with a checkpoint every step until a fault at step 3 stops the run with ``message``:
    last.pt must hold step 2's weights, all finite."""
    config = TrainConfig(
        features=str(objects),
        out=str(out),
        epochs=1,
        batch_size=16,
        checkpoint_every=1,
        model=dict(embed_dim=16, hidden_dim=32, attention_dim=16),
    )
    with pytest.raises(PipelineError, match=message):
        train(config, progress=False)
    state = torch.load(out / LAST, weights_only=True)
    assert state["position"]["step"] == 2
    assert all(t.isfinite().all() for t in state["model"].values() if t.is_floating_point())


def test_a_weight_gone_non_finite_is_never_checkpointed(objects, tmp_path, monkeypatch):
    """A step whose update overflows a weight (its loss and gradients finite) leaves last.pt at the
    step before, and the run stops naming the step."""
    import pipeline.train.loop as training

    make_optimizer = training.make_optimizer

    def overflowing(params, *args, **kwargs):
        params = list(params)
        optimizer, steps = make_optimizer(params, *args, **kwargs), []
        step = optimizer.step

        def step_then_overflow(*a, **k):
            step(*a, **k)
            steps.append(1)
            if len(steps) == 3:
                with torch.no_grad():
                    params[0].view(-1)[0] = float("inf")

        optimizer.step = step_then_overflow
        return optimizer

    monkeypatch.setattr(training, "make_optimizer", overflowing)
    _stopped_at_step_3(
        objects, tmp_path / "run", r"last.pt: not written: the weights hold nan or inf values at epoch 1, step 3"
    )


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_caption_prints_each_image_as_soon_as_it_is_done(trained_run, tmp_path, stop):
    """Interrupted (Ctrl-C, or SIGTERM as `timeout` and `docker stop` send) in the middle of 300
    images, the captions already printed are kept, each a whole line, and the JSON lines file
    holds them too."""
    out, root = trained_run
    image = str(sorted((root / "images").glob("*.jpg"))[0])
    proc = run_cli(
        "caption", *[image] * 300, "--checkpoint", str(out / "run" / "best.pt"), "--jsonl", str(tmp_path / "c.jsonl")
    )
    first = proc.stdout.readline()
    assert first.startswith(f"{image}: ") and proc.poll() is None  # printed while the others are still to do
    proc.send_signal(stop)
    rest, err = proc.communicate(timeout=120)
    printed = [first.rstrip("\n"), *rest.splitlines()]
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert 1 <= len(printed) < 300 and all(line == printed[0] for line in printed)
    header, *results = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    # every printed result but the last (interrupted, it may be printed before its line is written)
    assert header["written_by"] == folders.OWNER and len(results) >= len(printed) - 1
    assert all(f"{r['image']}: {r['caption']}" == printed[0] for r in results)
    rerun = run_cli(
        "caption", image, "--checkpoint", str(out / "run" / "best.pt"), "--jsonl", str(tmp_path / "c.jsonl")
    )
    assert rerun.wait(timeout=120) == 0  # its own earlier file may be replaced


def test_a_resume_changes_the_epochs_and_keeps_the_rest(objects, tmp_path):
    args = _train_args(objects, tmp_path / "run", "--epochs", "1", "--lr", "0.001")
    assert CliRunner().invoke(cli.main, args).exit_code == 0
    resumed = CliRunner().invoke(cli.main, [*args, "--resume", "--epochs", "2"])  # --lr as the run has it: accepted
    assert resumed.exit_code == 0, resumed.output
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    state = torch.load(tmp_path / "run" / LAST, weights_only=True)
    assert [r["epoch"] for r in log] == [1, 2] and state["train_config"]["epochs"] == 2
    assert state["train_config"]["lr"] == 0.001


def test_a_resume_clears_what_a_killed_run_left_and_nothing_else(objects, tmp_path):
    """A killed write's NAME.tmp-PID of a file the run writes goes, and so does a log line cut
    short; a user's file with a name like such a temporary, and the temporary of a live process
    (another rank, say), stay."""
    args = _train_args(objects, tmp_path / "run", "--epochs", "1")
    assert CliRunner().invoke(cli.main, args).exit_code == 0
    dead = subprocess.Popen(["true"])
    dead.wait()
    run, mark = tmp_path / "run", atomic.TMP_MARK
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as log:
        log.write('{"epoch": 2, "step": 1')
    killed = run / f"last.pt{mark}{dead.pid}"
    killed.write_bytes(b"half a checkpoint")
    kept = [run / "notes.tmp-old", run / f"notes.txt{mark}{dead.pid}", run / f"last.pt{mark}{os.getppid()}"]
    for path in kept:
        path.write_text("mine")
    resumed = CliRunner().invoke(cli.main, [*args, "--resume", "--epochs", "2"])
    assert resumed.exit_code == 0, resumed.output
    assert not killed.exists() and [path.read_text() for path in kept] == ["mine"] * 3
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]


@pytest.mark.parametrize("killed_at", [0, 1, 2, 3])
def test_owned_outputs_stay_owned_when_killed_at_any_write(tmp_path, monkeypatch, killed_at):
    """write_owned killed before its k-th rename (record, file, file, record): a rerun still knows
    every file as its own and replaces them; a file edited since is refused."""
    record, a, b = tmp_path / "r.scores.json", tmp_path / "r.captions.json", tmp_path / "r.references.json"
    folders.write_owned(record, {a: "old a", b: "old b"}, {"run": 1})
    replace, renames = os.replace, []

    def dying_replace(src, dst):
        if len(renames) == killed_at:
            raise KeyboardInterrupt
        renames.append(dst)
        replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        folders.write_owned(record, {a: "new a", b: "new b"}, {"run": 2})
    monkeypatch.setattr(atomic.os, "replace", replace)
    folders.check_owned(record, [a, b], "test", "out")
    folders.write_owned(record, {a: "new a", b: "new b"}, {"run": 2})
    assert a.read_text() == "new a" and json.loads(record.read_text())["run"] == 2
    b.write_text("edited by hand")
    with pytest.raises(PipelineError, match="r.references.json: exists and was not written by test"):
        folders.check_owned(record, [a, b], "test", "out")


def test_an_image_of_any_shape_is_preprocessed_in_bounded_memory():
    long = Image.new("RGB", (60000, 30), (200, 10, 10))
    assert bound_aspect(long).size == (60, 30)
    assert Preprocess().pixels()(long).shape == (3, 224, 224)
    tall = Image.new("RGB", (30, 60000))
    assert bound_aspect(tall).size == (30, 60)
    usual = Image.new("RGB", (500, 300))
    assert bound_aspect(usual) is usual  # within 2:1 nothing changes


def test_a_jsonl_run_stopped_before_any_result_leaves_the_file_as_it_was(tmp_path):
    keep = tmp_path / "keep.jsonl"
    with JsonLines(keep, {"run": 1}) as lines:
        lines.write('{"caption": "a dog"}')
    before = keep.read_text()
    for stop in (PipelineError("the model does not fit these images"), KeyboardInterrupt()):
        with pytest.raises(type(stop)):
            with JsonLines(keep, {"run": 2}):
                raise stop
        assert keep.read_text() == before and list(tmp_path.iterdir()) == [keep]
    with JsonLines(keep, {"run": 3}) as lines:
        lines.write('{"caption": "a cat"}')
    assert [json.loads(line).get("run") for line in keep.read_text().splitlines()] == [3, None]


def test_bad_image_rows_stay_one_line_whatever_the_file_name(tmp_path):
    failures = [{"split": "train", "image_id": "a\nb.jpg", "path": "x/a\nb\r.jpg", "reason": "bad\tdata"}]
    folder.write_bad_image_report(tmp_path / "bad_images.tsv", failures)
    rows = (tmp_path / "bad_images.tsv").read_text().split("\n")
    assert rows == ["split\timage_id\tpath\treason", "train\ta b.jpg\tx/a b .jpg\tbad data", ""]
