# Two entry points for a fresh machine: `make demo` and `make test`. Each builds .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The faiss build: cpu (faiss-cpu) or gpu (faiss-gpu, CUDA 12): `make venv FAISS=gpu`. One module, two builds:
# switching uninstalls the other one first.
FAISS ?= cpu
OTHER_FAISS := $(if $(filter gpu,$(FAISS)),cpu,gpu)
STAMP := $(VENV)/.installed-$(FAISS)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
CHROMIUM := /usr/bin/chromium

export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: venv demo test test-fast fashion-mnist chromium bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip uninstall --quiet --yes faiss-$(OTHER_FAISS) 2>/dev/null || true
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,dask,s3,$(FAISS)]'
	rm -f $(VENV)/.installed-$(OTHER_FAISS)
	touch $@

# Debian's dataset-fashion-mnist (MIT); end-to-end tests and benchmarks read it. Needs root or sudo.
fashion-mnist: $(FMNIST)
$(FMNIST):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist

# Debian's chromium: the acceptance test screenshots the HTML cache report headless (~80 s to install,
# apt-get update included, on a 2-core machine). Needs root or sudo; pytest skips that test without chromium.
chromium: $(CHROMIUM)
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

demo: venv
	$(BIN)/distillery demo

# --durations=15: the 15 slowest tests listed at the end of every run, so a test that grows slow is seen where it grows.
# -n WORKERS: pytest-xdist workers, by default one per logical core up to 4 (each with its share of the cores' threads,
# tests/conftest.py; a worker's fixtures and models peak near 3 GB, so more cores do not get more workers);
# `make test WORKERS=0` runs in one process. --dist loadfile: a module's tests run on one worker,
# so its module-scoped fixtures are built once; session fixtures are built once per worker.
WORKERS ?= $(shell n=$$(nproc); echo $$(( n < 4 ? n : 4 )))
test: venv fashion-mnist chromium
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile --durations=15; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

test-fast: venv
	$(BIN)/python -m pytest -q --durations=15 -m "not slow"

bench: venv fashion-mnist
	$(BIN)/distillery bench

clean:
	rm -rf runs build
