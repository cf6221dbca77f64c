"""CIDEr-D (pipeline.eval.cider) against pycocoevalcap's Cider, which is CIDEr-D, on random caption sets."""

import random

import pytest
from pycocoevalcap.cider.cider import Cider

from pipeline.eval.cider import CiderD

WORDS = "a dog the cat runs on grass in red ball black white man".split()  # few words: many shared n-grams


def _sentence(rng: random.Random, shortest: int) -> list[str]:
    return [rng.choice(WORDS) for _ in range(rng.randint(shortest, 14))]


@pytest.mark.parametrize("seed", range(8))
def test_cider_d_equals_coco_caption(seed):
    rng = random.Random(seed)
    images = rng.randint(1, 40)
    references = [[_sentence(rng, 1) for _ in range(rng.randint(1, 5))] for _ in range(images)]
    captions = [_sentence(rng, 0) for _ in range(images)]  # empty captions too
    captions[0] = list(references[0][0])  # one caption equal to a reference
    corpus, per_image = Cider().compute_score(
        {i: [" ".join(r) for r in refs] for i, refs in enumerate(references)},
        {i: [" ".join(c)] for i, c in enumerate(captions)},
    )
    ours = CiderD(references)
    assert [ours.score(i, c) for i, c in enumerate(captions)] == pytest.approx(list(per_image), abs=1e-6)
    assert ours.corpus(captions) == pytest.approx(corpus, abs=1e-6)
    assert max(per_image) > 0.5  # the sets are not degenerate


def test_unseen_words_and_no_references():
    scorer = CiderD([[["a", "dog"]], [["a", "cat"]]])
    assert scorer.score(0, ["a", "dog"]) > scorer.score(0, ["a", "zebra"]) >= 0
    with pytest.raises(ValueError, match="at least one reference"):
        CiderD([[["a"]], []])
