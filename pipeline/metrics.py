"""Caption scores from the coco-caption scorers (pycocoevalcap).

Validation during training uses BLEU-4 on the pipeline's own tokens (no Java needed).
"""
from pycocoevalcap.bleu.bleu import Bleu


def bleu(hypotheses: list[list[str]], references: list[list[list[str]]]) -> list[float]:
    """Corpus BLEU-1..4 (fractions in [0, 1]) of token-list hypotheses against token-list
    references (several per image), with coco-caption's scorer (Papineni et al. 2002, closest
    reference length)."""
    if not hypotheses:
        return [0.0] * 4
    res = {i: [" ".join(h)] for i, h in enumerate(hypotheses)}
    gts = {i: [" ".join(r) for r in refs] for i, refs in enumerate(references)}
    scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return [float(s) for s in scores]
