# Everything runs as root on a fresh Debian machine: `make demo`, `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Debian packages the data plane, the lab and the tests call.
APT_PACKAGES := iptables nftables ipset conntrack iproute2 procps kmod \
	nginx-light openssl apache2-utils \
	qemu-system-x86 linux-image-amd64 busybox-static file ipvsadm \
	python3-venv shellcheck vagrant

.PHONY: demo test test-unit test-kernel test-ingress test-vm bench lint deps venv clean

demo: venv
	$(VENV)/bin/kproxy lab demo

test: venv
	$(MAKE) lint
	$(PY) -m pytest -q -p no:cacheprovider tests --ignore=tests/vm
	$(MAKE) test-vm

test-unit: venv
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

test-kernel: venv
	$(PY) -m pytest -q -p no:cacheprovider tests/kernel

test-ingress: venv
	$(PY) -m pytest -q -p no:cacheprovider tests/ingress

test-vm: venv
	bash tests/vm/run_in_vm.sh $(PY) -m pytest -q -p no:cacheprovider tests/vm

# Both benchmarks, one after the other, under one lock so that no two recorded runs on this
# machine overlap; BENCH_FLAGS go to the process benchmark (e.g. --budget 300 --sizes 1000x10).
BENCH_LOCK ?= /tmp/kproxy-bench.lock
bench: venv
	@start=$$(date +%s); \
	flock $(BENCH_LOCK) $(PY) bench/process_bench.py --out docs/benchmarks.md $(BENCH_FLAGS) && \
	flock $(BENCH_LOCK) $(PY) bench/iptables_bench.py --services 1000 10000 --out docs/benchmarks.md && \
	flock $(BENCH_LOCK) $(PY) bench/first_packet.py --sizes 1000 30000 --rounds 7 --out docs/benchmarks.md; \
	status=$$?; echo "make bench took $$(( $$(date +%s) - start )) s"; exit $$status

lint: venv
	$(VENV)/bin/ruff check kproxy tests bench tools
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: deps $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info
