# Both targets build .venv from nothing on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint bench bench-peers gpu-check docs clean screenshot

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/featcache demo --out demo-out

# The suite a change must pass (about 3 minutes on 2 cores); the slow cases (real SLURM
# jobs, moto's S3 server killed mid-run, torchrun ranks, kill -9, the full fuzz, the peers)
# are marked `slow` and run by `make test-slow` (about 20 minutes here).
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check featcache cli tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/extract.py
	$(BIN)/python benchmarks/probe.py
	$(BIN)/python benchmarks/report.py
	$(BIN)/python benchmarks/suite.py

# featcache beside thingsvision and CLIP_benchmark on the same work; builds the peers'
# virtualenvs in .peers/ the first time (minutes, the registry needed), reuses them after.
bench-peers: $(STAMP)
	$(BIN)/python benchmarks/peers.py --json peers.json

# Every CUDA path once against the CPU, then the GPU figures (benchmarks/gpu_check.py).
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py

docs: $(STAMP)
	$(BIN)/python -m featcache.cli.docs > docs/cli.md

# A picture of the demo's HTML report, rendered by headless Chromium (Debian's package).
screenshot: demo
	command -v chromium >/dev/null || apt-get install -y chromium
	chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
	  --disable-background-networking --disable-component-update --disable-sync \
	  --user-data-dir=$$(mktemp -d) --window-size=1280,4000 \
	  --screenshot=demo-out/report/screenshot.png file://$(CURDIR)/demo-out/report/report.html
	@echo "wrote demo-out/report/screenshot.png"

clean:
	rm -rf $(VENV) demo-out report
