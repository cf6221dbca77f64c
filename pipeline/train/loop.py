"""Stage two: train the attention decoder on the feature shards.

Minibatches hold captions of a single length (paper section 4.3), so no padding enters the loss.
Each epoch ends with free-running beam-search decoding of the validation split (beam 3 by
default, as the captions are scored), scored with coco-caption BLEU-4 and CIDEr-D (never
teacher-forced); the learning rate decays (halves, by default) and early stopping counts whenever
the validation score (``val_metric``: BLEU-4 for XE, CIDEr-D for SCST) fails to improve.
``last.pt`` is written every epoch (and every ``checkpoint_every`` steps) and ``best.pt`` when
that score improves, atomically; ``resume`` continues a killed run from ``last.pt`` and gives the
same weights as an uninterrupted run (on CPU, for a given seed).
"""

import contextlib
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..checkpoint import build_decoder, decoder_config, load_checkpoint
from ..config import TRAIN_CAPTIONS, DecoderConfig, ObjectiveConfig, TrainConfig
from ..features.shards import AnnotationShards, CaptionPairs, Images
from ..io import distributed
from ..io.atomic import remove_stale_temps
from ..io.errors import PipelineError, param
from ..io.folders import folder_lock
from ..io.memory import configure_allocator
from ..model.compiled import SLOWER_BF16_TRAINING, decide, use_compiled
from ..model.decoder import Decoder
from ..text import tokenize
from .monitor import CURVES, Monitor, figure_image
from .scst import Reward
from .state import (
    BEST,
    CONFIG,
    LAST,
    METRICS,
    TrainState,
    accumulate,
    check_new_run,
    check_trained_on,
    epoch_means,
    log_metrics,
    restore,
    resumed_config,
    save_state,
    truncate_log,
    write_config,
)
from .steps import NonFinite, epoch_batches, make_optimizer, scst_step, train_step, uses_bf16
from .validate import METRIC_NAMES, validate

log = logging.getLogger(__name__)


def annotation_rms(shards: AnnotationShards, images: int = 256) -> float:
    """Root mean square of the annotation vectors of the first ``images`` images (1.0 if 0)."""
    rows = torch.stack([shards[i] for i in range(min(images, len(shards)))])
    return rows.pow(2).mean().sqrt().item() or 1.0


def new_decoder_config(model: dict, shards: AnnotationShards) -> DecoderConfig:
    """The DecoderConfig of a new decoder trained on ``shards``: their vocabulary size and D, the
    overrides in ``model``, and ``attention_input_scale`` 0 resolved to the RMS of the training
    annotation vectors (:func:`annotation_rms`)."""
    config = DecoderConfig(vocab_size=len(shards.vocab), annotation_dim=shards.D, **model)
    if config.attention_input_scale == 0:
        config = replace(config, attention_input_scale=annotation_rms(shards))
    return config


def train(config: TrainConfig, resume: bool = False, progress: bool = True, given: set[str] | None = None) -> dict:
    """Train a decoder per ``config``; returns the final training state (as in ``last.pt``).

    Under torchrun (:mod:`pipeline.io.distributed`) every rank trains a DistributedDataParallel copy
    on every WORLD_SIZE-th minibatch of the epoch's length-bucketed order (so each holds captions
    of one length; the last WORLD_SIZE-1 minibatches of an epoch are left out so every rank takes
    as many steps), and rank 0 validates, logs and writes the checkpoints, which hold every rank's
    random state: resume with the same number of processes.

    given: the options the user gave (``TrainConfig`` field names, ``model.NAME`` and
    ``objective.NAME`` for the nested ones): on ``resume`` those of ``RESUMABLE`` take effect and
    the others must equal the run's (:func:`resumed_config`).
    Rank 0 holds ``config.out``'s lock (:func:`pipeline.io.folders.folder_lock`) for the whole run.
    A fresh run writes ``last.pt`` before its first step, so that every run folder with outputs can
    be resumed. No checkpoint is written with a nan or inf weight.

    Raises PipelineError if another command holds ``config.out``, if it already holds a run's
    files and ``resume`` is false, if there is nothing to resume, if a resume changes an option it
    cannot, if the features (or the number of processes) differ from those the run started with,
    or if a training step meets a non-finite loss or gradient (naming the epoch, the step and the
    minibatch's images) or non-finite annotation values (naming the image).
    """
    configure_allocator(huge_pages=False)
    with distributed.session(config.device) as world, contextlib.ExitStack() as held:
        error = None
        if world.main:  # rank 0 holds the run folder's lock for the whole job
            try:
                held.enter_context(folder_lock(config.out, "out"))
            except PipelineError as e:
                error = e
        error = world.broadcast(error)
        if error is not None:
            raise error
        return _train(config, resume, progress and world.main, world, given or set())


def _open_features(config: TrainConfig) -> tuple[AnnotationShards, AnnotationShards, str]:
    """(training shards, validation shards, validation split) of ``config.features``."""
    train_shards = AnnotationShards(config.features, "train")
    val_split = config.val_split or next((s for s in ("dev", "val") if s in train_shards.manifest["splits"]), None)
    if val_split is None:
        raise PipelineError(f"{config.features}: no 'dev' or 'val' features to validate on; pass {param('val_split')}")
    return train_shards, AnnotationShards(config.features, val_split), val_split


def _setup(config: TrainConfig, saved: dict | None, world: distributed.World) -> TrainState:
    """A new run's state, or (``saved``: its last.pt) the state of the run to resume, in the
    order that draws the same random numbers either way."""
    if config.criterion == "scst" and world.size > 1:
        raise PipelineError(f"{param('criterion', 'scst')} trains in one process: run it without torchrun")
    train_shards, val_shards, val_split = _open_features(config)
    torch.manual_seed(config.seed)
    if saved is not None:
        decoder = Decoder(decoder_config(saved, Path(config.out) / LAST))
    elif config.init:
        decoder = _initial_decoder(config, train_shards)
    else:
        decoder = Decoder(new_decoder_config(config.model, train_shards))
    model_config = decoder.config
    if world.size > 1:  # the same weights on every rank (DDP broadcasts rank 0's), then noise of its own
        torch.manual_seed(int(torch.randint(2**62, ())) + world.rank)  # the same draw on every rank
    decoder.to(world.device)
    optimizer = make_optimizer(decoder.parameters(), config)
    ema = AveragedModel(decoder, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay)) if config.ema_decay else None
    pairs = CaptionPairs(train_shards)
    work = f"{config.epochs} epochs x {len(pairs)} captions"
    slower = SLOWER_BF16_TRAINING if world.device.type == "cpu" and uses_bf16(config, world.device) else ""
    on = decide(config.compile, world.device, config.epochs * len(pairs), TRAIN_CAPTIONS, work, world.main, slower)
    use_compiled([decoder, *([ema.module] if ema is not None else [])], on)
    state = TrainState(
        config,
        world,
        train_shards,
        val_shards,
        val_split,
        model_config,
        ObjectiveConfig(**config.objective),
        decoder,
        DistributedDataParallel(decoder) if world.size > 1 else decoder,
        optimizer,
        ema,
        pairs,
        Reward([[tokenize(c) for c in refs] for refs in train_shards.references], config.scst_bleu_weight)
        if config.criterion == "scst"
        else None,
    )
    if saved is not None:
        restore(state, saved)
    return state


def _initial_decoder(config: TrainConfig, shards: AnnotationShards) -> Decoder:
    """The decoder of ``config.init`` (its weight average where it kept one), checked to be
    trained on features like ``shards`` and to agree with the decoder options in ``config.model``."""
    checkpoint = load_checkpoint(config.init)
    check_trained_on(checkpoint, shards, config.init, "start from it")
    decoder, _ = build_decoder(checkpoint, config.init)
    differs = [
        f"{param('model.' + k, v)} (it has {k} = {has})"
        for k, v in config.model.items()
        if (has := getattr(decoder.config, k)) != v
    ]
    if differs:
        raise PipelineError(
            f"{config.init}: the decoder's sizes and switches come from this checkpoint; drop {', '.join(differs)}"
        )
    return decoder


def _train(config: TrainConfig, resume: bool, progress: bool, world: distributed.World, given: set[str]) -> dict:
    out, saved = Path(config.out), None
    if resume:
        saved = load_checkpoint(out / LAST)  # its options, but the folders given now (they may have moved)
        config = resumed_config(saved, config, given, out / LAST)
        if len(saved["rng"]["cpu"]) != world.size:
            n = len(saved["rng"]["cpu"])
            raise PipelineError(
                f"{out / LAST}: written by a run of {n} process(es); resume it with as many "
                f"(torchrun --nproc-per-node {n}; no torchrun for 1)"
            )
        if world.main:
            log.info(f"resuming {out / LAST}: epoch {saved['position']['epoch'] + 1}, step {saved['position']['step']}")
    else:
        check_new_run(out)
    s = _setup(config, saved, world)
    if world.main:
        if resume:
            truncate_log(out, s.epoch)
            remove_stale_temps(out, (LAST, BEST, METRICS, CURVES, CONFIG))  # being written when the run was killed
        out.mkdir(parents=True, exist_ok=True)
        write_config(config, s.model_config)
    state = None if resume else save_state(s, out / LAST)  # a fresh run's folder can be resumed from its start
    monitor = Monitor(out, s.val_split, config.tensorboard, s.epoch) if world.main else None
    for epoch in range(s.epoch, config.epochs):
        if config.patience and s.stale_epochs >= config.patience:
            break
        seen, seconds = _epoch(s, epoch, progress)
        state = _end_epoch(s, epoch, seen, seconds, monitor)
    if monitor is not None:
        monitor.close()
    return state or save_state(s, out / LAST)


def _epoch(s: TrainState, epoch: int, progress: bool) -> tuple[int, float]:
    """Train one epoch (from ``s.batch`` on, for a resumed one); returns (captions
    this process saw, seconds)."""
    config, device = s.config, s.world.device
    batches = epoch_batches(s.pairs, config, epoch)
    batches = s.world.share(batches[: len(batches) - len(batches) % s.world.size])
    loader = DataLoader(
        Images(s.train) if s.reward is not None else s.pairs,
        batch_sampler=batches[s.batch :],
        num_workers=config.workers,
        generator=torch.Generator(),
        pin_memory=device.type == "cuda",
    )
    bar = tqdm(
        loader,
        total=len(batches),
        initial=s.batch,
        desc=f"epoch {epoch + 1}/{config.epochs}",
        unit="batch",
        disable=not progress,
        dynamic_ncols=True,
    )
    s.model.train()
    start, seen = time.perf_counter(), 0
    for annotations, *captions, images in bar:  # (B, L, D), [(B, T+1) for XE], (B,)
        loss, stats, n = _step(s, epoch, annotations.to(device, non_blocking=True), captions, images)
        if s.ema is not None:
            s.ema.update_parameters(s.decoder)
        s.batch += 1
        s.step += 1
        seen += n
        accumulate(s.sums, dict(stats, loss=loss.item()), n)
        bar.set_postfix(loss=f"{loss.item():.2f}", caps_s=f"{seen / (time.perf_counter() - start):.0f}")
        if config.checkpoint_every and s.step % config.checkpoint_every == 0:
            save_state(s, s.out / LAST)
    bar.close()
    return seen, time.perf_counter() - start


def _step(s: TrainState, epoch: int, annotations: torch.Tensor, captions: list, images: torch.Tensor):
    """One update on a minibatch: annotations (B, L, D) float on the device; ``captions``: [(B, T+1)
    long] for cross-entropy training, [] for SCST; ``images``: (B,) their indices in the training
    split. Returns (loss, stats, captions trained on). Raises PipelineError naming the epoch, the
    step and the minibatch's images where the loss or gradient is not finite."""
    try:
        if s.reward is not None:
            loss, stats = scst_step(s, annotations, images.tolist())
            return loss, stats, len(images) * s.config.scst_samples
        loss, stats, s.baseline = train_step(
            s.model,
            s.optimizer,
            annotations,
            captions[0].to(annotations.device),
            s.config,
            s.objective_config,
            s.baseline,
            epoch,
        )
        return loss, stats, len(images)
    except NonFinite as e:
        names = ", ".join(s.train.image_ids[i] for i in images.unique()[:3].tolist())
        raise PipelineError(
            f"{s.out}: epoch {epoch + 1}, step {s.step + 1}: {e} (minibatch of images "
            f"{names}, ...); training stopped, no checkpoint holds these values: start a new run "
            f"with a lower {param('lr')} or a {param('clip')}"
        ) from None


def _end_epoch(s: TrainState, epoch: int, seen: int, seconds: float, monitor: Monitor | None) -> dict:
    """Validate, decay the learning rate, log, and write last.pt (and best.pt when the validation
    score, BLEU-4 or CIDEr-D per ``config.selection_metric``, improved); returns the checkpoint."""
    config, world = s.config, s.world
    val = world.broadcast(
        validate(s.decoder if s.ema is None else s.ema.module, s.val, config, world.device) if world.main else None
    )
    bleu4, metric = val["bleu"][3], config.selection_metric
    score = bleu4 if metric == "bleu4" else val["cider"]
    improved = score > s.best_score
    if improved:
        s.best_score, s.best_epoch, s.stale_epochs = score, epoch + 1, 0
    else:
        s.stale_epochs += 1
    lr = s.optimizer.param_groups[0]["lr"]
    if not improved and s.stale_epochs % (config.lr_patience + 1) == 0:
        for group in s.optimizer.param_groups:  # the optimizer's state_dict carries it into last.pt
            group["lr"] *= config.lr_decay
    seen = sum(world.gather(seen))
    record = {
        "epoch": epoch + 1,
        "step": s.step,
        **epoch_means(world.gather(s.sums)),
        f"{s.val_split}_bleu": [round(b, 2) for b in val["bleu"]],
        f"{s.val_split}_bleu4": round(bleu4, 2),
        f"{s.val_split}_cider": round(val["cider"], 2),
        "attention_entropy": round(val["attention_entropy"], 3),
        "lr": lr,
        "seconds": round(seconds, 1),
        "captions_per_s": round(seen / seconds, 1) if seconds else None,
    }
    s.epoch, s.batch, s.sums = epoch + 1, 0, {}
    if world.main:  # logged before last.pt: a resume drops log lines past its checkpoint, never misses one
        log_metrics(s.out, record)
        image = figure_image(s.val.paths[0], s.val.manifest["preprocess"])
        monitor.epoch(record, (image, val["captions"][0], val["first_alpha"], s.val.grid))
    # best.pt first: killed between the two, the run resumes from the last.pt before and redoes the epoch
    state = save_state(s, *([s.out / BEST] if improved else []), s.out / LAST)
    if world.main:
        log.info(
            f"epoch {epoch + 1}: loss {record['loss']:.3f}, {s.val_split} BLEU-4 {bleu4:.2f}, CIDEr-D "
            f"{val['cider']:.1f} (best {METRIC_NAMES[metric]} {s.best_score:.2f} at epoch {s.best_epoch}), "
            f"attention entropy {val['attention_entropy']:.2f} nats (uniform {math.log(s.val.L):.2f}), lr {lr:.2g}, "
            f'{seconds:.0f} s, {record["captions_per_s"]} captions/s; e.g. "{" ".join(val["captions"][0])}"'
        )
    return state
