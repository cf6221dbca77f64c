"""Turning a trained decoder into captions: batched greedy decoding and batched beam search.

Both run every image of a batch at once (beam search as one (B*k)-row tensor program), through
the decoder's own :meth:`~pipeline.model.Decoder.step` and :meth:`~pipeline.model.Decoder.output`.
"""
from dataclasses import dataclass

import torch

from .model import Decoder, in_autocast_dtype


@torch.no_grad()
def greedy_decode(decoder: Decoder, annotations: torch.Tensor, start: int, end: int, max_len: int = 20,
                  context: str = "expected"):
    """Free-running decoding of a batch, the most probable word at each step.

    annotations: (B, L, D) float. Returns tokens: (B, T) long (T <= max_len; positions after a
    caption's ``<end>`` hold whatever was decoded there and are to be cut at the first ``end``)
    and alpha: (B, T, L) the attention weights of each step. context as in :meth:`Decoder.step`.
    """
    annotations = in_autocast_dtype(annotations)
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


@dataclass
class Caption:
    """One decoded caption: word ids without ``<end>``, the log-probability of the whole sequence
    (its ``<end>`` included when it has one; natural log), whether it ended within the length
    limit, the attention weights alpha (T, L) of each emitted token (``<end>`` included), and for
    hard attention with 'sample' or 'argmax' context the chosen locations (T,)."""

    tokens: list[int]
    log_prob: float
    ended: bool
    alpha: torch.Tensor
    locations: torch.Tensor | None = None


@torch.no_grad()
def beam_search(decoder: Decoder, annotations: torch.Tensor, start: int, end: int, beam_size: int = 3,
                max_len: int = 20, length_penalty: float = 0.0, context: str = "expected") -> list[Caption]:
    """Beam search over a batch of images at once.

    annotations: (B, L, D) float. Each step expands the k live hypotheses of every image (a
    (B*k, V) tensor of scores), retires those of the k best that end in ``end`` to the finished
    pool and carries the k best unfinished ones on (from the 2k best, so k stay live).
    Hypotheses are ranked by log-probability divided by ``length ** length_penalty`` (length in
    tokens, ``<end>`` included; 0: plain log-probability).
    An image whose hypotheses never end within ``max_len`` steps gets its best live one (``ended``
    False). context as in :meth:`Decoder.step` ('expected' for soft attention).
    Beam search can prune the greedy caption's path (its prefix may drop out of the k best before
    it ends), so for k > 1 the greedy caption (this search with k = 1, 1/k more work) is decoded
    too and returned where it ranks higher: a larger beam never returns a worse-ranked caption.
    Returns one :class:`Caption` per image, the best-ranked.
    """
    annotations = in_autocast_dtype(annotations)  # once for both searches
    captions = _beam(decoder, annotations, start, end, beam_size, max_len, length_penalty, context)
    if beam_size == 1:
        return captions

    def rank(caption: Caption):
        return caption.ended, caption.log_prob / (len(caption.tokens) + caption.ended) ** length_penalty

    greedy = _beam(decoder, annotations, start, end, 1, max_len, length_penalty, context)
    return [g if rank(g) > rank(b) else b for b, g in zip(captions, greedy)]


def _beam(decoder, annotations, start, end, beam_size, max_len, length_penalty, context) -> list[Caption]:
    """The beam search of :func:`beam_search` proper (without its greedy safeguard)."""
    B, L, _ = annotations.shape
    k, device, inf = beam_size, annotations.device, float("-inf")
    rows = torch.arange(B, device=device).unsqueeze(1)  # (B, 1)
    h, c, proj = decoder.init_state(annotations)
    a, h, c, proj = (x.repeat_interleave(k, 0) for x in (annotations, h, c, proj))
    score = torch.full((B, k), inf, device=device)
    score[:, 0] = 0.0  # one live hypothesis to start with
    token = torch.full((B * k,), start, dtype=torch.long, device=device)
    # live hypotheses (B, k, t, ...) and the best finished one of each image (B, ...)
    history = torch.empty(B, k, 0, dtype=torch.long, device=device)
    alphas = torch.empty(B, k, 0, L, device=device)
    places = torch.empty(B, k, 0, dtype=torch.long, device=device)
    done_rank = torch.full((B,), inf, device=device)
    done_log_p = torch.full((B,), inf, device=device)
    done_len = torch.zeros(B, dtype=torch.long, device=device)
    done_history = torch.zeros(B, max_len, dtype=torch.long, device=device)
    done_alphas = torch.zeros(B, max_len, L, device=device)
    done_places = torch.zeros(B, max_len, dtype=torch.long, device=device)
    for t in range(1, max_len + 1):
        embedded = decoder.embedding(token)
        h, c, z, alpha, _, s = decoder.step(embedded, h, c, a, proj, context)
        log_p = torch.log_softmax(decoder.output(embedded, h, z), dim=1)  # (B*k, V)
        V = log_p.shape[1]
        top, index = (score.view(B * k, 1) + log_p).view(B, k * V).topk(2 * k, dim=1)  # (B, 2k)
        beam, word = torch.div(index, V, rounding_mode="floor"), index % V
        src = rows * k + beam  # rows of the (B*k) tensors the candidates extend
        history = torch.cat([history[rows, beam], word.unsqueeze(2)], 2)
        alphas = torch.cat([alphas[rows, beam], alpha[src].unsqueeze(2)], 2)
        places = torch.cat([places[rows, beam], (s[src] if s is not None else torch.zeros_like(word)).unsqueeze(2)], 2)
        # retire the candidates among the k best that end, keeping each image's best
        is_end = word == end
        ended = is_end & torch.isfinite(top)
        ended[:, k:] = False
        rank, j = torch.where(ended, top / t ** length_penalty, inf).max(1)
        better = rank > done_rank
        done_rank = torch.where(better, rank, done_rank)
        done_log_p = torch.where(better, top[rows[:, 0], j], done_log_p)
        done_len = torch.where(better, t, done_len)
        pick = better.view(B, 1)
        done_history[:, :t] = torch.where(pick, history[rows[:, 0], j], done_history[:, :t])
        done_alphas[:, :t] = torch.where(pick.unsqueeze(2), alphas[rows[:, 0], j], done_alphas[:, :t])
        done_places[:, :t] = torch.where(pick, places[rows[:, 0], j], done_places[:, :t])
        # carry the k best unfinished candidates on
        score, keep = top.masked_fill(is_end, inf).topk(k, dim=1)
        history, alphas, places = history[rows, keep], alphas[rows, keep], places[rows, keep]
        chosen = src.gather(1, keep).view(-1)
        h, c, token = h[chosen], c[chosen], word.gather(1, keep).view(-1)
        # without a length penalty log-probabilities only fall: stop once nothing live can win
        if length_penalty == 0 and (done_rank >= score[:, 0]).all():
            break
    captions = []
    for i in range(B):
        if torch.isfinite(done_rank[i]):
            n = done_len[i].item()
            captions.append(Caption(done_history[i, :n - 1].tolist(), done_log_p[i].item(), True, done_alphas[i, :n],
                                    done_places[i, :n] if s is not None else None))
        else:  # nothing ended within max_len: the best live hypothesis
            captions.append(Caption(history[i, 0].tolist(), score[i, 0].item(), False, alphas[i, 0],
                                    places[i, 0] if s is not None else None))
    return captions
