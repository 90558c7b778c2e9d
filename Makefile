# Two commands for a fresh machine (Python 3.11+ and pip): `make demo`, `make test`.
# Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-fast bench constraints

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,bench,tensorboard,wandb]'
	touch $@

constraints: $(VENV)/.installed
	{ sed -n '1,3p' constraints.txt; $(PY) -m pip freeze --exclude-editable; } > constraints.new && mv constraints.new constraints.txt

# Builds the demo corpus on first use (dataprep, into ~/.cache/coatnet_scale/demo), starts a local Ray, pretrains configs/tiny.yaml.
demo: $(VENV)/.installed
	$(PY) -m dataprep demo
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
	$(PY) benchmarks/parquet_memory.py
	$(PY) benchmarks/reshard_cost.py
	$(PY) benchmarks/checkpoint_stall.py

# Wheels for a GPU host that has only PyTorch (air-gapped): this project, DeepSpeed, pydantic,
# webdataset and what DeepSpeed imports. Install there: pip install --no-index --no-deps wheelhouse/*.whl
.PHONY: wheelhouse
wheelhouse: $(VENV)/.installed
	PY=$(PY) bash launch/wheelhouse.sh

# Every dependency at exactly its floor in pyproject.toml (extras included), in a venv of its
# own, running the fast tier: run it when a floor changes (not in CI; the first run downloads
# torch and its CUDA libraries). docs/install.md lists the floors and why.
FLOORS ?= .venv-floors
.PHONY: test-floors
$(FLOORS)/.installed: pyproject.toml tests/floors.py
	$(PYTHON) -m venv $(FLOORS)
	$(FLOORS)/bin/python -m pip install --quiet --upgrade pip
	$(PYTHON) tests/floors.py > $(FLOORS)/floors.txt
	$(FLOORS)/bin/python -m pip install --quiet -r $(FLOORS)/floors.txt -e .
	touch $@

# DeepSpeed's just-in-time ops are built into the floors venv, against its torch
# (tests/conftest.py gives each venv a build folder of its own).
test-floors: $(FLOORS)/.installed
	$(FLOORS)/bin/python -m pip check
	$(FLOORS)/bin/python -c "import deepspeed, ray.train.torch, ray.autoscaler.sdk, s3fs, timm"  # what the slow tier needs imports at the floors too
	$(FLOORS)/bin/python -m pytest -q -m "not slow"
