# Two entry points do everything on a fresh machine: `make demo`, `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench protos duplicates clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

## Run the local-provider demo: 3 peer pods end to end in a private namespace.
demo: $(STAMP)
	$(BIN)/cloud-api-adaptor demo

## Run the whole test suite inside a private user+net+mount namespace.
test: $(STAMP)
	$(BIN)/python -m cloudadaptor.dev.privatens -- $(BIN)/python -m pytest $(PYTEST_ARGS)

## Every benchmark, one table (figure, ours, reference, ratio); BENCH_ARGS=--quick for about a minute.
bench: $(STAMP) $(VENV)/.bench
	$(BIN)/python -m bench $(BENCH_ARGS)

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
