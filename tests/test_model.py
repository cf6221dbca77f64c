import itertools
import json
from pathlib import Path

import pytest
import torch

from pipeline.io.errors import PipelineError
from pipeline.model.decoder import AttentionTanh, Decoder, DecoderConfig, ObjectiveConfig, attention_entropy, objective


def tiny(L=3, D=4, V=7, **kw):
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=V, annotation_dim=D, embed_dim=5, hidden_dim=6, attention_dim=4, dropout=0.0, **kw)
    return Decoder(cfg).eval(), torch.randn(1, L, D)


def test_shapes_and_attention_is_a_distribution():
    decoder, a = tiny(attention_layers=2, output_tanh=True)
    captions = torch.tensor([[1, 4, 5, 6, 2], [1, 6, 6, 4, 2]])
    out = decoder(a.expand(2, -1, -1), captions)
    assert out.logits.shape == (2, 4, 7) and out.alpha.shape == (2, 4, 3) and out.beta.shape == (2, 4)
    torch.testing.assert_close(out.alpha.sum(2), torch.ones(2, 4))
    assert ((out.beta > 0) & (out.beta < 1)).all() and torch.equal(out.log_p_s, torch.zeros(2))
    sampled = decoder(a.expand(2, -1, -1), captions, "sample")
    assert (sampled.log_p_s < 0).all()
    with pytest.raises(PipelineError, match="unknown context"):
        decoder(a, captions[:1], "nearest")


def test_doubly_stochastic_term_is_eq_14():
    decoder, a = tiny()
    captions = torch.tensor([[1, 4, 5, 2]])
    out = decoder(a, captions)
    plain, _ = objective(out, captions, ObjectiveConfig(alpha_c=0.0))
    regularised, parts = objective(out, captions, ObjectiveConfig(alpha_c=2.0))
    expected = 2.0 * ((1 - out.alpha[0].sum(0)) ** 2).sum()
    torch.testing.assert_close(regularised - plain, expected)
    assert parts["nll"] == pytest.approx(plain.item())


def test_label_smoothing_is_torchs_smoothed_cross_entropy_and_leaves_the_nll_reported():
    """With label_smoothing eps each word's loss is torch's cross-entropy with label_smoothing=eps
    (summed over the caption), while 'nll' and hard attention's reward stay the plain NLL."""
    decoder, a = tiny()
    captions = torch.tensor([[1, 4, 5, 6, 2], [1, 6, 3, 4, 2]])
    out = decoder(a.expand(2, -1, -1), captions, "sample")
    plain, parts = objective(out, captions, ObjectiveConfig(alpha_c=0.0))
    smoothed, smoothed_parts = objective(out, captions, ObjectiveConfig(alpha_c=0.0, label_smoothing=0.2))
    targets = captions[:, 1:].flatten()
    expected = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), targets, label_smoothing=0.2) * 4
    torch.testing.assert_close(smoothed, expected)
    assert not torch.isclose(smoothed, plain)
    assert smoothed_parts["nll"] == pytest.approx(parts["nll"]) == pytest.approx(plain.item())
    sampled = objective(out, captions, ObjectiveConfig(alpha_c=0.0, label_smoothing=0.2), sampled=True)[1]
    assert sampled["reward"] == pytest.approx(-parts["nll"])
    with pytest.raises(PipelineError, match="label.smoothing"):
        ObjectiveConfig(label_smoothing=1.0)


def test_sharpness_penalty_adds_the_attention_entropy_and_lowers_it():
    """sharpness_c * sum_t H(alpha_t) is added to the loss of the expected context, and its
    gradient steps make alpha concentrate while the NLL part stays what it was."""
    decoder, a = tiny()
    captions = torch.tensor([[1, 4, 5, 2]])
    out = decoder(a, captions)
    plain, _ = objective(out, captions, ObjectiveConfig(alpha_c=0.0))
    sharp, _ = objective(out, captions, ObjectiveConfig(alpha_c=0.0, sharpness_c=0.5))
    H = attention_entropy(out.alpha[0]).sum()
    torch.testing.assert_close(sharp - plain, 0.5 * H)
    optimizer = torch.optim.SGD(decoder.parameters(), lr=0.5)
    for _ in range(30):
        optimizer.zero_grad()
        objective(decoder(a, captions), captions, ObjectiveConfig(alpha_c=0.0, sharpness_c=5.0))[0].backward()
        optimizer.step()
    assert attention_entropy(decoder(a, captions).alpha[0]).sum() < 0.5 * H


def test_sharpness_target_penalises_only_the_entropy_above_it():
    """With sharpness_target, each word's H(alpha_t) counts only above the target: nothing when
    every word is below it, the excess otherwise; training stops pushing a word's entropy once it
    is below the target."""
    decoder, a = tiny()
    captions = torch.tensor([[1, 4, 5, 2]])
    out = decoder(a, captions)
    H = attention_entropy(out.alpha[0])  # (T,)
    plain, _ = objective(out, captions, ObjectiveConfig(alpha_c=0.0))
    above, _ = objective(out, captions, ObjectiveConfig(alpha_c=0.0, sharpness_c=0.5, sharpness_target=10.0))
    torch.testing.assert_close(above, plain)
    target = H.median().item()
    part, _ = objective(out, captions, ObjectiveConfig(alpha_c=0.0, sharpness_c=0.5, sharpness_target=target))
    torch.testing.assert_close(part - plain, 0.5 * (H - target).clamp_min(0).sum())
    assert 0 < (part - plain).item() < 0.5 * H.sum().item()
    goal = 0.5 * H.max().item()

    def trained(target):
        decoder, _ = tiny()
        optimizer = torch.optim.SGD(decoder.parameters(), lr=0.05)
        for _ in range(60):
            optimizer.zero_grad()
            cfg = ObjectiveConfig(alpha_c=0.0, sharpness_c=5.0, sharpness_target=target)
            objective(decoder(a, captions), captions, cfg)[0].backward()
            optimizer.step()
        return attention_entropy(decoder(a, captions).alpha[0])

    after, unbounded = trained(goal), trained(0.0)
    assert after.max() < 1.1 * goal and after.min() > 0.5 * goal > unbounded.max()  # down to the target, not past


def test_sharpness_over_the_caption_bounds_only_the_mean_entropy():
    """With sharpness_over 'caption', the penalty is sharpness_c * T * (mean_t H(alpha_t) - target)
    where the mean is above the target, and nothing where it is below, even with words above it;
    trained, the caption's mean entropy comes down to the target while its words may differ."""
    decoder, a = tiny()
    captions = torch.tensor([[1, 4, 5, 2]])
    out = decoder(a, captions)
    H = attention_entropy(out.alpha[0])  # (T,)
    plain, _ = objective(out, captions, ObjectiveConfig(alpha_c=0.0))

    def penalised(target):
        cfg = ObjectiveConfig(alpha_c=0.0, sharpness_c=0.5, sharpness_target=target, sharpness_over="caption")
        return objective(out, captions, cfg)[0]

    below = H.mean().item() - 0.01
    torch.testing.assert_close(penalised(below) - plain, 0.5 * len(H) * (H.mean() - below))
    above = (H.mean() + H.max()).item() / 2
    assert H.max() > above > H.mean()  # a word above the target, yet the mean is below it
    torch.testing.assert_close(penalised(above), plain)

    goal = 0.5 * H.mean().item()
    optimizer = torch.optim.SGD(decoder.parameters(), lr=0.05)
    for _ in range(60):
        optimizer.zero_grad()
        cfg = ObjectiveConfig(alpha_c=0.0, sharpness_c=5.0, sharpness_target=goal, sharpness_over="caption")
        objective(decoder(a, captions), captions, cfg)[0].backward()
        optimizer.step()
    assert 0.8 * goal < attention_entropy(decoder(a, captions).alpha[0]).mean() < 1.1 * goal


def _path_log_probs(decoder, a, captions, L, T):
    """log p(s|a) and log p(y|s, a) of every attention path s in {0..L-1}^T."""
    paths = torch.tensor(list(itertools.product(range(L), repeat=T)))
    out = decoder(a.expand(len(paths), -1, -1), captions.expand(len(paths), -1), paths)
    _, parts = objective(out, captions.expand(len(paths), -1), ObjectiveConfig(alpha_c=0.0))
    nll = (
        torch.nn.functional.cross_entropy(
            out.logits.flatten(0, 1), captions[:, 1:].expand(len(paths), -1).flatten(), reduction="none"
        )
        .view(len(paths), T)
        .sum(1)
    )
    return out.log_p_s, -nll


@pytest.mark.parametrize("baseline, attention_error", [("moving", 0.08), ("batch", 0.02)])
def test_reinforce_estimator_matches_the_exact_gradient(baseline, attention_error):
    """Eq. 11-12: the average of the sampled estimator (entropy off) over 400k samples equals the
    gradient of L_s = sum_s p(s|a) log p(y|s, a), computed exactly by enumerating all L^T = 27
    paths: within 1% (relative L2 error) over all parameters and within ``attention_error`` on the
    attention MLP's, both without a baseline ('moving' at 0; measured: 0.3% and 5.4%, the Monte
    Carlo error) and with the leave-one-out minibatch mean ('batch': unbiased, and with less
    variance; measured: 0.2% and 0.2%)."""
    L, T = 3, 3
    decoder, a = tiny(L=L)
    captions = torch.tensor([[1, 4, 5, 2]])
    names, params = zip(*decoder.named_parameters())
    attention = [n.startswith("attention.") for n in names]  # f_att: where the score-function term matters

    log_p_s, log_p_y = _path_log_probs(decoder, a, captions, L, T)
    assert torch.exp(log_p_s).sum().item() == pytest.approx(1.0, abs=1e-5)
    exact = torch.autograd.grad((torch.exp(log_p_s) * log_p_y).sum(), params, allow_unused=True)

    n = 400_000
    torch.manual_seed(1)
    out = decoder(a.expand(n, -1, -1), captions.expand(n, -1), "sample")
    cfg = ObjectiveConfig(alpha_c=0.0, reinforce_scale=1.0, entropy_c=0.0, baseline=baseline)
    loss, _ = objective(out, captions.expand(n, -1), cfg, sampled=True, baseline=0.0)
    estimate = torch.autograd.grad(-loss, params, allow_unused=True)

    def flat(grads, only_attention=False):
        return torch.cat(
            [g.flatten() for g, att in zip(grads, attention) if g is not None and (att or not only_attention)]
        )

    def relative_error(grads, only_attention=False):
        x = flat(exact, only_attention)
        return ((flat(grads, only_attention) - x).norm() / x.norm()).item()

    assert relative_error(estimate) < 0.01 and relative_error(estimate, only_attention=True) < attention_error
    # the score-function term matters: without it the attention gradient is far off
    out = decoder(a.expand(n, -1, -1), captions.expand(n, -1), "sample")
    no_reinforce, _ = objective(out, captions.expand(n, -1), ObjectiveConfig(alpha_c=0.0))
    assert relative_error(torch.autograd.grad(-no_reinforce, params, allow_unused=True), only_attention=True) > 0.3


@pytest.mark.parametrize("baseline", ["batch", "moving"])
def test_authors_reward_per_word_summed_over_the_batch(baseline):
    """reward 'word' (the authors' code): reward and baseline per word, the score-function and
    entropy terms summed over the minibatch: n/T times the 'caption' form's REINFORCE term (same
    samples; a moving baseline given per word), n times its entropy term."""
    decoder, a = tiny(L=3)
    n, T = 8, 3
    captions = torch.tensor([[1, 4, 5, 2]]).expand(n, -1)
    torch.manual_seed(0)
    out = decoder(a.expand(n, -1, -1), captions, "sample")
    nll = objective(out, captions, ObjectiveConfig(alpha_c=0.0))[0]
    terms = {}
    for reward, given in (("caption", -6.0), ("word", -2.0)):
        for entropy_c in (0.0, 0.5):
            cfg = ObjectiveConfig(alpha_c=0.0, entropy_c=entropy_c, baseline=baseline, reward=reward)
            loss, stats = objective(out, captions, cfg, sampled=True, baseline=given)
            terms[reward, entropy_c] = (loss - nll).item()
        assert stats["reward"] == pytest.approx(-stats["nll"] / (T if reward == "word" else 1), rel=1e-5)
    assert terms["word", 0.0] == pytest.approx(n / T * terms["caption", 0.0], rel=1e-4)
    entropy_term = terms["caption", 0.5] - terms["caption", 0.0]
    assert entropy_term < 0 and terms["word", 0.5] - terms["word", 0.0] == pytest.approx(n * entropy_term, rel=1e-4)


def test_attention_input_scale_divides_what_f_att_sees():
    """proj = W_a (a_i / scale) + b: a decoder with scale s on a is the unscaled one on a / s for
    f_att, while the initial state still sees the unscaled mean."""
    scaled, a = tiny(attention_input_scale=4.0)
    plain, _ = tiny()
    state, proj = scaled.init_state(a)
    plain_state, _ = plain.init_state(a)
    torch.testing.assert_close(proj, plain.init_state(a / 4.0)[1])
    torch.testing.assert_close(state, plain_state)


@pytest.mark.parametrize(
    "scale, message",
    [
        (0.0, r"attention_input_scale 0.0: give a positive number .*new_decoder_config"),
        (-1.0, r"`attention_input_scale`: -1.0 is not in the range 0<=x"),
        (float("nan"), r"`attention_input_scale`: nan is not a finite number"),
    ],
)
def test_an_unresolved_attention_input_scale_is_refused(scale, message):
    """0 stands for the training annotation vectors' RMS, which only training can resolve; built
    with it the decoder would divide by it, so it refuses instead (a negative or NaN scale is out
    of DecoderConfig's range)."""
    with pytest.raises(PipelineError, match=message):
        tiny(attention_input_scale=scale)


def test_decoding_in_blocks_of_rows_gives_the_training_step():
    """Without autograd on a CPU the attention energies go through in blocks of rows (here 40 rows
    of (64, 512) in blocks of 16, the last one short); the step must not change."""
    torch.manual_seed(0)
    decoder = Decoder(
        DecoderConfig(vocab_size=9, annotation_dim=8, embed_dim=6, hidden_dim=10, attention_dim=512, dropout=0.0)
    ).eval()
    a = torch.randn(40, 64, 8).relu()
    state, proj = decoder.init_state(a)
    embedded = decoder.embedding(torch.randint(0, 9, (40,)))
    with torch.no_grad():
        blocked = decoder.step(embedded, state, a, proj)
    whole = decoder.step(embedded, state, a, proj)  # autograd on: one (40, 64, 512) sum
    torch.testing.assert_close(blocked[0], tuple(x.detach() for x in whole[0]))  # the state
    for x, y in zip(blocked[1:4], whole[1:4]):  # z, alpha, beta
        torch.testing.assert_close(x, y.detach())


def test_attention_tanh_is_tanh_with_tanh_gradient():
    """f_att's tanh, computed on a CPU as 2 sigmoid(2x) - 1 in place: its values and both input
    gradients are those of torch.tanh(proj + att_h), in float64, float32 and bfloat16 (within
    1 ulp of bfloat16's 8-bit significand)."""
    torch.manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 3e-7), (torch.bfloat16, 2**-8)):
        proj = (3 * torch.randn(4, 7, 5, dtype=torch.float64)).to(dtype).requires_grad_()
        att_h = torch.randn(4, 5, dtype=torch.float64).to(dtype).requires_grad_()
        grad = torch.randn(4, 7, 5, dtype=torch.float64).to(dtype)
        y = AttentionTanh.apply(proj, att_h)
        reference = torch.tanh((proj + att_h.unsqueeze(1)).detach().double())  # of the sum in dtype
        assert y.dtype == dtype and (y.double() - reference).abs().max() <= tol
        got = torch.autograd.grad(y, (proj, att_h), grad)
        # the exact gradient at the computed output, as tanh's own backward pass forms it
        exact = grad.double() * (1 - y.detach().double() ** 2)
        torch.testing.assert_close(got[0].double(), exact, rtol=0, atol=tol * 8)
        torch.testing.assert_close(got[1].double(), exact.sum(1), rtol=0, atol=tol * 64)
    assert torch.autograd.gradcheck(
        AttentionTanh.apply, (proj.detach().double().requires_grad_(), att_h.detach().double().requires_grad_())
    )


def test_bf16_teacher_forcing_casts_the_annotations_once():
    """Under bf16 autocast the (B, L, D) annotations are cast once per pass, not by the context
    bmm of each of the T steps; the logits stay those of the float32 pass to bf16 accuracy."""
    from torch.profiler import ProfilerActivity, profile

    decoder, a = tiny(L=6, D=8)
    a = a.expand(3, -1, -1).contiguous()
    captions = torch.tensor([[1, 4, 5, 6, 3, 2]] * 3)
    with torch.no_grad():
        reference = decoder(a, captions).logits
        with (
            profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof,
            torch.autocast("cpu", dtype=torch.bfloat16),
        ):
            logits = decoder(a, captions).logits

    def callers(event):
        while event.cpu_parent is not None:
            event = event.cpu_parent
            yield event.name

    casts = [
        list(callers(e)) for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes[:1] == [[3, 6, 8]]
    ]
    # one cast of the pass's own; mean(1) of the initial state accumulates bf16 in float32 inside
    assert [c for c in casts if "aten::mean" not in c] == [["aten::to"]]
    torch.testing.assert_close(logits.float(), reference, atol=0.05, rtol=0.05)


def test_a_checkpoint_of_main_at_103e4ad_loads_and_captions_identically(tmp_path):
    """tests/data/checkpoint-103e4ad.pt was written by main at 103e4ad (tiny soft model trained
    with lr 3e-3 on object features of seed 0, best of 6 epochs, weight average 0.9), before the
    Attention module; its .captions.json holds the beam-3 captions that version decoded for the 10
    test scenes."""
    from pipeline.checkpoint import build_decoder, load_checkpoint
    from pipeline.config import DecodeConfig
    from pipeline.features.shards import AnnotationShards
    from pipeline.model.decode import beam_search

    from object_features import write_object_features

    data = Path(__file__).parent / "data"
    write_object_features(tmp_path, sizes={"train": 300, "val": 10, "test": 10})
    decoder, vocab = build_decoder(load_checkpoint(data / "checkpoint-103e4ad.pt"), "checkpoint-103e4ad.pt")
    shards = AnnotationShards(tmp_path, "test")
    found = beam_search(
        decoder.eval(), torch.stack([shards[i] for i in range(10)]), vocab, DecodeConfig(allow_unk=True)
    )
    expected = json.loads((data / "checkpoint-103e4ad.captions.json").read_text())
    assert [c.tokens for c in found] == expected["captions"]
    assert [c.log_prob for c in found] == pytest.approx(expected["log_probs"], abs=1e-4)
