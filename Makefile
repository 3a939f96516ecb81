# One-command entry points. Each creates .venv if missing and installs what it needs;
# a second run only re-installs when pyproject.toml changed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORE_STAMP := $(VENV)/.installed-core
LIGHT_STAMP := $(VENV)/.installed-light
# torch comes first, pinned, so pip takes the build on this machine's disk rather than
# resolving a newer one from the index.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test test-fast clean bench-env bench-speed

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# the library and its CLI (what `make demo` needs)
$(CORE_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .
	touch $(CORE_STAMP)

# the light extras: what the README's next commands need besides the core (imgcls audit,
# export, serve, and Grad-CAM explanations): 0.38 GB and 8 s next to the core's 5.8 GB
$(LIGHT_STAMP): $(CORE_STAMP)
	$(BIN)/pip install -q -e ".[data,export,serve]"
	touch $(LIGHT_STAMP)

# everything the tests need: all extras (explain, export, serve, ...) and the test tools
$(STAMP): $(CORE_STAMP)
	$(BIN)/pip install -q -e ".[dev,all]"
	touch $(STAMP)

install: $(STAMP)

# Train the reference CNN on the digits that ship inside scikit-learn (no download).
demo: $(LIGHT_STAMP)
	$(BIN)/imgcls train --data digits --model reference_cnn --epochs 8 --batch-size 32 --out runs --name demo --exist-ok

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# TensorFlow for the Keras reference benchmarks only: a separate environment, never a
# dependency of imgcls (bench/keras_reference.py, bench/mnist_vs_keras.py).
BENCH_ENV := .bench-env
$(BENCH_ENV)/.ready:
	$(PY) -m venv $(BENCH_ENV)
	$(BENCH_ENV)/bin/pip install -q tensorflow-cpu==2.21.0 numpy
	touch $(BENCH_ENV)/.ready

bench-env: $(BENCH_ENV)/.ready

# Speed benchmarks (minutes; they take the shared heavy-job lock).
bench-speed: $(STAMP) $(BENCH_ENV)/.ready
	flock /tmp/imgcls-heavy.lock $(BIN)/python bench/mnist_vs_keras.py --rounds 2
	flock /tmp/imgcls-heavy.lock $(BIN)/python bench/cifar10.py --recipe fast

clean:
	rm -rf runs .pytest_cache
