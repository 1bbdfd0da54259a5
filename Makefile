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

.PHONY: all venv sysdeps peers demo test lint bench clean

all: test

# sysdeps first where both are needed: the venv builds NetfilterQueue against libnetfilter-queue-dev.
venv: $(STAMP)

# Reinstall only when pyproject.toml changes; the stamp lives inside the venv so `clean` drops both.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[dev,ray,netlink,cli]'
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

# Independent libp2p peers for the libp2p-mode tests (tests/peers/, tests/rig/libp2p_peers.py), in
# .peers/ (gitignored). py-libp2p gets its own venv: its protobuf<7 pin conflicts with ours. js-libp2p
# installs from the committed lock file in tests/peers/js/, copied beside a fresh node_modules; its
# peer.mjs is a symlink there, run with --preserve-symlinks-main so imports resolve to that copy.
# Not `npm ci`: the npm registry we reach serves only the linux-x64 builds of libp2p-quic, so
# the lock lacks its other platforms' optional packages and `npm ci` calls it out of sync.
# `npm install` on the copy installs exactly the lock; if it had to change the lock, the committed
# one is stale and the target fails (regenerate: cd tests/peers/js && npm install --package-lock-only).
# Stamps make a second run instant; a missing node (or one older than 20) is reported, not fatal:
# the js tests then skip with that reason.
PEERS := .peers
PY_PEER := $(PEERS)/py-libp2p
JS_PEER := $(PEERS)/js-libp2p
PY_LIBP2P := libp2p==0.8.1

peers: $(PY_PEER)/.installed $(JS_PEER)/.installed

# Building py-libp2p's wheels needs a C compiler, GMP headers and Python headers; the venv module
# needs ensurepip (python3-venv on Debian).
$(PY_PEER)/.installed:
	@missing=""; \
	command -v gcc >/dev/null 2>&1 || missing="$$missing gcc"; \
	dpkg -s libgmp-dev >/dev/null 2>&1 || missing="$$missing libgmp-dev"; \
	$(PY) -c 'import os, sysconfig; raise SystemExit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
		|| missing="$$missing python3-dev"; \
	$(PY) -c 'import ensurepip' >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	if [ -z "$$missing" ]; then \
		echo "peers: py-libp2p build dependencies present"; \
	elif [ "$$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
		echo "peers: cannot install$$missing (not root or no apt-get); trying the build anyway"; \
	else \
		echo "peers: installing$$missing"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -q && apt-get install -y -q --no-install-recommends $$missing; \
	fi
	@test -x $(PY_PEER)/bin/python || $(PY) -m venv $(PY_PEER)
	$(PY_PEER)/bin/python -m pip install -q --disable-pip-version-check '$(PY_LIBP2P)'
	@touch $@

$(JS_PEER)/.installed: tests/peers/js/package.json tests/peers/js/package-lock.json
	@if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then \
		echo "peers: node/npm not found: js-libp2p peer not installed (its tests skip)"; \
	elif [ "$$(node -p 'process.versions.node.split(".")[0]')" -lt 20 ]; then \
		echo "peers: node $$(node --version) is older than 20: js-libp2p peer not installed (its tests skip)"; \
	else \
		rm -rf $(JS_PEER)/node_modules && mkdir -p $(JS_PEER) && \
		cp tests/peers/js/package.json tests/peers/js/package-lock.json $(JS_PEER)/ && \
		ln -sfn ../../tests/peers/js/peer.mjs $(JS_PEER)/peer.mjs && \
		(cd $(JS_PEER) && npm install --no-audit --no-fund --loglevel=error) && \
		if ! cmp -s $(JS_PEER)/package-lock.json tests/peers/js/package-lock.json; then \
			echo "peers: tests/peers/js/package-lock.json is out of date: regenerate it with"; \
			echo "  cd tests/peers/js && npm install --package-lock-only"; \
			exit 1; \
		fi && \
		touch $@; \
	fi

demo: sysdeps venv peers
	$(BIN)/quic-supervisor demo

test: sysdeps venv peers
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

# Benchmarks (see bench/__main__.py): JSON to bench/results/, a table on stdout,
# then README.md's results table regenerated from the JSON (even if one benchmark failed).
bench: sysdeps venv $(VENV)/.bench-installed
	$(BIN)/python -m bench; status=$$?; $(BIN)/python -m bench.report; exit $$status

$(VENV)/.bench-installed: pyproject.toml $(STAMP)
	$(BIN)/python -m pip install -e '.[dev,ray,netlink,cli,bench]'
	@touch $@

clean:
	rm -rf $(VENV) $(PEERS) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
