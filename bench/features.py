"""Feature extraction: end-to-end images/s of ``extract_features`` (JPEG decode, resize, forward
pass, HDF5 write) over the bare encoder forward pass on already-decoded tensors (already on the
device), same images, same batch size, same arithmetic, same process. Also the effect of
inference_mode, channels_last and the other precision (CPU: bf16 autocast; CUDA: fp32 instead of
the pipeline's fp16 autocast)."""

import tempfile
from pathlib import Path

import torch

from pipeline.encoders import Preprocess, build_encoder, open_rgb
from pipeline.features import PRECISIONS, FeatureConfig, compute_precision, decoding_workers, extract_features

from .common import SQUEEZENET_WEIGHTS, corpus_records, seconds


def bare_forward(encoder, batches, mode: str, half) -> float:
    """Seconds of the encoder over already-decoded ``batches``: as the pipeline runs it
    ('inference_mode', channels_last, autocast to ``half`` unless None), under 'no_grad'
    instead, 'contiguous' (weights and inputs in the default NCHW layout) or 'other' precision
    (bf16 autocast where the pipeline uses fp32, fp32 where it autocasts)."""
    forward = encoder
    if mode == "contiguous":
        forward = encoder.trunk.to(memory_format=torch.contiguous_format)
    if mode == "other":
        half = None if half is not None else torch.bfloat16
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode

    def run():
        with context(), torch.autocast(encoder.device.type, dtype=half, enabled=half is not None):
            for b in batches:
                forward(b)

    took = seconds(run, warmup=1)
    encoder.to(memory_format=torch.channels_last)
    return took


def bench_encoder(name: str, weights: str, n: int, device: str, batch: int) -> dict:
    """End-to-end `cli.py features` images/s of encoder ``name`` over ``n`` images (Flickr8k's
    where ../shared has them, else generated), beside its bare forward pass in each mode."""
    with tempfile.TemporaryDirectory(prefix="bench-images-") as images:
        return _bench_encoder(name, weights, corpus_records(Path(images), n)[0], device, batch)


def _bench_encoder(name: str, weights: str, records: list, device: str, batch: int) -> dict:
    n = len(records)
    encoder = build_encoder(name, weights, device)
    config = FeatureConfig(encoder=name, weights=weights, batch_size=batch, shard_size=n, device=device)
    precision = compute_precision(config, encoder.device)
    half = PRECISIONS[precision]
    transform = Preprocess().transform()
    batches = torch.stack([transform(open_rgb(r.image_path)) for r in records]).to(device).split(batch)
    modes = {
        mode: n / bare_forward(encoder, batches, mode, half)
        for mode in ("no_grad", "inference_mode", "contiguous", "other")
    }
    with tempfile.TemporaryDirectory() as out:
        extract_features(records[:batch], out + "/warm", config, "bench", progress=False)  # CUDA/cuDNN start-up
        summary = extract_features(records, out + "/run", config, "bench", progress=False)
    end_to_end = summary.images / summary.seconds
    return {
        "encoder": name,
        "weights": "imagenet file" if weights not in ("random", "imagenet") else weights,
        "images": n,
        "batch": batch,
        "workers": decoding_workers(config, encoder.device),
        "end_to_end": end_to_end,
        **modes,
        "ratio": end_to_end / modes["inference_mode"],
        "precision": precision,
        "other_name": "fp32" if half is not None else "bf16",
    }


def run(device: str = "cpu") -> list[str]:
    """The feature-extraction table on ``device``: VGG-19 (random weights) and SqueezeNet v1.1
    (ImageNet weights where ../shared has them), end to end beside the bare forward pass."""
    squeezenet_weights = str(SQUEEZENET_WEIGHTS) if SQUEEZENET_WEIGHTS.exists() else "random"
    cpu = device == "cpu"
    batch = 32 if cpu else 128
    rows = [
        bench_encoder("vgg19", "random", 64 if cpu else 2048, device, batch),
        bench_encoder("squeezenet1_1", squeezenet_weights, 512 if cpu else 2048, device, batch),
    ]
    lines = [
        "| encoder | images, batch, decoding workers | end-to-end img/s | bare forward img/s (inference_mode, "
        "channels_last, pipeline's precision) | ratio (target >= 0.9) | no_grad img/s | NCHW img/s "
        "| other precision img/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['encoder']} ({r['weights']} weights) | {r['images']}, {r['batch']}, {r['workers']} "
            f"| {r['end_to_end']:.1f} | {r['inference_mode']:.1f} ({r['precision']}) | **{r['ratio']:.2f}** "
            f"| {r['no_grad']:.1f} | {r['contiguous']:.1f} | {r['other']:.1f} ({r['other_name']}) |"
        )
    return lines
