"""Beam search: images/s at beam 3 and 5, the whole batch of 64 images at once against one image
at a time, and the batch with the decoder's step compiled (:mod:`pipeline.model.compiled`) against the
batch eager, same model (default sizes, L=196). With untrained weights no hypothesis ends early, so
every caption runs to the 20-word limit in all modes. Also f_att's tanh (the largest cost of a
batched step) as PyTorch's tanh kernel and as the decoder computes it, side by side."""

import torch

from pipeline.config import DecodeConfig
from pipeline.model.compiled import use_compiled
from pipeline.model.decode import beam_search
from pipeline.model.decoder import AttentionTanh, Decoder, DecoderConfig
from pipeline.text import Vocabulary
from pipeline.train.loop import native_bf16

from .common import progress, seconds

IMAGES, VOCAB, MAX_LEN = 64, 2600, 20
Words = Vocabulary([])  # the special words' ids: <start> 1, <end> 2, <unk> 3


def run(device: str = "cpu") -> list[str]:
    """The beam-search table on ``device``: images/s batched, one at a time and compiled, at beam
    sizes 3 and 5 in each precision this device computes natively."""
    torch.manual_seed(0)
    decoder = Decoder(DecoderConfig(vocab_size=VOCAB, annotation_dim=512)).to(device).eval()
    annotations = torch.randn(IMAGES, 196, 512, device=device).relu()
    precisions = ["fp32", "bf16"] if native_bf16(torch.device(device)) else ["fp32"]
    lines = [
        "| beam size | precision | batch of 64: images/s | one image at a time: images/s | ratio (target >= 5) "
        "| batch of 64 compiled: images/s | compiled / eager batch (target >= 1.3) |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in (3, 5):
        for precision in precisions:
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                batched = seconds(
                    lambda k=k: beam_search(decoder, annotations, Words, DecodeConfig(k, MAX_LEN)), repeat=2
                )  # the best of 2, as the compiled timing below
                single = seconds(
                    lambda k=k: [
                        beam_search(decoder, annotations[i : i + 1], Words, DecodeConfig(k, MAX_LEN))
                        for i in range(IMAGES)
                    ]
                )
                use_compiled([decoder], True)  # the warm-up call compiles
                fused = seconds(
                    lambda k=k: beam_search(decoder, annotations, Words, DecodeConfig(k, MAX_LEN)), repeat=2
                )
                use_compiled([decoder], False)
            lines.append(
                f"| {k} | {precision} | {IMAGES / batched:.1f} | {IMAGES / single:.1f} | **{single / batched:.1f}** "
                f"| {IMAGES / fused:.1f} | **{batched / fused:.2f}x** |"
            )
            progress(lines[-1])
    lines += ["", tanh_rates(device)]
    return lines


@torch.no_grad()
def tanh_rates(device: str, k: int = 5) -> str:
    """One line: f_att's tanh(proj + W_h h) over one image's beam of k rows, (k, 196, 512) float32,
    in G values/s, with torch's tanh kernel and with :class:`AttentionTanh`."""
    proj, att_h = torch.randn(k, 196, 512, device=device), torch.randn(k, 512, device=device)
    kernel = seconds(lambda: (proj + att_h.unsqueeze(1)).tanh_(), repeat=50)
    ours = seconds(lambda: AttentionTanh.apply(proj, att_h), repeat=50)
    return (
        f"f_att's tanh(proj + W_h h) over ({k}, 196, 512) float32, add included: torch's tanh_ "
        f"{proj.numel() / kernel / 1e9:.2f} G values/s, AttentionTanh {proj.numel() / ours / 1e9:.2f} "
        f"(**{kernel / ours:.1f}x**)."
    )
