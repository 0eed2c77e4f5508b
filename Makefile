# dreamer_trl — every command a user needs. `make setup` once, then `make train ENV=dmc_walker`.
PY      ?= .venv/bin/python
ENV     ?= dmc_walker
ARGS    ?=
CKPT    ?=
TASKS   ?=
SEEDS   ?=
export MUJOCO_GL ?= egl

.PHONY: setup test test-slow lint train eval ui bench bench-learn

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

train:  ## make train ENV=dmc_walker ARGS="seed=1 model=size12m"
	$(PY) pipelines/train.py env=$(ENV) $(ARGS)

eval:   ## make eval CKPT=<checkpoint path, run dir or MLflow run id>
	$(PY) pipelines/evaluate.py ckpt=$(CKPT) $(ARGS)

ui:     ## MLflow UI on 127.0.0.1:5000 over the embedded store
	$(PY) -m mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db} --host 127.0.0.1 --port 5000

bench:  ## update-step and acting benchmark; writes results/bench.json
	$(PY) pipelines/bench.py $(ARGS)

bench-learn:  ## learning benchmarks: make bench-learn TASKS=cartpole,pendulum SEEDS=0,1
	$(PY) pipelines/bench_learn.py $(if $(TASKS),tasks=[$(TASKS)]) $(if $(SEEDS),seeds=[$(SEEDS)]) $(ARGS)
