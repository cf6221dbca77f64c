"""Compiled decoding steps: :meth:`pipeline.model.decoder.Decoder.step` (attention, gate and LSTM: one
word of one caption) compiled by torch.compile's inductor backend into fused C++ (CPU) or Triton
(CUDA) kernels, for training's teacher-forced pass and for every decoder (beam search, greedy
decoding, SCST sampling). ``--compile`` on `train`, `evaluate`, `caption` and `serve`, and
``compile=`` of a :class:`~pipeline.captioner.Captioner` call, take one of :data:`COMPILE_MODES`.

What is compiled, and why the step: the teacher-forced pass loops over the T words of a minibatch,
and compiling the pass would unroll that loop, one graph per caption length (Flickr8k has about 20
length buckets, each graph minutes to compile). The step's graph does not depend on T. Batch sizes
vary (a length bucket's last minibatch, a beam whose images finish): the first change of size
recompiles once with the size symbolic (torch.compile's automatic dynamic shapes), and no sizes
after that recompile. So a training run compiles the step 2 times with gradients (forward and
backward) and 2 times without (validation's beam search), plus 2 for a hard run's sampled context.

Where the time goes (bench/RESULTS.md): inside the step, f_att's tanh(W_a a_i + W_h h) and its
product with w (eq. 4), the softmax (eq. 5) and the context vector's sum (eq. 13) become one pass
over the (B, L, A) and (B, L, D) tensors instead of one pass per operation; the matrix products
stay the library's (oneDNN, cuBLAS). Under autocast the step's linear layers compute with
weights cast once per pass (:func:`cast_once`), as eager autocast's cache has them; cast inside
the graph, at every word, they made compiled bf16 training slower than eager. With gradients,
f_att's sigmoid is kept for the backward graph, not evaluated again there
(``pipeline.model.decoder._keep_sigmoid``). Over a whole epoch on a CPU (caption lengths and batch
sizes vary; the output layer, the weight average and the data are outside the step) compiled bf16
training gains nothing reliable over eager, so `auto` leaves it eager (:data:`SLOWER_BF16_TRAINING`).
The figures: bench/RESULTS.md and docs/benchmarks.md.

The compile cache (inductor's FX-graph and AOTAutograd caches) is kept between runs in
``~/.cache/show-attend-tell/inductor`` (``$TORCHINDUCTOR_CACHE_DIR`` where set): a compile that
takes about a minute the first time takes seconds after.
"""

import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module  # what torch.func.functional_call swaps weights with

from ..config import COMPILE_MODES, DECODE_ROWS
from ..io.errors import PipelineError, param

log = logging.getLogger(__name__)

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "show-attend-tell" / "inductor"
SLOWER_BF16_TRAINING = "compiled bf16 training gains nothing reliable over eager on a CPU (docs/benchmarks.md)"
RECOMPILE_LIMIT = 64  # graphs of the step kept (torch's default, 8, is reached by a test session)
_STEP = None  # Decoder.step compiled, built on first use (:func:`compiled_step`)


def compiler(device: torch.device) -> str:
    """What inductor needs on ``device`` and this machine lacks ('' where nothing): a C++ compiler
    for a CPU (``$CXX``, g++, c++ or clang++ on the PATH), Triton for a GPU."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return "" if has_triton() else "Triton (pip install triton)"
    names = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    return "" if any(name and shutil.which(name) for name in names) else "a C++ compiler (apt-get install g++)"


def decide(mode: str, device, work: int, enough: int, what: str, note: bool = True, slower: str = "") -> bool:
    """Whether to compile: ``mode`` 'on' or 'off' as given; 'auto': on where inductor can compile
    for ``device`` (a torch device or its name; :func:`compiler`), compiled code is not known to
    be slower here (``slower``: why it is, e.g. a benchmark's figure) and ``work`` (captions, or
    images x beam size; ``what`` says it in words, e.g. '4 epochs x 300 captions') reaches
    ``enough``, so that the compile (about a minute uncached) pays for itself.
    With ``note``, an 'auto' that decides off for a run long enough to compile says why on stderr
    (one line); a short run stays eager silently.
    Raises PipelineError for 'on' where inductor cannot compile, or an unknown mode."""
    if mode not in COMPILE_MODES:
        raise PipelineError(f"{param('compile', mode)}: choose one of {', '.join(COMPILE_MODES)}")
    device = torch.device(device)
    missing = compiler(device) if mode != "off" else ""
    if mode == "on" and missing:
        raise PipelineError(
            f"{param('compile', 'on')} needs {missing} on this machine for {device.type}; "
            f"or use {param('compile', 'off')}"
        )
    if mode != "auto":
        return mode == "on"
    why = (
        f"needs {missing}"
        if missing
        else slower or (f"{what} is too short to pay for compiling" if work < enough else "")
    )
    if why and note and work >= enough:
        log.info(f"note: compile 'auto' stays off ({why}; 'on' forces it)")
    return not why


def decide_decoding(settings, device, images: int, note: bool = True) -> bool:
    """:func:`decide` for decoding ``images`` images with ``settings`` (a DecodeConfig: its
    ``compile`` mode and beam size), the work counted as images x beam size against
    :data:`~pipeline.config.DECODE_ROWS`."""
    rows, work = images * settings.beam_size, f"{images} images x beam {settings.beam_size}"
    return decide(settings.compile, device, rows, DECODE_ROWS, work, note)


def use_compiled(decoders, on: bool) -> None:
    """Run each decoder's :meth:`~pipeline.model.decoder.Decoder.step` compiled (``on``) or eagerly.
    The first compiled call compiles (or loads from :data:`CACHE`); the weights stay the module's
    parameters, so a compiled decoder trains, saves and loads as an eager one."""
    for decoder in decoders:
        decoder.compiled = on


@contextmanager
def cast_once(decoder):
    """Within, a compiled ``decoder`` under autocast computes with its linear layers' weights and
    biases cast to autocast's dtype here, once per pass (a teacher-forced pass, a decoding), not
    once per word. Eager autocast keeps its casts of the weights for the whole autocast region,
    but a compiled step's graph cannot reach that cache: without this it casts the step's 8.5M
    weights (VGG-sized: W_hh, W_e, W_z, W_h) at every word of every caption, forward and backward,
    which made compiled bf16 training slower than eager (docs/benchmarks.md). Gradients flow back through
    the one cast to the float32 parameters, as under eager autocast. Eager decoders, or no
    autocast: nothing changes."""
    device = next(decoder.parameters()).device.type
    if not (decoder.compiled and torch.is_autocast_enabled(device)):
        yield
        return
    dtype = torch.get_autocast_dtype(device)
    linears = [(name, m) for name, m in decoder.named_modules() if isinstance(m, nn.Linear)]
    cast = {f"{name}.{k}": p.to(dtype) for name, m in linears for k, p in m.named_parameters()}
    with _reparametrize_module(decoder, cast):
        yield


def compiled_step(decoder, *args):
    """``decoder.step(*args)`` compiled: one compiled function for every decoder (modules are
    inputs of the graph, not constants, so a second decoder, e.g. the weight average, reuses the
    graphs of the first)."""
    global _STEP
    if _STEP is None:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(CACHE))  # read by inductor when it compiles
        # a graph per grad mode, autocast state, context kind and decoder, 2 per batch size (static, then symbolic)
        torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
        _STEP = torch.compile(type(decoder).step)
    return _STEP(decoder, *args)
