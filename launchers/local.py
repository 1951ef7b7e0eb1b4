#!/usr/bin/env python3
"""Runs every party and the dealer of a job on this machine: `python launchers/local.py JOB.yaml`."""

import sys

from mpcfl.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
