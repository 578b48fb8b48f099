# The two commands of the README: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# `make demo DEMO_PORT=29617` where another job already holds DeepSpeed's default port on a shared machine.
DEMO_PORT ?= 29500
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast test-bench bench clean

install: $(STAMP)

# torch/torchvision are pinned in setup.py (the one place); pip takes them from local disk here.
$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]'
	touch $(STAMP)

# Generate the captioned-shapes shards, pre-train the tiny recipe with ZeRO-3 on 2 CPU ranks, export it
# (megavl, timm, transformers, OpenCLIP) and score it on the shapes classes zero-shot.
demo: $(STAMP)
	rm -rf outputs/tiny  # a fresh run each time (--resume auto would otherwise find the finished one)
	$(BIN)/megavl-synth-shapes --out outputs/shapes --num-train 4096 --num-val 256 --seed 0 \
	    --image-size 64 --samples-per-shard 1024
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/deepspeed --master_port $(DEMO_PORT) --num_gpus 2 megavl/train.py \
	    --ds_config ds_configs/zero3.json --config configs/tiny.yaml $(DEMO_ARGS)
	$(BIN)/megavl-synth-classes --out outputs/shape_classes --per-class 16 --seed 0 --classes kind --shards
	$(BIN)/megavl-export outputs/tiny/checkpoints outputs/tiny/export --peers all
	$(BIN)/megavl-evaluate --task zeroshot --weights outputs/tiny/export --images outputs/shape_classes/images \
	    --classnames outputs/shape_classes/classnames.txt --templates outputs/shape_classes/zeroshot_classification_templates.txt \
	    --out outputs/tiny/zeroshot --dataset shapes
	@echo "exports (docs/using_elsewhere.md): megavl outputs/tiny/export, timm outputs/tiny/export/vision,"
	@echo "  transformers outputs/tiny/export/text, OpenCLIP outputs/tiny/export/open_clip"

# The whole suite except GPU-only tests (those skip with a reason on CPU anyway). tests/README.md: what runs where.
test: $(STAMP)
	$(BIN)/python -m pytest tests -m "not gpu" -ra --durations=15 $(PYTEST_ARGS)

# The checks of the benchmark programs themselves (bench/tests; tests/ imports nothing from bench/).
test-bench: $(STAMP)
	$(BIN)/python -m pytest bench/tests -m "not gpu" -ra $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests/unit -m "not slow and not gpu" -q

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) outputs build *.egg-info
