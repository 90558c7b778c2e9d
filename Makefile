# Two commands for a fresh machine (Python 3.11+ and pip): `make demo`, `make test`.
# Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-fast bench constraints

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,bench]'
	touch $@

constraints: $(VENV)/.installed
	{ sed -n '1,3p' constraints.txt; $(PY) -m pip freeze --exclude-editable; } > constraints.new && mv constraints.new constraints.txt

# Builds the demo corpus on first use (dataprep), starts a local Ray, pretrains configs/tiny.yaml.
demo: $(VENV)/.installed
	$(PY) -m dataprep demo data/demo
	$(PY) -m coatnet_scale.pretrain --config configs/tiny.yaml

# pytest exits 5 when it collects no test: a failure here, never a pass.
test: $(VENV)/.installed
	$(PY) -m pytest -q; rc=$$?; [ $$rc -ne 5 ] || echo "make test: no tests were collected" >&2; exit $$rc

# The fast tier for iterating (under 5 minutes): everything but the tests marked slow (Ray
# clusters, DeepSpeed runs, real services). CI runs `make test`, which is everything.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

bench: $(VENV)/.installed
	$(PY) benchmarks/model_throughput.py
	$(PY) benchmarks/dataprep_throughput.py
	$(PY) benchmarks/loader_throughput.py
	$(PY) benchmarks/zero3_memory.py
	$(PY) benchmarks/monitoring_overhead.py
	$(PY) benchmarks/read_amplification.py
	$(PY) benchmarks/listing_memory.py
	$(PY) benchmarks/reshard_cost.py

# Wheels for a GPU host that has only PyTorch (air-gapped): this project, DeepSpeed, pydantic,
# webdataset and what DeepSpeed imports. Install there: pip install --no-index --no-deps wheelhouse/*.whl
.PHONY: wheelhouse
wheelhouse: $(VENV)/.installed
	PY=$(PY) bash launch/wheelhouse.sh
