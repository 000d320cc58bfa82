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

# Both container images, built with docker or podman (whichever is on the PATH; CONTAINER_TOOL=...
# to choose); skipped with a message when neither is installed. PUSH=1 pushes them too. Point the
# manifests at them with kustomize `images:` (README, docs/install.md).
#   make images IMAGE_REGISTRY=registry.example.com/lightpath IMAGE_TAG=0.1.0 PUSH=1
IMAGE_REGISTRY ?= ghcr.io/lightpath-cloud
IMAGE_TAG ?= 0.1.0
.PHONY: images
images:
	@tool="$(CONTAINER_TOOL)"; \
	if [ -z "$$tool" ]; then tool=$$(command -v docker || command -v podman || true); fi; \
	if [ -z "$$tool" ]; then \
	  echo "make images: skipped: neither docker nor podman is installed (install one, or build" \
	       "Dockerfile.webhook and Dockerfile.redirector with any OCI image builder)"; \
	  exit 0; \
	fi; \
	for name in webhook redirector; do \
	  image="$(IMAGE_REGISTRY)/lightpath-$$name:$(IMAGE_TAG)"; \
	  echo "+ $$tool build -f Dockerfile.$$name --build-arg VERSION=$(IMAGE_TAG) -t $$image ."; \
	  "$$tool" build -f Dockerfile.$$name --build-arg VERSION=$(IMAGE_TAG) -t "$$image" . || exit 1; \
	  if [ "$(PUSH)" = 1 ]; then echo "+ $$tool push $$image"; "$$tool" push "$$image" || exit 1; fi; \
	done

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache
