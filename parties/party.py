#!/usr/bin/env python3
"""Runs one party of a job: `python parties/party.py JOB.yaml --party NAME [--rendezvous tcp://HOST:PORT]`."""

import sys

from mpcfl.cli import main

if __name__ == "__main__":
    sys.exit(main(["party", *sys.argv[1:]]))
