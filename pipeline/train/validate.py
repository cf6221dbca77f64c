"""Validation at the end of each epoch: free-running beam search over the validation images, scored
with coco-caption BLEU-1..4 and CIDEr-D, and how sharp the attention is."""

import torch
from torch.utils.data import DataLoader

from ..config import DecodeConfig, TrainConfig
from ..eval.cider import CiderD
from ..eval.metrics import bleu
from ..features.shards import AnnotationShards
from ..model.decode import beam_search
from ..model.decoder import Decoder, attention_entropy
from ..text import tokenize
from .steps import autocast

METRIC_NAMES = {"bleu4": "BLEU-4", "cider": "CIDEr-D"}


def validate(decoder: Decoder, shards: AnnotationShards, config: TrainConfig, device) -> dict:
    """Free-running captions of the validation images (beam search of ``config.val_beam_size``,
    never emitting ``<unk>``) and their BLEU-1..4 against the raw reference captions, tokenised
    (coco-caption's BLEU, in %), and how sharp their
    attention is: the entropy of alpha_t in nats, averaged over the words (log L when uniform: a
    model that does not attend, as hard attention does when its gating scalar collapses).
    Also their CIDEr-D (document frequencies over these references, as coco-caption's; in %).
    Returns {'bleu': [b1..b4], 'cider': float, 'captions': [token lists], 'attention_entropy': float,
    'first_alpha': (T, L) the attention weights of the first image's caption}."""
    decoder.eval()
    n = config.val_images or len(shards)
    hyps, entropies, alphas = [], [], []
    loader = DataLoader(
        torch.utils.data.Subset(shards, range(min(n, len(shards)))), batch_size=100, num_workers=config.workers
    )
    vocab, settings = shards.vocab, DecodeConfig(config.val_beam_size, config.max_len)
    for annotations in loader:
        with autocast(config, device):
            captions = beam_search(decoder, annotations.to(device), vocab, settings, config.decode_context)
        hyps += [vocab.decode(c.tokens) for c in captions]
        entropies += [attention_entropy(c.alpha).mean().item() for c in captions]
        alphas = alphas or [captions[0].alpha.float().cpu()]
    refs = [[tokenize(c) for c in caps] for caps in shards.references[: len(hyps)]]  # raw: <unk> is never right
    return {
        "bleu": [100 * b for b in bleu(hyps, refs)],
        "cider": 100 * CiderD(refs).corpus(hyps),
        "captions": hyps,
        "attention_entropy": sum(entropies) / max(len(entropies), 1),
        "first_alpha": alphas[0],
    }
