"""--compile (pipeline.model.compiled): the decoder's step compiled by torch.compile computes what the
eager step computes, in training and in beam search, and `auto` compiles only runs long enough to
pay for it. (Killed and resumed compiled training: tests/test_faults.py.)"""

import json
import logging

import pytest
import torch

from pipeline.checkpoint import build_decoder, load_checkpoint
from pipeline.config import DecodeConfig
from pipeline.features.shards import AnnotationShards
from pipeline.io.errors import PipelineError
from pipeline.model import compiled
from pipeline.model.decode import beam_search
from pipeline.model.decoder import Decoder, DecoderConfig
from pipeline.train.loop import TrainConfig, train

from object_features import write_object_features

TINY = dict(embed_dim=16, hidden_dim=32, attention_dim=16)
needs_compiler = pytest.mark.skipif(
    bool(compiled.compiler(torch.device("cpu"))), reason="no C++ compiler for torch.compile on this machine"
)


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    out = tmp_path_factory.mktemp("objects")
    write_object_features(out, sizes={"train": 300, "val": 40, "test": 40})
    return out


def notes(caplog) -> str:
    """The library's log lines since the last call, and forget them."""
    text = caplog.text
    caplog.clear()
    return text


def test_auto_compiles_long_runs_where_a_compiler_is_found(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="pipeline")
    cpu = torch.device("cpu")
    monkeypatch.setattr(compiled.shutil, "which", lambda name: "/usr/bin/g++" if name == "g++" else None)
    monkeypatch.delenv("CXX", raising=False)
    assert compiled.decide("auto", cpu, 200_000, 100_000, "8 epochs x 25000 captions")
    assert notes(caplog) == ""
    assert not compiled.decide("auto", cpu, 600, 100_000, "2 epochs x 300 captions")
    assert notes(caplog) == ""  # a short run stays eager silently
    assert compiled.decide("on", cpu, 1, 100_000, "") and not compiled.decide("off", cpu, 10**9, 1, "")
    slower = compiled.SLOWER_BF16_TRAINING
    assert not compiled.decide("auto", cpu, 10**9, 1, "", slower=slower)  # measured slower: auto stays eager
    assert f"note: compile 'auto' stays off ({slower}; 'on' forces it)" in notes(caplog)
    assert compiled.decide("on", cpu, 10**9, 1, "", slower=slower)
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    assert not compiled.decide("auto", cpu, 200_000, 100_000, "8 epochs x 25000 captions")
    assert "off (needs a C++ compiler (apt-get install g++)" in notes(caplog)
    assert not compiled.decide("auto", cpu, 600, 100_000, "2 epochs x 300 captions")
    assert notes(caplog) == ""
    with pytest.raises(
        PipelineError, match=r"`compile='on'` needs a C\+\+ compiler .* for cpu; or use `compile='off'`"
    ):
        compiled.decide("on", "cpu", 1, 1, "")
    with pytest.raises(PipelineError, match="`compile='yes'`: choose one of auto, on, off"):
        compiled.decide("yes", cpu, 1, 1, "")


def _pass(decoder, annotations, captions, context):
    decoder.zero_grad()
    out = decoder(annotations, captions, context)
    (out.logits.logsumexp(2).sum() + out.alpha.pow(2).sum()).backward()
    return out, {k: p.grad.clone() for k, p in decoder.named_parameters() if p.grad is not None}


@needs_compiler
@pytest.mark.parametrize("context", ["expected", "locations"])
def test_compiled_teacher_forced_pass_equals_eager(context):
    """fp32: logits, attention weights and every gradient to float32 rounding, at two batch sizes
    and two caption lengths (the second size compiles the batch dimension as symbolic)."""
    torch.manual_seed(0)
    decoder = Decoder(DecoderConfig(vocab_size=40, annotation_dim=24, **TINY)).eval()
    for batch, length in ((6, 5), (9, 8)):
        annotations = torch.randn(batch, 16, 24).relu()
        captions = torch.randint(4, 40, (batch, length))
        where = torch.randint(0, 16, (batch, length - 1)) if context == "locations" else "expected"
        compiled.use_compiled([decoder], False)
        eager, eager_grads = _pass(decoder, annotations, captions, where)
        compiled.use_compiled([decoder], True)
        fused, fused_grads = _pass(decoder, annotations, captions, where)
        torch.testing.assert_close(fused.logits, eager.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused.alpha, eager.alpha, rtol=1e-5, atol=1e-6)
        assert fused_grads.keys() == eager_grads.keys()
        for name in eager_grads:
            torch.testing.assert_close(fused_grads[name], eager_grads[name], rtol=1e-4, atol=1e-5, msg=name)


@needs_compiler
def test_compiled_pass_under_autocast_casts_the_weights_once_and_equals_eager():
    """bf16 autocast: within a compiled pass (cast_once) the linear layers compute with bf16 copies
    of their weights, made once, and the float32 parameters are back afterwards; the pass gives
    eager autocast's logits, attention weights and gradients to bf16 rounding."""
    torch.manual_seed(0)
    decoder = Decoder(DecoderConfig(vocab_size=40, annotation_dim=24, **TINY)).eval()
    annotations, captions = torch.randn(6, 16, 24).relu(), torch.randint(4, 40, (6, 5))
    results = {}
    for on in (False, True):
        compiled.use_compiled([decoder], on)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[on] = _pass(decoder, annotations, captions, "expected")
    (eager, eager_grads), (fused, fused_grads) = results[False], results[True]
    torch.testing.assert_close(fused.logits.float(), eager.logits.float(), rtol=0.03, atol=0.03)
    torch.testing.assert_close(fused.alpha.float(), eager.alpha.float(), rtol=0.03, atol=0.005)
    assert fused_grads.keys() == eager_grads.keys() == {k for k, _ in decoder.named_parameters()}
    for name, grad in eager_grads.items():
        assert fused_grads[name].dtype == torch.float32
        if name != "attention.score.bias":  # its gradient is 0 (softmax ignores a constant): both are rounding noise
            assert (fused_grads[name] - grad).norm() <= 0.05 * grad.norm(), name
    weight = decoder.lstm_hidden.weight
    with torch.autocast("cpu", dtype=torch.bfloat16), compiled.cast_once(decoder):
        assert decoder.lstm_hidden.weight.dtype == decoder.attention.hidden.weight.dtype == torch.bfloat16
        assert decoder.embedding.weight.dtype == torch.float32  # autocast leaves embeddings alone
    assert decoder.lstm_hidden.weight is weight and weight.dtype == torch.float32
    compiled.use_compiled([decoder], False)
    with torch.autocast("cpu", dtype=torch.bfloat16), compiled.cast_once(decoder):
        assert decoder.lstm_hidden.weight is weight  # eager: autocast's own cache casts


@needs_compiler
def test_compiled_step_keeps_f_atts_sigmoid_for_the_backward_pass():
    """With gradients, the compiled step saves f_att's sigmoid(2 (W_a a_i + W_h h_{t-1})), (B, L, A),
    for its backward pass (pipeline.model.decoder._keep_sigmoid), where inductor alone would save the inputs
    and evaluate it again there."""
    torch.manual_seed(0)
    decoder = Decoder(DecoderConfig(vocab_size=40, annotation_dim=24, **TINY))
    compiled.use_compiled([decoder], True)
    annotations, captions = torch.randn(6, 16, 24).relu(), torch.randint(4, 40, (6, 5))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.detach().clone()) or t, lambda t: t):
        decoder(annotations, captions)
    with torch.no_grad():
        (h, _), proj = decoder.init_state(annotations)
        first = torch.sigmoid(2 * (proj + decoder.attention.hidden(h).unsqueeze(1)))  # the first word's
    assert any(t.shape == first.shape and torch.allclose(t, first, atol=1e-6) for t in saved)


@needs_compiler
def test_compiled_training_and_beam_search_equal_eager(objects, tmp_path):
    """One epoch compiled and one eager from the same seed, in the run's precision (bf16 where the CPU
    computes it natively): the same loss to bf16 noise; then beam search of the trained decoder,
    compiled and eager, gives the same captions of the held-out images."""
    runs = {}
    for mode in ("off", "on"):
        config = TrainConfig(
            features=str(objects), out=str(tmp_path / mode), epochs=1, batch_size=32, val_beam_size=2, compile=mode,
            model=TINY,
        )  # fmt: skip
        train(config, progress=False)
        runs[mode] = json.loads((tmp_path / mode / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("loss", "nll"):
        assert runs["on"][key] == pytest.approx(runs["off"][key], rel=0.02), key
    decoder, vocab = build_decoder(load_checkpoint(tmp_path / "on" / "best.pt"), "best.pt")
    annotations = torch.stack(list(AnnotationShards(objects, "test")))
    captions = {}
    for on in (False, True):
        compiled.use_compiled([decoder], on)
        captions[on] = [c.tokens for c in beam_search(decoder.eval(), annotations, vocab, DecodeConfig(beam_size=3))]
    assert captions[True] == captions[False]
