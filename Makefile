# The two commands of README.md. Both build .venv from the lock files, so a fresh clone with only
# Python 3.11 gets exactly the pinned environment. pip (not uv/poetry) is used on purpose: the
# pinned torch CPU wheel is resolved through pip's find-links.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements/lock.txt
DEV_LOCK := requirements/dev-lock.txt

.PHONY: quickstart test test-fast test-airflow lint layering bench lock lock-cuda audit clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "recforge needs Python >= 3.11, found " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)

# Stamp files: reinstall only when a lock file or pyproject.toml changes.
$(VENV)/.installed: $(BIN)/python $(LOCK) pyproject.toml
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r $(LOCK)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed $(DEV_LOCK) $(VENV)/.java $(VENV)/.redis
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r $(DEV_LOCK)
	touch $@

# Java 17+ for the Spark preparation engine (data.engine=spark) and its tests; the quickstart needs none.
# tools/ensure_java.sh does nothing when java (JAVA_HOME's, else PATH's) is 17+; otherwise, as root, it runs
# apt-get update once and installs openjdk-17-jre-headless, and as any other user it fails with one line
# saying what to install.
$(VENV)/.java: tools/ensure_java.sh | $(BIN)/python
	tools/ensure_java.sh
	touch $@

# redis-server 7+ for the shared online-state tests (serve --state redis://...); tools/ensure_redis.sh installs
# Debian's package as root when it is missing, and otherwise fails with one line saying what to install.
$(VENV)/.redis: tools/ensure_redis.sh | $(BIN)/python
	tools/ensure_redis.sh
	touch $@

quickstart: $(VENV)/.installed
	$(BIN)/recforge quickstart

# Two pytest workers (one per core on the 2-core reference machine; a test file stays on one worker so
# its fixtures are built once), then the Airflow DAG under dag.test(). Airflow's own venv is installed
# in the background while pytest runs (it is mostly download); pytest's exit status (5 included, when
# nothing is collected) is make's, and a failed install fails the target with its log shown.
# One intra-op thread per worker (OMP_NUM_THREADS, inherited by the CLIs the tests start): two workers
# of two threads each on two cores spin-wait on each other (tests/e2e/test_zoo.py: 77 s -> 62 s).
TEST_WORKERS ?= 2
TEST_THREADS ?= 1
AIRFLOW_INSTALL_LOG := .venv-airflow-install.log
test: $(VENV)/.installed-dev
	@deploy/airflow/test_dag.sh --install-only > $(AIRFLOW_INSTALL_LOG) 2>&1 & installer=$$!; \
	OMP_NUM_THREADS=$(TEST_THREADS) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile; status=$$?; \
	if ! wait $$installer; then cat $(AIRFLOW_INSTALL_LOG) >&2; echo "airflow venv install failed" >&2; \
	  [ $$status -ne 0 ] || status=1; fi; \
	[ $$status -eq 0 ] || exit $$status; \
	deploy/airflow/test_dag.sh

# The quick lane for the edit loop: unit and seeded numeric tests, no end-to-end runs (-m "not slow";
# a test that starts the CLI, a server or a cluster carries @pytest.mark.slow). make test runs them all.
test-fast: $(VENV)/.installed-dev
	OMP_NUM_THREADS=$(TEST_THREADS) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

# The Airflow DAG run for real with dag.test() in its own environment (.venv-airflow: Airflow's pins
# conflict with recforge's); the pipeline steps it runs use .venv's recforge.
test-airflow: $(VENV)/.installed
	deploy/airflow/test_dag.sh

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

# The declared layering (docs/architecture.md) and every import edge of the package against it.
layering: $(VENV)/.installed
	$(BIN)/python tools/layering.py

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/train_throughput.py

# Recompile the lock files from requirements/*.in with pip-tools in a throwaway environment.
lock:
	rm -rf .lock-tools && $(PYTHON) -m venv .lock-tools && .lock-tools/bin/pip install --quiet pip-tools==7.6.2
	LOCK_COMPILER=$(CURDIR)/.lock-tools/bin/pip-compile requirements/compile.sh
	rm -rf .lock-tools

# The CUDA lock (torch 2.13.0 CUDA build + the same pins as lock.txt); see docs/environments.md.
lock-cuda:
	requirements/compile-cuda.sh pypi

# Known vulnerabilities of the locked pins: pip-audit (pinned, in its own environment like pip-tools above,
# so the locks stay free of it) run by requirements/audit.py. Exit 0 clean (every pin looked up, none
# vulnerable), 1 vulnerable, 2 unknown: a database that cannot be reached is never reported as clean.
#   make audit AUDIT_SERVICE=osv OSV_URL=https://osv.mirror.example/v1/query     (an OSV mirror)
PIP_AUDIT_VERSION := 2.10.1
AUDIT_SERVICE ?= pypi
AUDIT_LOCKS ?= $(LOCK) $(DEV_LOCK)
AUDIT_TOOLS := .audit-tools
$(AUDIT_TOOLS)/.pip-audit-$(PIP_AUDIT_VERSION):
	rm -rf $(AUDIT_TOOLS) && $(PYTHON) -m venv $(AUDIT_TOOLS)
	$(AUDIT_TOOLS)/bin/pip install --quiet --disable-pip-version-check pip-audit==$(PIP_AUDIT_VERSION)
	touch $@

audit: $(AUDIT_TOOLS)/.pip-audit-$(PIP_AUDIT_VERSION)
	$(PYTHON) requirements/audit.py --pip-audit $(AUDIT_TOOLS)/bin/pip-audit --service $(AUDIT_SERVICE) \
		$(if $(OSV_URL),--osv-url $(OSV_URL)) $(AUDIT_LOCKS)

clean:
	rm -rf $(VENV) .venv-airflow $(AUDIT_TOOLS) runs .pytest_cache
