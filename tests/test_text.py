import pytest

from pipeline.io.errors import PipelineError
from pipeline.text import SPECIALS, Vocabulary, tokenize


def test_tokenize_lowercases_splits_and_drops_punctuation():
    assert tokenize("A dog's ball, in the SNOW .") == ["a", "dog", "'s", "ball", "in", "the", "snow"]
    assert tokenize('Three boy do " Hear no evil . "') == ["three", "boy", "do", "hear", "no", "evil"]
    assert tokenize("a tri-colored dog") == ["a", "tri-colored", "dog"]


def test_vocabulary_min_count_and_deterministic_order():
    captions = [["a", "dog", "runs"], ["a", "dog"], ["a", "cat"], ["b"], ["b"]]
    vocab = Vocabulary.build(captions, min_count=2)
    assert vocab.words == list(SPECIALS) + ["a", "b", "dog"]  # by count, then alphabetically
    assert (vocab.pad, vocab.start, vocab.end, vocab.unk) == (0, 1, 2, 3)
    assert len(Vocabulary.build(captions, min_count=1)) == 4 + 5


def test_encode_decode_round_trip_with_unknown_words():
    vocab = Vocabulary(["a", "dog"])
    ids = vocab.encode(["a", "zebra", "dog"])
    assert ids == [vocab.start, vocab.index["a"], vocab.unk, vocab.index["dog"], vocab.end]
    assert vocab.decode(ids + [vocab.index["a"]]) == ["a", "<unk>", "dog"]  # stops at <end>


def test_save_load(tmp_path):
    vocab = Vocabulary(["x", "y"])
    vocab.save(tmp_path / "v.json")
    assert Vocabulary.load(tmp_path / "v.json") == vocab


@pytest.mark.parametrize("content", ["not json", '{"words": ["a", "b"]}', '{"other": 1}'])
def test_load_rejects_bad_files_naming_them(tmp_path, content):
    path = tmp_path / "vocab.json"
    path.write_text(content)
    with pytest.raises(PipelineError, match="vocab.json"):
        Vocabulary.load(path)
