"""A training run's state and its folder: :class:`TrainState`, the checkpoint it writes and a
resume reads back (every rank's random state and epoch statistics, from checkpoints of earlier
versions too), metrics.jsonl, config.toml, and the options a resume may change."""

import json
import math
from copy import deepcopy
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel

from ..checkpoint import save_checkpoint
from ..config import SECTIONS, DecoderConfig, ObjectiveConfig, TrainConfig
from ..features import folder
from ..features.shards import AnnotationShards, CaptionPairs
from ..io import distributed
from ..io.atomic import atomic_path
from ..io.errors import PipelineError, param
from ..model.decoder import Decoder
from ..options import CONFIG, defaults, flatten, specs, write_toml
from .monitor import BOARD, CURVES
from .scst import Reward

LAST, BEST, METRICS = "last.pt", "best.pt", "metrics.jsonl"


LAST, BEST, METRICS = "last.pt", "best.pt", "metrics.jsonl"


LAST, BEST, METRICS = "last.pt", "best.pt", "metrics.jsonl"


# options a --resume may change
RESUMABLE = ("epochs", "patience", "checkpoint_every", "workers", "tensorboard", "compile")


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


def accumulate(sums: dict, stats: dict, n: int) -> None:
    """Add a minibatch of ``n`` captions' ``stats`` (those of EPOCH_STATS it has) to ``sums``:
    name -> [sum of value * n, sum of n], kept in the checkpoint so a resumed epoch's means are exact."""
    for name in EPOCH_STATS:
        if name in stats:
            total = sums.setdefault(name, [0.0, 0])
            total[0] += stats[name] * n
            total[1] += n


def epoch_means(sums_by_rank: list[dict]) -> dict:
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


def log_metrics(out: Path, record: dict) -> None:
    with open(out / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")


def truncate_log(out: Path, epochs_done: int) -> None:
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
    new, old = flatten(asdict(config), SECTIONS, dotted=True), flatten(run, SECTIONS, dotted=True)
    refused = sorted(k for k in given if k not in (*RESUMABLE, "features", "out") and new.get(k) != old.get(k))
    if refused:
        flags = ", ".join(f"{param(k)} (the run has {old.get(k)}, given {new.get(k)})" for k in refused)
        raise PipelineError(
            f"{checkpoint_path}: a resumed run keeps its options, so {flags} cannot be used; drop "
            f"the option, or start a new run in another {param('out')} (a resume may change "
            f"{', '.join(map(param, RESUMABLE))})"
        )
    changed = {k: new[k] for k in RESUMABLE if k in given}
    return TrainConfig(**dict(saved, features=config.features or saved["features"], out=config.out, **changed))


def write_config(config: TrainConfig, model_config: DecoderConfig) -> None:
    """Record the run's resolved options as ``OUT/config.toml``: one flat table of option names
    (the decoder's as ``model_config`` has them where not given, those of ``--init``'s checkpoint
    included, and the objective's defaults filled in), so ``cli.py train --config`` repeats it."""
    model = dict({k: getattr(model_config, k) for k in specs(DecoderConfig)}, **config.model)
    objective = dict(defaults(ObjectiveConfig), **config.objective)
    values = flatten(dict(asdict(config), model=model, objective=objective), SECTIONS)
    write_toml(Path(config.out) / CONFIG, values, "the options of this run (cli.py train --config FILE repeats it)")


def check_new_run(out: Path) -> None:
    """Raise PipelineError if ``out`` holds any file a run writes (a fresh run would replace it)."""
    found = [name for name in (LAST, BEST, METRICS, CURVES, BOARD, CONFIG) if (out / name).exists()]
    if found:
        how = (
            f"pass {param('resume', True)} to continue it"
            if LAST in found
            else f"it has no {LAST} to resume from, so move them away"
        )
        raise PipelineError(f"{out} already holds a run ({', '.join(found)}); {how}, or pass another {param('out')}")


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
    sums: dict = field(default_factory=dict)  # the epoch's running statistics (accumulate)
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


def restore(s: TrainState, saved: dict) -> None:
    """Load a resumed run's weights, optimizer, weight average, random state and progress."""
    check_trained_on(saved, s.train, s.out / LAST, "resume on the features the run started from")
    if "hidden_proj.weight" in saved["model"]:
        raise PipelineError(
            f"{s.out / LAST}: written by an earlier version (before the Attention module); it loads "
            f"for captioning and scoring, but cannot be resumed: start a new run in another {param('out')}"
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


def check_trained_on(checkpoint: dict, shards: AnnotationShards, path, what: str) -> None:
    """Raise PipelineError if ``checkpoint`` (read from ``path``) was not trained on features made
    like ``shards`` with their vocabulary; ``what``: what to do instead."""
    folder.check_identity(checkpoint["features"], shards.manifest, shards.dir, path)
    if checkpoint["vocab"] != shards.vocab.words:
        raise PipelineError(
            f"{shards.dir / 'vocab.json'}: not the vocabulary {path} was trained with "
            f"({len(shards.vocab)} words, it has {len(checkpoint['vocab'])}); {what}"
        )


def save_state(s: TrainState, *paths: Path) -> dict:
    """The training state as a checkpoint, with every rank's random state; rank 0 writes it to
    each of ``paths`` in order (never with a non-finite weight: PipelineError instead)."""
    weights = [s.decoder.state_dict()] + ([s.ema.state_dict()] if s.ema is not None else [])
    if not all(t.isfinite().all() for sd in weights for t in sd.values() if t.is_floating_point()):
        raise PipelineError(
            f"{paths[-1]}: not written: the weights hold nan or inf values at epoch {s.epoch + 1}, step "
            f"{s.step}; the file keeps its last whole state: start a new run with a lower {param('lr')} "
            f"or a {param('clip')}"
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
        "features": folder.identity(s.train.manifest, s.train.dir),
        "rng": rng,
        **s.progress(),
    }
    if s.ema is not None:
        state["ema"] = s.ema.state_dict()
    if s.world.main:
        for target in paths:
            save_checkpoint(target, state)
    return state
