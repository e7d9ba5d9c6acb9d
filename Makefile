# Two commands matter: `make calibrate` (the main job on its embedded default) and `make test`.
# Both set up .venv/ first (idempotent; seconds when it is already there).
PY := .venv/bin/python
export VLLM_TARGET_DEVICE ?= cpu
export VLLM_CPU_KVCACHE_SPACE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup calibrate test test-fast lint duplicates clean-fixtures toyvlm peer-llmcompressor-setup peer-llmcompressor bench-accuracy \
	bench-serving bench-kernels bench-calibration

setup:
	bash scripts/setup.sh

calibrate: setup
	$(PY) -m tlq_vllm.calibrate $(ARGS)

# Everything CI runs: fast unit tests and the vLLM end-to-end tests (marked slow).
test: setup
	$(PY) -m pytest -q $(ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint: setup
	$(PY) -m ruff check tlq_vllm tests scripts benchmarks

# Benchmarks (docs/accuracy.md, docs/serving-benchmark.md, docs/kernels-benchmark.md); results in benchmarks/results/.
# The toy VLM is committed; this retrains it (about 50 min on 2 cores) and rewrites its model card.
toyvlm: setup
	$(PY) -m benchmarks.toyvlm.train && $(PY) -m benchmarks.toyvlm.card

peer-llmcompressor-setup:
	bash benchmarks/peers/setup_llmcompressor.sh

# ARGS: --model DIR --calib-jsonl FILE --scheme W4A16|W8A8|W4A8|W3A16 --output DIR [--seed N] [--overwrite]
peer-llmcompressor: peer-llmcompressor-setup
	.venv-llmc/bin/python benchmarks/peers/llmcompressor_peer.py $(ARGS)

bench-accuracy: setup peer-llmcompressor-setup
	$(PY) -m benchmarks.accuracy $(ARGS)

bench-serving: setup
	$(PY) -m benchmarks.serving $(ARGS)

bench-kernels: setup
	$(PY) -m benchmarks.kernels $(ARGS)

bench-calibration: setup peer-llmcompressor-setup
	$(PY) -m benchmarks.calibration $(ARGS)

clean-fixtures:
	rm -rf $${TLQ_CACHE_DIR:-$$HOME/.cache/tlq_vllm}/fixtures
