# dalg — every command a user or CI types. `make install` is implied by the others and is a no-op when
# nothing changed (a stamp file newer than pyproject.toml).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.install-stamp
PYTHON ?= python3
ARGS ?=
# the torch / torchvision pins of pyproject.toml (a test checks they agree)
TORCH_VERSION := 2.14.1
TORCHVISION_VERSION := 0.29.1

.PHONY: install install-gpu run test test-slow lint format ablate bench eval models clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision first, pinned to the wheels on this machine's disk (pip takes them from there)
	$(PY) -m pip install -q torch==$(TORCH_VERSION) torchvision==$(TORCHVISION_VERSION)
	$(PY) -m pip install -q -e '.[dev,sweep]'
	@touch $(STAMP)

# CUDA machines: the CUDA build of the pinned torch/torchvision from PyTorch's wheel index (TORCH_CUDA=cu128 by
# default; cu126 for older drivers, see https://pytorch.org/get-started/locally), replacing the CPU build, then
# FAISS with GPU support instead of faiss-cpu (both provide the `faiss` module). Fails if torch has no CUDA after.
TORCH_CUDA ?= cu128
install-gpu: install
	$(PY) -m pip install -q --force-reinstall --no-deps torch==$(TORCH_VERSION) torchvision==$(TORCHVISION_VERSION) \
		--index-url https://download.pytorch.org/whl/$(TORCH_CUDA)
	$(PY) -c 'import torch; assert torch.version.cuda, f"torch {torch.__version__} is a CPU build"; \
		print("torch", torch.__version__, "CUDA", torch.version.cuda, "GPU visible:", torch.cuda.is_available())'
	$(PY) -m pip uninstall -y -q faiss-cpu
	$(PY) -m pip install -q -e '.[gpu]'

run: install  ## train the default model (DALG, CPU-sized) on the embedded data; evaluates every epoch
	$(PY) src/train.py $(ARGS)

test: install  ## the default test suite (fast; `make test-slow` for the long tests)
	$(PY) -m pytest -q $(ARGS)

test-slow: install
	$(PY) -m pytest -q -m slow $(ARGS)

lint: install
	$(VENV)/bin/ruff check src tests experiments benchmarks

format: install
	$(VENV)/bin/ruff format src tests experiments benchmarks

ablate: install  ## fusion x backbone sweep on the embedded data, then the table + plot in its sweep folder
	$(PY) experiments/ablation/run.py $(ARGS)

# rebuild a sweep's summary (written after every -m sweep): summary.{md,csv,json,png} in DIR, printed
.PHONY: sweep-summary
sweep-summary: install  ## make sweep-summary DIR=logs/train/multiruns/<run_name> [ARGS="--metrics mAP_E,mAP_M"]
	@test -n "$(DIR)" || { echo "usage: make sweep-summary DIR=<sweep folder>"; exit 2; }
	$(PY) -m dalg.sweeps.summary $(DIR) $(ARGS)

bench: install  ## efficiency benchmarks: prints figures, writes experiments/bench/*.json and a table
	$(PY) benchmarks/run_all.py $(ARGS)

eval: install  ## make eval ARGS="ckpt_path=... data=landmarks_mini"
	$(PY) src/eval.py $(ARGS)

models: install  ## parameters / GFLOPs / descriptor size of every model config
	$(PY) src/model_table.py $(ARGS)

# landmarks-mini's database -> a feature store (one per checkpoint, kept), then its queries searched against
# it: $(DEMO_DIR)/search/{results.json,results.png,report/index.html}
.PHONY: demo
LANDMARKS_MINI ?= ../shared/data/landmarks-mini
DEMO_DIR ?= logs/demo
demo: install  ## extract + search landmarks-mini with the newest logs/**/checkpoints/last.ckpt (or CKPT=...)
	@ckpt="$(CKPT)"; \
	[ -n "$$ckpt" ] || ckpt=$$(find logs -path '*/checkpoints/last.ckpt' -printf '%T@ %p\n' 2>/dev/null \
		| sort -n | tail -1 | cut -d' ' -f2-); \
	[ -f "$$ckpt" ] || { echo "no checkpoint '$$ckpt': train one (make run) or pass CKPT=<ckpt>"; exit 1; }; \
	echo "checkpoint: $$ckpt"; \
	$(PY) -c 'import sys, pathlib; from dalg.data.revisited import load_ground_truth; \
		gt = load_ground_truth(sys.argv[1], "landmarks-mini"); out = pathlib.Path(sys.argv[2]); \
		out.mkdir(parents=True, exist_ok=True); \
		[(out / f).write_text("".join(n + gt.suffix + "\n" for n in names)) \
		 for f, names in (("database.txt", gt.imlist), ("queries.txt", gt.qimlist))]' \
		$(LANDMARKS_MINI) $(DEMO_DIR) && \
	store=$(DEMO_DIR)/db_$$(sha256sum "$$ckpt" | cut -c1-12) && \
	$(PY) src/extract.py ckpt_path="$$ckpt" images=$(DEMO_DIR)/database.txt image_root=$(LANDMARKS_MINI)/jpg \
		output=$$store hydra.run.dir=$(DEMO_DIR)/extract && \
	$(PY) src/search.py index=$$store query=$(DEMO_DIR)/queries.txt query_root=$(LANDMARKS_MINI)/jpg \
		database_root=$(LANDMARKS_MINI)/jpg hydra.run.dir=$(DEMO_DIR)/search $(ARGS)

.PHONY: scale gpu-check
scale: install  ## GLDv2-clean's full size through the real data path -> experiments/scale/results.{md,json}
	$(PY) benchmarks/scale_gldv2.py $(ARGS)

# CUDA machines (`make install-gpu` first for FAISS-GPU): <= 8 min; exits 2 without CUDA, 1 if a check failed
gpu-check: install  ## bf16 training, DDP/NCCL, torch.compile, FAISS-GPU, extraction -> experiments/gpu/results.{md,json}
	$(PY) benchmarks/gpu_check.py $(ARGS)

clean:
	rm -rf logs outputs multirun wandb .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -prune -exec rm -rf {} +

# Datasets into $(DATA_ROOT) (= paths.data_dir): resumable, verified, nothing half-written under a final name
.PHONY: data-roxford5k data-rparis6k data-gldv2
DATA_ROOT ?= data
data-roxford5k: install  ## Revisited Oxford: $(DATA_ROOT)/roxford5k/{gnd_roxford5k.pkl,jpg/}
	$(PY) -m dalg.data.download roxford5k --root $(DATA_ROOT) $(ARGS)

data-rparis6k: install  ## Revisited Paris: $(DATA_ROOT)/rparis6k/{gnd_rparis6k.pkl,jpg/}
	$(PY) -m dalg.data.download rparis6k --root $(DATA_ROOT) $(ARGS)

data-gldv2: install  ## GLDv2 train_clean.csv + 500 image tars (md5-checked); ARGS="--parts 0-9" for a slice
	$(PY) -m dalg.data.download gldv2 --root $(DATA_ROOT) $(ARGS)

.PHONY: data-revisitop1m
data-revisitop1m: install  ## revisitop 1M distractors: $(DATA_ROOT)/revisitop1m/{revisitop1m.txt,jpg/}; ARGS="--parts 1-10"
	$(PY) -m dalg.data.download revisitop1m --root $(DATA_ROOT) $(ARGS)
