# quic-supervisor developer entry points. CI runs `make test` through .ci/run on a fresh clone,
# so every target installs what it needs and is safe to run again.

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Debian packages the test rig uses: independent QUIC peers (ngtcp2), packet decoding (tshark),
# fault injection (nftables, NFQUEUE headers, iptables for the NFQUEUE target, conntrack to flush
# NAT state), namespaces and routes (iproute2).
SYSDEPS := ngtcp2-server ngtcp2-client tshark nftables iproute2 libnetfilter-queue-dev iptables conntrack

.PHONY: all venv sysdeps demo test lint bench clean

all: test

# sysdeps first where both are needed: the venv builds NetfilterQueue against libnetfilter-queue-dev.
venv: $(STAMP)

# Reinstall only when pyproject.toml changes; the stamp lives inside the venv so `clean` drops both.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[dev,ray,netlink]'
	@touch $(STAMP)

# Install only what is missing; without root, say what is missing and carry on (tests that need
# a missing tool skip themselves).
sysdeps:
	@missing=""; \
	command -v gtlsserver >/dev/null 2>&1 || missing="$$missing ngtcp2-server"; \
	command -v gtlsclient >/dev/null 2>&1 || missing="$$missing ngtcp2-client"; \
	command -v tshark >/dev/null 2>&1 || missing="$$missing tshark"; \
	command -v nft >/dev/null 2>&1 || missing="$$missing nftables"; \
	command -v ip >/dev/null 2>&1 || missing="$$missing iproute2"; \
	dpkg -s libnetfilter-queue-dev >/dev/null 2>&1 || missing="$$missing libnetfilter-queue-dev"; \
	command -v iptables >/dev/null 2>&1 || missing="$$missing iptables"; \
	command -v conntrack >/dev/null 2>&1 || missing="$$missing conntrack"; \
	if [ -z "$$missing" ]; then \
		echo "sysdeps: all present"; \
	elif [ "$$(id -u)" -ne 0 ]; then \
		echo "sysdeps: not root, skipping install of:$$missing (tests needing them will skip)"; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "sysdeps: no apt-get, skipping install of:$$missing (tests needing them will skip)"; \
	else \
		echo "sysdeps: installing$$missing"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -q && \
		echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections && \
		apt-get install -y -q --no-install-recommends $$missing; \
	fi

demo: sysdeps venv
	$(BIN)/quic-supervisor demo

test: sysdeps venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

# Benchmarks (see bench/__main__.py): JSON to bench/results/, a table on stdout,
# then README.md's results table regenerated from the JSON (even if one benchmark failed).
bench: sysdeps venv $(VENV)/.bench-installed
	$(BIN)/python -m bench; status=$$?; $(BIN)/python -m bench.report; exit $$status

$(VENV)/.bench-installed: pyproject.toml $(STAMP)
	$(BIN)/python -m pip install -e '.[dev,ray,netlink,bench]'
	@touch $@

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
