# Airlock developer entry points. Every target bootstraps .venv when it is missing or stale.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test protos lint typecheck bench soak fuzz venv clean

venv:
	@./scripts/bootstrap.sh

## Start gateway + one worker per demo tenant, send one demo request per tenant, keep serving.
run: venv
	$(VENV)/bin/airlock up --demo

## Lint, type-check and run the whole test suite (real processes, real TLS, the real bundled model).
test: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/airlock policy lint --dir policy
	$(VENV)/bin/airlock policy test --dir policy
	$(PY) scripts/proto_compat.py
	$(PY) -m pytest -ra

## Regenerate the gRPC code in airlock/v1 from protos/.
protos: venv
	$(PY) scripts/gen_protos.py

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy

## Benchmarks: gateway overhead (EchoEngine, direct vs through the gateway) and bundled-model
## tokens/s (engine alone vs through the stack); authorization at 10k tenants / 100k lines;
## quota admission cost (memory, Redis).
## audit records/s per fsync policy.
## domain scrub GB/s vs a plain memset of the same memory.
## Tables on stdout, JSON in bench/results/.
bench: venv
	$(PY) bench/overhead.py
	$(PY) bench/model_tokens.py
	$(PY) bench/authz.py
	$(PY) bench/quota.py
	$(PY) bench/audit.py
	$(PY) bench/sealing.py
	$(PY) bench/scrub.py

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
