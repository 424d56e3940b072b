# The targets CI runs. Each sets up what is missing first (scripts/setup.sh is quick when nothing is).
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
NP ?= 2

.PHONY: setup demo demo-classifier demo-toy test test-fast lint format bench-allreduce bench-overhead bench-unet bench-classifier bench-scaling clean

setup:
	@bash scripts/setup.sh

demo: setup
	NP=$(NP) bash scripts/demo.sh

demo-classifier: setup
	test -d data/us || $(PY) -m jobs.make_ultrasound data/us --n-per-class 40 --size 128
	horovodrun -np $(NP) --gloo python -m jobs.train_classifier --config jobs/configs/classifier_demo.yaml \
		--data data/us --run-dir runs/cls_demo-$$(date +%Y%m%d-%H%M%S) --no-progress

demo-toy: setup
	horovodrun -np $(NP) --gloo python -m jobs.demo --run-dir runs/demo-$$(date +%Y%m%d-%H%M%S)

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not multirank and not slurm" tests

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format .

bench-allreduce: setup
	$(PY) -m jobs.bench_allreduce

bench-overhead: setup
	$(PY) -m jobs.bench_overhead

bench-unet: setup
	$(PY) -m jobs.bench_unet

bench-classifier: setup
	$(PY) -m jobs.bench_classifier

bench-scaling: setup
	$(PY) -m jobs.bench_scaling

clean:
	rm -rf runs .pytest_cache .ruff_cache
