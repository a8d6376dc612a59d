# The README's two commands: `make run` and `make test`. Everything else is what they need.
VENV        ?= .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
MODEL_DIR   ?= models/SmolLM2-135M-Instruct
export API_PORT    ?= 8000
export FLOWER_PORT ?= 5555
export REDIS_PORT  ?= 6379

.PHONY: setup model redis prometheus run test test-unit test-core chaos bench bench-batch bench-client lint typecheck clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	VENV=$(VENV) scripts/setup.sh
	touch $@

model: $(MODEL_DIR)/conversion.json

$(MODEL_DIR)/conversion.json: | $(STAMP)
	$(PY) -m worker.model_prep --output $(MODEL_DIR)

redis:
	scripts/ensure-redis.sh

prometheus:
	scripts/ensure-prometheus.sh

# The API runs as API_PROCESSES processes on one port; unset, min(cores // 2, 8).
run: setup model redis
	$(PY) scripts/stack.py run

test: setup model redis prometheus lint typecheck
	$(PY) -m pytest tests

test-unit: setup
	$(PY) -m pytest tests/unit

# Pure logic plus every Redis script, the reaper and the worker runtime on a real Redis: seconds.
test-core: setup redis
	$(PY) -m pytest tests/unit tests/core

# The seeded chaos run alone, e.g. `make chaos CHAOS_SEED=1,2,3` (part of `make test` with one seed).
chaos: setup model redis
	$(PY) -m pytest tests/integration/test_chaos.py -s

# Every figure of the README's Performance section, in one run (about 17 min here): the
# engine alone / `vllm serve` / llmq, the CPU a request costs each process of serve and
# of llmq, the orchestration ceilings next to Celery's no-op
# rate, batches (fake engine; a 200 MB input file's API memory), 1,000 idle streams, API
# processes, and 1 to 4 worker hosts (network namespaces: needs root). BENCH_ARGS go to
# bench_stream.py, e.g. BENCH_ARGS="--only serve,llmq --levels 1,8,32".
bench: setup model redis
	$(PY) bench/bench_stream.py $(BENCH_ARGS)
	$(PY) bench/bench_cpu.py
	$(PY) bench/bench_ceiling.py
	$(PY) bench/bench_batch.py --skip-real --memory-mb 200
	$(PY) bench/bench_idle.py --streams 1000 --api-processes 1
	$(PY) bench/bench_idle.py --streams 1000 --api-processes 2
	$(PY) bench/bench_api_scale.py
	$(PY) bench/bench_hosts.py

bench-batch: setup model redis
	$(PY) bench/bench_batch.py

# vLLM's own benchmark client (`vllm bench serve`, completions and openai-chat) against a
# stack: a wire-format check and its throughput, e.g. `make bench-client BENCH_ARGS="--engine vllm"`.
bench-client: setup model redis
	$(PY) bench/bench_vllm_client.py $(BENCH_ARGS)

lint: setup
	$(VENV)/bin/ruff check api worker common tests bench scripts
	$(VENV)/bin/ruff format --check api worker common tests bench scripts

typecheck: setup
	$(VENV)/bin/mypy api worker common bench

clean:
	rm -rf $(VENV) .pytest_cache
