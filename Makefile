# Two entry points do everything on a fresh machine: `make demo`, `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Debian packages the tests need (installed when missing; CI runs on a fresh clone):
# QEMU and mmdebstrap for the pod VM image and its VMs, prometheus for promtool (checks /metrics).
APT_PACKAGES := qemu-system-x86 qemu-utils mmdebstrap e2fsprogs prometheus

.PHONY: demo test bench protos duplicates clean apt-packages podvm-image

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

## Run the local-provider demo: 3 peer pods end to end in a private namespace.
demo: $(STAMP)
	$(BIN)/cloud-api-adaptor demo

## Install the Debian packages the tests need, only those missing.
apt-packages:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; } >/dev/null \
	    || echo "could not install $$missing (the tests that need them will fail under CI)"; \
	fi

## Build (or find in the cache) the local pod VM images the QEMU tests boot: one whose kata-agent is
## the third-party agent (tests/fakes/thirdpartypayload.py), then the default one, last, so the cache's
## `current` stays the development-agent image. Outside the private namespace, because mmdebstrap
## needs the machine's real root to keep file owners. A cache hit each when nothing changed.
podvm-image: $(STAMP) apt-packages
	@$(BIN)/python tests/fakes/thirdpartypayload.py $(VENV)/thirdparty-payload.tar >/dev/null
	@$(BIN)/cloud-api-adaptor image build local --agent-payload $(VENV)/thirdparty-payload.tar >/dev/null \
	  2>$(VENV)/podvm-image-thirdparty.log \
	  || { echo "image build local (third-party agent) failed (the QEMU tests will fail under CI); tail of $(VENV)/podvm-image-thirdparty.log:"; tail -5 $(VENV)/podvm-image-thirdparty.log; }
	@$(BIN)/cloud-api-adaptor image build local >/dev/null 2>$(VENV)/podvm-image.log \
	  || { echo "image build local failed (the QEMU tests will fail under CI); tail of $(VENV)/podvm-image.log:"; tail -5 $(VENV)/podvm-image.log; }

## Run the whole test suite inside a private user+net+mount namespace.
test: $(STAMP) podvm-image
	$(BIN)/python -m cloudadaptor.dev.privatens -- $(BIN)/python -m pytest $(PYTEST_ARGS)

## Every benchmark, one table (figure, ours, reference, ratio); BENCH_ARGS=--quick for about a minute.
## BENCH_QEMU=1 adds the real-VM figures of bench/qemu_pods.py (image build cold and cached, QEMU boot
## and StartVM for 1 and 3 pods: several minutes of CPU), run outside the private namespace because
## the image build needs the machine's real root; BENCH_QEMU_ARGS passes options (e.g. --pods 1 --skip-cold).
bench: $(STAMP) $(VENV)/.bench
	$(BIN)/python -m bench $(BENCH_ARGS)
	@if [ -n "$(BENCH_QEMU)" ]; then $(BIN)/python bench/qemu_pods.py $(BENCH_QEMU_ARGS); fi

$(VENV)/.bench: pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $@

## Regenerate cloudadaptor/protocols from protos/.
protos: $(STAMP)
	$(BIN)/python -m cloudadaptor.protocols.generate

## Repeated code across the tree (the library's `duplicates` command), without the generated *_pb2 modules.
duplicates:
	tmp=$$(mktemp -d) && git ls-files -z | grep -zv '_pb2\.pyi\?$$' | xargs -0 cp --parents -t "$$tmp" && \
	duplicates --repo "$$tmp" --most 40 --seconds 120; rm -rf "$$tmp"

clean:
	rm -rf $(VENV) .pytest_cache
