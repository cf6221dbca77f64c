"""Watching training: TensorBoard scalars equal to metrics.jsonl, an attention figure and
curves.png each epoch."""

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.train import monitor
from pipeline.train.loop import TrainConfig, train

from object_features import write_object_features


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    out = tmp_path_factory.mktemp("objects")
    write_object_features(out, sizes={"train": 300, "val": 20})
    return out


@pytest.mark.parametrize("attention", ["soft", "hard"])
def test_tensorboard_holds_what_metrics_jsonl_holds(objects, tmp_path, monkeypatch, attention):
    curves, drawn = monitor.training_curves, []
    monkeypatch.setattr(monitor, "training_curves", lambda *args: drawn.append(1) or curves(*args))
    config = TrainConfig(
        features=str(objects),
        out=str(tmp_path / "run"),
        epochs=3,
        batch_size=16,
        val_beam_size=1,
        attention=attention,
        soft_warmup_epochs=1,
        semi_sampling_p=0.0,
        model=dict(embed_dim=16, hidden_dim=32, attention_dim=16),
    )
    train(config, progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    board = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    board.Reload()
    logged = 0
    for name in records[0].keys() | records[-1].keys():
        tag = monitor.tag(name, "val")
        if tag is None:
            continue
        events = {e.step: e.value for e in board.Scalars(tag)}
        assert events == pytest.approx({r["epoch"]: r[name] for r in records if name in r}, rel=1e-6), name
        logged += 1
    assert logged >= 9 and {"train/gating_beta", "train/doubly_stochastic", "val/bleu4"} <= set(board.Tags()["scalars"])
    if attention == "hard":  # sampled from epoch 2 on: the REINFORCE reward and baseline are there
        assert [e.step for e in board.Scalars("train/reinforce_baseline")] == [2, 3]
    assert [e.step for e in board.Images("val/attention_first_image")] == [1, 2, 3]
    assert drawn == [1, 1, 1] and (tmp_path / "run" / "curves.png").stat().st_size > 1000


def test_no_tensorboard_writes_only_the_curves(objects, tmp_path):
    config = TrainConfig(
        features=str(objects),
        out=str(tmp_path / "run"),
        epochs=1,
        batch_size=16,
        val_beam_size=1,
        tensorboard=False,
        model=dict(embed_dim=16, hidden_dim=32, attention_dim=16),
    )
    train(config, progress=False)
    assert not (tmp_path / "run" / "tensorboard").exists() and (tmp_path / "run" / "curves.png").exists()
