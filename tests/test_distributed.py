"""torchrun with 2 CPU processes (gloo): features from 2 ranks equal features from 1; 2-rank
DistributedDataParallel training runs, checkpoints on rank 0, and resumes after a SIGKILL to the
weights of an uninterrupted 2-rank run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline.io.distributed import World

from conftest import ROOT
from object_features import write_object_features
from test_faults import assert_same_features

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _run(args, **kwargs):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, **kwargs)


def test_shards_are_shared_between_ranks_by_size():
    shards, sizes = ["train0", "train1", "train2", "dev0", "test0"], [2000, 2000, 2000, 1000, 1000]
    shares = [World(rank, 2).share_by_size(shards, sizes) for rank in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(shards)  # each shard on exactly one rank
    assert [sum(sizes[shards.index(s)] for s in share) for share in shares] == [4000, 4000]
    assert shares[0] == ["train0", "train2"]  # in the order given
    assert World(0, 1).share_by_size(shards, sizes) == shards
    assert [World(r, 3).share_by_size(["a", "b"], [1, 1]) for r in range(3)] == [["a"], ["b"], []]


def test_features_from_two_ranks_equal_features_from_one(small_corpus, tmp_path):
    json_path, root = small_corpus
    args = [
        "cli.py",
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
        "--shard-size",
        "8",
        "--batch-size",
        "4",
        "--workers",
        "1",
        "--no-progress",
    ]
    # torchrun gives each rank one thread; the encoder's convolutions can differ in the last bits
    # between thread counts, so the one-process run gets one thread too, for bitwise equality
    one = _run([sys.executable, *args, "--out", str(tmp_path / "one")], env=dict(os.environ, OMP_NUM_THREADS="1"))
    two = _run([*TORCHRUN, *args, "--out", str(tmp_path / "two")])
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("features: 60 images extracted") == 1  # rank 0 reports for both
    assert_same_features(tmp_path / "one", tmp_path / "two")


def _train(out, *extra):
    return [
        "cli.py",
        "train",
        "--features",
        str(out.parent / "objects"),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--checkpoint-every",
        "5",
        "--no-progress",
        "--embed-dim",
        "16",
        "--hidden-dim",
        "32",
        "--attention-dim",
        "16",
        *extra,
    ]


def test_two_rank_training_checkpoints_and_resumes(tmp_path):
    write_object_features(tmp_path / "objects")
    reference = _run([*TORCHRUN, *_train(tmp_path / "ref")])
    assert reference.returncode == 0, reference.stderr[-2000:]
    assert reference.stdout.count("train: best BLEU-4") == 1
    log = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    single = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)
    pairs = sum(len(c) for c in json.loads((tmp_path / "objects" / "captions.json").read_text())["train"].values())
    assert [r["epoch"] for r in log] == [1, 2] and len(single["rng"]["cpu"]) == 2
    assert log[0]["step"] <= -(-pairs // 16) // 2 + 6  # each rank takes about half the minibatches

    killed = subprocess.Popen(
        [*TORCHRUN, *_train(tmp_path / "run")],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    last, deadline = tmp_path / "run" / "last.pt", time.time() + 120
    while time.time() < deadline and killed.poll() is None:
        if last.exists() and 10 <= torch.load(last, weights_only=True)["position"]["step"] < log[1]["step"]:
            break
        time.sleep(0.05)
    assert killed.poll() is None, "training ended before it could be killed"
    ranks = [int(pid) for pid in Path(f"/proc/{killed.pid}/task/{killed.pid}/children").read_text().split()]
    os.killpg(killed.pid, signal.SIGKILL)
    for pid in ranks:  # torchrun starts each rank in a session of its own: killing torchrun leaves them running
        os.killpg(pid, signal.SIGKILL)
    killed.wait()
    while any(Path(f"/proc/{pid}/cmdline").exists() and Path(f"/proc/{pid}/cmdline").read_bytes() for pid in ranks):
        time.sleep(0.05)  # gone (a zombie's cmdline is empty): the run folder's lock is free
    alone = _run([sys.executable, *_train(tmp_path / "run", "--resume")])
    assert alone.returncode == 2 and "written by a run of 2 process(es); resume it with as many" in alone.stderr
    resumed = _run([*TORCHRUN, *_train(tmp_path / "run", "--resume")])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = single, torch.load(last, weights_only=True)
    assert a["position"] == b["position"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_make_refuses_a_number_of_processes_that_is_not_a_whole_number(tmp_path):
    for ranks in ("abc", "0", "1.5"):
        done = _run(["make", "-n", "features", f"RANKS={ranks}", f"OUT={tmp_path / 'f'}"])
        assert done.returncode != 0 and "Traceback" not in done.stderr
        assert f"RANKS={ranks}: give the number of processes as a whole number, 1 or more" in done.stderr
    assert (
        "torchrun --standalone --nproc-per-node 2 cli.py features" in _run(["make", "-n", "features", "RANKS=2"]).stdout
    )
    assert not (tmp_path / "f").exists()
