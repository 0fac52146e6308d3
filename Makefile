# Two entry points (see README): `make demo` runs the main job, `make test` the test suite.
# Both create .venv on first use. torch is pinned first, exactly, so that pip takes the
# machine's CPU build and never pulls CUDA wheels; GPU users see README "Installing on a GPU".
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.delrec-installed

.PHONY: demo test test-all install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	@if $(PY) -m pip list 2>/dev/null | grep -qi '^nvidia-'; then \
		echo "error: CUDA wheels were installed into $(VENV); remove it and install torch==2.13.0 first" >&2; exit 1; fi
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/delrec data prepare --format synthetic --out runs/demo/data --overwrite
	$(VENV)/bin/delrec data stats runs/demo/data

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
