# ssl-foundry: `make demo` and `make test` set everything up themselves.
VENV ?= .venv
PY := $(VENV)/bin/python
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: setup demo test bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	$(PY) -m pytest tests

bench: setup
	$(VENV)/bin/foundry bench train configs/simclr_resnet18_fmnist.yaml --out bench/train.json

clean:
	rm -rf runs bench .pytest_cache
