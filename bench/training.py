"""Training step: captions/s of :func:`pipeline.train.steps.train_step` on random
annotation vectors and captions of one length, eager and with the decoder's step compiled
(:mod:`pipeline.model.compiled`) side by side, its achieved FLOP/s as a fraction of this machine's
measured matmul FLOP/s (same run), the compile's time uncached and cached, and a profile of where
the time goes. Hard attention runs its default schedule past the warm-up: a sampled context on
1 - semi_sampling_p of the steps."""

import os
import subprocess
import sys
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from pipeline.model.compiled import use_compiled
from pipeline.model.decoder import Attention, Decoder, DecoderConfig, ObjectiveConfig
from pipeline.train.loop import TrainConfig
from pipeline.train.steps import make_optimizer, native_bf16, train_step

from .common import ROOT, progress, seconds, sync
from .port import PortDecoder, port_step

VOCAB = 2600  # about Flickr8k's vocabulary at min count 5
WORDS = 12  # words per caption (Flickr8k's mean is about 11): 13 predicted tokens with <end>
PORT_CAPTIONS_PER_S = 39  # the most used PyTorch port at 512/512/512, L=169, batch 32, on this CPU (issue 5)
FLICKR8K_CAPTIONS = 30_000  # training captions of a Flickr8k epoch (6000 images x 5)
D = 512  # annotation vector size D (VGG-19's conv5_4 and SqueezeNet's last block alike)


def matmul_side(device: str) -> int:
    """Side n of the (n x n) @ (n x n) product that measures the peak: 2048, or on CUDA 8192 (2048
    leaves the GPU half idle)."""
    return 2048 if device == "cpu" else 8192


def matmul_flops(dtype: torch.dtype, device: str, shape: tuple[int, int, int] | None = None) -> float:
    """Measured FLOP/s of the (m x k) @ (k x n) product ``shape`` (default: the :func:`matmul_side`
    square) in ``dtype`` on ``device``."""
    m, k, n = shape or (matmul_side(device),) * 3
    a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
    return 2 * m * k * n / seconds(lambda: a @ b, repeat=5)


def setup(sizes: tuple[int, int, int], L: int, batch: int, attention: str, precision: str, device: str, compiled=False):
    """A training step (a function of no arguments) of a decoder of ``sizes`` (embedding, hidden,
    attention) on random annotation vectors (batch, L, 512) and captions of WORDS words."""
    embed, hidden, att = sizes
    torch.manual_seed(0)
    decoder = Decoder(
        DecoderConfig(vocab_size=VOCAB, annotation_dim=D, embed_dim=embed, hidden_dim=hidden, attention_dim=att)
    ).to(device)
    use_compiled([decoder], compiled)
    config = TrainConfig(features="", out="", attention=attention, batch_size=batch, precision=precision, device=device)
    optimizer = make_optimizer(decoder.parameters(), config)
    annotations = torch.randn(batch, L, D, device=device).relu()
    captions = torch.randint(4, VOCAB, (batch, WORDS + 2), device=device)

    def step():
        train_step(
            decoder, optimizer, annotations, captions, config, ObjectiveConfig(), None, epoch=config.soft_warmup_epochs
        )  # past the warm-up

    return step


def port_rate(device: str, L: int = 169, batch: int = 32, steps: int = 4) -> float:
    """Captions/s of the port's training step (bench/port.py) at its sizes, fp32, same captions;
    the best of 3 timings, as :func:`measure`'s (these machines are shared: the best is the least
    disturbed)."""
    torch.manual_seed(0)
    decoder = PortDecoder(VOCAB).to(device)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=4e-4)
    encoder_out = torch.randn(batch, L, D, device=device).relu()
    captions = torch.randint(4, VOCAB, (batch, WORDS + 2), device=device)
    lengths = [WORDS + 2] * batch
    took = seconds(
        lambda: [port_step(decoder, optimizer, encoder_out, captions, lengths) for _ in range(steps)], repeat=3
    )
    return batch * steps / took


def step_flops(step) -> int:
    """Floating-point operations of one training step (forward and backward), counted by torch."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def measure(sizes, L, batch, attention, precision, device, steps: int = 8, compiled=False) -> dict:
    """Captions/s and achieved FLOP/s of ``steps`` training steps, the best of 3 timings
    (after a step that compiles, where ``compiled``)."""
    step = setup(sizes, L, batch, attention, precision, device, compiled)
    took = seconds(lambda: [step() for _ in range(steps)], repeat=3) / steps
    flops = step_flops(setup(sizes, L, batch, attention, precision, device))  # counted eagerly: the same work
    return {"captions_s": batch / took, "flops": flops / took}


def first_step_seconds(sizes, L, batch, attention, precision, device) -> float:
    """Seconds of a compiled decoder's first training step less its second's: the compile (run by
    :func:`compile_seconds` in a process of its own)."""
    step = setup(sizes, L, batch, attention, precision, device, compiled=True)
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    return first - seconds(step, warmup=0)


def compile_seconds(sizes, L, batch, attention, precision, device) -> tuple[float, float]:
    """The compile's seconds in a fresh process with an empty compile cache, then in another fresh
    process with the cache the first filled (what a second training run pays)."""
    code = (
        f"from bench.training import first_step_seconds as f; print(f{(sizes, L, batch, attention, precision, device)})"
    )
    took = []
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        for _ in range(2):
            out = subprocess.run(
                [sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache},
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            took.append(float(out.stdout.split()[-1]))
    return took[0], took[1]


PRODUCTS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


class RecordProducts(TorchDispatchMode):
    """Records the (op, args) of every matrix product dispatched within, its tensors as (shape,
    stride, dtype)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in PRODUCTS:
            self.calls.append((func, [(a.shape, a.stride(), a.dtype) if torch.is_tensor(a) else a for a in args]))
        return func(*args, **(kwargs or {}))


def dense(args) -> bool:
    """Whether a recorded product is a dense one, every side of (m x k) @ (k x n) at least 8: the
    others (a rank-1 product, a matrix-vector product such as f_att's w or the context's sum over L)
    are passes over memory that a compiler fuses with their neighbours."""
    *_, a, b = [shape for shape, _, _ in (arg for arg in args if isinstance(arg, tuple))]
    return min(a[-2], a[-1], b[-1]) >= 8


def products_seconds(sizes, L, batch, attention, precision, device) -> tuple[float, int]:
    """Seconds of an eager training step's dense matrix products alone (:func:`dense`; recorded in
    one step, replayed on random tensors of the same shapes, strides and dtypes, the best of 5
    timings), and how many there are. A compiled step leaves these products to the library
    (oneDNN, cuBLAS), so the step's time over theirs bounds what compiling can gain."""
    step = setup(sizes, L, batch, attention, precision, device)
    record = RecordProducts()
    with record:
        step()
    calls = [
        (func, [torch.empty_strided(*arg[:2], dtype=arg[2], device=device).normal_() if isinstance(arg, tuple) else arg
                for arg in args])
        for func, args in record.calls
        if dense(args)
    ]  # fmt: skip
    return seconds(lambda: [func(*args) for func, args in calls], repeat=5), len(calls)


def attention_seconds(sizes, L, batch, precision, device) -> float:
    """Seconds of a training step's attention alone, compiled as training compiles it: per word,
    f_att's tanh and its product with w, the softmax and the context vector (:class:`Attention`
    with W_h h given, so no dense product), forward and backward over WORDS + 1 words, with the
    gradient of the (B, L, A) projection summed over them; the best of 5 timings. What the
    generated kernels take for the step's largest elementwise work."""
    _, _, att = sizes
    torch.manual_seed(0)
    attention = Attention(D, att, att).to(device)
    attention.hidden = torch.nn.Identity()  # att_h given: W_h h is one of the dense products
    compiled = torch.compile(attention)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    annotations = torch.randn(batch, L, D, device=device).relu().to(dtype)
    att_h = [torch.randn(batch, att, device=device, dtype=dtype) for _ in range(WORDS + 1)]
    grad_z, grad_alpha = torch.randn(batch, D, device=device), torch.randn(batch, L, device=device)
    projected = torch.randn(batch, L, att, device=device, dtype=dtype)

    def step():
        proj = projected.detach().requires_grad_()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = 0
            for h in att_h:
                alpha, z, _ = compiled(annotations, proj, h.detach().requires_grad_())
                loss = loss + (z.float() * grad_z).sum() + (alpha.float() * grad_alpha).sum()
        loss.backward()

    step()  # compiles
    return seconds(step, repeat=5)


def optimizer_seconds(device: str) -> tuple[float, float, int]:
    """Seconds of one Adam step over a VGG-sized decoder's parameters (random gradients): the
    per-parameter loop and the fused kernel (:func:`pipeline.train.steps.make_optimizer`), and the
    parameter count."""
    decoder = Decoder(DecoderConfig(vocab_size=VOCAB, annotation_dim=D)).to(device)
    for p in decoder.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    config = TrainConfig(features="", out="", device=device)
    loop, fused = (make_optimizer(decoder.parameters(), config, fused=f) for f in (False, True))
    return (
        seconds(loop.step, repeat=20),
        seconds(fused.step, repeat=20),
        sum(p.numel() for p in decoder.parameters()),
    )


def copy_bandwidth(device: str, megabytes: int = 256) -> float:
    """Bytes/s moved (read plus written) by copying a ``megabytes`` tensor into another, the best
    of 5: this machine's memory bandwidth as a kernel that only streams sees it."""
    a = torch.ones(megabytes << 19, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    return 2 * a.nbytes / seconds(lambda: b.copy_(a), repeat=5)


def attention_traffic(sizes, L, batch, precision) -> int:
    """The least bytes a training step's attention moves with one graph per word: per word, the
    forward reads the projection (B, L, A) and the annotation vectors (B, L, D, for the context
    vector); the backward reads both again and writes the projection's gradient. Tensors in bf16
    under autocast, else fp32."""
    width = 2 if precision == "bf16" else 4
    _, _, att = sizes
    return (WORDS + 1) * batch * L * (3 * att + 2 * D) * width


def top_ops(sizes, L, batch, attention, precision, device, compiled, rows: int = 8) -> list[str]:
    """The ``rows`` operators (a compiled graph's kernels among them) with the most self time (CPU
    time, or on CUDA GPU time) over 3 training steps, after 3 (the first steps of a process also
    page-fault their heap in)."""
    step = setup(sizes, L, batch, attention, precision, device, compiled)
    for _ in range(3):
        step()
    cuda = device != "cpu"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
        sync()

    def self_time(e):
        return e.self_device_time_total if cuda else e.self_cpu_time_total

    events = sorted(prof.key_averages(), key=self_time, reverse=True)
    total = sum(self_time(e) for e in events)
    return [f"{_op_name(e.key)} {100 * self_time(e) / total:.0f}%" for e in events[:rows]]


def _op_name(key: str) -> str:
    """A profile row's name, a compiled graph's call named as such (its hash says nothing)."""
    return "a compiled graph's fused kernels (forward or backward)" if "CompiledFxGraph" in key else key[:60]


def run(device: str = "cpu") -> list[str]:
    """The training-step table on ``device`` (eager and compiled, each precision), the ceiling of
    compiling, Adam's step, the compile's time and the profiles."""
    bf16 = native_bf16(torch.device(device))
    peaks = {"fp32": matmul_flops(torch.float32, device)}
    if bf16:
        peaks["bf16"] = matmul_flops(torch.bfloat16, device)
    configs = [
        (f"VGG-sized {a}, 512/1000/512, L=196, batch 64", ((512, 1000, 512), 196, 64, a)) for a in ("soft", "hard")
    ]
    configs.append(("port's sizes soft, 512/512/512, L=169, batch 32", ((512, 512, 512), 169, 32, "soft")))
    port = port_rate(device)
    lines = [
        f"Measured matmul peak ({matmul_side(device)}^3): "
        + ", ".join(f"{p} {f / 1e9:.0f} GFLOP/s" for p, f in peaks.items())
        + ". "
        f"The port's training step (bench/port.py, fp32), measured in this run at 512/512/512, L=169, batch 32: "
        f"{port:.0f} captions/s (the issue quotes {PORT_CAPTIONS_PER_S}).",
        "",
        "| configuration | precision | eager captions/s | compiled captions/s | compiled / eager "
        "| compiled GFLOP/s, of this precision's matmul peak | eager vs the port measured here (target >= 5) "
        f"| eager vs the quoted {PORT_CAPTIONS_PER_S} captions/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    step_seconds = {}  # (label, precision) -> eager and compiled seconds per step
    for label, args in configs:
        for precision, peak in peaks.items():
            eager, fused = (measure(*args, precision, device, compiled=c) for c in (False, True))
            step_seconds[label, precision] = (args[2] / eager["captions_s"], args[2] / fused["captions_s"])
            versus = (
                f"**{eager['captions_s'] / port:.1f}x** | {eager['captions_s'] / PORT_CAPTIONS_PER_S:.1f}x"
                if label.startswith("port")
                else " | "
            )
            lines.append(
                f"| {label} | {precision} | {eager['captions_s']:.0f} | {fused['captions_s']:.0f} | "
                f"**{fused['captions_s'] / eager['captions_s']:.2f}x** | {fused['flops'] / 1e9:.0f}, "
                f"{fused['flops'] / peak:.2g} | {versus} |"
            )
            progress(lines[-1])
    best = list(peaks)[-1]
    label, args = configs[0]
    step_s, compiled_s = step_seconds[label, best]
    products_s, count = products_seconds(*args, best, device)
    bandwidth, traffic = copy_bandwidth(device), attention_traffic(*args[:3], best)
    traffic_s = traffic / bandwidth
    attention_s = attention_seconds(*args[:3], best, device)
    lines += [
        "",
        f"Ceiling of compiling ({label}, {best}, eager): the step's {count} dense matrix products (every side of "
        f"m x k x n at least 8; recorded in one step and replayed alone on random inputs of the same shapes, "
        f"strides and dtype) take {1e3 * products_s:.0f} ms of its {1e3 * step_s:.0f} ms (the table's eager "
        f"rate). A compiled step, which "
        f"leaves them to the library, is at most **{step_s / products_s:.2f}x** eager even if all its other work "
        f"took no time; at 1.5x that work would have to fit in {1e3 * (step_s / 1.5 - products_s):.0f} ms, "
        f"against {1e3 * (step_s - products_s):.0f} ms eagerly and "
        f"{1e3 * (compiled_s - products_s):.0f} ms in the compiled step of the table. "
        f"Of that work the attention's least memory traffic (per word, forward: read the (B, L, A) projection and "
        f"the (B, L, D) annotation vectors; backward: read both, write the projection's gradient; "
        f"{traffic / 1e9:.2f} GB a step) takes {1e3 * traffic_s:.0f} ms at the copy "
        f"bandwidth measured here ({bandwidth / 1e9:.1f} GB/s), so the step is at most "
        f"**{step_s / (products_s + traffic_s):.2f}x** eager. "
        f"The attention alone, compiled as training compiles it (f_att's tanh and product with w, the softmax "
        f"and the context vector, forward and backward over the step's {WORDS + 1} words, W_h h given; "
        f"bench.training.attention_seconds), takes {1e3 * attention_s:.0f} ms: with the kernels inductor "
        f"generates, the step is at most **{step_s / (products_s + attention_s):.2f}x** eager even if all else "
        f"(the LSTM's gates, the output layer's softmax and loss, dropout, Adam) took no time.",
    ]
    loop_s, fused_s, count = optimizer_seconds(device)
    lines += [
        "",
        f"Adam's step over the VGG-sized decoder's {count / 1e6:.1f}M parameters (fp32): {1e3 * loop_s:.1f} ms "
        f"{'as a loop over the parameters' if device == 'cpu' else 'unfused (torch multi-tensor default)'}, "
        f"{1e3 * fused_s:.1f} ms fused (training's, "
        f"pipeline.train.loop.make_optimizer): **{loop_s / fused_s:.1f}x**.",
    ]
    cold, warm = compile_seconds(*args, best, device)
    epoch = FLICKR8K_CAPTIONS * compiled_s / args[2]  # at the table's compiled rate
    lines += [
        "",
        f"Compile ({label}, {best}; forward and backward of the step, each in a fresh process): {cold:.0f} s "
        f"with an empty cache, {warm:.1f} s from the cache it filled, {100 * warm / epoch:.1f}% of a Flickr8k "
        f"epoch ({FLICKR8K_CAPTIONS} captions at the compiled rate, {epoch:.0f} s).",
    ]
    products = {"forward": (64, 1000, 4000), "input gradient": (64, 4000, 1000), "weight gradient": (4000, 64, 1000)}
    dtype = torch.bfloat16 if bf16 else torch.float32
    lines += [
        "",
        f"The LSTM's W_hh h_{{t-1}} at batch 64 in {best}, as a fraction of the square product's GFLOP/s: "
        + ", ".join(
            f"{name} {' x '.join(map(str, shape))} {matmul_flops(dtype, device, shape) / peaks[best]:.2f}"
            for name, shape in products.items()
        )
        + " (a step's products are per word: 64 rows, or a sum over 64).",
    ]
    for label, args in configs[:2]:
        for compiled in (False, True):
            lines += [
                "",
                f"Profile, {label}, {best}, {'compiled' if compiled else 'eager'} "
                f"(self {'CPU' if device == 'cpu' else 'GPU'} time): "
                + ", ".join(top_ops(*args, best, device, compiled)),
            ]
    return lines
