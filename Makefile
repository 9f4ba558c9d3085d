# The two commands of README.md: `make bench` (the main job) and `make test` (what CI runs).
# Both install what they need first, so they work from a fresh clone.
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install test bench clean

# The extras install brings; bench adds the peers (JAX, ONNX Runtime, OpenVINO: ~700 MB) for itself only,
# so `make test` (what CI runs) does not download them. A target-specific value reaches its prerequisites.
EXTRAS ?= test,bench
bench: EXTRAS = test,bench,peers

# torch first (the extension compiles against the installed torch, so the build is not isolated);
# then the package with its test and bench extras. A CUDA build of torch plus the CUDA toolkit also
# builds the CUDA kernels (see setup.py for the switches).
install:
	$(PIP) install --quiet "torch>=2.4" ninja "setuptools>=64" wheel numpy
	$(PIP) install --quiet --no-build-isolation -e ".[$(EXTRAS)]"

test: install
	$(PYTHON) -m pytest -q tests

bench: install
	$(PYTHON) -m rnn_fused.bench $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info rnn_fused/*.so
