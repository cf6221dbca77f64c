"""Turning a trained decoder into captions: batched greedy decoding."""
import torch

from .model import Decoder


@torch.no_grad()
def greedy_decode(decoder: Decoder, annotations: torch.Tensor, start: int, end: int, max_len: int = 20,
                  context: str = "expected"):
    """Free-running decoding of a batch, the most probable word at each step.

    annotations: (B, L, D) float. Returns tokens: (B, T) long (T <= max_len; positions after a
    caption's ``<end>`` hold whatever was decoded there and are to be cut at the first ``end``)
    and alpha: (B, T, L) the attention weights of each step. context as in :meth:`Decoder.step`.
    """
    h, c, proj = decoder.init_state(annotations)
    token = torch.full((annotations.shape[0],), start, dtype=torch.long, device=annotations.device)
    done = torch.zeros_like(token, dtype=torch.bool)
    tokens, alphas = [], []
    for _ in range(max_len):
        embedded = decoder.embedding(token)
        h, c, z, alpha, _, _ = decoder.step(embedded, h, c, annotations, proj, context)
        token = decoder.output(embedded, h, z).argmax(1)
        tokens.append(token), alphas.append(alpha)
        done |= token == end
        if done.all():
            break
    return torch.stack(tokens, 1), torch.stack(alphas, 1)
