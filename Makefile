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

# The local SLURM cluster (infra/local/slurm.sh) for the launcher tests, and iproute2 for
# the 2-node cluster (infra/local/cluster.sh): Debian packages.
SYSTEM_PKGS := slurmctld slurmd slurm-client slurmdbd munge mariadb-server iproute2
system-deps:
	@command -v slurmctld >/dev/null && command -v mariadbd >/dev/null && command -v ip >/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PKGS) >/dev/null; }

# Two pytest-xdist workers: much of the suite waits on daemons, requeues and rank start-up,
# and the other worker computes meanwhile. A module is one unit of work (tests/conftest.py),
# so its fixtures start once. TEST_WORKERS=0 runs everything in this one process.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

test: venv
	$(BIN)/python -m pytest $(XDIST) $(TEST_ARGS)

# The inner loop: no training, sampling or cluster processes (markers in pyproject.toml).
test-fast: venv
	$(BIN)/python -m pytest $(XDIST) -m "not slow and not cluster" $(TEST_ARGS)

demo: venv
	$(BIN)/python -m dist_diffusion.demo

# The seed report's comparison on the digits (pixel/latent, schedules, CFG, samplers): about
# 20 minutes on 2 cores; the table lands in runs/ablation/report.md.
ablation: venv
	$(BIN)/python -m dist_diffusion.ablation

bench: venv
	$(BIN)/python tools/bench_table.py

clean:
	rm -rf runs .pytest_cache
