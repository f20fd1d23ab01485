# freezeframe: the two commands a newcomer needs are `make demo` and `make test`.
# Both start from a fresh Debian 12 machine: they install what is missing first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
# Tests keep their state (catalog, lab VMs, image cache) here, never in the user's home.
export FREEZEFRAME_TEST_HOME ?= $(CURDIR)/.test-home

.PHONY: setup system demo test lint typecheck pytest bench fuzz clean

# compileall: bytecode, as a pip-installed package has it; every run (and its guard)
# starts faster, even where PYTHONDONTWRITEBYTECODE keeps Python from caching it.
setup: system $(STAMP)
	@bash scripts/link-debian-modules.sh $(VENV)
	@$(BIN)/python -m compileall -q freezeframe

system:
	@bash scripts/setup-system.sh

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

demo: setup
	@bash scripts/demo.sh

test: setup
	$(BIN)/freezeframe --home $(FREEZEFRAME_TEST_HOME) lab build
	$(BIN)/freezeframe --home $(FREEZEFRAME_TEST_HOME) lab build --distro debian
	$(MAKE) --no-print-directory lint typecheck pytest

lint:
	$(BIN)/ruff check freezeframe tests bench fuzz
	shellcheck -s sh freezeframe/guest/hook.sh

typecheck:
	$(BIN)/mypy

pytest:
	$(BIN)/pytest -ra --durations=25

bench: setup
	@bash scripts/setup-system.sh bench
	$(BIN)/python bench/freeze_window.py
	$(BIN)/python bench/app_stall.py
	$(BIN)/python bench/backup_throughput.py
	$(BIN)/python bench/repo_scale.py
	$(BIN)/python bench/prune_vs_restic.py
	$(BIN)/python bench/recovery.py

fuzz: setup
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[fuzz]'
	$(BIN)/python fuzz/fuzz_guest_input.py -max_total_time=60
	corpus=$$(mktemp -d) && cp fuzz/corpus/repository_objects/* $$corpus && \
		$(BIN)/python fuzz/fuzz_repository_objects.py -max_total_time=60 $$corpus; \
		status=$$?; rm -rf $$corpus; exit $$status

clean:
	rm -rf $(VENV) $(FREEZEFRAME_TEST_HOME) .mypy_cache .ruff_cache .pytest_cache .hypothesis
