# `make setup` builds .venv with the locked stack; `make test` and `make demo` run inside it.
# Setup is idempotent: it reruns only when the lock, the packaging or this file changes.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.stack-installed
# detectron2 is not on PyPI. sal-detectron2 is upstream detectron2 repackaged; it ships only a
# cp310-tagged pure-Python wheel, which we fetch and re-tag (its cp310 _C never loads, and is not needed).
D2_VERSION := 0.7.2
D2_WHEEL   := $(VENV)/wheels/sal_detectron2-$(D2_VERSION)-py3-none-any.whl

.PHONY: setup test demo
setup: $(STAMP)

$(STAMP): requirements/lock.txt pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24"
	$(PIP) install -q -r requirements/lock.txt
	# mmcv's ops are compiled against the installed torch, so it cannot use build isolation.
	MMCV_WITH_OPS=1 MAX_JOBS=2 $(PIP) install -q --no-build-isolation -c requirements/lock.txt mmcv==2.1.0
	mkdir -p $(VENV)/wheels
	test -f $(D2_WHEEL) || ( $(PIP) download -q --no-deps --only-binary=:all: --python-version 3.10 \
	    -d $(VENV)/wheels/dl sal-detectron2==$(D2_VERSION) && mv $(VENV)/wheels/dl/*.whl $(D2_WHEEL) )
	$(PIP) install -q -c requirements/lock.txt $(D2_WHEEL)
	$(PIP) install -q --no-deps -e .
	touch $@

test: setup
	$(PY) -m pytest -q tests

# Pretraining, then detection, segmentation and classification from MAE and from scratch, on the built-in
# synthetic world (8-14 min on 2 CPU cores); results in runs/demo/results.md.
demo: setup
	$(PY) tools/demo.py --out runs/demo
