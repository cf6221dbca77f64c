"""Scoring a checkpoint: beam-search captions of a split of the features, coco-caption scores.

Writes, next to the checkpoint, ``NAME-SPLIT-beamK.captions.json`` (COCO results format:
``[{"image_id": ..., "caption": ...}]``), ``NAME-SPLIT-beamK.scores.json`` and
``NAME-SPLIT.references.json`` (the split's reference captions in the COCO caption annotation
format, whatever the dataset), so the official coco-caption code can score the same files.
"""
from pathlib import Path

from torch.utils.data import DataLoader
from tqdm import tqdm

from .atomic import write_json
from .decode import beam_search
from .metrics import coco_id, coco_references, score_captions
from .shards import AnnotationShards
from .train import build_decoder, check_features, load_checkpoint


def evaluate(checkpoint_path, split: str = "test", beam_size: int = 3, max_len: int = 20, length_penalty: float = 0.0,
             features=None, batch_size: int = 50, device: str = "cpu", progress: bool = True) -> dict:
    """Decode ``split`` with beam search and score it against its reference captions.

    features: the features folder (default: the one recorded in the checkpoint).
    Returns {'scores': {metric: %}, 'notes': [str], 'captions': path, 'scores_file': path,
    'references': path, 'images': n, 'examples': [(image id, caption)] (the first three)}.
    Raises PipelineError for an unreadable checkpoint, missing split or mismatched features.
    """
    checkpoint_path = Path(checkpoint_path)
    checkpoint = load_checkpoint(checkpoint_path)
    decoder, vocab = build_decoder(checkpoint, checkpoint_path)
    decoder.to(device).eval()
    shards = AnnotationShards(features or checkpoint["features"]["dir"], split)
    check_features(checkpoint, shards, checkpoint_path)
    context = checkpoint["train_config"]["decode_context"]
    captions = []
    loader = DataLoader(shards, batch_size=batch_size)
    for annotations in tqdm(loader, desc=f"decoding {split}", unit="batch", disable=not progress):
        captions += beam_search(decoder, annotations.to(device), vocab.start, vocab.end, beam_size, max_len,
                                length_penalty, context)
    hypotheses = {i: " ".join(vocab.words[t] for t in c.tokens) for i, c in zip(shards.image_ids, captions)}
    references = dict(zip(shards.image_ids, shards.references))
    scores, notes = score_captions(hypotheses, references)
    stem = checkpoint_path.with_suffix("")
    name = f"{stem.name}-{split}-beam{beam_size}"
    captions_file = stem.parent / f"{name}.captions.json"
    scores_file = stem.parent / f"{name}.scores.json"
    references_file = stem.parent / f"{stem.name}-{split}.references.json"
    write_json(captions_file, [{"image_id": coco_id(i), "caption": c} for i, c in hypotheses.items()])
    write_json(references_file, coco_references(references, f"{shards.manifest['dataset']} {split} references"))
    write_json(scores_file, {"checkpoint": str(checkpoint_path), "split": split, "images": len(captions),
                             "beam_size": beam_size, "max_len": max_len, "length_penalty": length_penalty,
                             "scores": scores, "notes": notes})
    return {"scores": scores, "notes": notes, "captions": captions_file, "scores_file": scores_file,
            "references": references_file, "images": len(captions), "examples": list(hypotheses.items())[:3]}
