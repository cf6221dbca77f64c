"""CIDEr-D (Vedantam et al. 2015, arXiv 1411.5726), as coco-caption computes it, for rewards and
model selection.

For each n = 1..4, a caption is the vector of its n-grams' counts weighted by their inverse
document frequency, log(|images|) - log(max(1, df)), df counting the images whose references
hold the n-gram. The score of a caption against an image's m references is

    CIDEr-D = 10 / (4 m) * sum_n sum_refs  e^(-(l_c - l_r)^2 / (2 sigma^2)) *
              sum_g min(c_g, r_g) r_g / (|c| |r|)

(sigma = 6; c, r the caption's and the reference's vectors; the n-gram weights of the caption
clipped at the reference's). Two details follow pycocoevalcap's cider_scorer exactly, so that the
scores are equal: the length l of a sentence is its number of bigrams, and a norm of 0 leaves the
sum undivided. Document frequencies are computed once, over the references given
(:class:`CiderD`); coco-caption computes them over the set it scores, so the two agree when the
same references are given.
"""

import math
from collections import Counter

N, SIGMA = 4, 6.0


def ngram_counts(words: list[str], n: int = N) -> Counter:
    """Counts of the 1..n-grams (tuples) of ``words``."""
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


class CiderD:
    """CIDEr-D against fixed references, with document frequencies over them.

    references: per image, its reference captions as word lists (tokenised as the hypotheses are).
    ``score(i, words)`` gives the CIDEr-D of a caption of image i (its references' vectors are
    computed once, so scoring many sampled captions of one image is cheap); :meth:`corpus`
    averages it over a set of images. Raises ValueError for an image without references.
    """

    def __init__(self, references: list[list[list[str]]]):
        if any(not refs for refs in references):
            raise ValueError("every image needs at least one reference caption")
        df = Counter(gram for refs in references for gram in set().union(*(ngram_counts(r) for r in refs)))
        self.log_images = math.log(len(references)) if references else 0.0
        self.idf = {gram: self.log_images - math.log(count) for gram, count in df.items()}  # df >= 1 here
        self.references = [[self._vector(ngram_counts(r)) for r in refs] for refs in references]

    def _vector(self, counts: Counter) -> tuple[list[dict], list[float], int]:
        """(tf-idf weights per n, their norms per n, length in bigrams) of n-gram ``counts``."""
        vec = [{} for _ in range(N)]
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = tf * self.idf.get(gram, self.log_images)  # unseen: df taken as 1
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
        return vec, norms, sum(counts[g] for g in vec[1])

    def score(self, image: int, words: list[str]) -> float:
        """CIDEr-D of the caption ``words`` of image ``image`` (an index into the references)."""
        vec, norms, length = self._vector(ngram_counts(words))
        refs = self.references[image]
        total = 0.0
        for ref_vec, ref_norms, ref_length in refs:
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * SIGMA**2))
            for n in range(N):
                ref = ref_vec[n]
                value = sum(min(w, ref[g]) * ref[g] for g, w in vec[n].items() if g in ref)
                if norms[n] != 0 and ref_norms[n] != 0:
                    value /= norms[n] * ref_norms[n]
                total += value * penalty
        return 10.0 * total / (N * len(refs))

    def corpus(self, captions: list[list[str]]) -> float:
        """Mean CIDEr-D of ``captions`` (one word list per image, in the references' order)."""
        return sum(self.score(i, words) for i, words in enumerate(captions)) / max(len(captions), 1)
