# Show, Attend and Tell. Every target chains `cli.py` commands; the virtual environment lives outside
# the clone, keyed by a hash of requirements.txt, and is built on first use.
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
SPLITS ?=
SKIP_BAD ?=
OUT ?= data/features/$(DATASET)-$(ENCODER)

SOURCE = $(if $(filter karpathy,$(DATASET)),--karpathy-json $(KARPATHY_JSON) --image-dir $(IMAGE_DIR),--data-dir $(DATA_DIR))

.PHONY: venv features demo test
venv: $(VENV)/.complete

$(VENV)/.complete: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

features: venv
	$(PY) cli.py features --dataset $(DATASET) $(SOURCE) --encoder $(ENCODER) --weights $(WEIGHTS) \
		$(if $(SPLITS),--splits $(SPLITS)) --out $(OUT) $(if $(filter 1,$(SKIP_BAD)),--skip-bad-images)

# The main job on the embedded default: the generated synthetic corpus, SqueezeNet with seeded weights.
demo: venv
	$(MAKE) features DATASET=synthetic ENCODER=squeezenet1_1 WEIGHTS=random OUT=data/features/demo

test: venv
	$(PY) -m pytest -q tests
