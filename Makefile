# Two commands do everything on a fresh Debian machine (as root, or a user with sudo):
#   make run    set up, then serve on the embedded default (configs/default.toml)
#   make test   set up, then run the whole test suite
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# torch: the build this machine's pip offers (a CPU wheel here; CUDA where PyPI's is taken).
TORCH   ?= torch==2.13.0
MOSHI   ?= moshi==0.2.13
DEB_PACKAGES := espeak-ng sox libsox-fmt-all chromium chromium-driver sip-tester baresip \
                python3-venv ca-certificates postgresql kamailio haproxy
PYTEST_ARGS ?=
# The suite runs in two phases. First every test that shares a core well, on two workers; then,
# one at a time, the `solo` tests: those whose audio goes through PJSIP's real-time media clock,
# or that load the machine with twenty calls. Sharing two cores with another test, they would
# measure the machine rather than the bridge (a late 20 ms tick is a word PJSIP conceals).
# No worker restarts: with --dist loadgroup, xdist 3.8 hangs after replacing a crashed worker
# (pytest-xdist#1323/#1327), so a crash ends the run with its traceback, not a timeout.
PARALLEL ?= -n 2 --dist loadgroup --max-worker-restart 0

.PHONY: run test setup system-packages python-packages lint bench clean

run: setup
	$(VENV)/bin/stt-bridge serve

# pytest's exit code 5 is "nothing collected": a PYTEST_ARGS that picks tests of one phase only.
test: setup
	$(PY) -m pytest -m "not solo" $(PARALLEL) $(PYTEST_ARGS) || [ $$? = 5 ]
	$(PY) -m pytest -m solo $(PYTEST_ARGS) || [ $$? = 5 ]

setup: system-packages python-packages

# apt only when something is missing, so repeated runs cost nothing.
system-packages:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

python-packages: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev]"
	# moshi pins torch<2.10 (a multi-GB CUDA build on PyPI): take it without its pins.
	$(PIP) install -q --no-deps "$(MOSHI)"
	$(PY) -c "import moshi.models, onnxruntime, moonshine_cpp, silero_vad, soxr, aiohttp"
	touch $@

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: setup
	$(PY) bench/audio.py
	$(PY) bench/cpu_engine.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
