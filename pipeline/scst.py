"""Self-critical sequence training (Rennie et al. 2017, arXiv 1612.00563): the decoder's own
sampled captions, rewarded by their CIDEr-D, trained with REINFORCE.

For each image of a minibatch, k captions are sampled from the model (words from p(y_t | ...),
``<unk>`` excluded; for hard attention also the locations s_t ~ alpha_t, eq. 8), each is scored by
CIDEr-D against the image's references (:class:`pipeline.cider.CiderD`, document frequencies over
the training references), and its sampled tokens' log-probabilities are weighted by its
advantage, the reward minus a baseline:

- 'mean' (default; the "new SCST" of self-critical.pytorch, Luo 2020): the mean reward of the
  image's other k-1 samples, independent of the sample itself, so the estimate stays unbiased;
- 'greedy' (Rennie et al.): the reward of the image's greedy caption (test-time inference).

loss = -sum_samples (r - b) sum_t log p(w_t) / (sampled tokens, ``<end>`` included), the mean over
tokens of self-critical.pytorch's RewardCriterion. The captions are sampled without gradients,
then scored by one teacher-forced pass with them (:func:`log_probs`), whose output layer runs once
over all steps: several times faster on a CPU than keeping the sampling loop's graph. Dropout is
off in both, so the policy sampled is the one differentiated. Hard attention: the reward is a function of the
whole sample, words and locations together, so the score function is that of their joint
probability: each sampled location's log alpha_{t, s_t} receives the same advantage as the words
(the paper's eq. 11, with CIDEr-D in place of log p(y | s, a)). Soft attention's context is
deterministic and gets its gradient through the words' log-probabilities.
"""

import torch

from .cider import CiderD
from .config import DecodeConfig
from .decode import greedy_decode, next_word_log_probs
from .model import Decoder, in_autocast_dtype
from .text import Vocabulary


@torch.no_grad()
def sample(decoder: Decoder, annotations: torch.Tensor, vocab: Vocabulary, max_len: int, context: str):
    """Sample one caption per row (no gradients; :func:`log_probs` scores the samples).

    annotations: (N, L, D) float (repeat an image's rows for several samples); context: 'expected'
    (soft attention) or 'sample' (hard: sampled locations).
    Returns tokens: (N, T) long sampled words, ``<unk>`` never (after a row's ``<end>``: padding);
    locations: (N, T) long sampled locations s_t, or None for 'expected'; mask: (N, T) float, 1 up
    to and including each row's ``<end>``.
    """
    annotations = in_autocast_dtype(annotations)  # (N, L, D)
    state, proj = decoder.init_state(annotations)  # opaque tuple of (N, ...); proj (N, L, A)
    token = torch.full((len(annotations),), vocab.start, dtype=torch.long, device=annotations.device)  # (N,)
    live = torch.ones_like(token, dtype=torch.bool)  # (N,) not yet ended
    settings = DecodeConfig(max_len=max_len)  # <unk> is never sampled
    tokens, places, masks = [], [], []  # each step: (N,)
    for _ in range(max_len):
        embedded = decoder.embedding(token)  # (N, m)
        state, z, _, _, s = decoder.step(embedded, state, annotations, proj, context)  # z (N, D), s (N,) or None
        log_p = next_word_log_probs(decoder, embedded, state, z, vocab, settings)  # (N, V)
        token = torch.multinomial(log_p.float().exp(), 1).squeeze(1)  # (N,)
        tokens.append(token), places.append(s), masks.append(live.float())
        live = live & (token != vocab.end)
        if not live.any():
            break
    locations = torch.stack(places, 1) if places[0] is not None else None  # (N, T) or None
    return torch.stack(tokens, 1), locations, torch.stack(masks, 1)  # (N, T) each


def log_probs(decoder: Decoder, annotations, tokens, locations, vocab: Vocabulary) -> torch.Tensor:
    """log-probability of each sampled token under the sampling policy (``<unk>`` excluded), plus
    for hard attention that of its sampled location log alpha_{t, s_t}, by one teacher-forced pass
    with gradients (the output layer runs once over all steps, as in XE training).

    annotations: (N, L, D); tokens, locations: (N, T) as :func:`sample` returns them.
    Returns (N, T) float.
    """
    captions = torch.cat([torch.full_like(tokens[:, :1], vocab.start), tokens], 1)  # (N, T+1)
    out = decoder(annotations, captions, "expected" if locations is None else locations)  # logits (N, T, V)
    logits = out.logits.float().index_fill(2, torch.tensor([vocab.unk], device=tokens.device), float("-inf"))
    token_log_p = torch.log_softmax(logits, 2).gather(2, tokens.unsqueeze(2)).squeeze(2)  # (N, T)
    if locations is not None:
        token_log_p = (
            token_log_p + out.alpha.float().gather(2, locations.unsqueeze(2)).squeeze(2).clamp_min(1e-12).log()
        )
    return token_log_p


def scst_loss(
    decoder: Decoder,
    annotations: torch.Tensor,
    images: list[int],
    vocab: Vocabulary,
    cider: CiderD,
    samples: int,
    baseline: str,
    max_len: int,
    context: str,
):
    """The self-critical loss of a minibatch of images (the module docstring).

    annotations: (B, L, D) float; images: the B images' indices into ``cider``'s references;
    samples: k captions sampled per image (k >= 2 for the 'mean' baseline); context: 'expected'
    (soft) or 'sample' (hard attention).
    Returns (loss: 0-dim tensor, stats: {'reward': mean CIDEr-D of the samples, 'baseline': mean
    baseline, 'reward_rms': root mean square of the advantages, 'greedy_reward' for 'greedy'}).
    """
    k, was_training = samples, decoder.training
    decoder.eval()  # no dropout: the policy sampled is the policy differentiated
    repeated = annotations.repeat_interleave(k, 0)  # (B*k, L, D)
    tokens, locations, mask = sample(decoder, repeated, vocab, max_len, context)  # (B*k, T) each
    log_p = log_probs(decoder, repeated, tokens, locations, vocab)  # (B*k, T)
    rewards = torch.tensor(
        [cider.score(images[row // k], vocab.decode(t)) for row, t in enumerate(tokens.tolist())],
        device=log_p.device,
    ).view(-1, k)  # (B, k)
    stats = {}
    if baseline == "mean":
        base = (rewards.sum(1, keepdim=True) - rewards) / (k - 1)  # (B, k) the others' mean
    else:
        greedy, _ = greedy_decode(decoder, annotations, vocab, DecodeConfig(max_len=max_len))  # (B, T) expected context
        greedy_rewards = torch.tensor(
            [cider.score(i, vocab.decode(t)) for i, t in zip(images, greedy.tolist())], device=log_p.device
        )  # (B,)
        base = greedy_rewards.unsqueeze(1).expand_as(rewards)  # (B, k)
        stats["greedy_reward"] = greedy_rewards.mean().item()
    decoder.train(was_training)
    advantage = (rewards - base).view(-1, 1)  # (B*k, 1)
    loss = -(advantage * log_p * mask).sum() / mask.sum()
    stats.update(
        reward=rewards.mean().item(), baseline=base.mean().item(), reward_rms=advantage.pow(2).mean().sqrt().item()
    )
    return loss, stats
