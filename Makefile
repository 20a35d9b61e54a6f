# Two commands do everything on a fresh Debian machine (as root, or a user with sudo):
#   make run    set up what serving needs, then serve on the embedded default (configs/default.toml)
#   make test   set up that and the test tools, then run the whole test suite
# Both are idempotent: a second run installs nothing and goes straight to its command.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# torch: the build this machine's pip offers (a CPU wheel here; CUDA where PyPI's is taken).
TORCH   ?= torch==2.13.0
MOSHI   ?= moshi==0.2.13
# Serving needs Python's venv and pip's certificates only: audio is decoded and resampled by
# wheels (soundfile bundles libsndfile, soxr), PJSIP comes as a wheel, and nothing calls sox.
SERVE_DEB := python3 python3-venv ca-certificates
# The tests add the peers and tools they run against: speech (espeak-ng for hibari-tts, sox to
# convert it), a browser, SIP phones and load (baresip, SIPp), the cluster (PostgreSQL,
# Kamailio, HAProxy).
TEST_DEB  := espeak-ng sox libsox-fmt-all chromium chromium-driver sip-tester baresip \
             postgresql kamailio haproxy
PYTEST_ARGS ?=
# The suite runs in two phases. First every test that shares a core well, on two workers; then,
# one at a time, the `solo` tests: those whose audio goes through PJSIP's real-time media clock,
# or that load the machine with twenty calls. Sharing two cores with another test, they would
# measure the machine rather than the bridge (a late 20 ms tick is a word PJSIP conceals).
# No worker restarts: with --dist loadgroup, xdist 3.8 hangs after replacing a crashed worker
# (pytest-xdist#1323/#1327), so a crash ends the run with its traceback, not a timeout.
PARALLEL ?= -n 2 --dist loadgroup --max-worker-restart 0

.PHONY: run test setup setup-test system-packages test-system-packages python-packages \
	test-python-packages lint bench clean

run: setup
	$(VENV)/bin/stt-bridge serve

# pytest's exit code 5 is "nothing collected": a PYTEST_ARGS that picks tests of one phase only.
test: setup-test
	$(PY) -m pytest -m "not solo" $(PARALLEL) $(PYTEST_ARGS) || [ $$? = 5 ]
	$(PY) -m pytest -m solo $(PYTEST_ARGS) || [ $$? = 5 ]

setup: system-packages python-packages
setup-test: setup test-system-packages test-python-packages

# apt only when something is missing, so repeated runs cost nothing.
define apt_missing
	@missing=$$(for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "==> Debian packages:" $$missing; \
		$(SUDO) apt-get update && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends $$missing; \
	fi
endef

system-packages:
	$(call apt_missing,$(SERVE_DEB))

test-system-packages:
	$(call apt_missing,$(TEST_DEB))

python-packages: $(VENV)/.installed
test-python-packages: $(VENV)/.installed-test

# pip without -q: torch alone is a large download, and its progress is worth seeing.
$(VENV)/.installed: pyproject.toml Makefile
	@echo "==> Python environment in $(VENV)"
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	@echo "==> torch ($(TORCH))"
	$(PIP) install "$(TORCH)"
	@echo "==> stt-bridge and what it serves with"
	$(PIP) install -e .
	@echo "==> moshi, without its pins (it pins torch<2.10, a multi-GB CUDA build on PyPI)"
	$(PIP) install --no-deps "$(MOSHI)"
	$(PY) -c "import moshi.models, onnxruntime, moonshine_cpp, silero_vad, soxr, aiohttp"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	@echo "==> test tools (pytest, selenium, hibari-tts, ...)"
	$(PIP) install -e ".[dev]"
	touch $@

lint: setup-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: setup-test
	$(PY) bench/audio.py
	$(PY) bench/cpu_engine.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
