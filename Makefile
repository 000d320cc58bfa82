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

# Every benchmark (bench/run_all.py); figures go to docs/performance.md. Needs root (network namespaces).
bench: bootstrap
	$(PY) -m bench.run_all

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache
