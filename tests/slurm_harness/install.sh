#!/bin/sh
# Installs the one-node Slurm used by tests/test_submit.py (root on Debian). Idempotent: does
# nothing when the daemons are present. Never fails: without Slurm those tests skip and say why.
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || [ ! -f /etc/debian_version ]; then
    echo "tests/slurm_harness/install.sh: installing Slurm needs root on Debian; the Slurm tests will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null; then
    echo "tests/slurm_harness/install.sh: installed $(slurmctld -V)"
else
    echo "tests/slurm_harness/install.sh: apt-get could not install slurm-wlm munge; the Slurm tests will skip" >&2
fi
