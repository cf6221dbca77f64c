"""Self-critical sequence training (Rennie et al. 2017, arXiv 1612.00563): the decoder's own
sampled captions, rewarded by their CIDEr-D, trained with REINFORCE.

For each image of a minibatch, k captions are sampled from the model (words from p(y_t | ...),
``<unk>``, ``<pad>`` and ``<start>`` excluded; for hard attention also the locations s_t ~ alpha_t,
eq. 8), each is scored by
CIDEr-D against the image's references (:class:`pipeline.eval.cider.CiderD`, document frequencies over
the training references; :class:`Reward`, optionally plus a weight times its sentence BLEU-4), and
its sampled tokens' log-probabilities are weighted by its advantage, the reward minus a baseline:

- 'mean' (default; the "new SCST" of self-critical.pytorch, Luo 2020): the mean reward of the
  image's other k-1 samples, independent of the sample itself, so the estimate stays unbiased;
- 'greedy' (Rennie et al.): the reward of the image's greedy caption (test-time inference).

loss = -sum_samples (r - b) sum_t log p(w_t) / (sampled tokens, ``<end>`` included), the mean over
tokens of self-critical.pytorch's RewardCriterion; ``--scst-xe-weight`` adds that weight times the
references' cross-entropy per word (:func:`reference_nll`), a mixed objective (Paulus et al. 2018).
The captions are sampled without gradients (:func:`pipeline.model.decode.free_run`, the loop of greedy
decoding with a draw in place of the argmax), then scored by one teacher-forced pass with them
(:func:`log_probs`), whose output layer runs once over all steps: several times faster on a CPU than
keeping the sampling loop's graph. Dropout is off in both, so the policy sampled is the one
differentiated (the references' cross-entropy keeps it, as XE training). Hard attention: the reward
is a function of the whole sample, words and locations together, so the score function is that of
their joint probability: each sampled location's log alpha_{t, s_t} receives the same advantage as
the words (the paper's eq. 11, with CIDEr-D in place of log p(y | s, a)). Soft attention's context
is deterministic and gets its gradient through the words' log-probabilities.
"""

import torch
from pycocoevalcap.bleu.bleu import Bleu
from torch.nn.utils.rnn import pad_sequence

from ..config import DecodeConfig
from ..eval.cider import CiderD
from ..model.decode import free_run, greedy_decode, never_chosen
from ..model.decoder import Decoder
from ..text import Vocabulary


class Reward:
    """The reward of a sampled caption: its CIDEr-D against its image's references, plus
    ``bleu_weight`` times its BLEU-4 as a sentence (pycocoevalcap's Bleu, per caption, the closest
    reference length; self-critical.pytorch's ``--bleu_reward_weight``), both on the 0-1 scale.

    references: per image, its reference captions as word lists (document frequencies of CIDEr-D
    over them, :class:`pipeline.eval.cider.CiderD`); bleu_weight: >= 0, 0 for CIDEr-D alone.
    ``reward(images, captions)``: images, a list of indices into ``references``; captions, one
    word list each -> list of floats. Raises ValueError as :class:`~pipeline.eval.cider.CiderD`.
    """

    def __init__(self, references: list[list[list[str]]], bleu_weight: float = 0.0):
        self.cider = CiderD(references)
        self.bleu_weight = bleu_weight
        self.references = [[" ".join(r) for r in refs] for refs in references]

    def __call__(self, images: list[int], captions: list[list[str]]) -> list[float]:
        rewards = [self.cider.score(i, words) for i, words in zip(images, captions)]
        if not self.bleu_weight:
            return rewards
        references = {n: self.references[i] for n, i in enumerate(images)}
        hypotheses = {n: [" ".join(words)] for n, words in enumerate(captions)}
        bleu4 = Bleu(4).compute_score(references, hypotheses, verbose=0)[1][3]  # per caption, in key order
        return [r + self.bleu_weight * b for r, b in zip(rewards, bleu4)]


def log_probs(decoder: Decoder, annotations, tokens, locations, vocab: Vocabulary) -> torch.Tensor:
    """log-probability of each sampled token under the sampling policy (the words
    :func:`pipeline.model.decode.never_chosen` names excluded), plus
    for hard attention that of its sampled location log alpha_{t, s_t}, by one teacher-forced pass
    with gradients (the output layer runs once over all steps, as in XE training).

    annotations: (N, L, D); tokens, locations: (N, T) as :func:`pipeline.model.decode.free_run` with
    ``sample`` returns them.
    Returns (N, T) float.
    """
    captions = torch.cat([torch.full_like(tokens[:, :1], vocab.start), tokens], 1)  # (N, T+1)
    out = decoder(annotations, captions, "expected" if locations is None else locations)  # logits (N, T, V)
    logits = never_chosen(out.logits.float(), vocab)  # (N, T, V): the policy sampled never draws these
    token_log_p = torch.log_softmax(logits, 2).gather(2, tokens.unsqueeze(2)).squeeze(2)  # (N, T)
    if locations is not None:
        token_log_p = (
            token_log_p + out.alpha.float().gather(2, locations.unsqueeze(2)).squeeze(2).clamp_min(1e-12).log()
        )
    return token_log_p


def reference_nll(decoder: Decoder, annotations: torch.Tensor, references: list[list[list[int]]], vocab: Vocabulary):
    """The negative log-likelihood per word of the images' reference captions, teacher-forced with
    the expected context (XE training's term, eq. 14 without the regulariser, averaged over words),
    dropout as the decoder's mode has it: the cross-entropy of ``--scst-xe-weight``.

    annotations: (B, L, D) float; references: per image, its captions as token ids ``<start> ...
    <end>`` (padded here to the longest; the padding is left out of the mean).
    Returns a 0-dim float tensor, nats per word (``<end>`` included).
    """
    rows = [(i, torch.tensor(c)) for i, caps in enumerate(references) for c in caps]
    captions = pad_sequence([c for _, c in rows], batch_first=True, padding_value=vocab.pad)  # (R, T+1)
    captions = captions.to(annotations.device)
    owners = torch.tensor([i for i, _ in rows], device=annotations.device)  # (R,)
    out = decoder(annotations[owners], captions, "expected")  # logits (R, T, V)
    targets = captions[:, 1:]  # (R, T)
    nll = -out.logits.float().log_softmax(-1).gather(2, targets.unsqueeze(2)).squeeze(2)  # (R, T)
    mask = targets != vocab.pad
    return (nll * mask).sum() / mask.sum()


def scst_loss(
    decoder: Decoder,
    annotations: torch.Tensor,
    images: list[int],
    vocab: Vocabulary,
    reward: Reward,
    samples: int,
    baseline: str,
    max_len: int,
    context: str,
):
    """The self-critical loss of a minibatch of images (the module docstring).

    annotations: (B, L, D) float; images: the B images' indices into ``reward``'s references;
    samples: k captions sampled per image (k >= 2 for the 'mean' baseline); context: 'expected'
    (soft) or 'sample' (hard attention).
    Returns (loss: 0-dim tensor, stats: {'reward': mean reward of the samples, 'baseline': mean
    baseline, 'reward_rms': root mean square of the advantages, 'greedy_reward' for 'greedy'}).
    """
    k, was_training = samples, decoder.training
    decoder.eval()  # no dropout: the policy sampled is the policy differentiated
    repeated = annotations.repeat_interleave(k, 0)  # (B*k, L, D)
    settings = DecodeConfig(max_len=max_len)  # <unk>, <pad> and <start> are never sampled
    tokens, _, locations, mask = free_run(decoder, repeated, vocab, settings, context, sample=True)  # (B*k, T) each
    log_p = log_probs(decoder, repeated, tokens, locations, vocab)  # (B*k, T)
    rewards = torch.tensor(
        reward([images[row // k] for row in range(len(tokens))], [vocab.decode(t) for t in tokens.tolist()]),
        device=log_p.device,
    ).view(-1, k)  # (B, k)
    stats = {}
    if baseline == "mean":
        base = (rewards.sum(1, keepdim=True) - rewards) / (k - 1)  # (B, k) the others' mean
    else:
        greedy, _ = greedy_decode(decoder, annotations, vocab, settings)  # (B, T), expected context
        greedy_rewards = torch.tensor(reward(images, [vocab.decode(t) for t in greedy.tolist()]), device=log_p.device)
        base = greedy_rewards.unsqueeze(1).expand_as(rewards)  # (B, k)
        stats["greedy_reward"] = greedy_rewards.mean().item()
    decoder.train(was_training)
    advantage = (rewards - base).view(-1, 1)  # (B*k, 1)
    loss = -(advantage * log_p * mask).sum() / mask.sum()
    stats.update(
        reward=rewards.mean().item(), baseline=base.mean().item(), reward_rms=advantage.pow(2).mean().sqrt().item()
    )
    return loss, stats
