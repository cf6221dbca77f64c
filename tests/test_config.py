"""Options defined once: the command line generated from the configuration dataclasses, and
`--config FILE` repeating a run or a features folder from the config.toml it recorded."""

import tomllib

import click
import pytest
import torch
from click.testing import CliRunner

import cli
from pipeline import options
from pipeline.checkpoint import build_decoder
from pipeline.config import (
    DECODE,
    ENCODER_NAMES,
    SECTIONS,
    DecodeConfig,
    DecoderConfig,
    FeatureConfig,
    ObjectiveConfig,
    TrainConfig,
)
from pipeline.features import encoders, folder
from pipeline.io.errors import PipelineError
from pipeline.options import flag_name, specs

from object_features import write_object_features


def test_every_option_is_its_dataclass_field():
    commands = {
        "features": [FeatureConfig],
        "train": [TrainConfig, DecoderConfig, ObjectiveConfig],
        **{command: [DecodeConfig] for command in ("evaluate", "caption", "serve")},
    }
    for command, classes in commands.items():
        params = {p.name: p for p in cli.main.commands[command].params if isinstance(p, click.Option)}
        for cls in classes:
            for name, (default, spec) in specs(cls).items():
                assert params[name].default == default and flag_name(name, default, spec) in params[name].opts, name
    assert ENCODER_NAMES == tuple(encoders.ENCODERS)
    assert (TrainConfig.val_beam_size, TrainConfig.max_len) == (DECODE.beam_size, DECODE.max_len)


def test_decode_settings_are_checked_in_python_too():
    with pytest.raises(PipelineError, match=r"`beam_size`: 0 is not in the range 1<=x<=100"):
        DecodeConfig(beam_size=0)
    with pytest.raises(PipelineError, match=r"`max_len`: 2.0 is not an integer"):
        DecodeConfig(max_len=2.0)
    with pytest.raises(PipelineError, match=r"`allow_unk`: 1 is not true or false"):
        DecodeConfig(allow_unk=1)


def test_decoder_settings_are_checked_in_python_and_in_checkpoints(tmp_path):
    with pytest.raises(PipelineError, match=r"`dropout`: 2 is not in the range 0<=x<1"):
        DecoderConfig(vocab_size=10, annotation_dim=4, dropout=2)
    with pytest.raises(PipelineError, match=r"model: `dropout`: 2 is not in the range 0<=x<1"):
        TrainConfig(features="f", out="o", model={"dropout": 2})
    with pytest.raises(PipelineError, match=r"model: hiden_dim: not a field of DecoderConfig"):
        TrainConfig(features="f", out="o", model={"hiden_dim": 8})
    with pytest.raises(PipelineError, match=r"objective: `alpha_c`: -1 is not in the range 0<=x"):
        TrainConfig(features="f", out="o", objective={"alpha_c": -1})
    edited = {"model_config": {"vocab_size": 10, "annotation_dim": 4, "hidden_dim": 0}}
    with pytest.raises(PipelineError, match=r"x.pt: its model configuration does not fit .*`hidden_dim`: 0 is not in"):
        build_decoder(edited, tmp_path / "x.pt")


def test_config_toml_repeats_a_run_exactly(tmp_path):
    write_object_features(tmp_path / "objects", sizes={"train": 200, "val": 10})
    args = [
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--embed-dim",
        "16",
        "--hidden-dim",
        "32",
        "--attention-dim",
        "16",
        "--lr",
        "0.002",
        "--no-gating",
        "--no-tensorboard",
        "--no-progress",
        "--val-beam-size",
        "1",
    ]
    first = CliRunner().invoke(
        cli.main, ["train", "--features", str(tmp_path / "objects"), "--out", str(tmp_path / "a"), *args]
    )
    assert first.exit_code == 0, first.output
    recorded = tomllib.loads((tmp_path / "a" / "config.toml").read_text())
    assert recorded["lr"] == 0.002 and recorded["gating"] is False and recorded["embed_dim"] == 16
    again = CliRunner().invoke(
        cli.main,
        ["train", "--config", str(tmp_path / "a" / "config.toml"), "--out", str(tmp_path / "b"), "--no-progress"],
    )
    assert again.exit_code == 0, again.output
    assert tomllib.loads((tmp_path / "b" / "config.toml").read_text()) == dict(recorded, out=str(tmp_path / "b"))
    a, b = (torch.load(tmp_path / run / "last.pt", weights_only=True) for run in ("a", "b"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_config_toml_repeats_a_features_folder(small_corpus, tmp_path):
    json_path, root = small_corpus
    first = CliRunner().invoke(
        cli.main,
        [
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
            "16",
            "--dtype",
            "float32",
            "--out",
            str(tmp_path / "a"),
            "--no-progress",
        ],
    )
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(
        cli.main,
        ["features", "--config", str(tmp_path / "a" / "config.toml"), "--out", str(tmp_path / "b"), "--no-progress"],
    )
    assert again.exit_code == 0, again.output
    assert folder.load_manifest(tmp_path / "a")["splits"] == folder.load_manifest(tmp_path / "b")["splits"]


def test_a_config_naming_an_unknown_option_is_refused(tmp_path):
    (tmp_path / "c.toml").write_text("lr = 0.1\nwarp_speed = 9\n")
    result = CliRunner().invoke(cli.main, ["train", "--config", str(tmp_path / "c.toml")])
    assert result.exit_code == 2 and "c.toml: no option 'warp_speed' in `train`" in result.output


def test_options_nest_into_their_configurations_and_flatten_back():
    flat = {"lr": 1e-3, "embed_dim": 16, "alpha_c": 0.5}
    nested = options.nest(flat, SECTIONS)
    assert nested == {"lr": 1e-3, "model": {"embed_dim": 16}, "objective": {"alpha_c": 0.5}}
    assert options.flatten(nested, SECTIONS) == flat
    assert options.flatten(nested, SECTIONS, dotted=True) == {
        "lr": 1e-3,
        "model.embed_dim": 16,
        "objective.alpha_c": 0.5,
    }
