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
import json
import logging
import math
import time
from collections import defaultdict
from copy import deepcopy
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..checkpoint import (
    build_decoder,
    check_features,
    decoder_config,
    feature_identity,
    load_checkpoint,
    save_checkpoint,
)
from ..config import TRAIN_CAPTIONS, DecodeConfig, DecoderConfig, ObjectiveConfig, TrainConfig
from ..eval.cider import CiderD
from ..eval.metrics import bleu
from ..features.shards import AnnotationShards, CaptionPairs, Images
from ..io import distributed
from ..io.atomic import atomic_path, remove_stale_temps
from ..io.errors import PipelineError
from ..io.folders import folder_lock
from ..io.memory import configure_allocator
from ..model.compiled import SLOWER_BF16_TRAINING, decide, use_compiled
from ..model.decode import beam_search
from ..model.decoder import Decoder, attention_entropy, objective
from ..options import CONFIG, defaults, field_flag, specs, write_toml
from ..text import tokenize
from .monitor import BOARD, CURVES, Monitor, figure_image
from .scst import Reward, reference_nll, scst_loss

log = logging.getLogger(__name__)

LAST, BEST, METRICS = "last.pt", "best.pt", "metrics.jsonl"
METRIC_NAMES = {"bleu4": "BLEU-4", "cider": "CIDEr-D"}
# options a --resume may change
RESUMABLE = ("epochs", "patience", "checkpoint_every", "workers", "tensorboard", "compile")


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


def make_optimizer(params, config: TrainConfig, fused: bool = True):
    """The optimizer of ``config.optimizer`` over ``params`` at ``config.lr``: Adam (betas 0.9,
    0.999; with ``fused``, torch's fused kernel, one pass over all parameters, CPU and CUDA alike:
    its step is about 3x faster than the per-parameter loop on a CPU, bench/RESULTS.md section 2)
    or RMSprop (section 4.3)."""
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, betas=(0.9, 0.999), fused=fused)
    return torch.optim.RMSprop(params, lr=config.lr)


EPOCH_STATS = (
    "loss",
    "nll",
    "doubly_stochastic",
    "beta",
    "reward",
    "greedy_reward",
    "reward_rms",
    "baseline",
    "reference_nll",
)


def _accumulate(sums: dict, stats: dict, n: int) -> None:
    """Add a minibatch of ``n`` captions' ``stats`` (those of EPOCH_STATS it has) to ``sums``:
    name -> [sum of value * n, sum of n], kept in the checkpoint so a resumed epoch's means are exact."""
    for name in EPOCH_STATS:
        if name in stats:
            total = sums.setdefault(name, [0.0, 0])
            total[0] += stats[name] * n
            total[1] += n


def _means(sums_by_rank: list[dict]) -> dict:
    """Per-caption means over an epoch of every rank's ``sums``, in EPOCH_STATS order."""
    means = {}
    for name in EPOCH_STATS:
        parts = [sums[name] for sums in sums_by_rank if name in sums]
        if parts and sum(n for _, n in parts):
            means[name] = sum(v for v, _ in parts) / sum(n for _, n in parts)
    return means


def _progress(saved: dict, rank: int) -> dict:
    """A checkpoint's record of the run's progress (its 'position' and 'run') as TrainState's
    fields on process ``rank``, from checkpoints of earlier versions too (the epoch's statistics as
    loss and NLL sums; the best score named best_bleu4; rank 0's statistics and baseline alone)."""
    position, run = dict(saved["position"]), dict(saved["run"])
    if "sums" not in position:
        n = position.pop("captions", 0)
        position["sums"] = {"loss": [position.pop("loss_sum", 0.0), n], "nll": [position.pop("nll_sum", 0.0), n]}
    if "best_bleu4" in run:
        run["best_score"] = run.pop("best_bleu4")
    for record, name in ((position, "sums"), (run, "baseline")):
        per_rank = record.get(name) if isinstance(record.get(name), list) else [record.get(name)]
        record[name] = per_rank[rank if len(per_rank) > 1 else 0]
    return deepcopy({**position, **run})


def _log(out: Path, record: dict) -> None:
    with open(out / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")


def _truncate_log(out: Path, epochs_done: int) -> None:
    """Drop log lines of epochs after ``epochs_done`` (written by a run killed before its checkpoint),
    and a line cut short (by a kill or a full disk while it was appended)."""
    path = out / METRICS
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if (_logged_epoch(line) or math.inf) <= epochs_done]
        with atomic_path(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in keep))


def _logged_epoch(line: str) -> int | None:
    """The epoch of a line of metrics.jsonl; None for a line that is not a whole record."""
    try:
        return json.loads(line)["epoch"]
    except (ValueError, TypeError, KeyError):
        return None


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


def scst_step(s: "TrainState", annotations: torch.Tensor, images: list[int]):
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
                held.enter_context(folder_lock(config.out, "--out"))
            except PipelineError as e:
                error = e
        error = world.broadcast(error)
        if error is not None:
            raise error
        return _train(config, resume, progress and world.main, world, given or set())


def resumed_config(checkpoint: dict, config: TrainConfig, given: set[str], checkpoint_path) -> TrainConfig:
    """The configuration of a resumed run: the saved one (``train_config`` of its last.pt,
    ``checkpoint``), with the folders of ``config`` (its features folder where ``config.features``
    is empty) and those of ``RESUMABLE`` that are in ``given``.
    Raises PipelineError naming every other option in ``given`` whose value differs from the run's
    (the decoder's as its ``model_config`` has them where the run was not given them)."""
    saved = checkpoint["train_config"]
    decoder = {k: checkpoint["model_config"].get(k, default) for k, default in defaults(DecoderConfig).items()}
    objective = dict(defaults(ObjectiveConfig), **saved["objective"])
    run = dict(saved, model=dict(decoder, **saved["model"]), objective=objective)
    new, old = _flat(asdict(config)), _flat(run)
    refused = sorted(k for k in given if k not in (*RESUMABLE, "features", "out") and new.get(k) != old.get(k))
    if refused:
        flags = ", ".join(f"{_flag(k)} (the run has {old.get(k)}, given {new.get(k)})" for k in refused)
        raise PipelineError(
            f"{checkpoint_path}: a resumed run keeps its options, so {flags} cannot be used; drop "
            f"the flag, or start a new run in another --out (a resume may change "
            f"{', '.join(map(_flag, RESUMABLE))})"
        )
    changed = {k: new[k] for k in RESUMABLE if k in given}
    return TrainConfig(**dict(saved, features=config.features or saved["features"], out=config.out, **changed))


def _flag(key: str) -> str:
    """The command-line flag of a key of :func:`_flat`: ``--lr`` for 'lr', ``--no-gating`` for
    'model.gating', ``--objective`` for 'criterion'."""
    section, _, name = key.rpartition(".")
    return field_flag({"": TrainConfig, "model": DecoderConfig, "objective": ObjectiveConfig}[section], name)


def _flat(config: dict) -> dict:
    """{'lr': ..., 'model': {'embed_dim': ...}} -> {'lr': ..., 'model.embed_dim': ...}."""
    flat = {}
    for key, value in config.items():
        flat.update({f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value})
    return flat


def write_config(config: TrainConfig, model_config: DecoderConfig) -> None:
    """Record the run's resolved options as ``OUT/config.toml``: one flat table of option names
    (the decoder's as ``model_config`` has them where not given, those of ``--init``'s checkpoint
    included, and the objective's defaults filled in), so ``cli.py train --config`` repeats it."""
    values = {k: v for k, v in asdict(config).items() if k not in ("model", "objective")}
    values.update({k: getattr(model_config, k) for k in specs(DecoderConfig)}, **config.model)
    values.update(defaults(ObjectiveConfig), **config.objective)
    write_toml(Path(config.out) / CONFIG, values, "the options of this run (cli.py train --config FILE repeats it)")


def _check_new_run(out: Path) -> None:
    """Raise PipelineError if ``out`` holds any file a run writes (a fresh run would replace it)."""
    found = [name for name in (LAST, BEST, METRICS, CURVES, BOARD, CONFIG) if (out / name).exists()]
    if found:
        how = "pass --resume to continue it" if LAST in found else f"it has no {LAST} to resume from, so move them away"
        raise PipelineError(f"{out} already holds a run ({', '.join(found)}); {how}, or pass another --out")


@dataclass
class TrainState:
    """Everything a training run holds between steps, in place of a closure over a dozen names:
    the options, the data, the model and its optimizer and weight average, and where the run is
    (the fields from ``epoch`` on; a checkpoint records those of POSITION and RUN under these two
    keys, and the random states)."""

    config: TrainConfig
    world: distributed.World
    train: AnnotationShards
    val: AnnotationShards
    val_split: str
    model_config: DecoderConfig
    objective_config: ObjectiveConfig
    decoder: Decoder
    model: torch.nn.Module  # what the steps call: the decoder, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    ema: AveragedModel | None
    pairs: CaptionPairs  # the training (image, caption) pairs, built once
    reward: Reward | None = None  # SCST: the reward, against the training references
    epoch: int = 0  # epochs finished
    batch: int = 0  # minibatches of epoch ``epoch`` done (a resumed epoch starts here)
    step: int = 0  # optimizer steps taken
    sums: dict = field(default_factory=dict)  # the epoch's running statistics (_accumulate)
    baseline: float | None = None  # the REINFORCE moving baseline (--baseline moving)
    best_score: float = -1.0  # best validation score (config.selection_metric) so far
    best_epoch: int = -1  # its epoch, from 1
    stale_epochs: int = 0  # epochs since it improved

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    def progress(self) -> dict:
        """The checkpoint's record of the run's progress: {'position': ..., 'run': ...}, the
        epoch's statistics and the moving baseline as lists of every rank's (each rank has its own)."""
        position = {"epoch": self.epoch, "batch": self.batch, "step": self.step}
        return {
            "position": dict(position, sums=self.world.gather(deepcopy(self.sums))),
            "run": {
                "baseline": self.world.gather(self.baseline),
                **{name: getattr(self, name) for name in ("best_score", "best_epoch", "stale_epochs")},
            },
        }


def _open_features(config: TrainConfig) -> tuple[AnnotationShards, AnnotationShards, str]:
    """(training shards, validation shards, validation split) of ``config.features``."""
    train_shards = AnnotationShards(config.features, "train")
    val_split = config.val_split or next((s for s in ("dev", "val") if s in train_shards.manifest["splits"]), None)
    if val_split is None:
        raise PipelineError(f"{config.features}: no 'dev' or 'val' features to validate on; pass --val-split")
    return train_shards, AnnotationShards(config.features, val_split), val_split


def _setup(config: TrainConfig, saved: dict | None, world: distributed.World) -> TrainState:
    """A new run's state, or (``saved``: its last.pt) the state of the run to resume, in the
    order that draws the same random numbers either way."""
    if config.criterion == "scst" and world.size > 1:
        raise PipelineError("--objective scst trains in one process: run it without torchrun")
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
        _restore(state, saved)
    return state


def _initial_decoder(config: TrainConfig, shards: AnnotationShards) -> Decoder:
    """The decoder of ``config.init`` (its weight average where it kept one), checked to be
    trained on features like ``shards`` and to agree with the decoder options in ``config.model``."""
    checkpoint = load_checkpoint(config.init)
    _check_trained_on(checkpoint, shards, config.init, "start from it")
    decoder, _ = build_decoder(checkpoint, config.init)
    differs = [
        f"{field_flag(DecoderConfig, k)}{'' if isinstance(v, bool) else f' {v}'} (it has {k} = {has})"
        for k, v in config.model.items()
        if (has := getattr(decoder.config, k)) != v
    ]
    if differs:
        raise PipelineError(
            f"{config.init}: the decoder's sizes and switches come from this checkpoint; drop {', '.join(differs)}"
        )
    return decoder


def _restore(s: TrainState, saved: dict) -> None:
    """Load a resumed run's weights, optimizer, weight average, random state and progress."""
    _check_trained_on(saved, s.train, s.out / LAST, "resume on the features the run started from")
    if "hidden_proj.weight" in saved["model"]:
        raise PipelineError(
            f"{s.out / LAST}: written by an earlier version (before the Attention module); it loads "
            "for captioning and scoring, but cannot be resumed: start a new run in another --out"
        )
    s.decoder.load_state_dict(saved["model"])
    s.optimizer.load_state_dict(saved["optimizer"])
    if s.ema is not None:
        s.ema.load_state_dict(saved["ema"])
    torch.set_rng_state(saved["rng"]["cpu"][s.world.rank])
    if s.world.device.type == "cuda":
        torch.cuda.set_rng_state(saved["rng"]["cuda"][s.world.rank], s.world.device)
    for name, value in _progress(saved, s.world.rank).items():
        setattr(s, name, value)


def _check_trained_on(checkpoint: dict, shards: AnnotationShards, path, what: str) -> None:
    """Raise PipelineError if ``checkpoint`` (read from ``path``) was not trained on features made
    like ``shards`` with their vocabulary; ``what``: what to do instead."""
    check_features(checkpoint, shards, path)
    if checkpoint["vocab"] != shards.vocab.words:
        raise PipelineError(
            f"{shards.dir / 'vocab.json'}: not the vocabulary {path} was trained with "
            f"({len(shards.vocab)} words, it has {len(checkpoint['vocab'])}); {what}"
        )


def _checkpoint(s: TrainState, *paths: Path) -> dict:
    """The training state as a checkpoint, with every rank's random state; rank 0 writes it to
    each of ``paths`` in order (never with a non-finite weight: PipelineError instead)."""
    weights = [s.decoder.state_dict()] + ([s.ema.state_dict()] if s.ema is not None else [])
    if not all(t.isfinite().all() for sd in weights for t in sd.values() if t.is_floating_point()):
        raise PipelineError(
            f"{paths[-1]}: not written: the weights hold nan or inf values at epoch {s.epoch + 1}, step "
            f"{s.step}; the file keeps its last whole state: start a new run with a lower --lr or a --clip"
        )
    rng = {"cpu": s.world.gather(torch.get_rng_state())}
    if s.world.device.type == "cuda":
        rng["cuda"] = s.world.gather(torch.cuda.get_rng_state(s.world.device))
    state = {
        "model": s.decoder.state_dict(),
        "optimizer": s.optimizer.state_dict(),
        "model_config": s.model_config.to_dict(),
        "train_config": asdict(s.config),
        "objective_config": asdict(s.objective_config),
        "vocab": s.train.vocab.words,
        "features": feature_identity(s.train),
        "rng": rng,
        **s.progress(),
    }
    if s.ema is not None:
        state["ema"] = s.ema.state_dict()
    if s.world.main:
        for target in paths:
            save_checkpoint(target, state)
    return state


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
        _check_new_run(out)
    s = _setup(config, saved, world)
    if world.main:
        if resume:
            _truncate_log(out, s.epoch)
            remove_stale_temps(out, (LAST, BEST, METRICS, CURVES, CONFIG))  # being written when the run was killed
        out.mkdir(parents=True, exist_ok=True)
        write_config(config, s.model_config)
    state = None if resume else _checkpoint(s, out / LAST)  # a fresh run's folder can be resumed from its start
    monitor = Monitor(out, s.val_split, config.tensorboard, s.epoch) if world.main else None
    for epoch in range(s.epoch, config.epochs):
        if config.patience and s.stale_epochs >= config.patience:
            break
        seen, seconds = _epoch(s, epoch, progress)
        state = _end_epoch(s, epoch, seen, seconds, monitor)
    if monitor is not None:
        monitor.close()
    return state or _checkpoint(s, out / LAST)


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
        annotations = annotations.to(device, non_blocking=True)
        try:
            if s.reward is not None:
                loss, stats = scst_step(s, annotations, images.tolist())
                n = len(images) * config.scst_samples
            else:
                loss, stats, s.baseline = train_step(
                    s.model,
                    s.optimizer,
                    annotations,
                    captions[0].to(device),
                    config,
                    s.objective_config,
                    s.baseline,
                    epoch,
                )
                n = len(images)
        except NonFinite as e:
            names = ", ".join(s.train.image_ids[i] for i in images.unique()[:3].tolist())
            raise PipelineError(
                f"{s.out}: epoch {epoch + 1}, step {s.step + 1}: {e} (minibatch of images "
                f"{names}, ...); training stopped, no checkpoint holds these values: start a new run "
                "with a lower --lr or a --clip"
            ) from None
        if s.ema is not None:
            s.ema.update_parameters(s.decoder)
        s.batch += 1
        s.step += 1
        seen += n
        _accumulate(s.sums, dict(stats, loss=loss.item()), n)
        bar.set_postfix(loss=f"{loss.item():.2f}", caps_s=f"{seen / (time.perf_counter() - start):.0f}")
        if config.checkpoint_every and s.step % config.checkpoint_every == 0:
            _checkpoint(s, s.out / LAST)
    bar.close()
    return seen, time.perf_counter() - start


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
        **_means(world.gather(s.sums)),
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
        _log(s.out, record)
        image = figure_image(s.val.paths[0], s.val.manifest["preprocess"])
        monitor.epoch(record, (image, val["captions"][0], val["first_alpha"], s.val.grid))
    # best.pt first: killed between the two, the run resumes from the last.pt before and redoes the epoch
    state = _checkpoint(s, *([s.out / BEST] if improved else []), s.out / LAST)
    if world.main:
        log.info(
            f"epoch {epoch + 1}: loss {record['loss']:.3f}, {s.val_split} BLEU-4 {bleu4:.2f}, CIDEr-D "
            f"{val['cider']:.1f} (best {METRIC_NAMES[metric]} {s.best_score:.2f} at epoch {s.best_epoch}), "
            f"attention entropy {val['attention_entropy']:.2f} nats (uniform {math.log(s.val.L):.2f}), lr {lr:.2g}, "
            f'{seconds:.0f} s, {record["captions_per_s"]} captions/s; e.g. "{" ".join(val["captions"][0])}"'
        )
    return state
