import io
import json
import math

import pytest
import torch

from pipeline.checkpoint import build_decoder, load_checkpoint
from pipeline.eval.metrics import bleu
from pipeline.features.shards import AnnotationShards
from pipeline.io.errors import PipelineError
from pipeline.model.decode import greedy_decode
from pipeline.model.decoder import Decoder, DecoderConfig
from pipeline.train.loop import TrainConfig, train
from pipeline.train.steps import bucket_batches, make_optimizer

from object_features import write_object_features

TINY = dict(embed_dim=32, hidden_dim=64, attention_dim=32, dropout=0.0)


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    """A features folder of object scenes and the scenes of each split."""
    out = tmp_path_factory.mktemp("objects")
    return out, write_object_features(out)


def test_bucket_batches_hold_one_length_and_cover_everything_once():
    lengths = [5, 7, 5, 9, 7, 5, 5, 7, 12]
    batches = bucket_batches(lengths, 2, torch.Generator().manual_seed(3))
    assert sorted(i for b in batches for i in b) == list(range(9))
    assert all(len({lengths[i] for i in b}) == 1 and len(b) <= 2 for b in batches)
    assert batches == bucket_batches(lengths, 2, torch.Generator().manual_seed(3))
    assert batches != bucket_batches(lengths, 2, torch.Generator().manual_seed(4))


def held_out_scores(run, features, scenes, context="expected"):
    """Greedy captions of the test scenes: BLEU-4 (fraction), and per named object the attention
    mass on its cell at the step that emits its word."""
    decoder, vocab = build_decoder(load_checkpoint(run / "best.pt"), "best.pt")
    test = AnnotationShards(features, "test")
    annotations = torch.stack([test[i] for i in range(len(test))])
    tokens, alpha = greedy_decode(decoder.eval(), annotations, vocab, context=context)
    hyps = [vocab.decode(t) for t in tokens.tolist()]
    masses = [
        alpha[i, hyps[i].index(obj), cell].item() if obj in hyps[i] else 0.0
        for i, scene in enumerate(scenes)
        for obj, cell in scene
    ]
    return bleu(hyps, [[vocab.decode(c) for c in caps] for caps in test.captions])[3], torch.tensor(masses)


@pytest.mark.parametrize("attention, epochs", [("soft", 12), ("hard", 30)])
def test_learns_to_caption_and_attend_held_out_scenes(objects, tmp_path, attention, epochs):
    """Known answer: captions name the two objects in reading order, so a model that attends to
    the object it names can caption unseen scenes exactly. The doubly stochastic term is off here:
    with T = 6 steps over L = 16 cells it pushes every cell toward the same total attention."""
    features, scenes = objects
    config = TrainConfig(
        features=str(features),
        out=str(tmp_path / attention),
        attention=attention,
        lr=3e-3,
        epochs=epochs,
        batch_size=32,
        patience=0,
        ema_decay=0.0,
        model=TINY,
        objective={"alpha_c": 0.0},
        soft_warmup_epochs=0,
    )  # hard: sampled from the first step
    state = train(config, progress=False)
    assert state["run"]["best_score"] >= 95
    last = json.loads((tmp_path / attention / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["attention_entropy"] < 0.5 * math.log(16), "validation attention should be sharp, not uniform"
    bleu4, mass = held_out_scores(tmp_path / attention, features, scenes["test"])
    assert bleu4 >= 0.95
    assert mass.mean() > 0.5, f"attention on the named object: mean {mass.mean():.2f}"


def test_hard_attention_samples_only_after_the_soft_warmup(objects, tmp_path, monkeypatch):
    """The first soft_warmup_epochs epochs train on the expected context only; after them about
    1 - semi_sampling_p of the minibatches sample their locations."""
    from pipeline.model.decoder import Decoder

    features, _ = objects
    contexts, forward = [], Decoder.forward
    monkeypatch.setattr(
        Decoder,
        "forward",
        lambda self, a, c, context="expected": (
            contexts.append(context) if self.training else None,
            forward(self, a, c, context),
        )[1],
    )
    config = TrainConfig(
        features=str(features),
        out=str(tmp_path / "r"),
        attention="hard",
        epochs=3,
        batch_size=16,
        soft_warmup_epochs=2,
        val_images=5,
        val_beam_size=1,
        model=TINY,
    )
    train(config, progress=False)
    steps = len(contexts) // 3  # 1500 captions of one length: 94 minibatches per epoch
    assert steps == 94 and set(contexts[: 2 * steps]) == {"expected"}
    sampled = contexts[2 * steps :].count("sample") / steps  # binomial, standard deviation 0.045 at p = 0.75
    assert abs(sampled - (1 - config.semi_sampling_p)) < 0.15, sampled


def test_doubly_stochastic_term_spreads_attention(objects, tmp_path):
    features, scenes = objects
    coverage = {}
    for alpha_c in (0.0, 1.0):
        out = tmp_path / f"ac{alpha_c}"
        train(
            TrainConfig(
                features=str(features),
                out=str(out),
                lr=3e-3,
                epochs=4,
                batch_size=32,
                patience=0,
                ema_decay=0.0,
                model=TINY,
                objective={"alpha_c": alpha_c},
            ),
            progress=False,
        )
        decoder, vocab = build_decoder(load_checkpoint(out / "last.pt"), "last.pt")
        test = AnnotationShards(features, "test")
        captions = torch.tensor([c[0] for c in test.captions])
        out_ = decoder.eval()(torch.stack([test[i] for i in range(len(test))]), captions)
        coverage[alpha_c] = ((1 - out_.alpha.sum(1)) ** 2).sum(1).mean().item()
    assert coverage[1.0] < 0.5 * coverage[0.0]


def test_checkpoint_contents_and_refusals(objects, tmp_path):
    features, _ = objects
    config = TrainConfig(features=str(features), out=str(tmp_path / "run"), epochs=1, batch_size=64, model=TINY)
    train(config, progress=False)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert {
        "model",
        "optimizer",
        "model_config",
        "train_config",
        "vocab",
        "features",
        "rng",
        "position",
    } <= state.keys()
    assert state["features"]["L"] == 16 and state["vocab"][:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert state["position"]["epoch"] == 1 and state["position"]["step"] == 24  # 1500 captions of one length / 64
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["epoch"] == 1 and log[0]["step"] == 24 and "val_bleu4" in log[0]
    with pytest.raises(PipelineError, match="already holds a run"):
        train(config, progress=False)
    with pytest.raises(PipelineError, match="no such checkpoint"):
        train(TrainConfig(features=str(features), out=str(tmp_path / "none")), resume=True)


def test_validation_is_free_running_beam_search(objects, tmp_path):
    from pipeline.model.decode import beam_search
    from pipeline.train.steps import autocast
    from pipeline.train.validate import validate

    features, _ = objects  # fp32: under bf16, ties among the logits break differently in the two decoders
    config = TrainConfig(features=str(features), out=str(tmp_path / "r"), epochs=1, model=TINY, precision="fp32")
    train(config, progress=False)
    decoder, vocab = build_decoder(load_checkpoint(tmp_path / "r" / "last.pt"), "last.pt")
    val = AnnotationShards(features, "val")
    annotations = torch.stack([val[i] for i in range(len(val))])
    with autocast(config, torch.device("cpu")):
        tokens, _ = greedy_decode(decoder, annotations, vocab)
        beams = beam_search(decoder, annotations, vocab)
    assert validate(decoder, val, config, torch.device("cpu"))["captions"] == [vocab.decode(c.tokens) for c in beams]
    greedy = TrainConfig(**dict(vars(config), val_beam_size=1))
    assert validate(decoder, val, greedy, torch.device("cpu"))["captions"] == [vocab.decode(t) for t in tokens.tolist()]


def _stalled(objects, out, **options) -> TrainConfig:
    """A run whose learning rate (8e-9) is too small to change the captions: its validation score
    never improves after epoch 1."""
    features, _ = objects
    return TrainConfig(
        features=str(features), out=str(out), lr=8e-9, val_images=20, val_beam_size=1, model=TINY, **options
    )


@pytest.mark.parametrize("lr_patience, expected", [(0, [8e-9, 8e-9, 4e-9, 2e-9]), (1, [8e-9, 8e-9, 8e-9, 4e-9])])
def test_learning_rate_decays_when_validation_bleu_stalls(objects, tmp_path, lr_patience, expected):
    """With a learning rate too small to change the captions, BLEU-4 never improves after epoch 1,
    so the rate halves after every epoch (lr_patience 0) or every second one (1); the log shows
    the rate each epoch ran with, and last.pt carries the rate for the next epoch to a resume."""
    state = train(_stalled(objects, tmp_path / "r", epochs=4, lr_patience=lr_patience, patience=0), progress=False)
    log = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len({entry["val_bleu4"] for entry in log}) == 1
    assert [entry["lr"] for entry in log] == pytest.approx(expected)
    following = expected[-1] / 2 if lr_patience == 0 else expected[-1]  # epoch 4 is the 3rd stale one
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(following)


def test_a_stalled_run_stops_early_and_keeps_its_best_epoch(objects, tmp_path, monkeypatch):
    """With the validation score (here CIDEr-D, --val-metric) stalled after epoch 1, patience 2
    stops the run after epoch 3 of 6, and best.pt stays the epoch-1 state that scored it. The
    epoch that improved wrote best.pt before last.pt (so a kill between the two redoes the epoch,
    never leaving a last.pt whose best epoch is not in best.pt)."""
    import pipeline.train.state

    written, save = [], pipeline.train.state.save_checkpoint
    monkeypatch.setattr(
        pipeline.train.state, "save_checkpoint", lambda path, state: (written.append(path.name), save(path, state))
    )
    state = train(_stalled(objects, tmp_path / "r", epochs=6, patience=2, val_metric="cider"), progress=False)
    assert written == ["last.pt", "best.pt", "last.pt", "last.pt", "last.pt"]  # the start, then epochs 1-3
    log = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    best = torch.load(tmp_path / "r" / "best.pt", weights_only=True)
    assert [entry["epoch"] for entry in log] == [1, 2, 3] and state["position"]["epoch"] == 3
    assert best["position"]["epoch"] == 1 and best["run"]["best_score"] == pytest.approx(log[0]["val_cider"], abs=0.005)


def test_weight_average_is_what_is_validated_and_loaded(objects, tmp_path):
    from pipeline.train.validate import validate

    features, _ = objects
    config = TrainConfig(
        features=str(features),
        out=str(tmp_path / "r"),
        epochs=2,
        lr=3e-3,
        ema_decay=0.9,
        val_beam_size=1,
        model=dict(TINY, attention_input_scale=0),
        precision="fp32",
    )
    state = train(config, progress=False)
    train_shards = AnnotationShards(features, "train")
    rms = torch.stack([train_shards[i] for i in range(len(train_shards))][:256]).pow(2).mean().sqrt().item()
    assert state["model_config"]["attention_input_scale"] == pytest.approx(rms)  # 0: the features' RMS
    assert state["ema"]["n_averaged"].item() == state["position"]["step"]
    decoder, _ = build_decoder(state, "last.pt")
    raw, averaged = state["model"], decoder.state_dict()
    assert all(torch.equal(averaged[k], state["ema"][f"module.{k}"]) for k in averaged)
    assert not all(torch.equal(averaged[k], raw[k]) for k in raw)
    logged = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])["val_bleu4"]
    assert (
        round(validate(decoder, AnnotationShards(features, "val"), config, torch.device("cpu"))["bleu"][3], 2) == logged
    )


def test_fused_adam_takes_the_loops_step_and_resumes_from_its_state():
    """Training's fused Adam (make_optimizer) moves parameters as the per-parameter loop does, and
    optimizer state saved by the loop (in checkpoints written before it was fused) resumes in it."""
    torch.manual_seed(0)
    config = TrainConfig(features="", out="")
    decoders = [Decoder(DecoderConfig(vocab_size=30, annotation_dim=16, embed_dim=8, hidden_dim=12, attention_dim=10))]
    decoders.append(Decoder(decoders[0].config))
    decoders[1].load_state_dict(decoders[0].state_dict())
    loop, fused = (make_optimizer(d.parameters(), config, fused=f) for d, f in zip(decoders, (False, True)))

    def differ() -> float:
        return max((p0 - p1).abs().max().item() for p0, p1 in zip(decoders[0].parameters(), decoders[1].parameters()))

    for step in range(4):
        grads = [torch.randn_like(p) for p in decoders[0].parameters()]
        for decoder, optimizer in zip(decoders, (loop, fused)):
            for p, g in zip(decoder.parameters(), grads):
                p.grad = g.clone()
            optimizer.step()
        assert differ() < 1e-7  # a step moves parameters by about lr = 4e-4
        if step == 1:  # resume the second run from the loop's checkpointed state
            saved = io.BytesIO()
            torch.save({"optimizer": loop.state_dict(), "model": decoders[0].state_dict()}, saved)
            saved.seek(0)
            saved = torch.load(saved, weights_only=True)
            decoders[1].load_state_dict(saved["model"])
            fused = make_optimizer(decoders[1].parameters(), config)
            fused.load_state_dict(saved["optimizer"])
    assert fused.state_dict()["state"][0]["step"].item() == 4
