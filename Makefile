# dreamer_trl — every command a user needs. `make setup` once, then `make train ENV=dmc_walker`.
PY      ?= .venv/bin/python
ENV     ?= dmc_walker
ARGS    ?=
CKPT    ?=
TASKS   ?=
SEEDS   ?=
export MUJOCO_GL ?= egl

.PHONY: setup test test-slow lint train eval ui bench bench-learn device-kit

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

train:  ## make train ENV=dmc_walker ARGS="seed=1 model=size12m"; make train ARGS="resume=<dir>"
	$(PY) pipelines/train.py $(ENV_ARG) $(ARGS)

eval:   ## make eval CKPT=<checkpoint path, run dir or MLflow run id>
	$(PY) pipelines/evaluate.py ckpt=$(CKPT) $(ARGS)

# MLflow 3.17 opens experiments in its GenAI view until "Model training" is picked once (top
# left; the browser keeps the choice) or a link asks for it (an experiment's URL + the query
# ?workflowType=machine_learning); the experiment tag alone does not: pipelines/mlflow_view_check.py.
ui:     ## MLflow UI on 127.0.0.1:5000 over the embedded store
	@echo 'runs and charts: pick "Model training" at the top left once (the browser keeps it)'
	$(PY) -m mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db} --host 127.0.0.1 --port 5000

bench:  ## update-step and acting benchmark; writes results/bench.json
	$(PY) pipelines/bench.py $(ARGS)

bench-learn:  ## learning benchmarks: make bench-learn TASKS=cartpole,pendulum SEEDS=0,1
	$(PY) pipelines/bench_learn.py $(if $(TASKS),tasks=[$(TASKS)]) $(if $(SEEDS),seeds=[$(SEEDS)]) $(ARGS)

# Wheels the lent GPU machine lacks (it has torch; the rest of what bench.py imports is
# here), for pipelines/gpu_bench.sh: Python 3.12, manylinux x86-64, into the ignored .whl/.
WHEEL_PLATFORMS = $(foreach p,manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64,--platform $(p))
device-kit:  ## download the GPU bench's wheels into .whl/ (then: device run `bash pipelines/gpu_bench.sh`, carry .whl)
	mkdir -p .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(WHEEL_PLATFORMS) -d .whl torchrl==0.14.1 tensordict==0.14.3 orjson==3.13.0
	$(PY) -m pip download -q --no-deps --only-binary=:all: -d .whl \
		hoptorch==0.1.4 pyvers==0.2.3 hydra-core==1.3.2 omegaconf==2.3.0 \
		gymnasium==1.4.0 farama-notifications==0.0.6
	$(PY) -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3  # sdist only on PyPI
