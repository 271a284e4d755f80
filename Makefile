# One-command setup: every target creates .venv on first use (CPU torch 2.13.0).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-predict demo-quick test test-acceptance lint check-install clean

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,diffusers,parallel,lora]'
	touch $(STAMP)

demo: $(STAMP)  ## the main job: distill a 36-step CFG teacher into a 1-step student, print figures
	$(VENV)/bin/distill-mixins demo

demo-predict: $(STAMP)  ## the Cosmos-Predict2.5 recipe: a 4-step DMD2 student, no KD stage
	$(VENV)/bin/distill-mixins demo --recipe predict2.5

demo-quick: $(STAMP)  ## a short run of each demo recipe and of the causal demo (CI smoke test)
	$(VENV)/bin/distill-mixins demo --quick --out runs/demo-quick
	$(VENV)/bin/distill-mixins demo --quick --recipe predict2.5 --out runs/demo-predict2.5-quick
	$(VENV)/bin/distill-mixins demo-causal --quick --out runs/demo-causal-quick

test: $(STAMP)  ## lint, then the whole test suite (CPU, float32 or bf16 by the precision policy; under 10 minutes)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --durations=15 -m "not acceptance"

test-acceptance: $(STAMP)  ## the known-answer trainings and long end-to-end runs (KD, DMD2 and sCM on the exact mixture teacher, the demo's resume; minutes)
	$(PY) -m pytest -q --durations=15 -m acceptance

lint: $(STAMP)
	$(VENV)/bin/ruff check .

check-install: $(STAMP)  ## pip install . into a fresh venv; the namespaced packages import, `trainer` does not
	rm -rf /tmp/distill-mixins-fresh
	$(PYTHON) -m venv /tmp/distill-mixins-fresh
	/tmp/distill-mixins-fresh/bin/pip install -q torch==2.13.0
	/tmp/distill-mixins-fresh/bin/pip install -q .
	cd /tmp && /tmp/distill-mixins-fresh/bin/python -c "import distill_mixins, distill_mixins.trainer, distill_mixins.checkpointer; print('imports ok')"
	cd /tmp && ! /tmp/distill-mixins-fresh/bin/python -c "import trainer" 2>/dev/null && echo "import trainer fails, as it must"
	cd /tmp && ! /tmp/distill-mixins-fresh/bin/python -c "import checkpointer" 2>/dev/null && echo "import checkpointer fails, as it must"

clean:
	rm -rf $(VENV) build *.egg-info runs
