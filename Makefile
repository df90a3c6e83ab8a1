# Single entry points. Every target creates or refreshes .venv from pyproject.toml as needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-citus gen gen-check lint format bench bench-quick bench-citus soak clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# `make run` works with nothing configured: unless a key or app id is given (FOLLOW_* variables
# or ARGS), the v4 shim uses a development key made once in var/dev-secret-key and app id
# 1400000000. Production deployments pass their own.
DEV_KEY := var/dev-secret-key
DEV_SDKAPPID := 1400000000
RUN_KEY = $(if $(or $(FOLLOW_SECRET_KEY),$(FOLLOW_SECRET_KEY_FILE),$(findstring secret-key,$(ARGS)),$(findstring insecure-no-auth,$(ARGS))),,--secret-key-file $(DEV_KEY))
RUN_APP = $(if $(or $(FOLLOW_SDKAPPID),$(findstring sdkappid,$(ARGS)),$(findstring insecure-no-auth,$(ARGS))),,--sdkappid $(DEV_SDKAPPID))

$(DEV_KEY):
	@mkdir -p $(dir $@)
	@umask 077 && $(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(32))' > $@
	@echo "made a development v4 secret key in $@ (app id $(DEV_SDKAPPID))"

run: $(STAMP) $(DEV_KEY)
	$(BIN)/follow-server $(RUN_KEY) $(RUN_APP) $(ARGS)

# tests/test_node_client.py's packages (tests/node, from its package-lock.json), installed
# when npm is on the machine; without node/npm that one test skips and says why.
NODE_DEPS := tests/node/node_modules/.package-lock.json
.PHONY: node-deps
node-deps:
	@if command -v npm >/dev/null 2>&1; then \
		test $(NODE_DEPS) -nt tests/node/package-lock.json 2>/dev/null || \
		(cd tests/node && npm ci --no-audit --no-fund --loglevel=error); \
	else echo "npm not found: tests/test_node_client.py will skip"; fi

test: $(STAMP) node-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The storage-touching suites again, on a throwaway Citus cluster (a coordinator and two
# workers on 127.0.0.1, started and stopped by the tests: tests/support/citus.py), each test
# in a Citus database of its own with the tables distributed; plus every store statement's
# plan (tests/test_citus_plans.py; `PYTEST_ARGS=-rP` prints the table). Tests marked `citus`
# run only here: make test skips them.
CITUS_TESTS := tests/test_servicer.py tests/test_v4_commands.py tests/test_stateful.py \
	tests/test_v4_stateful.py tests/test_concurrency.py tests/test_importer.py \
	tests/test_checker.py tests/test_citus_migrations.py tests/test_citus_tools.py \
	tests/test_citus_plans.py tests/test_outbox.py tests/test_webhooks.py \
	tests/test_retention.py tests/test_watch.py
test-citus: $(STAMP)
	@$(BIN)/python -c 'from tests.support.citus import citus_missing_reason as missing; \
		r = missing(); raise SystemExit(r and "make test-citus: no Citus cluster can start here: " + r \
		+ "\nInstall Citus: run ../shared/citus/install.sh (or install Citus 13.2 for PostgreSQL" \
		" 15-17 from its packages); FOLLOW_CITUS_PG_BIN (default /usr/lib/postgresql/15/bin)" \
		" picks the PostgreSQL binaries it runs on.")'
	FOLLOW_TEST_CITUS=1 $(BIN)/python -m pytest $(CITUS_TESTS) $(PYTEST_ARGS)

# gen/: the Python of proto/follow (+ .pyi stubs). proto/google/rpc/: the two googleapis
# files a client in another language needs to decode error details (google.rpc.Status and
# ErrorInfo), copied once from the installed googleapis-common-protos so the contract ships
# whole; kept as committed (their wire format never changes): `rm -r proto/google && make gen`
# refreshes them.
GOOGLE_RPC_PROTOS := status.proto error_details.proto
gen: $(STAMP)
	rm -rf gen/follow
	mkdir -p gen/follow/v1 proto/google/rpc
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m grpc_tools.protoc -Iproto \
		--python_out=gen --grpc_python_out=gen --mypy_out=gen --mypy_grpc_out=gen \
		proto/follow/v1/*.proto
	touch gen/follow/__init__.py gen/follow/v1/__init__.py gen/follow/py.typed
	src="$$($(BIN)/python -c 'import os, google.rpc.status_pb2 as m; print(os.path.dirname(m.__file__))')" && \
		for f in $(GOOGLE_RPC_PROTOS); do test -f proto/google/rpc/$$f || cp "$$src/$$f" proto/google/rpc/$$f; done

gen-check: gen
	git diff --exit-code -- gen proto/google || (echo "gen/ or proto/google/ differs from what 'make gen' writes: run make gen and commit" && exit 1)
	@test -z "$$(git status --porcelain -- gen proto/google)" || (git status --porcelain -- gen proto/google; echo "untracked files in gen/ or proto/google/" && exit 1)

lint: $(STAMP)
	$(BIN)/python -m tests.support.layers
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python -m tests.bench $(ARGS)

bench-quick: $(STAMP)
	$(BIN)/python -m tests.bench --quick $(ARGS)

# The gRPC scenarios on a Citus cluster (coordinator + 2 workers) and on one plain PostgreSQL 15,
# same data, side by side (tests/bench/citus.py); quick size unless ARGS=--full.
bench-citus: $(STAMP)
	$(BIN)/python -m tests.bench --citus $(ARGS)

# Cost as the graph grows: the gRPC scenarios on graphs of 1, 5 and 10 million edges, throughput
# at the largest / the smallest (target >= 0.8), database size per million edges, import rate,
# server RSS (tests/bench/scale.py). Smaller sizes for a quick check: ARGS=--scale-sizes=0.2,1.
.PHONY: bench-scale
bench-scale: $(STAMP)
	$(BIN)/python -m tests.bench --scale $(ARGS)

# Operations whose cost grows with the graph, on a running service: deleting an account with
# 400,000 fans and importing 300,000 edges while other users' calls run; their latency and
# throughput before and during, target worst latency < 0.5 s (tests/bench/ops.py).
# Repeat for medians: ARGS=--repeat=3; a small graph: ARGS=--quick.
.PHONY: bench-ops
bench-ops: $(STAMP)
	$(BIN)/python -m tests.bench --ops $(ARGS)

# The importer's rate alone (tests/bench/importrate.py): a graph's CSV files (ARGS="--graph DIR";
# make one with `python -m tests.bench.graph --out DIR --users 1000000 --edges 5000000`)
# imported into a throwaway PostgreSQL, with its phases; --base DIR imports another one first.
.PHONY: bench-importrate
bench-importrate: $(STAMP)
	$(BIN)/python -m tests.bench.importrate $(ARGS)

# What change events cost the writers: the write scenarios with webhooks (to an aiohttp receiver
# run by the bench, checking Sign) and one Watch stream on, against the same server without them,
# runs alternating on fresh copies of the bench's data; calls/s on / off (target >= 0.8), delivery
# lag p50/p99, backlog, every event matched (tests/bench/events.py). Quick: ARGS=--quick.
.PHONY: bench-events
bench-events: $(STAMP)
	$(BIN)/python -m tests.bench --events $(ARGS)

# Mixed load while PostgreSQL restarts and the server is killed, then the checker;
# bounded (SOAK_SECONDS, default 600). Extra flags in ARGS.
SOAK_SECONDS ?= 600
soak: $(STAMP)
	$(BIN)/python -m tests.soak --seconds $(SOAK_SECONDS) $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
