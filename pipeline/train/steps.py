"""One training step and what it needs: the epoch's minibatches (captions of one length, paper
section 4.3), the optimizer, the precision (bf16 autocast where the device computes it natively),
and the updates of the cross-entropy / REINFORCE objective (eq. 12-14) and of self-critical
training."""

from collections import defaultdict
from pathlib import Path

import torch

from ..config import ObjectiveConfig, TrainConfig
from ..features.shards import CaptionPairs
from ..io.errors import PipelineError
from ..model.decoder import Decoder, objective
from .scst import reference_nll, scst_loss
from .state import TrainState


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively (a CUDA GPU that supports it, or a CPU with
    AVX512-BF16 or AMX-BF16), so that bf16 autocast speeds training up."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def uses_bf16(config: TrainConfig, device: torch.device) -> bool:
    """Whether ``config.precision`` means bf16 autocast on ``device`` ('auto': where it is native)."""
    return config.precision == "bf16" or (config.precision == "auto" and native_bf16(device))


def autocast(config: TrainConfig, device: torch.device):
    """The autocast context of ``config.precision`` on ``device``: bf16 matrix products and
    activations with fp32 weights, or plain fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(config, device))


def bucket_batches(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Minibatches of indices whose captions all have one length (paper section 4.3).

    Indices are shuffled within each length and the batches are shuffled, both with
    ``generator``, so an epoch's order is fixed by its seed.
    """
    by_length = defaultdict(list)
    for j, n in enumerate(lengths):
        by_length[n].append(j)
    batches = []
    for n in sorted(by_length):
        idx = by_length[n]
        idx = [idx[p] for p in torch.randperm(len(idx), generator=generator).tolist()]
        batches += [idx[k : k + batch_size] for k in range(0, len(idx), batch_size)]
    return [batches[p] for p in torch.randperm(len(batches), generator=generator).tolist()]


def epoch_batches(pairs: CaptionPairs, config: TrainConfig, epoch: int) -> list[list[int]]:
    """The minibatches of ``epoch``, the same on every run with the same seed: of caption pairs
    (length-bucketed), or for SCST of images (batch_size // scst_samples each, shuffled)."""
    generator = torch.Generator().manual_seed(config.seed * 100003 + epoch)
    if config.criterion == "scst":
        order = torch.randperm(len(pairs.shards), generator=generator).tolist()
        size = config.batch_size // config.scst_samples  # images, each with scst_samples captions
        return [order[k : k + size] for k in range(0, len(order), size)]
    return bucket_batches(pairs.lengths(), config.batch_size, generator)


def make_optimizer(params, config: TrainConfig, fused: bool = True):
    """The optimizer of ``config.optimizer`` over ``params`` at ``config.lr``: Adam (betas 0.9,
    0.999; with ``fused``, torch's fused kernel, one pass over all parameters, CPU and CUDA alike:
    its step is faster than the per-parameter loop on a CPU, bench/RESULTS.md section 2)
    or RMSprop (section 4.3)."""
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, betas=(0.9, 0.999), fused=fused)
    return torch.optim.RMSprop(params, lr=config.lr)


class NonFinite(PipelineError):
    """A training step met a nan or inf loss or gradient; the weights were not updated."""


def train_step(
    decoder: Decoder,
    optimizer,
    annotations: torch.Tensor,
    captions: torch.Tensor,
    config: TrainConfig,
    objective_config: ObjectiveConfig,
    baseline: float | None,
    epoch: int,
):
    """One minibatch update: forward (soft, or for hard attention a sampled or, with chance
    ``semi_sampling_p``, expected context; expected only in the first ``soft_warmup_epochs``
    epochs, counted from 0 by ``epoch``), the objective, backward, clipping, optimizer step.

    annotations: (B, L, D) float; captions: (B, T+1) long, one length. ``baseline``: the REINFORCE
    moving average of ``objective_config.baseline`` 'moving' (None before the first sampled batch).
    Returns (loss: 0-dim tensor, stats: dict of floats as :func:`pipeline.model.decoder.objective`'s, the
    moving baseline after this batch).
    Raises NonFinite, before the optimizer step, if the loss or the gradient norm is nan or inf.
    """
    sampled = (
        config.attention == "hard"
        and epoch >= config.soft_warmup_epochs
        and torch.rand(()).item() >= config.semi_sampling_p
    )
    with autocast(config, annotations.device):
        result = decoder(annotations, captions, "sample" if sampled else "expected")
        loss, stats = objective(result, captions, objective_config, sampled, baseline)
    if sampled and objective_config.baseline == "moving":  # b_k = 0.9 b_{k-1} + 0.1 log p(y|s_k, a)
        d = objective_config.baseline_decay
        baseline = stats["reward"] if baseline is None else d * baseline + (1 - d) * stats["reward"]
    update(decoder, optimizer, loss, config.clip)
    return loss, stats, baseline


def update(decoder: Decoder, optimizer, loss: torch.Tensor, clip: float) -> None:
    """Backward, gradient L2-norm clipping at ``clip`` (0: off), optimizer step.
    Raises NonFinite, before the step, if the loss or the gradient norm is nan or inf."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for p in decoder.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if not (torch.isfinite(loss) and torch.isfinite(norm)):  # before the step: the weights stay finite
        raise NonFinite(f"the loss ({loss.item():.4g}) or the gradient norm ({norm.item():.4g}) is not finite")
    if clip:
        torch.nn.utils.clip_grads_with_norm_(decoder.parameters(), clip, norm)
    optimizer.step()


def scst_step(s: TrainState, annotations: torch.Tensor, images: list[int]):
    """One self-critical update (:func:`pipeline.train.scst.scst_loss`, plus ``scst_xe_weight`` times
    :func:`pipeline.train.scst.reference_nll`, whose value stats['reference_nll'] holds) on a minibatch of images:
    annotations (B, L, D) float, images their indices in the training split. Hard attention
    samples its locations. Returns (loss, stats). Raises NonFinite as :func:`update`."""
    config = s.config
    with autocast(config, annotations.device):
        loss, stats = scst_loss(
            s.decoder,
            annotations,
            images,
            s.train.vocab,
            s.reward,
            config.scst_samples,
            config.scst_baseline,
            config.max_len,
            "sample" if config.attention == "hard" else "expected",
        )
        if config.scst_xe_weight:
            nll = reference_nll(s.decoder, annotations, [s.train.captions[i] for i in images], s.train.vocab)
            loss, stats["reference_nll"] = loss + config.scst_xe_weight * nll, nll.item()
    update(s.decoder, s.optimizer, loss, config.clip)
    return loss, stats
