"""Caption scores from the coco-caption scorers (pycocoevalcap): BLEU-1..4 (Papineni et al.
2002), METEOR 1.5 (Denkowski and Lavie 2014), ROUGE-L (Lin 2004), CIDEr-D (Vedantam et al. 2015),
and SPICE (Anderson et al. 2016) where it can run.

Official numbers tokenise with coco-caption's PTBTokenizer and score METEOR with its jar; both
need Java. Without Java the pipeline's own tokeniser is used, METEOR and SPICE are left out, and a
note says so. Validation during training uses :func:`bleu` on the pipeline's tokens.
"""

import shutil
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from ..text import tokenize

SPICE_NOTE = (
    "SPICE not computed: it needs Stanford CoreNLP 3.6.0 in pycocoevalcap/spice/lib, which pycocoevalcap "
    "downloads on first use (get_stanford_models); fetch it there on a machine with internet"
)


def bleu(hypotheses: list[list[str]], references: list[list[list[str]]]) -> list[float]:
    """Corpus BLEU-1..4 (fractions in [0, 1]) of token-list hypotheses against token-list
    references (several per image), with coco-caption's scorer (closest reference length)."""
    if not hypotheses:
        return [0.0] * 4
    res = {i: [" ".join(h)] for i, h in enumerate(hypotheses)}
    gts = {i: [" ".join(r) for r in refs] for i, refs in enumerate(references)}
    scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return [float(s) for s in scores]


def _spice_ready() -> bool:
    import pycocoevalcap.spice as spice

    return any((Path(spice.__file__).parent / "lib").glob("stanford-corenlp-3.6.0*.jar"))


def score_captions(hypotheses: dict, references: dict, java: bool | None = None) -> tuple[dict, list[str]]:
    """Score raw-text captions against raw-text references.

    hypotheses: image id -> caption str; references: image id -> list of caption str (same ids).
    java: whether Java may be used (default: whether ``java`` is on PATH).
    Returns (scores in % keyed 'BLEU-1'..'BLEU-4', 'METEOR', 'ROUGE-L', 'CIDEr'[, 'SPICE'], notes: one
    line per metric left out and why).
    """
    java = shutil.which("java") is not None if java is None else java
    notes = []
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in references.items()})
        res = tokenizer.tokenize({i: [{"caption": hypotheses[i]}] for i in references})
    else:
        notes.append(
            "Java not found: METEOR and SPICE left out, and captions tokenised by the pipeline's tokeniser "
            "instead of coco-caption's PTBTokenizer; install a Java runtime (e.g. apt-get install "
            "default-jre) for official numbers"
        )
        gts = {i: [" ".join(tokenize(c)) for c in refs] for i, refs in references.items()}
        res = {i: [" ".join(tokenize(hypotheses[i]))] for i in references}
    scores = dict(zip(("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"), Bleu(4).compute_score(gts, res, verbose=0)[0]))
    if java:
        try:
            from pycocoevalcap.meteor.meteor import Meteor

            scores["METEOR"] = Meteor().compute_score(gts, res)[0]
        except (OSError, ValueError, BrokenPipeError) as e:
            notes.append(f"METEOR failed ({type(e).__name__}: {e}); its Java process needs about 2 GB of memory")
    scores["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    scores["CIDEr"] = Cider().compute_score(gts, res)[0]
    if java and _spice_ready():
        from pycocoevalcap.spice.spice import Spice

        scores["SPICE"] = Spice().compute_score(gts, res)[0]
    elif java:
        notes.append(SPICE_NOTE)
    return {k: 100 * float(v) for k, v in scores.items()}, notes


def coco_id(image_id: str) -> int | str:
    """An image id as coco-caption's files hold it: an int where it is all digits (COCO's cocoid,
    Flickr30k's imgid), else the string (a Flickr8k file name)."""
    return int(image_id) if image_id.isdigit() else image_id


def coco_references(references: dict, description: str) -> dict:
    """The reference captions in the COCO caption annotation format (``captions_val2014.json``'s):
    ``{"info", "licenses", "type": "captions", "images": [{"id"}], "annotations": [{"image_id",
    "id", "caption"}]}``, so that a results file with the same ids can be scored by the official
    coco-caption code for any dataset. references: image id -> list of caption str."""
    annotations = [
        {"image_id": coco_id(i), "id": n, "caption": c}
        for n, (i, c) in enumerate((i, c) for i, refs in references.items() for c in refs)
    ]
    return {
        "info": {"description": description},
        "licenses": [],
        "type": "captions",
        "images": [{"id": coco_id(i)} for i in references],
        "annotations": annotations,
    }
