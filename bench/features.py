"""Feature extraction: end-to-end images/s of ``extract_features`` (JPEG decode, resize, forward
pass, HDF5 write) over the bare encoder forward pass on already-decoded tensors, same images,
same batch size, same process. Also the effect of inference_mode and channels_last."""
import tempfile
from pathlib import Path

import torch

from pipeline.encoders import Preprocess, build_encoder, open_rgb
from pipeline.features import FeatureConfig, extract_features

from .common import SQUEEZENET_WEIGHTS, corpus_records, seconds

BATCH = 32


def bare_forward(encoder, batches, mode: str) -> float:
    """Seconds of the encoder over already-decoded ``batches``: as the pipeline runs it
    ('inference_mode', channels_last), under 'no_grad' instead, or 'contiguous' (inference_mode,
    weights and inputs in the default NCHW layout)."""
    forward = encoder
    if mode == "contiguous":
        forward = encoder.trunk.to(memory_format=torch.contiguous_format)
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode

    def run():
        with context():
            for b in batches:
                forward(b)
    took = seconds(run, warmup=0)
    encoder.to(memory_format=torch.channels_last)
    return took


def bench_encoder(name: str, weights: str, n: int) -> dict:
    records, _ = corpus_records(Path(tempfile.mkdtemp(prefix="bench-images-")), n)
    encoder = build_encoder(name, weights)
    transform = Preprocess().transform()
    batches = torch.stack([transform(open_rgb(r.image_path)) for r in records]).split(BATCH)
    with torch.inference_mode():
        encoder(batches[0])  # warm-up
    modes = {mode: n / bare_forward(encoder, batches, mode) for mode in ("no_grad", "inference_mode", "contiguous")}
    with tempfile.TemporaryDirectory() as out:
        config = FeatureConfig(encoder=name, weights=weights, batch_size=BATCH, shard_size=n)
        summary = extract_features(records, out, config, "bench", progress=False)
    end_to_end = summary.images / summary.seconds
    return {"encoder": name, "weights": "imagenet file" if weights not in ("random", "imagenet") else weights,
            "images": n, "end_to_end": end_to_end, **modes, "ratio": end_to_end / modes["inference_mode"]}


def run() -> list[str]:
    squeezenet_weights = str(SQUEEZENET_WEIGHTS) if SQUEEZENET_WEIGHTS.exists() else "random"
    rows = [bench_encoder("vgg19", "random", 64), bench_encoder("squeezenet1_1", squeezenet_weights, 512)]
    lines = ["| encoder | images | end-to-end img/s | bare forward img/s (inference_mode, channels_last) | ratio (target >= 0.9) "
             "| no_grad img/s | NCHW (not channels_last) img/s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['encoder']} ({r['weights']} weights) | {r['images']} | {r['end_to_end']:.1f} | "
                     f"{r['inference_mode']:.1f} | **{r['ratio']:.2f}** | {r['no_grad']:.1f} | {r['contiguous']:.1f} |")
    return lines
