# Two entry points: `make demo` (the embedded demo end to end, no weights or network) and `make test`.
# Both create .venv on first use and install the exact set CI tested, from requirements/lock.txt:
# torch first (its CPU build is on the machine; a plain `torch` requirement would pull CUDA), then
# the package and its extras under the lock's constraints. `make lock` refreshes the lock.
PYTHON ?= python3
comma := ,
VENV := .venv
PY := $(VENV)/bin/python
LOCK := requirements/lock.txt
EXTRAS := dev,serve,deepspeed,demo,quant,track
# The torch line of the lock; for a CUDA build keep the version and add an index, e.g.
# make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= $(shell grep -m1 '^torch==' $(LOCK))
# The tests that name an upstream break: official numerics, generation, adapters, one training run.
UPSTREAM_TESTS := tests/model tests/test_generate.py tests/policy/test_presets.py tests/policy/test_rules.py \
	tests/train/test_resume.py tests/train/test_final_save.py

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) pip setuptools
	$(PY) -m pip install -q $(TORCH_SPEC)
	# No build isolation: DeepSpeed's build imports torch, so it must build against the torch just
	# installed (an isolated build would fetch another one), and ours uses the locked setuptools.
	$(PY) -m pip install -q -c $(LOCK) --no-build-isolation -e ".[$(EXTRAS)]"
	# On a CPU, DeepSpeed compiles a shared-memory collective the first time it starts (about 35 s
	# on 2 cores). Build it here, into this environment, where tests/conftest.py points it, so the
	# first distributed test does not pay for it and two checkouts do not rebuild each other's.
	TORCH_EXTENSIONS_DIR=$(abspath $(VENV))/torch_extensions $(PY) -c "from deepspeed.accelerator import \
	get_accelerator as a; b = a().create_op_builder('ShareMemCommBuilder'); b and b.load(verbose=False)" \
	|| echo "DeepSpeed's CPU op did not build now; DeepSpeed builds it when it first starts"
	touch $@

.PHONY: install demo test bench lock test-upstream test-floor
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/monkeytune demo

# Two workers, each running a whole test file at a time (module fixtures are built once), in the
# order tests/conftest.py gives: the files that launch ranks first, longest first, while the
# single-process files fill the other core.
test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15  # the slowest tests, so a regression shows

bench: $(VENV)/.installed
	$(PY) bench/vision.py

# Resolve every dependency afresh, to the newest release within pyproject.toml's ranges, and write
# the pins (pip, setuptools and torch included) to the lock. To move to newer releases: check them
# with `make test-upstream`, raise the caps in pyproject.toml, `make lock`, then `make test`, and
# commit the lock only with a passing suite.
LOCK_VENV := .venv-lock
TORCH_VERSION ?= 2.13.0
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip setuptools
	$(LOCK_VENV)/bin/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(LOCK_VENV)/bin/python -m pip install -q --no-build-isolation ".[$(EXTRAS)]"
	mkdir -p $(dir $(LOCK))
	{ echo "# The exact set CI tests (Python 3.11, Linux x86-64). Made by 'make lock'; installed by 'make install'."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable \
	    | grep -v '^monkeytune' | sed -E 's/^torch==([^+]*)\+.*/torch==\1/'; } > $(LOCK)
	rm -rf $(LOCK_VENV)

# The same package against the newest transformers, peft and accelerate that install here, for the
# tests above. CI runs it while the locked set installs, and reports a failure without blocking.
UPSTREAM := .venv-upstream
$(UPSTREAM)/.installed: pyproject.toml $(LOCK)
	test -x $(UPSTREAM)/bin/python || $(PYTHON) -m venv $(UPSTREAM)
	$(UPSTREAM)/bin/python -m pip install -q -c $(LOCK) pip
	$(UPSTREAM)/bin/python -m pip install -q $(TORCH_SPEC)
	# The upstream tests need the package and pytest only (not the serving, browser and API clients of dev).
	$(UPSTREAM)/bin/python -m pip install -q -c $(LOCK) -e . pytest pytest-xdist
	touch $@

test-upstream: $(UPSTREAM)/.installed
	# Every time, so a kept environment still meets the newest releases.
	$(UPSTREAM)/bin/python -m pip install -q --upgrade transformers peft accelerate
	$(UPSTREAM)/bin/python -m pip list 2>/dev/null | grep -E '^(transformers|peft|accelerate|torch) '
	$(UPSTREAM)/bin/python -m pytest -q -n 2 --dist loadfile $(UPSTREAM_TESTS)

# The same package at the floors of pyproject.toml's ranges (each direct requirement at the lowest
# version it allows), for the whole suite. Run by hand when a floor moves; the result is in the README.
FLOOR := .venv-floor
$(FLOOR)/.installed: pyproject.toml
	test -x $(FLOOR)/bin/python || $(PYTHON) -m venv $(FLOOR)
	$(FLOOR)/bin/python -m pip install -q -c $(LOCK) pip
	$(FLOOR)/bin/python -m pip install -q -c $(LOCK) setuptools
	$(PYTHON) requirements/floor_pins.py $(subst $(comma), ,$(EXTRAS)) > $(FLOOR)/floors.txt
	$(FLOOR)/bin/python -m pip install -q $(TORCH_SPEC)
	$(FLOOR)/bin/python -m pip install -q -c $(FLOOR)/floors.txt --no-build-isolation -e ".[$(EXTRAS)]"
	touch $@

test-floor: $(FLOOR)/.installed
	$(FLOOR)/bin/python -m pytest -q
