# Two entry points (README): `make demo` and `make test`. Both bootstrap everything they need.
PY := .venv/bin/python

.PHONY: bootstrap test lint typecheck pytest demo bench clean

bootstrap:
	@bash scripts/bootstrap.sh

lint: bootstrap
	$(PY) -m ruff check .

typecheck: bootstrap
	$(PY) -m mypy

pytest: bootstrap
	$(PY) -m pytest

test: bootstrap lint typecheck pytest

demo: bootstrap
	$(PY) -m sandbox.demo

# The figures in docs/performance.md (CLI and end-to-end sections), with the commands it documents.
# The e2e benchmark needs root (network namespaces).
bench: bootstrap
	$(PY) -m bench.cli_status_bench --services 10000 --namespaces 50 --runs 5
	$(PY) -m bench.e2e_bench --duration 10 --fresh 500

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache
