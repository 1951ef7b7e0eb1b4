"""Runs CrypTen's own unittest suite under mpcfl's compat layer.

    python tests/crypten_suite.py test_optim test_onnx_converter test_crypten [-k PATTERN ...]

The suite is the top-level package ``test`` that the crypten wheel installs into site-packages
(Python's own ``test`` package would win on a plain import, so it is loaded from there by path).
CrypTen's multi-process tests spawn one process per party and one for the dealer; spawn runs this
file again in each of them, so every process applies the patches (:func:`import_crypten`) before
it unpickles its test, exactly as the parent did. One line per module:
``crypten-suite: MODULE passed P/N (failures F, errors E, skipped S)``. Exits 1 if a module did
not load or a test failed, 0 otherwise (``tests/mpc/test_crypten_suite.py`` holds the counts we expect).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import sysconfig
import unittest
from pathlib import Path

from mpcfl.mpc.engine import import_crypten

SUITE = Path(sysconfig.get_paths()["purelib"]) / "test"
SUMMARY = "crypten-suite:"


def _load_crypten_tests() -> None:
    """Registers site-packages' ``test`` as the package ``test``, ahead of Python's own."""
    if getattr(sys.modules.get("test"), "__file__", None) == str(SUITE / "__init__.py"):
        return
    spec = importlib.util.spec_from_file_location("test", SUITE / "__init__.py", submodule_search_locations=[str(SUITE)])
    assert spec is not None and spec.loader is not None, f"CrypTen's test suite is not installed at {SUITE}"
    package = importlib.util.module_from_spec(spec)
    sys.modules["test"] = package
    spec.loader.exec_module(package)


# At import, in the parent and in every spawned party and dealer alike.
import_crypten()
_load_crypten_tests()


def run(module: str, patterns: list[str] | None) -> unittest.TestResult:
    """Runs ``test.MODULE`` (only the tests matching ``patterns``, unittest's ``-k``, if given)."""
    loader = unittest.TestLoader()
    loader.testNamePatterns = [p if "*" in p else f"*{p}*" for p in patterns or []] or None
    suite = loader.loadTestsFromName(f"test.{module}")
    return unittest.TextTestRunner(verbosity=2).run(suite)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="+", help="modules of CrypTen's suite, e.g. test_optim")
    parser.add_argument("-k", dest="patterns", action="append", help="only tests matching this (unittest's -k)")
    args = parser.parse_args(argv)
    ok = True
    for module in args.modules:
        result = run(module, args.patterns)
        broken = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
        passed = result.testsRun - broken - len(result.skipped) - len(result.expectedFailures)
        # stdout, for a caller to parse; unittest's own report goes to stderr
        print(
            f"{SUMMARY} {module} passed {passed}/{result.testsRun} (failures {len(result.failures)}, "
            f"errors {len(result.errors)}, skipped {len(result.skipped)})", flush=True,
        )
        ok = ok and broken == 0
    return 0 if ok else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
