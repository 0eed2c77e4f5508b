# dreamer_trl — every command a user needs. `make setup` once, then `make train ENV=dmc_walker`.
PY      ?= .venv/bin/python
ENV     ?= dmc_walker
ARGS    ?=
CKPT    ?=
FORMAT  ?= onnx
OUT     ?=
TASKS   ?=
SEEDS   ?=
NPROC   ?= 1
export MUJOCO_GL ?= egl

.PHONY: setup test test-slow lint train eval export dataset ui bench bench-learn device-kit

setup:  ## create .venv: CPU torch first (so nothing pulls a CUDA build), then the package
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"

test:   ## fast test suite (slow tests excluded)
	$(PY) -m pytest

test-slow:  ## slow tests only: learning checks and full pipeline smoke runs
	$(PY) -m pytest -m slow

lint:
	$(PY) -m ruff check .

# A resume takes its env from the run's saved overrides: env= is passed only for a new run,
# or when ENV is given on make's command line (then train.py refuses a mismatch with the
# checkpoint). Not for an ENV from the shell's environment: POSIX shells use that name too.
ENV_GIVEN = $(filter command,$(origin ENV))
ENV_ARG = $(if $(findstring resume=,$(ARGS)),$(if $(ENV_GIVEN),env=$(ENV)),env=$(ENV))

# NPROC > 1: that many data-parallel learner processes on this machine (torchrun; one GPU
# each with device=cuda), README "Scaling out".
TRAIN_PY = $(if $(filter-out 1,$(NPROC)),$(dir $(PY))torchrun --standalone --nproc_per_node=$(NPROC),$(PY))

train:  ## make train ENV=dmc_walker ARGS="seed=1 model=size12m"; make train ARGS="resume=<dir>"; NPROC=2
	$(TRAIN_PY) pipelines/train.py $(ENV_ARG) $(ARGS)

eval:   ## make eval CKPT=<checkpoint path, run dir or MLflow run id>
	$(PY) pipelines/evaluate.py ckpt=$(CKPT) $(ARGS)

export: ## make export CKPT=<checkpoint, run dir, run id or models:/name/version> FORMAT=onnx|torchscript|pt2 [OUT=<file>]
	$(PY) pipelines/export.py ckpt=$(CKPT) format=$(FORMAT) $(if $(OUT),out=$(OUT)) $(ARGS)

dataset:  ## make dataset CKPT=<run dir|checkpoint> OUT=<dir>: the run's replay as a Minari dataset
	$(PY) pipelines/dataset.py ckpt=$(CKPT) out=$(OUT) $(ARGS)

# MLflow 3.17 opens experiments in its GenAI view until "Model training" is picked once (top
# left; the browser keeps the choice) or a link asks for it (an experiment's URL + the query
# ?workflowType=machine_learning); the experiment tag alone does not: pipelines/mlflow_view_check.py.
ui:     ## MLflow UI on 127.0.0.1:5000 over the embedded store
	@echo 'runs and charts: pick "Model training" at the top left once (the browser keeps it)'
	$(PY) -m mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db} --host 127.0.0.1 --port 5000

bench:  ## update-step, acting and acting-latency benchmark; writes results/bench.json
	$(PY) pipelines/bench.py $(ARGS)

bench-learn:  ## learning benchmarks: make bench-learn TASKS=cartpole,pendulum SEEDS=0,1
	$(PY) pipelines/bench_learn.py $(if $(TASKS),tasks=[$(TASKS)]) $(if $(SEEDS),seeds=[$(SEEDS)]) $(ARGS)

# Wheels the lent GPU machine needs besides its CUDA torch, for pipelines/gpu_bench.sh: what
# train.py, bench.py and gpu_check.py import and everything that requires (numpy, cloudpickle,
# packaging, PyYAML, ...), pinned to this venv's versions, for CPython 3.12 manylinux x86-64,
# into the ignored .whl/ (pipelines/device_kit.py resolves the set; torch is left out).
device-kit:  ## the GPU check's wheels into .whl/ (then: device run `bash pipelines/gpu_bench.sh`, carry .whl)
	$(PY) pipelines/device_kit.py .whl
