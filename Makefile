# Airlock developer entry points. Every target bootstraps .venv when it is missing or stale.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test protos lint typecheck bench profile soak fuzz venv clean

venv:
	@./scripts/bootstrap.sh

## Start gateway + one worker per demo tenant, send one demo request per tenant, keep serving.
run: venv
	$(VENV)/bin/airlock up --demo

## Lint, type-check and run the whole test suite (real processes, real TLS, the real bundled model).
test: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy
	$(VENV)/bin/airlock policy lint --dir policy
	$(VENV)/bin/airlock policy test --dir policy
	$(PY) scripts/proto_compat.py
	$(PY) -m pytest -ra

## Regenerate the gRPC code in airlock/v1 from protos/.
protos: venv
	$(PY) scripts/gen_protos.py

## Style and the architecture's import rules (pyproject.toml [tool.importlinter], docs/architecture.md).
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

typecheck: venv
	$(VENV)/bin/mypy

## Benchmarks: every row of docs/benchmarks.md against its same-run baseline (gateway overhead vs
## direct and a bare gRPC hop, the HTTP door against the gRPC door, paced-stream capacity against direct
## and a bare relay, a gateway of two processes against one, bundled-model tokens/s, authorization at
## 10k tenants / 100k lines, policy reload under load, sealing, scrub, a model bundle streamed from a
## local Ceph RGW), plus quota admission and audit costs.
## JSON in bench/results/, then the table on stdout and in docs/benchmarks.md.
## BENCH_FLAGS=--quick for a smoke run of each (seconds; not measurements): its JSON goes to a scratch
## directory and the table is only printed; bench/results and docs/benchmarks.md stay as measured.
QUICK_RESULTS = $(or $(TMPDIR),/tmp)/airlock-bench-quick
bench: venv
	$(PY) bench/overhead.py $(BENCH_FLAGS)
	$(PY) bench/http_door.py $(BENCH_FLAGS)
	$(PY) bench/capacity.py $(BENCH_FLAGS)
	$(PY) bench/processes.py $(BENCH_FLAGS)
	$(PY) bench/model_tokens.py $(BENCH_FLAGS)
	$(PY) bench/authz.py $(BENCH_FLAGS)
	$(PY) bench/reload.py $(BENCH_FLAGS)
	$(PY) bench/sealing.py $(BENCH_FLAGS)
	$(PY) bench/scrub.py $(BENCH_FLAGS)
	$(PY) bench/quota.py $(BENCH_FLAGS)
	$(PY) bench/audit.py $(BENCH_FLAGS)
	$(PY) bench/storage.py $(BENCH_FLAGS)
	$(PY) bench/report.py $(if $(findstring --quick,$(BENCH_FLAGS)),--results $(QUICK_RESULTS) --no-doc)

## py-spy flame graphs of the gateway process under the overhead benchmark's 64-in-flight load, and
## relaying 96 paced streams (the capacity benchmark's load).
profile: venv
	$(PY) bench/overhead.py --profile bench/results/gateway-profile.svg --seconds 15
	$(PY) bench/capacity.py --profile bench/results/gateway-relay-profile.svg --seconds 15

## The reliability soak at full length: mixed tenants, unary and streaming, at 80% of the capacity
## measured first, for AIRLOCK_SOAK_SECONDS (600 here; `make test` runs it for 60 s).
soak: venv
	AIRLOCK_SOAK_SECONDS=$${AIRLOCK_SOAK_SECONDS:-600} $(PY) -m pytest -s \
		--timeout=$$(( $${AIRLOCK_SOAK_SECONDS:-600} + 600 )) tests/reliability/test_soak.py

## Coverage-guided fuzzing (atheris, the optional `fuzz` extra) of the sealed envelope and the JWT
## front door, FUZZ_SECONDS each (default 60); fails on any unexpected exception (inputs in fuzz/crashes/).
FUZZ_SECONDS ?= 60
fuzz: venv
	@$(PY) -c "import atheris" 2>/dev/null || $(PY) -m pip install --quiet -e ".[fuzz]"
	FUZZ_SECONDS=$(FUZZ_SECONDS) $(PY) fuzz/run.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
