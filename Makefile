# Two entry points for a fresh machine (see README):
#   make serve  -> a torch-free serving venv, then the server on the shipped default bundle
#   make test   -> a full dev venv (CPU torch), then the test suite
PYTHON ?= python3
VENV ?= .venv
SERVE_VENV ?= .venv-serve
BUNDLE ?= bundles/mnist-default
ARGS ?=

.PHONY: test serve venv lint clean bundle

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	# CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(VENV)/bin/python -m pip install -q torch==2.13.0
	$(VENV)/bin/python -m pip install -q -e '.[serve,train,dev]'
	touch $@

$(SERVE_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install -q --upgrade pip
	$(SERVE_VENV)/bin/python -m pip install -q -e '.[serve]'
	touch $@

venv: $(VENV)/.installed

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest $(ARGS)

serve: $(SERVE_VENV)/.installed
	$(SERVE_VENV)/bin/python -m runtime serve $(BUNDLE) $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(SERVE_VENV) build *.egg-info

# Re-train and re-export the shipped default bundle from scratch (2-core CPU: about 1 h
# when the machine is otherwise idle). Budgets are the trainers' `cpu` presets, with every flag
# of the shipped bundle's f pinned (2 + 4 blocks of width 16 / 64, 6 epochs, Mixup alpha 1;
# today's MNIST preset is deeper); the exact commands are also recorded in
# bundles/mnist-default/manifest.json (provenance).
RUN ?= runs/mnist
bundle: $(VENV)/.installed
	$(VENV)/bin/python -m trainer classifier --dataset mnist --preset cpu --epochs 6 --blocks-per-stage 2 4 --hidden-channels 16 64 --mixup-alpha 1 --augment-shift 0 --threads 1 --out $(RUN)
	$(VENV)/bin/python -m trainer ideal-data --classifier $(RUN)/classifier.pt --n 5 --k 4 --preset cpu --threads 1 --out $(RUN)/ideal_k4.npz
	$(VENV)/bin/python -m trainer encoder --classifier $(RUN)/classifier.pt --ideal-data $(RUN)/ideal_k4.npz --preset cpu --l1-weight 10 --latent-weight 10 --distill-weight 1 --lr 5e-4 --steps 500 --eval-every 250 --out $(RUN)/encoder_k4.pt
	$(VENV)/bin/python -m trainer parm --classifier $(RUN)/classifier.pt --k 4 --preset cpu --steps 1200 --eval-every 400 --out $(RUN)/parm_k4.pt
	$(VENV)/bin/python -m export $(RUN)/classifier.pt $(RUN)/encoder_k4.pt $(RUN)/parm_k4.pt --out $(BUNDLE) --model-name mnist-coded-invnet --overwrite
