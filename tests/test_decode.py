import pytest
import torch

from pipeline.checkpoint import build_decoder, load_checkpoint
from pipeline.config import DecodeConfig
from pipeline.features.shards import AnnotationShards
from pipeline.model.decode import beam_search, free_run, greedy_decode, n_best, repeating_trigrams
from pipeline.model.decoder import Decoder, DecoderConfig
from pipeline.train.loop import TrainConfig, train

from object_features import write_object_features


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A briefly trained (imperfect, so beams matter) soft decoder and held-out annotations."""
    out = tmp_path_factory.mktemp("decode")
    write_object_features(out / "features", sizes={"train": 300, "val": 20, "test": 64})
    train(
        TrainConfig(
            features=str(out / "features"),
            out=str(out / "run"),
            epochs=2,
            lr=3e-3,
            batch_size=32,
            ema_decay=0.0,
            model=dict(embed_dim=16, hidden_dim=32, attention_dim=16),
        ),
        progress=False,
    )
    decoder, vocab = build_decoder(load_checkpoint(out / "run" / "last.pt"), "last.pt")
    test = AnnotationShards(out / "features", "test")
    return decoder.eval(), vocab, torch.stack([test[i] for i in range(len(test))])


def sequence_log_prob(decoder, annotations, tokens, vocab, ended=True):
    """log p(tokens [<end>]) by a teacher-forced pass."""
    seq = torch.tensor([[vocab.start] + tokens + ([vocab.end] if ended else [])])
    out = decoder(annotations.unsqueeze(0), seq)
    return torch.log_softmax(out.logits, -1)[0].gather(1, seq[0, 1:].unsqueeze(1)).sum().item()


def test_beam_size_1_is_greedy(trained):
    decoder, vocab, a = trained
    tokens, alpha = greedy_decode(decoder, a, vocab, DecodeConfig(max_len=20))
    beams = beam_search(decoder, a, vocab, DecodeConfig(beam_size=1, max_len=20))
    for i, caption in enumerate(beams):
        greedy = tokens[i].tolist()
        n = greedy.index(vocab.end) if vocab.end in greedy else len(greedy)
        assert caption.tokens == greedy[:n]
        torch.testing.assert_close(caption.alpha, alpha[i, : n + 1])


def test_larger_beams_never_score_below_greedy(trained):
    decoder, vocab, a = trained
    greedy = beam_search(decoder, a, vocab, DecodeConfig(beam_size=1, length_penalty=0))
    differs = 0
    for k in (2, 3, 5):
        beams = beam_search(decoder, a, vocab, DecodeConfig(beam_size=k, length_penalty=0))  # plain log-probability
        for g, b, x in zip(greedy, beams, a):
            assert b.ended and b.log_prob >= g.log_prob - 1e-5
            assert b.log_prob == pytest.approx(sequence_log_prob(decoder, x, b.tokens, vocab), abs=1e-4)
            assert b.alpha.shape == (len(b.tokens) + 1, 16)
            differs += b.tokens != g.tokens
    assert differs > 0, "the beams never changed a caption: the test model is too easy to tell anything"


def test_a_length_penalty_ranks_by_log_prob_per_length_and_lengthens_captions():
    """Each image's n best come ranked by log p / length**length_penalty (length with <end>), and
    a stronger penalty (0, 0.5, 1) makes the chosen captions longer on average (a random decoder
    whose <end> is about as likely as a word: plain log-probability ends almost every caption at once)."""
    torch.manual_seed(0)
    decoder = Decoder(DecoderConfig(vocab_size=9, annotation_dim=8, embed_dim=8, hidden_dim=8, attention_dim=8)).eval()
    with torch.no_grad():
        decoder.out_vocab.weight.mul_(3.0)  # peaked next-word distributions
        decoder.out_vocab.bias[_Vocab.end] = -0.5
    a = torch.randn(32, 5, 8)
    mean_length = {}
    for lp in (0.0, 0.5, 1.0):
        found = n_best(decoder, a, _Vocab, DecodeConfig(beam_size=5, max_len=12, length_penalty=lp), n=3)
        for captions in found:
            ranks = [(c.ended, c.log_prob / (len(c.tokens) + c.ended) ** lp) for c in captions]
            assert ranks == sorted(ranks, reverse=True)
        mean_length[lp] = sum(len(captions[0].tokens) for captions in found) / len(found)
    assert mean_length[0.0] < mean_length[0.5] < mean_length[1.0], mean_length


def test_batched_equals_one_image_at_a_time(trained):
    decoder, vocab, a = trained
    batched = beam_search(decoder, a[:6], vocab, DecodeConfig(beam_size=3))
    for i in range(6):
        single = beam_search(decoder, a[i : i + 1], vocab, DecodeConfig(beam_size=3))[0]
        assert single.tokens == batched[i].tokens and single.log_prob == pytest.approx(batched[i].log_prob, abs=1e-5)


def test_a_model_that_never_ends_gives_max_length_captions():
    torch.manual_seed(0)
    decoder = Decoder(DecoderConfig(vocab_size=9, annotation_dim=8, embed_dim=8, hidden_dim=8, attention_dim=8)).eval()
    with torch.no_grad():
        decoder.out_vocab.bias[2] = -1e4  # <end> never wins
    a = torch.randn(3, 5, 8)
    for k in (1, 3):
        captions = beam_search(decoder, a, _Vocab, DecodeConfig(beam_size=k, max_len=7))
        assert all(len(c.tokens) == 7 and not c.ended and c.alpha.shape == (7, 5) for c in captions)
        assert all(
            c.log_prob == pytest.approx(sequence_log_prob(decoder, x, c.tokens, _Vocab, ended=False), abs=1e-4)
            for c, x in zip(captions, a)
        )


class _Vocab:
    pad, start, end, unk = 0, 1, 2, 3


def test_hard_attention_sampling_returns_locations(trained):
    decoder, vocab, a = trained
    captions = beam_search(decoder, a[:4], vocab, DecodeConfig(beam_size=2), context="argmax")
    for c in captions:
        assert c.locations is not None and len(c.locations) == len(c.tokens) + c.ended  # <end> has one too
        assert torch.equal(c.locations, c.alpha.argmax(1))
    assert beam_search(decoder, a[:1], vocab)[0].locations is None


def test_unk_is_never_emitted_unless_allowed():
    torch.manual_seed(0)
    decoder = Decoder(DecoderConfig(vocab_size=9, annotation_dim=8, embed_dim=8, hidden_dim=8, attention_dim=8)).eval()
    with torch.no_grad():
        decoder.out_vocab.bias[_Vocab.unk] = 8.0  # <unk> is the model's favourite word
        decoder.out_vocab.bias[_Vocab.end] = -2.0  # and captions do not end at once
    a = torch.randn(3, 5, 8)
    allowed = DecodeConfig(beam_size=3, max_len=6, allow_unk=True)
    assert all(_Vocab.unk in c.tokens for c in beam_search(decoder, a, _Vocab, allowed))
    for k in (1, 3):
        captions = beam_search(decoder, a, _Vocab, DecodeConfig(beam_size=k, max_len=6))
        assert all(_Vocab.unk not in c.tokens for c in captions) and sum(len(c.tokens) for c in captions) >= 3
        assert all(  # the model's own log-probabilities, not renormalised without <unk>
            c.log_prob == pytest.approx(sequence_log_prob(decoder, x, c.tokens, _Vocab, c.ended), abs=1e-4)
            for c, x in zip(captions, a)
        )
    tokens, _ = greedy_decode(decoder, a, _Vocab, DecodeConfig(max_len=6))
    assert _Vocab.unk not in tokens.flatten().tolist()


def test_pad_and_start_are_never_emitted():
    """Even by a model that favours them, and with <unk> allowed: no caption holds <pad> or
    <start>, in beam search, greedy decoding and sampling alike."""
    torch.manual_seed(0)
    decoder = Decoder(DecoderConfig(vocab_size=9, annotation_dim=8, embed_dim=8, hidden_dim=8, attention_dim=8)).eval()
    with torch.no_grad():
        decoder.out_vocab.bias[[_Vocab.pad, _Vocab.start]] = 8.0
        decoder.out_vocab.bias[_Vocab.end] = -2.0
    a = torch.randn(3, 5, 8)
    settings = DecodeConfig(beam_size=3, max_len=6, allow_unk=True)
    emitted = [t for c in beam_search(decoder, a, _Vocab, settings) for t in c.tokens]
    emitted += greedy_decode(decoder, a, _Vocab, settings)[0].flatten().tolist()
    emitted += free_run(decoder, a, _Vocab, settings, sample=True)[0].flatten().tolist()
    assert len(emitted) > 20 and not {_Vocab.pad, _Vocab.start} & set(emitted)


def _trigrams(tokens: list[int]) -> list[tuple]:
    return [tuple(tokens[i : i + 3]) for i in range(len(tokens) - 2)]


def test_repeating_trigrams_are_the_words_that_followed_the_last_two_before():
    words = torch.tensor([[5, 6, 7, 5, 6], [1, 2, 3, 4, 5], [8, 8, 8, 8, 8], [5, 6, 7, 5, 6]])
    words[3, 2] = 4  # a different word after the first "5 6"
    repeats = repeating_trigrams(words, 10)
    assert [row.nonzero().flatten().tolist() for row in repeats] == [[7], [], [8], [4]]
    assert not repeating_trigrams(words[:, :2], 10).any()


def test_blocked_trigrams_never_repeat_and_keep_the_models_log_probs():
    torch.manual_seed(0)
    decoder = Decoder(DecoderConfig(vocab_size=9, annotation_dim=8, embed_dim=8, hidden_dim=8, attention_dim=8)).eval()
    with torch.no_grad():
        decoder.out_vocab.bias[5] = 6.0  # the model's favourite word
        decoder.out_vocab.bias[_Vocab.end] = -4.0  # and captions do not end at once
    a = torch.randn(3, 5, 8)
    free = beam_search(decoder, a, _Vocab, DecodeConfig(beam_size=3, max_len=8))
    assert all(len(set(_trigrams(c.tokens))) < len(_trigrams(c.tokens)) for c in free)  # "5 5 5 5 ..."
    for k in (1, 3):
        captions = beam_search(decoder, a, _Vocab, DecodeConfig(beam_size=k, max_len=8, block_trigrams=True))
        assert all(len(set(_trigrams(c.tokens))) == len(_trigrams(c.tokens)) for c in captions)
        assert all(len(c.tokens) >= 4 for c in captions)
        assert all(
            c.log_prob == pytest.approx(sequence_log_prob(decoder, x, c.tokens, _Vocab, c.ended), abs=1e-4)
            for c, x in zip(captions, a)
        )
