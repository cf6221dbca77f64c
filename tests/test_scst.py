"""Self-critical sequence training (pipeline.train.scst): it raises held-out CIDEr-D from an
under-trained XE decoder, its baselines, and what it samples."""

import json
import tomllib

import pytest
import torch

from pipeline.checkpoint import build_decoder, load_checkpoint
from pipeline.config import DecodeConfig
from pipeline.eval.cider import CiderD
from pipeline.features.shards import AnnotationShards
from pipeline.io.errors import PipelineError
from pipeline.model.decode import free_run, greedy_decode
from pipeline.model.decoder import Decoder, DecoderConfig
from pipeline.text import Vocabulary
from pipeline.train.loop import TrainConfig, train
from pipeline.train.scst import Reward, log_probs, reference_nll, scst_loss
from pipeline.train.validate import validate

from object_features import write_object_features

TINY = dict(embed_dim=16, hidden_dim=32, attention_dim=16)


def held_out_cider(run, features) -> float:
    decoder, _ = build_decoder(load_checkpoint(run / "best.pt"), "best.pt")
    config = TrainConfig(features=str(features), out="", precision="fp32")
    return validate(decoder, AnnotationShards(features, "test"), config, torch.device("cpu"))["cider"]


@pytest.mark.parametrize("attention", ["soft", "hard"])
def test_scst_raises_held_out_cider_of_an_under_trained_decoder(tmp_path, attention):
    features = tmp_path / "features"
    write_object_features(features, sizes={"train": 600, "val": 50, "test": 100})
    common = dict(features=str(features), ema_decay=0.0, attention=attention, val_beam_size=1, precision="fp32")
    train(TrainConfig(out=str(tmp_path / "xe"), epochs=1, lr=3e-3, batch_size=32, model=TINY, **common), False)
    scst = TrainConfig(
        out=str(tmp_path / "scst"), criterion="scst", init=str(tmp_path / "xe" / "best.pt"), epochs=3, lr=2e-3,
        batch_size=40, **common
    )  # fmt: skip
    state = train(scst, progress=False)
    before, after = held_out_cider(tmp_path / "xe", features), held_out_cider(tmp_path / "scst", features)
    assert after >= before + 50, (before, after)  # CIDEr-D in %
    assert state["train_config"]["criterion"] == "scst" and state["run"]["best_score"] > 0
    recorded = tomllib.loads((tmp_path / "scst" / "config.toml").read_text())
    assert (recorded["hidden_dim"], recorded["embed_dim"]) == (32, 16)  # --init's decoder, not the defaults


def test_scst_needs_an_init_checkpoint_of_the_same_sizes(tmp_path):
    with pytest.raises(PipelineError, match=r"`criterion='scst'` trains an XE-trained decoder: give .* `init`"):
        TrainConfig(features="f", out="o", criterion="scst")
    with pytest.raises(PipelineError, match=r"`batch_size=4` counts sampled captions: at least `scst_samples` \(5\)"):
        TrainConfig(features="f", out="o", criterion="scst", init="x.pt", batch_size=4)
    features = tmp_path / "features"
    write_object_features(features, sizes={"train": 100, "val": 10})
    train(TrainConfig(features=str(features), out=str(tmp_path / "xe"), epochs=1, model=TINY), progress=False)
    other = TrainConfig(
        features=str(features), out=str(tmp_path / "b"), init=str(tmp_path / "xe" / "best.pt"), model={"hidden_dim": 64}
    )
    with pytest.raises(
        PipelineError,
        match=r"sizes and switches come from this checkpoint; drop `model.hidden_dim=64` \(it has hidden_dim = 32\)",
    ):
        train(other, progress=False)


def _decoder(vocab_size=9):
    torch.manual_seed(0)
    config = DecoderConfig(vocab_size=vocab_size, annotation_dim=8, embed_dim=8, hidden_dim=8, attention_dim=8)
    return Decoder(config)


def test_sampling_never_draws_unk_and_masks_after_end():
    decoder, vocab = _decoder(), Vocabulary(["cat", "dog", "red", "big", "ran"])
    with torch.no_grad():
        decoder.out_vocab.bias[vocab.unk] = 6.0  # the model's favourite word
    for context in ("expected", "sample"):
        annotations = torch.randn(64, 5, 8)
        tokens, _, locations, mask = free_run(
            decoder.eval(), annotations, vocab, DecodeConfig(max_len=10), context, True
        )
        assert vocab.unk not in tokens[mask.bool()].tolist()
        assert (locations is None) == (context == "expected")
        log_p = log_probs(decoder, annotations, tokens, locations, vocab)
        assert (log_p[mask.bool()] < 0).all() and log_p.requires_grad
        for row, m in zip(tokens.tolist(), mask.tolist()):  # mask: up to and including the first <end>
            n = row.index(vocab.end) + 1 if vocab.end in row else len(row)
            assert m == [1.0] * n + [0.0] * (len(row) - n)


@pytest.mark.parametrize("baseline", ["mean", "greedy"])
def test_advantages_and_rewards(baseline):
    decoder, vocab = _decoder(), Vocabulary(["cat", "dog", "red", "big", "ran"])
    references = [[["a", "red", "cat"], ["big", "cat"]], [["dog", "ran"]], [["a", "dog"]]]
    cider = CiderD(references)
    annotations = torch.randn(3, 5, 8)
    torch.manual_seed(1)
    loss, stats = scst_loss(decoder, annotations, [0, 1, 2], vocab, Reward(references), 4, baseline, 6, "expected")
    loss.backward()
    assert torch.isfinite(loss) and decoder.out_vocab.weight.grad.abs().sum() > 0
    torch.manual_seed(1)  # the same samples again, scored by hand
    repeated, settings = annotations.repeat_interleave(4, 0), DecodeConfig(max_len=6)
    tokens, _, locations, mask = free_run(decoder.eval(), repeated, vocab, settings, sample=True)
    rewards = torch.tensor([cider.score(r // 4, vocab.decode(t)) for r, t in enumerate(tokens.tolist())]).view(3, 4)
    assert stats["reward"] == pytest.approx(rewards.mean().item(), abs=1e-6)
    if baseline == "mean":  # each sample's baseline: the mean of its image's 3 other samples
        base = torch.stack(
            [torch.stack([rewards[i, [j for j in range(4) if j != s]].mean() for s in range(4)]) for i in range(3)]
        )
    else:  # each image's greedy caption's reward, for all 4 of its samples
        greedy, _ = greedy_decode(decoder, annotations, vocab, settings)
        greedy_rewards = torch.tensor([cider.score(i, vocab.decode(t)) for i, t in enumerate(greedy.tolist())])
        assert stats["greedy_reward"] == pytest.approx(greedy_rewards.mean().item(), abs=1e-6)
        base = greedy_rewards[:, None].expand(3, 4)
    advantage = (rewards - base).view(-1, 1)
    assert stats["baseline"] == pytest.approx(base.mean().item(), abs=1e-6)
    assert stats["reward_rms"] == pytest.approx(advantage.pow(2).mean().sqrt().item(), abs=1e-6)
    log_p = log_probs(decoder, repeated, tokens, locations, vocab)
    assert loss.item() == pytest.approx((-(advantage * log_p * mask).sum() / mask.sum()).item(), rel=1e-5)


def test_the_reward_is_cider_d_plus_the_weighted_sentence_bleu4():
    references = [[["a", "dog", "runs", "on", "the", "grass"], ["a", "brown", "dog"]], [["two", "cats", "sleep"]]]
    cider, mixed = CiderD(references), Reward(references, bleu_weight=0.5)
    exact, unmatched = ["a", "dog", "runs", "on", "the", "grass"], ["two", "dogs", "ran", "far", "off"]
    assert Reward(references)([0, 1], [exact, unmatched]) == [cider.score(0, exact), cider.score(1, unmatched)]
    rewards = mixed([0, 1, 0], [exact, unmatched, []])
    assert rewards[0] == pytest.approx(cider.score(0, exact) + 0.5, abs=1e-6)  # a reference itself: BLEU-4 1
    assert rewards[1] == pytest.approx(cider.score(1, unmatched), abs=1e-6)  # no 4-gram in common: BLEU-4 ~0
    assert rewards[2] == pytest.approx(0.0, abs=1e-6)  # an empty caption scores nothing


def test_log_probs_are_those_the_samples_were_drawn_with():
    """The teacher-forced scoring of a sample equals the step-by-step policy it was drawn from:
    the words' log-probabilities without <unk>, <pad> and <start>, plus (hard) the sampled
    locations' log alpha."""
    decoder, vocab = _decoder(), Vocabulary(["cat", "dog", "red", "big", "ran"])
    decoder.eval()
    annotations = torch.randn(6, 5, 8)
    for context in ("expected", "sample"):
        tokens, _, locations, mask = free_run(decoder, annotations, vocab, DecodeConfig(max_len=8), context, True)
        scored = log_probs(decoder, annotations, tokens, locations, vocab)
        with torch.no_grad():  # step by step, replaying the sampled words and locations
            state, proj = decoder.init_state(annotations)
            token = torch.full((6,), vocab.start)
            for t in range(tokens.shape[1]):
                embedded = decoder.embedding(token)
                where = "expected" if locations is None else locations[:, t]
                state, z, alpha, _, _ = decoder.step(embedded, state, annotations, proj, where)
                logits = decoder.output(embedded, decoder.hidden(state), z)
                logits[:, [vocab.unk, vocab.pad, vocab.start]] = float("-inf")
                expected = torch.log_softmax(logits, 1).gather(1, tokens[:, t : t + 1]).squeeze(1)
                if locations is not None:
                    expected = expected + alpha.gather(1, locations[:, t : t + 1]).squeeze(1).log()
                live = mask[:, t].bool()
                torch.testing.assert_close(scored[live, t], expected[live], atol=1e-5, rtol=1e-5)
                token = tokens[:, t]


def test_reference_nll_is_the_per_word_nll_of_each_reference_scored_alone():
    """The mixed objective's cross-entropy: references of different lengths padded into one pass
    give each caption's own teacher-forced NLL, summed over the words and divided by their count."""
    decoder, vocab = _decoder(), Vocabulary(["cat", "dog", "red", "big", "ran"])
    decoder.eval()
    annotations = torch.randn(2, 5, 8)
    s, e = vocab.start, vocab.end
    references = [[[s, 4, 5, e], [s, 6, e]], [[s, 7, 8, 4, 5, e]]]  # 3, 2 and 5 words with <end>
    total, words = 0.0, 0
    for image, captions in enumerate(references):
        for caption in captions:
            tokens = torch.tensor([caption])
            logits = decoder(annotations[image : image + 1], tokens, "expected").logits  # (1, T, V)
            total -= logits.log_softmax(-1).gather(2, tokens[:, 1:].unsqueeze(2)).sum().item()
            words += len(caption) - 1
    nll = reference_nll(decoder, annotations, references, vocab)
    assert nll.item() == pytest.approx(total / words, rel=1e-5)
    nll.backward()
    assert decoder.out_vocab.weight.grad.abs().sum() > 0


def test_scst_xe_weight_adds_the_references_cross_entropy_to_the_loss(tmp_path, monkeypatch):
    import pipeline.train.steps

    nll = pipeline.train.steps.reference_nll

    def without_drawing(*args):  # its dropout draws would change the next batch's samples: the loss's
        # arithmetic is checked with the same samples in both runs
        with torch.random.fork_rng():
            return nll(*args)

    monkeypatch.setattr(pipeline.train.steps, "reference_nll", without_drawing)
    features = tmp_path / "features"
    write_object_features(features, sizes={"train": 60, "val": 10})
    common = dict(features=str(features), ema_decay=0.0, val_beam_size=1, precision="fp32", model=TINY)
    train(TrainConfig(out=str(tmp_path / "xe"), epochs=1, batch_size=32, **common), progress=False)
    init = str(tmp_path / "xe" / "best.pt")
    runs = {}
    for weight in (0.0, 2.0):
        config = TrainConfig(
            out=str(tmp_path / f"scst{weight}"), criterion="scst", init=init, epochs=1, lr=1e-9, batch_size=20,
            scst_xe_weight=weight, **common
        )  # fmt: skip
        train(config, progress=False)
        runs[weight] = [json.loads(line) for line in (tmp_path / f"scst{weight}" / "metrics.jsonl").open()][-1]
    assert "reference_nll" not in runs[0.0] and runs[2.0]["reference_nll"] > 0
    assert runs[2.0]["reward"] == runs[0.0]["reward"]  # the same samples (same seed, weights moved by lr 1e-9)
    # so the loss differs by the weighted term
    assert runs[2.0]["loss"] - runs[0.0]["loss"] == pytest.approx(2.0 * runs[2.0]["reference_nll"], rel=1e-3)
