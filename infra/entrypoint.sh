#!/bin/sh
# The node image's entry point (infra/Dockerfile): check the host's NVIDIA driver against
# torch's CUDA, then run the container's command (Ray's cluster launcher starts `bash`).
# A too-old driver stops the container here with one line (infra/check_driver.py) instead
# of letting runtime.device=auto train a GPU node on its CPU; no driver (a CPU node) passes.
set -e
python "$(dirname "$0")/check_driver.py"
exec "$@"
