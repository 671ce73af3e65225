# privsock. Every target installs what it needs (Debian packages, the privsock
# user, .venv) through scripts/bootstrap, so each works on a fresh Debian machine as root.

VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest
POLICY ?= policy/default.toml

.PHONY: run deb test test-fast test-containers lint audit audit-fast bench fuzz bootstrap bootstrap-dev bootstrap-containers clean

## The runtime only: privsock and its one dependency, python-prctl (what `make run` needs).
bootstrap:
	@scripts/bootstrap

## And the test, lint and fuzz tools.
bootstrap-dev:
	@scripts/bootstrap --dev

## And podman, lintian and mmdebstrap: everything `make test` runs.
bootstrap-containers:
	@scripts/bootstrap --containers --deb

## The main job: serve the bundled echo service on 127.0.0.1:53 (udp+tcp) as
## the unprivileged user, with sockets from the hardened helper. Ctrl-C stops it.
run: bootstrap
	$(VENV)/bin/privsock exec --policy $(POLICY) --user privsock-demo \
	    --listen udp:127.0.0.1:53 --listen tcp:127.0.0.1:53 \
	    -- $(PY) -I -m privsock.examples.echo

## The Debian package: dist/privsock_<version>_all.deb (dpkg-deb only; see deploy/debian/).
deb:
	deploy/debian/build-deb

## The whole suite: lint, type check, unit, end-to-end and container tests.
test: bootstrap-containers lint
	$(PYTEST) -q

## Everything but the container tests.
test-fast: bootstrap-dev lint
	$(PYTEST) -q -m 'not containers'

test-containers: bootstrap-containers
	$(PYTEST) -q -m containers

lint: bootstrap-dev
	$(VENV)/bin/ruff check privsock tests fuzz bench mutate
	$(VENV)/bin/mypy --strict -p privsock

## Mitigation audit: each mitigation removed in a copy of the tree must make its tests fail.
audit: bootstrap-containers
	$(PY) -m mutate

## The mutations whose tests are fast (CI runs this one).
audit-fast: bootstrap-containers
	$(PY) -m mutate --fast

## Benchmarks: ratios against baselines measured in the same run.
bench:
	@scripts/bootstrap --bench
	$(PY) bench/run.py
	$(PY) bench/run_bind.py

## Coverage-guided fuzzing and the live-helper fuzzer (FUZZ_SECONDS per target).
fuzz: bootstrap-dev
	$(PY) fuzz/run.py --seconds $${FUZZ_SECONDS:-300}

clean:
	rm -rf $(VENV) dist .pytest_cache .mypy_cache .ruff_cache .hypothesis
