# Two commands matter: `make serve` and `make test`. Both create .venv on first use.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-$(shell cat requirements_api.txt requirements-dev.txt | sha1sum | cut -c1-12)
ARGS ?=
PYTEST_ARGS ?=

.PHONY: serve test bench bench-engine bench-serve venv system-deps clean

venv: $(STAMP)

$(STAMP): requirements_api.txt requirements-dev.txt
	@$(MAKE) --no-print-directory system-deps
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -r requirements_api.txt -r requirements-dev.txt
	# --no-deps: voxcpm's metadata pulls gradio/funasr/modelscope that inference never imports
	$(VPY) -m pip install --quiet --no-deps voxcpm==2.0.3
	@rm -f $(VENV)/.deps-*
	@touch $@

# FFmpeg's shared libraries let torchaudio/torchcodec decode reference audio (VoxCPM1.x cloning).
system-deps:
	@if ! ldconfig -p 2>/dev/null | grep -q libavcodec; then \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	    echo "installing FFmpeg shared libraries (Debian package ffmpeg)"; \
	    apt-get -o DPkg::Lock::Timeout=900 update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y -qq ffmpeg >/dev/null; \
	  else \
	    echo "warning: FFmpeg shared libraries not found; install ffmpeg for VoxCPM1.x voice cloning" >&2; \
	  fi; \
	fi

serve: venv
	$(VPY) start_api.py $(ARGS)

test: venv
	$(VPY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache

# On a CUDA machine: the engine benchmark (official package vs batched engine, both models, results in
# bench/results/engine-*), then the served product over HTTP for both models (bench/results/serve-*; it runs
# its own engine baseline, so its ratios come from one run; SERVE_ARGS for its flags); always: the
# service-overhead benchmark (bench/results/service-cpu.*).
# Our engine runs with --compile (the committed results); BENCH_COMPILE= for the plain engine
# (those results live in bench/results/no-compile: ARGS='--out-dir bench/results/no-compile').
BENCH_COMPILE ?= --ours-compile
# one more round under torch.profiler at 64 rows with 8 LoRAs and at one row (where launches, not FLOPs, set
# the single-stream RTF): GPU kernel time by kind in the report, top kernels in profile-*.txt
BENCH_PROFILE ?= --profile c64-lora8,c1-lora0
SERVE_ARGS ?=
bench: venv
	@if $(VPY) -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then \
	  $(VPY) bench/bench_engine.py --model voxcpm1.5 $(BENCH_COMPILE) $(BENCH_PROFILE) $(ARGS) && $(VPY) bench/bench_engine.py --model voxcpm2 $(BENCH_COMPILE) $(BENCH_PROFILE) $(ARGS) \
	  && $(VPY) bench/bench_serve.py --model voxcpm1.5 $(SERVE_ARGS) && $(VPY) bench/bench_serve.py --model voxcpm2 $(SERVE_ARGS); \
	else echo "no CUDA GPU here: skipping the engine and served benchmarks (make bench-engine / bench-serve ARGS='--tiny --device cpu' smoke-test them)"; fi
	$(VPY) bench/bench_service.py

# Official package vs our batched engine on one GPU; e.g. make bench-engine ARGS='--model voxcpm2'
# (CPU smoke test: ARGS='--model voxcpm1.5 --tiny --device cpu --out-dir /tmp/benchtest')
bench-engine: venv
	$(VPY) bench/bench_engine.py $(ARGS)

# The served product over HTTP: start_api.py under load from bench/serve_load.py (closed loops, streams, an
# open-loop sweep, a mix of every request kind), with the engine baseline of the same run; ~9 min per model
# on an H100. E.g. make bench-serve ARGS='--model voxcpm2' (results in bench/results/serve-*);
# CPU smoke test: ARGS='--tiny --device cpu --skip-engine --out-dir /tmp/serve-smoke'
bench-serve: venv
	$(VPY) bench/bench_serve.py $(ARGS)
