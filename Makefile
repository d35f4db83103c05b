# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
RUN := PATH="$(BIN):$$PATH" DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
FASHION_MNIST := /usr/share/datasets/fashion-mnist
CHROMIUM := /usr/bin/chromium
QUICK := -S data.train_limit=6000 -S data.test_limit=2000 -S old.epochs=1 -S side_info.epochs=1 \
         -S new.epochs=1 -S v3.epochs=1 -S bct.backbone.epochs=1 -S transformation.epochs=5

.PHONY: setup postgres demo quick test sweep bench clean

# constraints.txt pins every package to the versions the README's figures were measured with.
$(BIN)/fct-registry: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]' -c constraints.txt
	touch $@

# Debian ships Fashion-MNIST as a package; elsewhere the prepare stage falls back to torchvision's downloader.
$(FASHION_MNIST):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
	    || echo "apt could not install dataset-fashion-mnist: prepare will use torchvision's downloader"; \
	else echo "dataset-fashion-mnist not installed (needs root + apt): prepare will use torchvision's downloader"; fi

# The shared-registry tests (tests/faces/test_shared_server.py) start a throwaway PostgreSQL under an mlflow server;
# Debian's `postgresql` package provides the server binaries (/usr/lib/postgresql/<major>/bin/initdb, pg_ctl).
postgres:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) \
	    || echo "apt could not install postgresql: tests/faces/test_shared_server.py will fail until it is installed"; \
	else echo "postgresql not installed (needs root + apt): tests/faces/test_shared_server.py will fail until it is"; fi

# Debian's chromium renders the MLflow UI's pages headless in a test (tests/faces/test_ui_pages.py).
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	    || echo "apt could not install chromium: tests/faces/test_ui_pages.py will fail until it is installed"; \
	else echo "chromium not installed (needs root + apt): tests/faces/test_ui_pages.py will fail until it is"; fi

setup: $(BIN)/fct-registry $(FASHION_MNIST) postgres $(CHROMIUM)

demo: setup                       ## the main job: dvc repro, then the retrieval table
	$(RUN) dvc repro
	@cat reports/retrieval.md
	@$(BIN)/python -c "import json; print(json.dumps(json.load(open('metrics/retrieval.json'))['summary'], indent=2))"
	@echo "chart: reports/retrieval.png (dvc plots show renders every chart into dvc_plots/index.html)"

quick: setup                      ## a first look in a few minutes (fewer images, 1 epoch), as a DVC experiment
	$(RUN) dvc exp run $(QUICK)
	@cat reports/retrieval.md

sweep: setup                      ## the paper's ablation: old dim x side-info dim, as DVC experiments
	$(RUN) python experiments/sweep.py

test: setup
	$(RUN) pytest -q

bench: setup                      ## benchmarks, run by hand; results in bench/results/
	$(RUN) python bench/run_all.py

clean:
	rm -rf data/prepared models embeddings registry/mlflow.db registry/artifacts registry/downloads
