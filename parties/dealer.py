#!/usr/bin/env python3
"""Runs a job's Beaver-triple dealer (TTP): `python parties/dealer.py JOB.yaml [--rendezvous tcp://HOST:PORT]`."""

import sys

from mpcfl.cli import main

if __name__ == "__main__":
    sys.exit(main(["dealer", *sys.argv[1:]]))
