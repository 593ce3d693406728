# Two entry points for a fresh machine (see README):
#   make demo   venv + install, synthetic data, train, CAM export, sanity checks, report (CPU, a few minutes)
#   make test   venv + install, system test dependencies when root, the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DATA ?= data/shapes

.PHONY: demo test venv clean-demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,timm]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m cnncam.data.synthetic --out $(DEMO_DATA) --classes 4 --per-class 150 --size 64 --seed 0
	$(PY) jobs/launch.py train --config configs/demo.yaml --set data.root=$(DEMO_DATA) --executor inline
	$(PY) jobs/launch.py cam --run runs/demo --executor inline
	$(PY) jobs/launch.py sanity --run runs/demo --executor inline
	$(PY) jobs/launch.py report --run runs/demo --executor inline

test: venv
	PYTHON=$(PY) bash tests/run.sh

clean-demo:
	rm -rf runs/demo $(DEMO_DATA)
