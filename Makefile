# edgeward developer tasks.  `make` alone lists them.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Removed by `make clean` (each only if git does not track it).
CLEAN_PATHS := $(VENV) .pytest_cache .ruff_cache .hypothesis build dist *.egg-info

.DEFAULT_GOAL := help
.PHONY: help venv broker prometheus test lint fmt demo bench clean protos

help:
	@echo "make venv    create $(VENV) ($(PYTHON) -m venv) and pip install -e '.[test]'"
	@echo "make broker  make sure RabbitMQ answers on 127.0.0.1 (scripts/ensure-broker)"
	@echo "make prometheus  install Debian's prometheus + promtool if missing (scripts/ensure-prometheus)"
	@echo "make test    lint, then pytest (needs venv + broker)"
	@echo "make lint    ruff check + ruff format --check"
	@echo "make fmt     sort imports and format with ruff"
	@echo "make demo    run edgeward.actors.demo against the local broker"
	@echo "make bench   run edgeward.actors.bench against the local broker"
	@echo "make protos  regenerate the KubeArmor gRPC stubs in enforcement/kubearmor"
	@echo "make clean   remove $(VENV) and caches (never tracked files)"
	@echo
	@echo "EDGEWARD_SKIP_BROKER=1 skips the broker step; ARGS=... is passed to demo/bench."

venv: $(STAMP)

# Reinstall only when the packaging metadata is newer than the last install.
$(STAMP): setup.cfg pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[test]'
	@touch $@

broker:
	@bash scripts/ensure-broker

# Debian's prometheus/promtool (and systemd-analyze) for tests/test_charts.py;
# its own service is stopped: the tests run their own Prometheus.
prometheus:
	@bash scripts/ensure-prometheus

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# pytest exits 5 when it collected no tests; that is a failure here too.
test: venv broker prometheus
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@$(BIN)/pytest -q || { rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; fi; \
	  exit $$rc; }

fmt: venv
	$(BIN)/ruff check --select I --fix .
	$(BIN)/ruff format .

demo: venv broker
	$(BIN)/python -m edgeward.actors.demo $(ARGS)

bench: venv broker
	$(BIN)/python -m edgeward.actors.bench $(ARGS)

# KubeArmor's .proto files -> checked-in stubs.  The -I mapping names the
# files edgeward/enforcement/kubearmor/*.proto, so protoc itself writes
# package imports (from edgeward.enforcement.kubearmor import policy_pb2).
PROTO_SRC := enforcement/kubearmor/protos
PROTO_PKG := edgeward/enforcement/kubearmor
protos: venv
	@out=$$(mktemp -d) && trap 'rm -rf "$$out"' EXIT && \
	$(BIN)/python -m grpc_tools.protoc -I$(PROTO_PKG)=$(PROTO_SRC) \
	  --python_out=$$out --pyi_out=$$out --grpc_python_out=$$out \
	  $(PROTO_PKG)/policy.proto $(PROTO_PKG)/kubearmor.proto && \
	cp $$out/$(PROTO_PKG)/*.py $$out/$(PROTO_PKG)/*.pyi enforcement/kubearmor/ && \
	echo "stubs regenerated in enforcement/kubearmor/"

clean:
	@for p in $(wildcard $(CLEAN_PATHS)); do \
	  if git ls-files --error-unmatch -- "$$p" >/dev/null 2>&1; then \
	    echo "keeping $$p (tracked by git)"; \
	  else \
	    echo "rm -rf $$p"; rm -rf -- "$$p"; \
	  fi; \
	done
	@find . -path ./.git -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
