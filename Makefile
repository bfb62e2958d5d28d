# SSN Lab. Two commands:
#   make run    set up .venv with SSN Lab installed in it (first time), prepare the starter model (first time), start
#               the app on 127.0.0.1:8501
#   make test   same set-up, then lint (ruff, then mypy over ssn_core), then run the test suite
# GPU users: choose the torch build, e.g.  make run TORCH_SPEC="torch==2.13.0 --index-url <pytorch CUDA wheel index>"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
STARTER ?= starter:qwen2.5-coder-0.5b

PY := $(VENV)/bin/python
# The install stamp is keyed on requirements.txt, pyproject.toml and TORCH_SPEC: editing any reinstalls, otherwise
# it is a no-op.
INSTALL_KEY := $(shell $(PYTHON) -c "import hashlib,sys; h=hashlib.sha256(open('requirements.txt','rb').read()+open('pyproject.toml','rb').read()); h.update(sys.argv[1].encode()); print(h.hexdigest()[:16])" "$(TORCH_SPEC)")
STAMP := $(VENV)/.ssn-installed-$(INSTALL_KEY)

.PHONY: run test install starter browser lint starter-neurons

run: starter
	$(PY) -m streamlit run app.py --server.address 127.0.0.1 --server.headless true --browser.gatherUsageStats false

# Tests never reach the Hugging Face hub. Lint runs first (make processes prerequisites in order), so CI fails fast
# on a ruff or mypy finding before the starter model is prepared.
test: export HF_HUB_OFFLINE := 1
test: lint starter browser
	$(PY) -m pytest -q

install: $(STAMP)

# torch first, so that the requirements that depend on it (accelerate, bitsandbytes, peft) keep that build.
# Then the project itself, editable and without dependencies: `.venv/bin/ssn` exists and `import ssn_core` works
# from any folder (the README's commands and Python examples).
$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@rm -f $(VENV)/.ssn-installed-*
	@touch $@

# Assemble + verify + convert the starter model into the cache once (~1.5 min); a no-op afterwards.
starter: install
	$(PY) -m ssn_core prepare-starter --name $(STARTER)

# The bundled starter neuron set (assets/starter_neurons/): identify on the starter with the default recipe (kept in
# $(STARTER_RUN), gitignored), then `ssn bundle` writes the small folder that is committed (sets, counts, overlap,
# refusal direction, English harmful activation means; no score table). A walkthrough.json / delta.safetensors already
# in the bundle folder is kept. Takes a while on a CPU (scoring 2 x 32 prompts per language with gradients).
STARTER_LANGS ?= en,zh,ar,bn,sw,jv
STARTER_RUN ?= runs/starter-neurons
STARTER_BUNDLE ?= assets/starter_neurons/$(lastword $(subst :, ,$(STARTER)))
starter-neurons: starter
	$(PY) -m ssn_core identify --model $(STARTER) --recipe default --langs $(STARTER_LANGS) --hr en --out $(STARTER_RUN)
	$(PY) -m ssn_core bundle --neurons $(STARTER_RUN) --out $(STARTER_BUNDLE)

# Debian's Chromium + chromedriver for the browser end-to-end test (a system package: no browser download).
# Installed when missing and we are root with apt-get (CI, this dev machine); otherwise that test skips and says why.
browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian chromium + chromium-driver for the browser test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else \
	    echo "note: chromium/chromedriver not found; the browser test will skip (apt-get install chromium chromium-driver)"; \
	  fi; \
	fi

# ruff (pinned in requirements.txt) with the rules chosen in pyproject.toml [tool.ruff.lint]: pycodestyle, pyflakes,
# isort, pyupgrade, bugbear, simplify; line length 120. Then mypy over the engine package (pyproject.toml [tool.mypy]:
# files = ssn_core; pinned too).
lint: install
	$(PY) -m ruff check .
	$(PY) -m mypy
