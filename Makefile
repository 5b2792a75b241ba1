# The verbs people type. `make test` and `make serve` work on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of this torch lies on local disk on our machines; users elsewhere get it from PyPI.
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.herd-installed
# llama.cpp's GGUF converter (convert_hf_to_gguf.py, conversion/, gguf-py) as vendored in llama-cpp-python's source
# package: tests/test_gguf.py makes its GGUF fixtures with it, offline, from $(LLAMA_CPP).
LLAMA_CPP_PYTHON_VERSION ?= 0.3.36
LLAMA_CPP := $(VENV)/src/llama.cpp

.PHONY: venv test lint format serve clean browser

venv: $(STAMP)

$(LLAMA_CPP)/convert_hf_to_gguf.py: | $(STAMP)
	rm -rf $(VENV)/src/sdist && mkdir -p $(LLAMA_CPP)
	$(PY) -m pip download --quiet --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION) -d $(VENV)/src/sdist
	tar xzf $(VENV)/src/sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION).tar.gz -C $(LLAMA_CPP) --strip-components=3 \
		$(addprefix llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION)/vendor/llama.cpp/,convert_hf_to_gguf.py conversion gguf-py)
	rm -rf $(VENV)/src/sdist

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e '.[dev]'
	# herd's CPU kernels (C++; a missing compiler only leaves PyTorch's kernels in their place)
	$(PY) -m herd.kernels.cpu || echo "herd's CPU kernels were not built; PyTorch's are used"
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check herd tests benchmarks scripts
	$(VENV)/bin/ruff format --check herd tests benchmarks scripts

format: $(STAMP)
	$(VENV)/bin/ruff check --fix herd tests benchmarks scripts
	$(VENV)/bin/ruff format herd tests benchmarks scripts

# The chat page's browser test (tests/test_chat_page.py) drives Debian's chromium through Playwright; Playwright's
# own browser download is not used. Installed here when missing (CI runs as root on Debian).
browser:
	command -v chromium >/dev/null || { apt-get update -q && apt-get install -y -q chromium; }

# pytest exits 5 when it collected no test; make treats that as the failure it is.
test: lint browser $(LLAMA_CPP)/convert_hf_to_gguf.py
	$(PY) -m pytest -q

# Without --model-path this serves the demo model shipped in herd/demo/model, pictures and tool calls on.
serve: $(STAMP)
	$(VENV)/bin/herd serve --enable-multimodal --tool-call-parser pythonic $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
