# Two entry points do everything on a fresh machine: `make demo`, `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Debian packages the QEMU tests need (installed when missing; CI runs on a fresh clone).
APT_PACKAGES := qemu-system-x86 qemu-utils mmdebstrap e2fsprogs

.PHONY: demo test protos lint clean apt-packages podvm-image

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

## Run the local-provider demo: 3 peer pods end to end in a private namespace.
demo: $(STAMP)
	$(BIN)/cloud-api-adaptor demo

## Install the Debian packages the QEMU pod VM tests need, only those missing.
apt-packages:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; } >/dev/null \
	    || echo "could not install $$missing (the QEMU tests will fail under CI)"; \
	fi

## Build (or find in the cache) the local pod VM image the QEMU tests boot; outside the private
## namespace, because mmdebstrap needs the machine's real root to keep file owners.
podvm-image: $(STAMP) apt-packages
	@$(BIN)/cloud-api-adaptor image build local >/dev/null 2>$(VENV)/podvm-image.log \
	  || { echo "image build local failed (the QEMU tests will fail under CI); tail of $(VENV)/podvm-image.log:"; tail -5 $(VENV)/podvm-image.log; }

## Run the whole test suite inside a private user+net+mount namespace.
test: $(STAMP) podvm-image
	$(BIN)/python -m cloudadaptor.dev.privatens -- $(BIN)/python -m pytest $(PYTEST_ARGS)

## Regenerate cloudadaptor/protocols from protos/.
protos: $(STAMP)
	$(BIN)/python -m cloudadaptor.protocols.generate

clean:
	rm -rf $(VENV) .pytest_cache
