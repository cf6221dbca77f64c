"""Faults: SIGKILL at random moments, then a rerun (features) or --resume (training) must finish
with outputs equal to an uninterrupted run's; a full disk leaves no partial file that looks
finished and says what happened."""

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

import cli
from pipeline.features import folder, shards
from pipeline.io import atomic, errors
from pipeline.io.errors import PipelineError
from pipeline.train.loop import TrainConfig, train

from conftest import ROOT, run_cli
from object_features import write_object_features


def _kill_at_random_moment(args, seconds, seed, out):
    """Start ``cli.py ARGS`` and SIGKILL its process group after a delay drawn by ``seed`` from 5% to
    95% of ``seconds`` (an uninterrupted run's duration); returns the delay. A run that ends first
    (faster than the reference: warm caches) has its ``out`` folder removed and is started again
    with half the delay, so that every call kills a run."""
    delay = random.Random(seed).uniform(0.05, 0.95) * seconds
    for _ in range(5):
        proc = run_cli(*args, start_new_session=True)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return delay
        _, err = proc.communicate()
        assert proc.returncode == 0, err
        shutil.rmtree(out)
        delay /= 2
    raise AssertionError(f"{args[0]} always ended before it could be killed (last delay {delay:.2f} s)")


def _timed(args):
    start = time.perf_counter()
    proc = run_cli(*args)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    return time.perf_counter() - start, out


# -- features ---------------------------------------------------------------------------------------


def _features_args(small_corpus, out):
    json_path, root = small_corpus
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
        "--shard-size",
        "4",
        "--batch-size",
        "3",
        "--workers",
        "1",
    ]


@pytest.fixture(scope="module")
def features_reference(small_corpus, tmp_path_factory):
    """An uninterrupted features run: (folder, seconds it took)."""
    out = tmp_path_factory.mktemp("features-ref")
    seconds, _ = _timed(_features_args(small_corpus, out))
    return out, seconds


def assert_same_features(reference, features):
    ref, got = folder.load_manifest(reference), folder.load_manifest(features)
    assert got["splits"] == ref["splits"]  # same files, counts and checksums
    assert not list(features.rglob(f"*{atomic.TMP_MARK}*"))
    for split in ref["splits"]:
        a, b = shards.AnnotationShards(reference, split), shards.AnnotationShards(features, split)
        assert a.image_ids == b.image_ids
        assert all(torch.equal(a[i], b[i]) for i in range(len(a)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_features_killed_at_a_random_moment_then_rerun(small_corpus, features_reference, tmp_path, seed):
    reference, seconds = features_reference
    args = _features_args(small_corpus, tmp_path / "out")
    delay = _kill_at_random_moment(args, seconds, seed, tmp_path / "out")
    rerun = run_cli(*args)
    out, err = rerun.communicate()
    assert rerun.returncode == 0, f"killed after {delay} s: {err}"
    assert_same_features(reference, tmp_path / "out")


def test_features_on_a_full_disk(small_corpus, features_reference, tmp_path, monkeypatch):
    """The disk fills while the third shard is written: a one-line message, the two finished shards
    kept and listed, nothing else left; once there is space the same command finishes the job."""
    reference, _ = features_reference
    add, calls = shards._ShardRows.add, []

    def add_until_full(self, *args):
        calls.append(1)
        if len(calls) == 5:  # shard-size 4, batch-size 3: shards 0-1 take 4 batches
            raise OSError(errno.ENOSPC, "No space left on device")
        return add(self, *args)

    monkeypatch.setattr(shards._ShardRows, "add", add_until_full)
    args = _features_args(small_corpus, tmp_path / "out")
    args[args.index("--workers") + 1] = "0"
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    shard = tmp_path / "out" / "train" / "shard-00002.h5"
    assert result.output.strip() == f"Error: {errors.worded(atomic.disk_full_message(shard), cli.flag)}"
    assert sorted(p.name for p in (tmp_path / "out" / "train").iterdir()) == ["shard-00000.h5", "shard-00001.h5"]
    listed = folder.load_manifest(tmp_path / "out")["splits"]["train"]["shards"]
    assert [e["file"] for e in listed] == ["train/shard-00000.h5", "train/shard-00001.h5"]
    monkeypatch.setattr(shards._ShardRows, "add", add)
    assert CliRunner().invoke(cli.main, args).exit_code == 0
    assert_same_features(reference, tmp_path / "out")


def test_features_on_a_real_full_file_system(small_corpus, tmp_path):
    """The same on a 2 MiB tmpfs (where this user may mount one): HDF5 itself meets ENOSPC unless
    the shard's space is reserved first, and then crashes the interpreter as it cleans up."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        args = _features_args(small_corpus, disk / "out")
        args[args.index("--workers") + 1] = "0"
        proc = run_cli(*args)
        _, err = proc.communicate()
        assert proc.returncode == 2, err
        message = err.strip().splitlines()[-1]
        assert message.startswith("Error: ") and "no space left on the device while writing it" in message
        written = sorted(p.name for p in (disk / "out" / "train").iterdir())
        listed = [e["file"] for e in folder.load_manifest(disk / "out")["splits"]["train"]["shards"]]
        assert written and listed == [f"train/{name}" for name in written]
        assert folder.check_shards(disk / "out", folder.load_manifest(disk / "out"), ["train"]) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# -- training ---# -- training ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    out = tmp_path_factory.mktemp("objects")
    write_object_features(out)
    return out


def _train_args(features, out, *extra):
    return [
        "train",
        "--features",
        str(features),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--checkpoint-every",
        "7",
        "--no-progress",
        "--embed-dim",
        "16",
        "--hidden-dim",
        "32",
        "--attention-dim",
        "16",
        *extra,
    ]


@pytest.fixture(scope="module")
def xe_checkpoint(objects, tmp_path_factory):
    """best.pt of a one-epoch XE run on ``objects`` at _train_args' sizes (what SCST starts from)."""
    out = tmp_path_factory.mktemp("xe") / "run"
    model = dict(embed_dim=16, hidden_dim=32, attention_dim=16)
    train(TrainConfig(features=str(objects), out=str(out), epochs=1, val_beam_size=1, model=model), progress=False)
    return out / "best.pt"


@pytest.mark.parametrize(
    "options, seed",
    [
        (("--attention", "soft", "--ema-decay", "0"), 0),
        (("--attention", "hard", "--soft-warmup-epochs", "1"), 1),
        (("--ema-decay", "0.9"), 2),
        (("--objective", "scst", "--batch-size", "40", "--lr", "0.001", "--ema-decay", "0.9"), 3),
        (("--compile", "on", "--ema-decay", "0.9"), 4),
    ],
)
def test_training_killed_at_a_random_moment_then_resumed(objects, tmp_path, options, seed, request):
    if "scst" in options:  # self-critical training of an XE checkpoint: its sampling draws from the saved RNG
        options = (*options, "--init", str(request.getfixturevalue("xe_checkpoint")))
    seconds, _ = _timed(_train_args(objects, tmp_path / "ref", *options))
    args = _train_args(objects, tmp_path / "run", *options)
    delay = _kill_at_random_moment(args, seconds, seed, tmp_path / "run")
    resume = ["--resume"] if (tmp_path / "run" / "last.pt").exists() else []  # killed before the first checkpoint
    finished = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args, *resume], cwd=ROOT, capture_output=True, text=True
    )
    assert finished.returncode == 0, f"killed after {delay} s: {finished.stderr}"
    a = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert a["position"] == b["position"] and a.keys() == b.keys()
    for part in ("model", "ema") if "ema" in a else ("model",):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key, f"killed after {delay} s")
    logs = [
        [
            {k: v for k, v in json.loads(line).items() if k not in ("seconds", "captions_per_s")}
            for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        ]
        for run in ("ref", "run")
    ]
    assert logs[0] == logs[1] and len(logs[0]) == 2
    assert not list((tmp_path / "run").glob(f"*{atomic.TMP_MARK}*"))


def test_a_resumed_scst_run_reports_its_own_metric(objects, xe_checkpoint, tmp_path):
    """`train --resume --out R`, no other option: the run continues as SCST and its last line
    names the score it selects by (CIDEr-D), not the default objective's (BLEU-4)."""
    cli = [sys.executable, str(ROOT / "cli.py")]
    scst = ("--objective", "scst", "--init", str(xe_checkpoint), "--batch-size", "40")
    first = _train_args(objects, tmp_path / "run", *scst)
    first[first.index("--epochs") + 1] = "1"
    subprocess.run([*cli, *first], cwd=ROOT, capture_output=True, text=True, check=True)
    resumed = subprocess.run(
        [*cli, "train", "--resume", "--out", str(tmp_path / "run"), "--epochs", "2", "--no-progress"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    line = r"^train: best CIDEr-D [\d.]+ at epoch [12]; checkpoints in .*run$"
    assert re.search(line, resumed.stdout, re.M), resumed.stdout


def test_training_on_a_full_disk_keeps_the_last_checkpoint(objects, tmp_path, monkeypatch):
    """The disk fills while epoch 2's last.pt is written (torch.save reports that with no errno):
    a clear PipelineError, and epoch 1's last.pt and best.pt intact with no temporary file beside."""
    save, calls = torch.save, []

    def save_until_full(obj, f, *args, **kwargs):
        calls.append(f)
        save(obj, f, *args, **kwargs)
        if len(calls) == 4:  # the start: last.pt; epoch 1: last.pt, best.pt; epoch 2: last.pt
            os.truncate(f, 100)
            monkeypatch.setattr(atomic.shutil, "disk_usage", lambda folder: SimpleNamespace(free=0))
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", save_until_full)
    config = TrainConfig(
        features=str(objects),
        out=str(tmp_path / "run"),
        epochs=2,
        batch_size=16,
        val_beam_size=1,
        model=dict(embed_dim=16, hidden_dim=32, attention_dim=16),
    )
    with pytest.raises(PipelineError, match=r"last.pt: no space left on the device while writing it; .*`resume=True`"):
        train(config, progress=False)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "best.pt",
        "config.toml",
        "curves.png",
        "last.pt",
        "metrics.jsonl",
        "tensorboard",
    ]
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["position"]["epoch"] == 1
