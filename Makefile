# keyrotation: `make demo` and `make test` do all set-up on a fresh clone.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
UV_VERSION := 0.13.9
BACKEND ?= vault
export PYTHONPATH := $(CURDIR)/include:$(CURDIR)/plugins:$(CURDIR)/dags

.PHONY: install test demo up down lint lock bench clean screenshots dist

$(VENV)/.installed: requirements.txt requirements-dev.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(PY) -r requirements-dev.txt -c constraints.txt
	touch $@

# The C page walk of module-level PME re-encryption, built next to its source when it changed (without a compiler
# the Python walk does the same work, more slowly: scripts/build_native.py).
install: $(VENV)/.installed
	$(PY) scripts/build_native.py

# TEST_WORKERS=2: two pytest-xdist workers, one test module each at a time (the suite waits on servers much of
# the time). Not the default yet: see README, "Set-up".
TEST_WORKERS ?= 0

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

demo: install
	BACKEND=$(BACKEND) $(PY) scripts/demo.py

up: install
	exec $(PY) scripts/up.py

down:
	$(PY) scripts/up.py down

bench: install
	BENCH_COMMAND="make bench" $(PY) bench/run.py --size full

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff check --select AIR3 dags plugins

screenshots: install
	KEYROTATION_SCREENSHOTS=$(CURDIR)/docs/images $(VENV)/bin/pytest -q tests/test_ui.py

# The wheel deployments install (docs/deploy): dist/keyrotation-<version>-py3-none-any.whl.
dist: install
	rm -rf dist
	$(VENV)/bin/uv build --wheel --out-dir dist .

lock: install
	$(VENV)/bin/uv pip freeze --python $(PY) | grep -v -E '^(uv|pip)==' > constraints.txt

clean:
	rm -rf var
