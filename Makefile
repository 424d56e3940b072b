# The targets CI runs. Each sets up what is missing first (scripts/setup.sh is quick when nothing is).
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
NP ?= 2

.PHONY: setup demo demo-classifier demo-toy test test-fast lint format bench-allreduce bench-overhead bench-unet bench-classifier bench-scaling bench-gpu clean

setup:
	@bash scripts/setup.sh

demo: setup
	NP=$(NP) bash scripts/demo.sh

demo-classifier: setup
	test -d data/us || $(PY) -m jobs.make_ultrasound data/us --n-per-class 40 --size 128
	$(PY) -m jobs._launch -np $(NP) python -m jobs.train_classifier --config jobs/configs/classifier_demo.yaml \
		--data data/us --run-dir runs/cls_demo-$$(date +%Y%m%d-%H%M%S) --no-progress

demo-toy: setup
	$(PY) -m jobs._launch -np $(NP) python -m jobs.demo --run-dir runs/demo-$$(date +%Y%m%d-%H%M%S)

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

# One GPU (H100/H200), at most 8 minutes: builds Horovod with NCCL when it lacks it; MONAI only for the comparison
# (a failed install, e.g. offline, just leaves that line out). On a CPU machine: python -m jobs.bench_gpu --dry-run
bench-gpu: setup
	$(PY) -c "import monai" 2>/dev/null || $(PY) -m pip install -q --no-deps monai==1.6.1 || echo "bench-gpu: monai not installed; no MONAI comparison"
	$(PY) -m jobs.bench_gpu

clean:
	rm -rf runs .pytest_cache .ruff_cache
