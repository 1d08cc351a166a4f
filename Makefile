# gradserve: `make demo` and `make test` are all a fresh machine needs (Python 3.10+).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
# pip finds this CPU build locally where it is cached; a bare `torch` would pull a multi-GB CUDA build.
TORCH_CPU := torch==2.13.0

# The Python that `make gpu-check` runs with: on a GPU machine usually its own python3 with a CUDA torch.
GPU_PYTHON ?= $(shell test -x $(PY) && echo $(PY) || command -v python3)
# The GPU machine's Python version, for `make gpu-bundle`.
GPU_PYTHON_VERSION ?= 3.12

.PHONY: venv browser demo test proto bench gpu-bundle gpu-check clean

venv: $(VENV)/.installed

$(VENV)/.installed: client/pyproject.toml proto/pyproject.toml server/pyproject.toml worker/pyproject.toml tests/requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_CPU)
	# Compat mode puts each package's folder on sys.path, so modules added later need no reinstall.
	$(PY) -m pip install -q --config-settings editable_mode=compat \
	  -e './client[cli,plot,export]' -e ./proto -e './server[dev]' -e ./worker -r tests/requirements.txt
	touch $@

demo: venv
	@echo "gradserve demo: a private stack trains a character LSTM on the Python standard library's docstrings."
	@echo "Watch the perplexity (ppl) fall from about 17 at the first report toward 5 (28, the vocabulary size, is a blind guess)."
	@$(VENV)/bin/gradserve-server dev --workers 1 --listen 127.0.0.1:0 --run \
	  '$(CURDIR)/$(VENV)/bin/gradserve submit --dataset builtin:pydocs --preprocess d2l --model lstm \
	   --hidden-size 128 --max-steps 3000 --log-every 200 --checkpoint-every 1000 --follow'

# The dashboard's browser tests drive Debian's chromium through chromium-driver;
# as root on Debian they are installed here, elsewhere the message says how.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      chromium chromium-driver; \
	  else \
	    echo "make test: the dashboard's browser tests need Debian's chromium and chromium-driver: run" \
	      "'sudo apt-get install chromium chromium-driver' first" >&2; exit 1; \
	  fi; }

# Three at a time on two cores: most of the suite waits on the processes it starts
# (redis-server, servers, Celery workers, a browser), and a file's tests share its stack.
test: venv browser
	$(PY) -m pytest -n 3 --dist loadfile tests

proto: venv
	$(PY) -m grpc_tools.protoc -Iproto --python_out=client --pyi_out=client --grpc_python_out=client \
	  proto/gradserve/v1/jobs.proto

bench: venv
	$(PY) bench/run.py
	$(PY) bench/memory.py
	$(PY) bench/upload.py
	$(PY) bench/fanout.py
	$(PY) bench/dashboard.py
	$(PY) bench/listing.py
	$(PY) bench/auto_truncation.py
	$(PY) bench/sweep.py
	$(PY) bench/products.py

# Wheels (and redis-server) for a GPU machine that lacks them and has no registry: gpu-bundle/ travels with the checkout.
gpu-bundle: venv
	$(PY) bench/gpu_check.py bundle --python-version $(GPU_PYTHON_VERSION)

# Every CUDA check in one table (bench/gpu_check.py); on a machine without a GPU it says so and fails.
gpu-check:
	$(GPU_PYTHON) bench/gpu_check.py check

clean:
	rm -rf $(VENV) .pytest_cache gpu-check-out
