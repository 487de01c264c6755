# `make demo` and `make test` each build the virtual environment they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= out/demo.mp4
DEMO_RUN ?= $(basename $(DEMO_OUT))
DEMO_STREAMS ?= 3
DEMO_CHUNKS ?= 80
PYTEST_ARGS ?=

.PHONY: demo test browser lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# the CPU build of torch first: an unpinned torch requirement would pull several GB of CUDA wheels
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,wan]'
	touch $(STAMP)

demo: $(STAMP)
	@rm -rf $(DEMO_RUN) && mkdir -p $(dir $(DEMO_OUT))
	$(VENV)/bin/longroll run --streams $(DEMO_STREAMS) --chunks $(DEMO_CHUNKS) --workers 2 --memory retrieval --out $(DEMO_RUN) --quiet
	$(VENV)/bin/longroll export s0 $(DEMO_OUT) --out $(DEMO_RUN)

browser:
	@# the dashboard's browser test drives Debian's Chromium through Playwright's client (no browser download)
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium (Debian package) for the dashboard's browser test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "warning: chromium is missing and cannot be installed without root: the browser test will skip" >&2; fi

test: $(STAMP) browser
	@# pytest exits 5 when it collected no tests: that is a failure here
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "error: no tests were collected" >&2; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/cache.py

clean:
	rm -rf $(VENV) out
