# Everything sets itself up: the first target that needs Python builds .venv
# from the package registry. Only python3 (3.11+) is needed on the machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: test lint demo fuzz fuzz-long api-fuzz openapi bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

## make test: types and lint, the whole suite, a short fuzz run, and core line coverage (>= 90%)
test: $(STAMP) lint
	HYPOTHESIS_PROFILE=ci $(PY) -m coverage erase
	HYPOTHESIS_PROFILE=ci $(PY) -m coverage run -m pytest -q
	$(PY) -m coverage report
	$(PY) -m fuzz.run --seconds 20

## make lint: mypy (strict on core/, default on shell/) and ruff, both clean
# mypy sees the installed layout (scaiwave_federation.core -> core/) through a
# tree of two symbolic links under .venv.
MYPY_TREE := $(VENV)/mypy-tree
lint: $(STAMP)
	mkdir -p $(MYPY_TREE)/scaiwave_federation
	ln -sfn $(CURDIR)/core $(MYPY_TREE)/scaiwave_federation/core
	ln -sfn $(CURDIR)/shell $(MYPY_TREE)/scaiwave_federation/shell
	cd $(MYPY_TREE) && MYPYPATH=. $(CURDIR)/$(PY) -m mypy --strict --namespace-packages --explicit-package-bases \
		--cache-dir $(CURDIR)/.mypy_cache -p scaiwave_federation.core
	cd $(MYPY_TREE) && MYPYPATH=. $(CURDIR)/$(PY) -m mypy --namespace-packages --explicit-package-bases \
		--cache-dir $(CURDIR)/.mypy_cache -p scaiwave_federation.shell
	$(PY) -m ruff check core shell tests fuzz bench examples

## make demo: two federating servers on loopback with real TLS, the guide end to end
demo: $(STAMP)
	$(VENV)/bin/scaiwave demo

## make fuzz-long: the long fuzz run (one hour, all harnesses)
fuzz-long: $(STAMP)
	$(PY) -m fuzz.run --seconds 3600

## make api-fuzz: schemathesis against a real daemon, 500 fresh random examples per operation (make test runs 12, derandomized)
api-fuzz: $(STAMP)
	SCAIWAVE_API_FUZZ_EXAMPLES=500 SCAIWAVE_API_FUZZ_RANDOM=1 $(PY) -m pytest -q -p no:cacheprovider tests/test_api_fuzz.py

## make openapi: rewrite docs/openapi.json from the route table (tests/test_openapi.py fails when it is stale)
openapi: $(STAMP)
	$(PY) -m scaiwave_federation.shell.http.openapi > docs/openapi.json.tmp && mv docs/openapi.json.tmp docs/openapi.json

## make bench: every benchmark (each prints PASS/FAIL per target); exits 1 if any target is missed
bench: $(STAMP)
	status=0; for b in ingest pipeline replay federation scale peers backlog workers; do echo "== bench.$$b"; $(PY) -m bench.$$b || status=1; done; exit $$status

clean:
	rm -rf $(VENV) build *.egg-info .coverage .hypothesis .pytest_cache .mypy_cache .ruff_cache demo-run
