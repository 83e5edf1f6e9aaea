# Everything a fresh machine needs: `make demo`, `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv system-deps test test-fast demo ablation bench clean

venv: $(STAMP)

# torch/torchvision first, pinned: those builds install from the build machines' disk.
# Then the package with every extra ([dev]), held to the tested versions (constraints.txt),
# and DeepSpeed's CPU communication op, built once here rather than inside the first run.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -c 'from dist_diffusion.runtime.distributed import prebuild_cpu_ops; prebuild_cpu_ops()'
	touch $(STAMP)

# The Debian packages of the cluster tests, each as COMMAND:PACKAGE (a command that shows the
# package is there): the local SLURM cluster (infra/local/slurm.sh: munge, MariaDB behind
# slurmdbd, slurmctld, slurmd) and iproute2 for the 2-node cluster (infra/local/cluster.sh).
# Missing ones are installed where that can be done (root and apt); otherwise one line names them.
SYSTEM_DEPS := slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client slurmdbd:slurmdbd munged:munge \
               mariadbd:mariadb-server ip:iproute2
APT_GET ?= apt-get
MISSING_PKGS = $(strip $(shell PATH="$$PATH:/usr/sbin:/sbin"; \
  for dep in $(SYSTEM_DEPS); do command -v "$${dep%%:*}" >/dev/null || echo "$${dep#*:}"; done))
CAN_APT = $(shell [ "$$(id -u)" = 0 ] && command -v $(APT_GET))
NEED_PKGS = make test needs Debian packages $(MISSING_PKGS) for its SLURM/cluster tests: run it as root on a \
  machine with apt (it installs them), or run `make test-fast` or `make test TEST_ARGS="-m 'not cluster'"`
# $(error) stops make with exactly that one line (expanded only when this recipe runs).
system-deps:
	$(if $(MISSING_PKGS),$(if $(CAN_APT),,$(error $(NEED_PKGS))))
	@$(if $(MISSING_PKGS),echo "installing Debian packages for the SLURM/cluster tests: $(MISSING_PKGS)" && \
	  $(APT_GET) update -qq && DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq $(MISSING_PKGS) >/dev/null,:)

# Two pytest-xdist workers: much of the suite waits on daemons, requeues and rank start-up,
# and the other worker computes meanwhile. A module is one unit of work (tests/conftest.py),
# so its fixtures start once. TEST_WORKERS=0 runs everything in this one process.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

# The system packages first (installed, or one line naming them), unless TEST_ARGS leaves the
# cluster tests out (-m "not cluster", or "not slow": every cluster module is slow too).
test: $(if $(or $(findstring not cluster,$(TEST_ARGS)),$(findstring not slow,$(TEST_ARGS))),,system-deps) venv
	$(BIN)/python -m pytest $(XDIST) $(TEST_ARGS)

# The inner loop: no training, sampling or cluster processes (markers in pyproject.toml).
test-fast: venv
	$(BIN)/python -m pytest $(XDIST) -m "not slow and not cluster" $(TEST_ARGS)

demo: venv
	$(BIN)/python -m dist_diffusion.demo

# The seed report's comparison on the digits (pixel/latent, schedules, CFG, samplers): about
# 20 minutes on 2 cores; the table lands in runs/ablation/report.md.
ablation: venv
	$(BIN)/python -m dist_diffusion.demo.ablation

bench: venv
	$(BIN)/python tools/bench_table.py

clean:
	rm -rf runs .pytest_cache
