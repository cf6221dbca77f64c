"""The attention LSTM decoder of Show, Attend and Tell (Xu et al. 2015, sections 3 and 4).

Notation follows the paper: annotation vectors a_i (i = 1..L, each of size D), attention weights
alpha_ti, gating scalar beta_t, context vector z_t, hidden state h_t, embedding matrix E.

One decoding step (:meth:`Decoder.step`), shared by training and every decoding method:

    e_ti    = w^T tanh(W_a a_i + W_h h_{t-1} + b)            eq. 4 (f_att, an MLP)
    alpha_t = softmax_i(e_t)                                  eq. 5
    beta_t  = sigmoid(w_beta^T h_{t-1} + b_beta)              section 4.2.1, a scalar per step
    z_t     = beta_t * sum_i alpha_ti a_i                     soft attention, eq. 13 ("expected")
            = beta_t * a_{s_t},  s_t ~ Multinoulli(alpha_t)   hard attention, eq. 8-9 ("sample")
    i,f,o,g = W_e E y_{t-1} + W_hh h_{t-1} + W_z z_t + b      eq. 1
    c_t, h_t = the LSTM update                                eq. 2-3
    p(y_t)  ∝ exp(L_o(E y_{t-1} + L_h h_t + L_z z_t))        eq. 7, the deep output layer

Initial state (section 3.1.2): h_0 = tanh(f_init,h(mean_i a_i)), c_0 = tanh(f_init,c(mean_i a_i)).
Speed: W_a a_i is computed once per caption, not at every step, and the output layer runs once
over all steps after the recurrence.
"""

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..config import CONTEXTS, DecoderConfig, ObjectiveConfig
from ..io.errors import PipelineError, param
from .compiled import cast_once, compiled_step


def attention_entropy(alpha: torch.Tensor) -> torch.Tensor:
    """H(alpha_t) in nats: alpha (..., L) attention weights -> (...); log L when uniform."""
    return -(alpha * alpha.clamp_min(1e-12).log()).sum(-1)


def in_autocast_dtype(annotations: torch.Tensor) -> torch.Tensor:
    """annotations (B, L, D) in autocast's dtype where autocast is on for their device (else as
    given): cast once per batch. Left in float32, every step's context bmm (eq. 13) would cast the
    whole (B, L, D) again, T times per caption (bench/RESULTS.md, training profile)."""
    device = annotations.device.type
    return annotations.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else annotations


def _tanh_energies(projected, att_h, w, b):
    """f_att's e (N, L) = w^T tanh(projected + att_h) + b, tanh as 2 sigmoid(2x) - 1, as one
    expression for inductor to fuse: projected (N, L, A), att_h (N, A), w (A,), b scalar."""
    x = projected + att_h.unsqueeze(1)
    return ((2 * torch.sigmoid(2 * x) - 1) * w).sum(2) + b


def _keep_sigmoid(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective activation checkpointing's policy for :func:`_tanh_energies` in a compiled
    step: the sigmoid's output is saved for the backward pass, the rest recomputed as inductor
    chooses. Left to itself, inductor's partitioner saves the inputs and evaluates the sigmoid
    again in the backward graph, one more exp and division per element of (N, L, A) at every
    word; keeping it makes compiled bf16 training steps faster (docs/benchmarks.md)."""
    return CheckpointPolicy.MUST_SAVE if op is torch.ops.aten.sigmoid.default else CheckpointPolicy.PREFER_RECOMPUTE


_KEEP_SIGMOID = partial(create_selective_checkpoint_contexts, _keep_sigmoid)


class AttentionTanh(torch.autograd.Function):
    """tanh(proj + att_h) of f_att (eq. 4): proj (N, L, A), att_h (N, A) -> (N, L, A), the
    decoding step's largest tensor, so computed in place in the sum's one allocation.
    On a CPU as 2 sigmoid(2x) - 1 (within 2e-7 of tanh in float32, 1 bf16 ulp): PyTorch's CPU tanh
    kernel is several times slower than its sigmoid kernel, and f_att's tanh was a batched decoding
    step's largest cost (bench/RESULTS.md section 3 measures both).
    The backward pass keeps only the output, as tanh's own does: d tanh = 1 - tanh^2."""

    @staticmethod
    def forward(ctx, proj, att_h):
        x = proj + att_h.unsqueeze(1)
        y = x.mul_(2).sigmoid_().mul_(2).sub_(1) if x.device.type == "cpu" else x.tanh_()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        grad_x = torch.ops.aten.tanh_backward(grad, y)  # grad * (1 - y^2), one pass
        return grad_x, grad_x.sum(1)


class Attention(nn.Module):
    """The attention of Show, Attend and Tell: the MLP f_att (eq. 4), its softmax (eq. 5) and the
    context vector (eq. 13 soft, eq. 8-9 hard), before the gating scalar.

    annotation: W_a a_i + b, computed once per caption (:meth:`project`); with ``layers`` 2, a
    second linear layer on the annotation side, as the authors' COCO configuration has it
    (``n_layers_att=2``: no non-linearity between the two, the note in their code says so);
    hidden: W_h h_{t-1}; score: w, so e_ti = w^T tanh(annotation(a_i) + W_h h_{t-1}).
    ``input_scale``: f_att sees a_i / input_scale; PipelineError unless it is positive.
    """

    def __init__(
        self, annotation_dim: int, hidden_dim: int, attention_dim: int, layers: int = 1, input_scale: float = 1.0
    ):
        super().__init__()
        D, A = annotation_dim, attention_dim
        if not input_scale > 0:  # 0 stands for the annotation vectors' RMS: pipeline.train.loop.new_decoder_config
            raise PipelineError(
                f"attention_input_scale {input_scale}: give a positive number (training resolves 0 to the RMS of the "
                "training annotation vectors: pipeline.train.loop.new_decoder_config)"
            )
        self.input_scale = input_scale  # f_att sees a_i / input_scale (DecoderConfig.attention_input_scale)
        self.annotation = nn.Sequential(nn.Linear(D, A), *[nn.Linear(A, A) for _ in range(layers - 1)])  # W_a
        self.hidden = nn.Linear(hidden_dim, A, bias=False)  # W_h
        self.score = nn.Linear(A, 1)  # w

    def project(self, annotations: torch.Tensor) -> torch.Tensor:
        """annotations (B, L, D) -> projected (B, L, A): the annotation side of f_att."""
        return self.annotation(annotations / self.input_scale)

    def energies(self, projected: torch.Tensor, att_h: torch.Tensor) -> torch.Tensor:
        """e (N, L) from projected (N, L, A) and att_h (N, A) = W_h h_{t-1}; the tanh by
        :class:`AttentionTanh`. Decoding on a CPU, in blocks of rows whose (rows, L, A) sum stays
        in cache (about 2 MiB): the whole (B*k, L, A) of a batched beam goes to memory and back
        (bench/RESULTS.md). Compiled (:mod:`pipeline.model.compiled`), the whole as one expression, which
        inductor fuses into one pass over (N, L, A): the product with w as a sum, and tanh as
        2 sigmoid(2x) - 1, as :class:`AttentionTanh` (inductor's CPU tanh is as slow as PyTorch's).
        Compiled with gradients on a CPU, the sigmoid's (N, L, A) output is kept for the backward
        pass (:func:`_keep_sigmoid`), as :class:`AttentionTanh` keeps its output."""
        if torch.compiler.is_compiling():
            args = (projected, att_h, self.score.weight[0], self.score.bias)
            if not torch.is_grad_enabled() or projected.device.type != "cpu":
                return _tanh_energies(*args)
            return checkpoint(_tanh_energies, *args, use_reentrant=False, context_fn=_KEEP_SIGMOID)
        if torch.is_grad_enabled() or projected.device.type != "cpu":
            return self.score(AttentionTanh.apply(projected, att_h)).squeeze(2)
        rows = max(1, (1 << 21) // (projected.shape[1] * projected.shape[2] * projected.element_size()))
        return torch.cat(
            [self.score(AttentionTanh.apply(p, a)).squeeze(2) for p, a in zip(projected.split(rows), att_h.split(rows))]
        )

    def forward(self, annotations: torch.Tensor, projected: torch.Tensor, h: torch.Tensor, context="expected"):
        """One step's attention.

        annotations: (B, L, D); projected: (B, L, A) from :meth:`project`; h: (B, n) h_{t-1};
        context: 'expected' (soft attention: z = sum_i alpha_i a_i), 'sample' (s ~
        Multinoulli(alpha)), 'argmax', or a (B,) long tensor of given locations.
        Returns alpha: (B, L) attention weights; z: (B, D) context vector (before the gating
        scalar); s: (B,) long chosen locations, or None for 'expected'.
        Raises PipelineError for an unknown context.
        """
        alpha = torch.softmax(self.energies(projected, self.hidden(h)), dim=1)  # (B, L), eq. 5
        if isinstance(context, str) and context == "expected":
            return alpha, torch.bmm(alpha.unsqueeze(1), annotations).squeeze(1), None  # eq. 13
        if torch.is_tensor(context):
            s = context
        elif context == "sample":
            s = torch.multinomial(alpha.detach(), 1).squeeze(1)  # eq. 8
        elif context == "argmax":
            s = alpha.argmax(1)
        else:
            raise PipelineError(f"unknown context {context!r}; choose one of {', '.join(CONTEXTS)}")
        return alpha, annotations[torch.arange(len(s), device=s.device), s], s  # eq. 9


def upgrade_state_dict(weights: dict, config: DecoderConfig) -> dict:
    """A decoder state dict written before the :class:`Attention` module (main at 103e4ad and
    earlier: one Linear ``hidden_proj`` held the LSTM's W_hh, f_att's W_h and the gate's w_beta,
    each with a bias) in this version's keys; others are returned as they are. f_att's two biases
    (both added before its tanh) become the annotation side's one.
    Raises PipelineError for the former 2-layer attention (a second layer after the tanh, which
    this version replaced with the authors' layer on the annotation side)."""
    if "hidden_proj.weight" not in weights:
        return weights
    if any(k.startswith("att_extra.") for k in weights):
        raise PipelineError(
            "written with the former 2-layer attention (its second layer after the tanh), which is "
            f"not the authors' and is gone: retrain with {param('attention_layers', 2)}"
        )
    n, A = config.hidden_dim, config.attention_dim
    W, b = weights["hidden_proj.weight"], weights["hidden_proj.bias"]  # (4n + A + 1, n), (4n + A + 1,)
    moved = {
        "lstm_hidden.weight": W[: 4 * n],
        "lstm_hidden.bias": b[: 4 * n],
        "gate.weight": W[-1:],
        "gate.bias": b[-1:],
        "attention.hidden.weight": W[4 * n : 4 * n + A],
        "attention.annotation.0.weight": weights["att_annotation.weight"],
        "attention.annotation.0.bias": weights["att_annotation.bias"] + b[4 * n : 4 * n + A],
        "attention.score.weight": weights["att_score.weight"],
        "attention.score.bias": weights["att_score.bias"],
    }
    kept = {k: v for k, v in weights.items() if not k.startswith(("hidden_proj.", "att_annotation.", "att_score."))}
    return {**kept, **{k: v.clone() for k, v in moved.items()}}


@dataclass
class DecoderOutput:
    """What a teacher-forced pass returns (B captions, T predicted steps, L locations).

    logits: (B, T, V) float, unnormalised log p(y_t); alpha: (B, T, L) attention weights;
    beta: (B, T) gating scalars; log_p_s: (B,) sum_t log alpha_{t, s_t} of the chosen locations
    (sampled, argmax or given; zeros for context='expected'); entropy: (B, T) H(alpha_t) of each
    word in nats.
    """

    logits: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    log_p_s: torch.Tensor
    entropy: torch.Tensor


class Decoder(nn.Module):
    """LSTM decoder with soft or hard attention over L annotation vectors of size D."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        c = self.config = config
        D, m, n, A = c.annotation_dim, c.embed_dim, c.hidden_dim, c.attention_dim
        self.embedding = nn.Embedding(c.vocab_size, m)  # E
        self.init_h, self.init_c = nn.Linear(D, n), nn.Linear(D, n)  # f_init
        self.attention = Attention(D, n, A, c.attention_layers, c.attention_input_scale)  # f_att
        self.lstm_hidden = nn.Linear(n, 4 * n)  # W_hh h_{t-1} + b of eq. 1
        self.gate = nn.Linear(n, 1)  # w_beta, b_beta: the gating scalar (section 4.2.1)
        self.input_embed = nn.Linear(m, 4 * n, bias=False)  # W_e
        self.input_context = nn.Linear(D, 4 * n, bias=False)  # W_z
        self.out_hidden = nn.Linear(n, m)  # L_h
        self.out_context = nn.Linear(D, m, bias=False) if c.ctx2out else None  # L_z
        self.out_vocab = nn.Linear(m, c.vocab_size)  # L_o
        self.drop = nn.Dropout(c.dropout)
        self.compiled = False  # run :meth:`step` compiled (pipeline.model.compiled)
        with torch.no_grad():  # the forget gate's bias 1 (Jozefowicz et al. 2015); gates in order i, f, o, g
            self.lstm_hidden.bias[n : 2 * n].fill_(1.0)

    # -- the pieces -------------------------------------------------------------------------------

    def init_state(self, annotations: torch.Tensor) -> tuple[tuple, torch.Tensor]:
        """The initial recurrent state and the attention's projection of the annotation vectors.

        annotations: (B, L, D) float. Returns state: a tuple of (B, ...) tensors, here (h_0, c_0),
        each (B, n) (callers treat it as opaque: rows are images or beams, reordered by indexing
        every tensor alike; :meth:`hidden` gives h); proj: (B, L, A).
        """
        mean = annotations.mean(1)  # (B, D)
        state = (torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean)))  # (B, n) each
        return state, self.attention.project(annotations)

    @staticmethod
    def hidden(state: tuple) -> torch.Tensor:
        """h_t (B, n), what the deep output layer reads, of a recurrent ``state``."""
        return state[0]

    def step(self, embedded, state: tuple, annotations, proj, context: str = "expected"):
        """One step of attention and LSTM (the module docstring's equations).

        embedded: (B, m) E y_{t-1}; state: the recurrent state t-1 (:meth:`init_state`);
        annotations: (B, L, D); proj: (B, L, A) from :meth:`init_state`; context: as in
        :meth:`Attention.forward`.
        Returns state: state t; z: (B, D) context vector; alpha: (B, L); beta: (B,);
        s: (B,) long chosen locations (None for 'expected').
        With ``compiled`` set, the step runs as one compiled graph (:mod:`pipeline.model.compiled`).
        """
        if self.compiled and not torch.compiler.is_compiling():
            return compiled_step(self, embedded, state, annotations, proj, context)
        h, c = state  # (B, n) each
        alpha, z, s = self.attention(annotations, proj, h, context)  # (B, L), (B, D), (B,) or None
        beta_logit = self.gate(h).squeeze(1)  # (B,)
        beta = torch.sigmoid(beta_logit) if self.config.gating else torch.ones_like(beta_logit)
        z = beta.unsqueeze(1) * z  # (B, D)
        gates = self.lstm_hidden(h) + self.input_embed(embedded) + self.input_context(z)  # (B, 4n), eq. 1
        i, f, o, g = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)  # eq. 2
        h = torch.sigmoid(o) * torch.tanh(c)  # eq. 3
        return (h, c), z, alpha, beta, s

    def output(self, embedded, h, z) -> torch.Tensor:
        """Deep output layer (eq. 7): logits (..., V) from E y_{t-1} (..., m), h_t (..., n) and
        z_t (..., D), with dropout on h_t and on the layer."""
        x = self.out_hidden(self.drop(h))
        if self.config.prev2out:
            x = x + embedded
        if self.out_context is not None:
            x = x + self.out_context(z)
        if self.config.output_tanh:
            x = torch.tanh(x)
        return self.out_vocab(self.drop(x))

    # -- teacher forcing ---------------------------------------------------------------------------

    def forward(self, annotations: torch.Tensor, captions: torch.Tensor, context: str = "expected") -> DecoderOutput:
        """Teacher-forced pass over whole captions.

        annotations: (B, L, D) float; captions: (B, T+1) long, ``<start> w_1 ... w_T``, where the
        last token is ``<end>`` for a full caption (all captions of a batch have one length, as in
        the paper's length-bucketed minibatches, section 4.3). Predicts tokens 1..T from 0..T-1.
        context: as in :meth:`step`, or a (B, T) long tensor of given locations per step.
        """
        with cast_once(self):  # a compiled step under autocast: its weights cast once, not at every word
            annotations = in_autocast_dtype(annotations)
            state, proj = self.init_state(annotations)
            embedded = self.embedding(captions[:, :-1])  # (B, T, m)
            hs, zs, alphas, betas, log_p_s = [], [], [], [], 0.0
            for t in range(embedded.shape[1]):
                step_context = context[:, t] if torch.is_tensor(context) else context
                state, z, alpha, beta, s = self.step(embedded[:, t], state, annotations, proj, step_context)
                hs.append(self.hidden(state)), zs.append(z), alphas.append(alpha), betas.append(beta)
                if s is not None:
                    log_p_s = log_p_s + alpha.gather(1, s.unsqueeze(1)).squeeze(1).clamp_min(1e-12).log()
            logits = self.output(embedded, torch.stack(hs, 1), torch.stack(zs, 1))
            alpha = torch.stack(alphas, 1)  # (B, T, L)
            entropy = attention_entropy(alpha)  # (B, T)
            log_p_s = log_p_s if torch.is_tensor(log_p_s) else torch.zeros_like(entropy[:, 0])
            return DecoderOutput(logits, alpha, torch.stack(betas, 1), log_p_s, entropy)


def objective(
    out: DecoderOutput,
    captions: torch.Tensor,
    cfg: ObjectiveConfig,
    sampled: bool = False,
    baseline: float | None = None,
):
    """The loss to minimise and its parts.

    Soft attention / expected context (eq. 14): the summed NLL of each caption (with
    ``label_smoothing`` eps, not in the paper: (1 - eps) NLL + eps times the mean over the vocabulary
    of -log p, per word), averaged over the batch, plus alpha_c * sum_i (1 - sum_t alpha_ti)^2,
    averaged over the batch (and, not in the paper, sharpness_c * sum_t max(0, H(alpha_t) -
    sharpness_target), the attention's entropy in nats above a target; target 0 penalises all of
    it; with ``sharpness_over`` 'caption', sharpness_c * T * max(0, mean_t H(alpha_t) -
    sharpness_target): only the caption's mean is bounded).
    Hard attention with sampled locations (``sampled``, eq. 10-12): in addition, the surrogate
    whose gradient is the REINFORCE estimate of dL_s/dW: reward log p(y|s, a) minus a baseline,
    scaled by reinforce_scale, times log p(s|a), plus the entropy bonus entropy_c * H[s].
    With ``cfg.reward`` 'word' (the authors' code: their reward is the mean cost per word, and
    their score-function and entropy gradients are given per element, not averaged over the
    batch), the reward is log p(y|s, a) / T and the two terms are summed over the minibatch.
    The baseline (``cfg.baseline``) is either, for each caption, the mean reward of the other
    captions of its minibatch ('batch'; they share its length, so the summed log-likelihoods are
    comparable; independent of its own sample, so the estimate stays unbiased; a minibatch of one
    caption gets no REINFORCE term), or the moving average ``baseline`` of eq. 12 ('moving', the
    paper's; None: the batch mean, for the first batch). On Flickr8k, with minibatches of mixed
    lengths in turn, the moving average left rewards of RMS 9.6 nats, the minibatch mean 5.7.
    captions: (B, T+1) long as in :meth:`Decoder.forward`.
    Returns (loss scalar, dict of floats: 'nll' = mean summed NLL per caption (unsmoothed), 'log_p_y' = mean
    log p(y|s, a), 'doubly_stochastic' = the mean regulariser sum_i (1 - sum_t alpha_ti)^2 (before
    its weight), 'beta' = the mean gating scalar, and with ``sampled`` 'reward' = the mean reward
    before its baseline, 'reward_rms' = the root mean square of the rewards after their baseline
    and 'baseline' = the mean baseline, in nats (per word for 'word')).
    """
    targets = captions[:, 1:]
    log_p = out.logits.float().log_softmax(-1)  # (B, T, V); under autocast, as cross_entropy's, bit for bit
    nll = -log_p.gather(-1, targets[..., None]).squeeze(-1).sum(1)
    eps = cfg.label_smoothing  # (1 - eps) NLL + eps * the mean over the vocabulary of -log p
    fit = (1 - eps) * nll - eps * log_p.mean(-1).sum(1) if eps else nll
    doubly_stochastic = ((1.0 - out.alpha.sum(1)) ** 2).sum(1)
    loss = fit + cfg.alpha_c * doubly_stochastic
    if cfg.sharpness_c and not sampled:
        if cfg.sharpness_over == "caption":  # T * max(0, mean_t H - target)
            excess = (out.entropy.sum(1) - out.entropy.shape[1] * cfg.sharpness_target).clamp_min(0)
        else:
            excess = (out.entropy - cfg.sharpness_target).clamp_min(0).sum(1)
        loss = loss + cfg.sharpness_c * excess
    log_p_y = (-nll).detach()
    if sampled:
        n, per_word = len(log_p_y), cfg.reward == "word"
        r = log_p_y / targets.shape[1] if per_word else log_p_y  # (B,) one length per minibatch
        if cfg.baseline == "batch":
            reward = r - (r.sum() - r) / (n - 1) if n > 1 else torch.zeros_like(r)
        else:
            reward = r - (r.mean() if baseline is None else baseline)
        surrogate = cfg.reinforce_scale * reward * out.log_p_s + cfg.entropy_c * out.entropy.sum(1)  # (B,)
        loss = loss - surrogate * (n if per_word else 1)  # 'word': summed over the minibatch by the mean below
    stats = {
        "nll": nll.mean().item(),
        "log_p_y": log_p_y.mean().item(),
        "doubly_stochastic": doubly_stochastic.mean().item(),
        "beta": out.beta.float().mean().item(),
    }
    if sampled:
        stats.update(
            reward_rms=reward.pow(2).mean().sqrt().item(), baseline=(r - reward).mean().item(), reward=r.mean().item()
        )
    return loss.mean(), stats
