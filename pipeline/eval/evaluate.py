"""Scoring a checkpoint: beam-search captions of a split of the features, coco-caption scores.

Writes into the output folder (default: the checkpoint's) three files named by every setting
that changes them, ``NAME-SPLIT-beamK[-lenN][-lpP][-unk][-blocktrigrams][-features-HASH]``:

- ``.captions.json``: the captions in the COCO results format ``[{"image_id", "caption"}]``;
- ``.references.json``: the split's reference captions in the COCO caption annotation format,
  whatever the dataset, so the official coco-caption code can score the pair;
- ``.scores.json``: the settings and scores, and the SHA-256 of the two others
  (:func:`pipeline.io.folders.write_owned`): a rerun with the same settings replaces only files
  an earlier run wrote and nobody edited since, never a file of the user's.
"""

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from torch.utils.data import DataLoader
from tqdm import tqdm

from ..checkpoint import build_decoder, load_checkpoint
from ..config import DECODE, DecodeConfig
from ..features.folder import check_identity, check_split_name
from ..features.shards import AnnotationShards
from ..io.folders import check_owned, check_writable, write_owned
from ..model.compiled import decide_decoding, use_compiled
from ..model.decode import beam_search
from .metrics import coco_id, coco_references, score_captions


def output_names(checkpoint_path: Path, split: str, settings: DecodeConfig, features, trained_on: str, out_dir) -> dict:
    """{'captions', 'references', 'scores'} -> the paths this evaluation writes: settings left at
    their defaults (:data:`~pipeline.config.DECODE`'s length limit, length penalty and <unk>, the
    features the checkpoint was trained on) add nothing to the name, others a suffix each, so
    evaluations with other settings never collide."""
    name = f"{checkpoint_path.stem}-{split}-beam{settings.beam_size}"
    if settings.max_len != DECODE.max_len:
        name += f"-len{settings.max_len}"
    if settings.length_penalty != DECODE.length_penalty:
        name += f"-lp{settings.length_penalty:g}"
    if settings.allow_unk != DECODE.allow_unk:
        name += "-unk"
    if settings.block_trigrams != DECODE.block_trigrams:
        name += "-blocktrigrams"
    if features is not None and Path(features).resolve() != Path(trained_on).resolve():
        name += "-features-" + hashlib.sha256(str(Path(features).resolve()).encode()).hexdigest()[:8]
    folder = Path(out_dir) if out_dir is not None else checkpoint_path.parent
    return {kind: folder / f"{name}.{kind}.json" for kind in ("captions", "references", "scores")}


def evaluate(
    checkpoint_path,
    split: str = "test",
    settings: DecodeConfig = DECODE,
    features=None,
    batch_size: int = 50,
    device: str = "cpu",
    progress: bool = True,
    out_dir=None,
) -> dict:
    """Decode ``split`` with beam search (``settings``) and score it against its reference captions.

    features: the features folder (default: the one recorded in the checkpoint).
    out_dir: where the three output files go (default: the checkpoint's folder); it is checked
    to be writable, and the output names to be free or this pipeline's, before any decoding.
    Returns {'scores': {metric: %}, 'notes': [str], 'captions': path, 'scores_file': path,
    'references': path, 'images': n, 'examples': [(image id, caption)] (the first three)}.
    Raises PipelineError for a split name that is a path, an unreadable checkpoint, missing split,
    mismatched features, an output folder that cannot be written, or an output name taken by a file
    not written here.
    """
    check_split_name(split)  # before any folder is made from it
    checkpoint_path = Path(checkpoint_path)
    checkpoint = load_checkpoint(checkpoint_path)
    trained_on = checkpoint["features"]["dir"]
    files = output_names(checkpoint_path, split, settings, features, trained_on, out_dir)
    check_writable(files["scores"].parent, "out_dir")
    check_owned(files["scores"], [files["captions"], files["references"]], "`cli.py evaluate`", "out_dir")
    decoder, vocab = build_decoder(checkpoint, checkpoint_path)
    decoder.to(device).eval()
    shards = AnnotationShards(features or trained_on, split)
    check_identity(checkpoint["features"], shards.manifest, shards.dir, checkpoint_path)
    context = checkpoint["train_config"]["decode_context"]
    use_compiled([decoder], decide_decoding(settings, device, len(shards)))
    captions = []
    loader = DataLoader(shards, batch_size=batch_size)
    for annotations in tqdm(loader, desc=f"decoding {split}", unit="batch", disable=not progress):
        captions += beam_search(decoder, annotations.to(device), vocab, settings, context)
    hypotheses = {i: " ".join(vocab.words[t] for t in c.tokens) for i, c in zip(shards.image_ids, captions)}
    references = dict(zip(shards.image_ids, shards.references))
    scores, notes = score_captions(hypotheses, references)
    results = [{"image_id": coco_id(i), "caption": c} for i, c in hypotheses.items()]
    annotation = coco_references(references, f"{shards.manifest['dataset']} {split} references")
    write_owned(
        files["scores"],
        {files["captions"]: _json(results), files["references"]: _json(annotation)},
        {
            "checkpoint": str(checkpoint_path),
            "features": str(shards.dir),
            "split": split,
            "images": len(captions),
            **asdict(settings),
            "scores": scores,
            "notes": notes,
        },
    )
    return {
        "scores": scores,
        "notes": notes,
        "captions": files["captions"],
        "scores_file": files["scores"],
        "references": files["references"],
        "images": len(captions),
        "examples": list(hypotheses.items())[:3],
    }


def _json(obj) -> str:
    return json.dumps(obj, indent=1, allow_nan=False) + "\n"
