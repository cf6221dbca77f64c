"""Turning a trained decoder into captions: batched greedy decoding and batched beam search.

Both run every image of a batch at once (beam search as one (B*k)-row tensor program), through
the decoder's own :meth:`~pipeline.model.decoder.Decoder.step` and :meth:`~pipeline.model.decoder.Decoder.output`.
The decoder's recurrent state is an opaque tuple of (rows, ...) tensors: beam search reorders it
by indexing every tensor alike, so another recurrent cell needs no change here.

Decoding settings come as a :class:`~pipeline.config.DecodeConfig` (beam size, length limit,
length penalty, whether ``<unk>`` may be emitted, whether a caption may repeat a trigram), the
special words' ids as the vocabulary's ``pad``, ``start``, ``end`` and ``unk``
(:class:`~pipeline.text.Vocabulary`). ``<pad>`` and ``<start>`` are never chosen, nor ``<unk>`` (or
a repeating trigram) where it is not allowed, but the log-probabilities reported are the model's
own (not renormalised without them).
"""

from dataclasses import dataclass, replace

import torch

from ..config import DECODE, DecodeConfig
from ..text import Vocabulary
from .compiled import cast_once
from .decoder import Decoder, in_autocast_dtype


def never_chosen(scores: torch.Tensor, vocab: Vocabulary, allow_unk: bool = False) -> torch.Tensor:
    """scores (..., V) over the vocabulary with those of the words a caption never holds set to
    -inf: ``<pad>`` and ``<start>``, and ``<unk>`` unless ``allow_unk``."""
    words = [vocab.pad, vocab.start, *([] if allow_unk else [vocab.unk])]
    return scores.index_fill(scores.dim() - 1, torch.tensor(words, device=scores.device), float("-inf"))


def repeating_trigrams(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """words (rows, t) long, each row a caption so far -> (rows, V) bool: the next words that would
    repeat one of the row's trigrams, i.e. those that followed an earlier occurrence of its last two
    words."""
    rows, t = words.shape
    repeats = torch.zeros(rows, vocab_size, device=words.device)
    if t >= 3:
        earlier = (words[:, :-2] == words[:, -2:-1]) & (words[:, 1:-1] == words[:, -1:])  # (rows, t - 2)
        repeats.scatter_reduce_(1, words[:, 2:], earlier.float(), reduce="amax")  # the words that followed them
    return repeats > 0


def next_word_log_probs(
    decoder: Decoder, embedded, state, z, vocab: Vocabulary, settings: DecodeConfig, words: torch.Tensor | None = None
):
    """log p(y_t | ...) of each row's next word: (rows, V) float32 (eq. 7's deep output, then a
    log-softmax, in float32 under autocast too), at -inf for the words :func:`never_chosen` names;
    with ``settings.block_trigrams``, also for the words that would repeat a trigram of the row's
    ``words`` so far ((rows, t) long; :func:`repeating_trigrams`)."""
    logits = decoder.output(embedded, decoder.hidden(state), z).float()  # (rows, V)
    log_p = never_chosen(torch.log_softmax(logits, dim=1), vocab, settings.allow_unk)
    if settings.block_trigrams and words is not None:
        log_p = log_p.masked_fill(repeating_trigrams(words, log_p.shape[1]), float("-inf"))
    return log_p


@torch.no_grad()
def free_run(
    decoder: Decoder,
    annotations: torch.Tensor,
    vocab: Vocabulary,
    settings: DecodeConfig = DECODE,
    context: str = "expected",
    sample: bool = False,
):
    """Free-running decoding of a batch, one word per step: the most probable, or with ``sample``
    a draw from p(y_t | ...) (``settings``' ``max_len`` and ``allow_unk``; its beam size and
    ``block_trigrams`` do not apply). Stops when every row has emitted ``<end>``.

    annotations: (B, L, D) float; context as in :meth:`Decoder.step` ('sample': hard attention's
    sampled locations). Returns tokens: (B, T) long (T <= max_len; positions after a row's
    ``<end>`` hold whatever was decoded there); alpha: (B, T, L) the attention weights of each
    step; locations: (B, T) long chosen locations, or None for 'expected'; mask: (B, T) float, 1
    up to and including each row's ``<end>``.
    """
    with cast_once(decoder):  # a compiled step under autocast: its weights cast once, not at every word
        annotations = in_autocast_dtype(annotations)  # (B, L, D)
        state, proj = decoder.init_state(annotations)  # opaque tuple of (B, ...); proj (B, L, A)
        token = torch.full((annotations.shape[0],), vocab.start, dtype=torch.long, device=annotations.device)  # (B,)
        live = torch.ones_like(token, dtype=torch.bool)  # (B,) not yet ended
        tokens, alphas, places, masks = [], [], [], []  # each step: (B,), (B, L), (B,) or None, (B,)
        for _ in range(settings.max_len):
            embedded = decoder.embedding(token)  # (B, m)
            state, z, alpha, _, s = decoder.step(embedded, state, annotations, proj, context)  # z (B, D), alpha (B, L)
            log_p = next_word_log_probs(decoder, embedded, state, z, vocab, settings)  # (B, V)
            token = torch.multinomial(log_p.float().exp(), 1).squeeze(1) if sample else log_p.argmax(1)  # (B,)
            tokens.append(token), alphas.append(alpha), places.append(s), masks.append(live.float())
            live = live & (token != vocab.end)
            if not live.any():
                break
    locations = torch.stack(places, 1) if places[0] is not None else None  # (B, T) or None
    return torch.stack(tokens, 1), torch.stack(alphas, 1), locations, torch.stack(masks, 1)


def greedy_decode(
    decoder: Decoder,
    annotations: torch.Tensor,
    vocab: Vocabulary,
    settings: DecodeConfig = DECODE,
    context: str = "expected",
):
    """The most probable word at each step (:func:`free_run`): tokens (B, T) long, to be cut at
    the first ``<end>``, and alpha (B, T, L)."""
    tokens, alpha, _, _ = free_run(decoder, annotations, vocab, settings, context)
    return tokens, alpha


@dataclass
class Hypothesis:
    """One decoded caption, as the model sees it (the Captioner's :class:`~pipeline.captioner.Caption`
    is its words): word ids without ``<end>``, the log-probability of the whole sequence
    (its ``<end>`` included when it has one; natural log), whether it ended within the length
    limit, the attention weights alpha (T, L) of each emitted token (``<end>`` included), and for
    hard attention with 'sample' or 'argmax' context the chosen locations (T,)."""

    tokens: list[int]
    log_prob: float
    ended: bool
    alpha: torch.Tensor
    locations: torch.Tensor | None = None


@torch.no_grad()
def beam_search(
    decoder: Decoder,
    annotations: torch.Tensor,
    vocab: Vocabulary,
    settings: DecodeConfig = DECODE,
    context: str = "expected",
) -> list[Hypothesis]:
    """Beam search over a batch of images at once: the best caption of each image, the first of
    :func:`n_best` (which see).
    annotations: (B, L, D) float. Returns one :class:`Hypothesis` per image."""
    return [found[0] for found in n_best(decoder, annotations, vocab, settings, context, 1)]


@torch.no_grad()
def n_best(
    decoder: Decoder,
    annotations: torch.Tensor,
    vocab: Vocabulary,
    settings: DecodeConfig = DECODE,
    context: str = "expected",
    n: int = 1,
) -> list[list[Hypothesis]]:
    """Beam search (beam size k = ``settings.beam_size``) over a batch of images at once, keeping
    the ``n`` (<= k) best captions of each image.

    annotations: (B, L, D) float. Each step expands the k live hypotheses of every image (a
    (B*k, V) tensor of scores), retires those of the k best that end in ``end`` to each image's
    pool of its n best finished ones and carries the k best unfinished ones on (from the 2k best,
    so k stay live).
    Hypotheses are ranked by log-probability divided by ``length ** settings.length_penalty``
    (length in tokens, ``<end>`` included; 0: plain log-probability).
    An image with fewer than n hypotheses ended within ``settings.max_len`` steps gets its best live one
    after them (``ended`` False). context as in :meth:`Decoder.step` ('expected' for soft attention).
    Beam search can prune the greedy caption's path (its prefix may drop out of the k best before
    it ends), so for k > 1 the greedy caption (this search with k = 1, 1/k more work) is decoded
    too and put first where it ranks higher: a larger beam never returns a worse-ranked caption.
    Returns per image its captions (:class:`Hypothesis`), best first.
    """
    annotations = in_autocast_dtype(annotations)  # once for both searches
    with cast_once(decoder):  # a compiled step under autocast: its weights cast once, not at every word
        found = _beam(decoder, annotations, vocab, settings, context, min(n, settings.beam_size))
        if settings.beam_size == 1:
            return found
        greedy = _beam(decoder, annotations, vocab, replace(settings, beam_size=1), context, 1)

    def rank(caption: Hypothesis):
        return caption.ended, caption.log_prob / (len(caption.tokens) + caption.ended) ** settings.length_penalty

    for captions, (g,) in zip(found, greedy):
        if rank(g) > rank(captions[0]) and all(g.tokens != c.tokens for c in captions):
            captions.insert(0, g)
            del captions[n:]
    return found


def _beam(decoder, annotations, vocab: Vocabulary, settings: DecodeConfig, context, n) -> list[list[Hypothesis]]:
    """The beam search of :func:`n_best` proper (without its greedy safeguard)."""
    B, L, _ = annotations.shape  # annotations (B, L, D)
    k, device, inf = settings.beam_size, annotations.device, float("-inf")
    max_len, length_penalty = settings.max_len, settings.length_penalty
    rows = torch.arange(B, device=device).unsqueeze(1)  # (B, 1)
    state, proj = decoder.init_state(annotations)  # opaque tuple of (B, ...); proj (B, L, A)
    state = tuple(x.repeat_interleave(k, 0) for x in state)  # (B*k, ...): k rows per image
    a, proj = annotations.repeat_interleave(k, 0), proj.repeat_interleave(k, 0)  # (B*k, L, D), (B*k, L, A)
    score = torch.full((B, k), inf, device=device)  # (B, k) live hypotheses' log-probabilities
    score[:, 0] = 0.0  # one live hypothesis to start with
    token = torch.full((B * k,), vocab.start, dtype=torch.long, device=device)  # (B*k,) their last words
    # live hypotheses (B, k, t, ...), and each image's n best finished ones (B, n, ...), best first
    history = torch.empty(B, k, 0, dtype=torch.long, device=device)  # (B, k, t) words
    alphas = torch.empty(B, k, 0, L, device=device)  # (B, k, t, L) attention weights
    places = torch.empty(B, k, 0, dtype=torch.long, device=device)  # (B, k, t) sampled locations
    done = _empty_pool(B, n, max_len, L, device)
    for t in range(1, max_len + 1):
        embedded = decoder.embedding(token)  # (B*k, m)
        state, z, alpha, _, s = decoder.step(embedded, state, a, proj, context)  # z (B*k, D); alpha (B*k, L)
        words = history.reshape(B * k, history.shape[2])  # (B*k, t - 1) each live hypothesis so far
        log_p = next_word_log_probs(decoder, embedded, state, z, vocab, settings, words)  # (B*k, V)
        V = log_p.shape[1]  # vocabulary size
        top, index = (score.view(B * k, 1) + log_p).view(B, k * V).topk(2 * k, dim=1)  # (B, 2k)
        beam, word = torch.div(index, V, rounding_mode="floor"), index % V  # (B, 2k) each
        src = rows * k + beam  # (B, 2k) rows of the (B*k) tensors the candidates extend
        history = torch.cat([history[rows, beam], word.unsqueeze(2)], 2)  # (B, 2k, t)
        alphas = torch.cat([alphas[rows, beam], alpha[src].unsqueeze(2)], 2)  # (B, 2k, t, L)
        step_places = s[src] if s is not None else torch.zeros_like(word)  # (B, 2k) sampled locations
        places = torch.cat([places[rows, beam], step_places.unsqueeze(2)], 2)  # (B, 2k, t)
        is_end = word == vocab.end  # (B, 2k)
        done = _retire(done, (is_end & torch.isfinite(top))[:, :k], top[:, :k], (history, alphas, places), t, settings)
        # carry the k best unfinished candidates on
        score, keep = top.masked_fill(is_end, inf).topk(k, dim=1)  # (B, k)
        history, alphas, places = history[rows, keep], alphas[rows, keep], places[rows, keep]  # (B, k, t, ...)
        chosen = src.gather(1, keep).view(-1)  # (B*k,)
        state = tuple(x[chosen] for x in state)  # (B*k, ...) each: the state of the hypotheses kept
        token = word.gather(1, keep).view(-1)  # (B*k,)
        # without a length penalty log-probabilities only fall: stop once nothing live can enter a pool
        if length_penalty == 0 and (done["rank"][:, -1] >= score[:, 0]).all():
            break
    return [_captions(done, i, history, alphas, places, score, s is not None) for i in range(B)]


def _empty_pool(B: int, n: int, max_len: int, L: int, device) -> dict:
    """Each of B images' pool of its n best finished captions, empty: 'rank' (the length-penalised
    score, -inf for an empty place), 'log_p', 'len' (B, n); 'history', 'places' (B, n, max_len)
    long; 'alphas' (B, n, max_len, L)."""
    inf = float("-inf")
    return {
        "rank": torch.full((B, n), inf, device=device),
        "log_p": torch.full((B, n), inf, device=device),
        "len": torch.zeros(B, n, dtype=torch.long, device=device),
        "history": torch.zeros(B, n, max_len, dtype=torch.long, device=device),
        "alphas": torch.zeros(B, n, max_len, L, device=device),
        "places": torch.zeros(B, n, max_len, dtype=torch.long, device=device),
    }


def _retire(done: dict, ended, log_p, paths: tuple, t: int, settings: DecodeConfig) -> dict:
    """The pools ``done`` (:func:`_empty_pool`) after the candidates of step ``t`` that end join
    them: ended (B, k) bool and log_p (B, k), of the k best candidates; ``paths``: their (history,
    alphas, places), (B, >= k, t, ...). Each pool keeps its n best by log_p / t**length_penalty."""
    history, alphas, places = (x[:, : ended.shape[1]] for x in paths)
    candidates = {
        "rank": torch.where(ended, log_p / t**settings.length_penalty, float("-inf")),
        "log_p": log_p,
        "len": torch.full_like(ended, t, dtype=torch.long),
        "history": _pad(history, settings.max_len),
        "alphas": _pad(alphas, settings.max_len),
        "places": _pad(places, settings.max_len),
    }  # (B, k, ...)
    pooled = {key: torch.cat([done[key], candidates[key]], 1) for key in done}  # (B, n + k, ...)
    pick = pooled["rank"].topk(done["rank"].shape[1], dim=1).indices  # (B, n)
    rows = torch.arange(pick.shape[0], device=pick.device).unsqueeze(1)
    return {key: value[rows, pick] for key, value in pooled.items()}  # (B, n, ...)


def _pad(x: torch.Tensor, length: int) -> torch.Tensor:
    """x (B, k, t, ...) zero-padded along t to ``length``."""
    return torch.cat([x, x.new_zeros(*x.shape[:2], length - x.shape[2], *x.shape[3:])], 2)


def _captions(done: dict, i: int, history, alphas, places, score, sampled: bool) -> list[Hypothesis]:
    """Image i's finished captions, best first, then its best live hypothesis if fewer than n ended."""
    captions = []
    for j in range(done["rank"].shape[1]):
        if torch.isfinite(done["rank"][i, j]):
            n = done["len"][i, j].item()
            captions.append(
                Hypothesis(
                    done["history"][i, j, : n - 1].tolist(),
                    done["log_p"][i, j].item(),
                    True,
                    done["alphas"][i, j, :n],
                    done["places"][i, j, :n] if sampled else None,
                )
            )
    if len(captions) < done["rank"].shape[1]:  # nothing (more) ended within max_len: the best live one
        captions.append(
            Hypothesis(
                history[i, 0].tolist(), score[i, 0].item(), False, alphas[i, 0], places[i, 0] if sampled else None
            )
        )
    return captions
