"""The layers of ARCHITECTURE.md hold: imports point down only and never close a cycle, checked by import-linter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO, package_files_matching


def test_import_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def _lint_with(tmp_path: Path, module: str, addition: str) -> subprocess.CompletedProcess:
    """import-linter on a copy of the package with ``addition`` appended to ``module`` (under mpcfl/)."""
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(REPO / "mpcfl", copy / "mpcfl")
    shutil.copy(REPO / "pyproject.toml", copy / "pyproject.toml")
    target = copy / "mpcfl" / module
    target.write_text(target.read_text() + addition)
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(lint)], cwd=copy, capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(copy), "PATH": ""}
    )


def test_the_contracts_would_catch_an_upward_import(tmp_path: Path) -> None:
    # The tool must see a violation when there is one: a copy of the package with
    # the DP layer importing a task.
    result = _lint_with(tmp_path, "dp/noise.py", "\nfrom mpcfl.tasks.train import loop  # noqa\n")
    assert result.returncode != 0
    assert "mpcfl.dp is not allowed to import mpcfl.tasks" in result.stdout


def test_the_contracts_would_catch_an_import_cycle(tmp_path: Path) -> None:
    # Two modules of one layer importing each other (inside a function, as the circle through
    # mpcfl.mpc.compat did): no layer is crossed, yet the cycle contract names the import.
    result = _lint_with(tmp_path, "mpc/wire.py", "\n\ndef _key_words():\n    from mpcfl.mpc.prng import KEY_WORDS  # noqa\n")
    assert result.returncode != 0
    assert "No cycles are allowed in mpcfl.mpc." in result.stdout
    assert ".prng -> .wire" in result.stdout or ".wire -> .prng" in result.stdout


def test_the_training_loop_has_no_dp_branch() -> None:
    """DP is the step strategy's business (mpcfl.tasks.train.steps): the loop never looks at the job's dp."""
    import re

    source = (REPO / "mpcfl" / "tasks" / "train" / "loop.py").read_text()
    assert "job.dp" not in source
    assert not re.search(r"^\s*(from|import) mpcfl\.(dp|tasks\.train\.dp_sgd)\b", source, re.M)


def test_only_the_head_knows_binary_from_multiclass() -> None:
    assert package_files_matching(r"num_classes\s*[=!<>]=?\s*2|num_classes\s*>\s*2") == ["mpcfl/models/spec.py"]


def _imported_after(statements: str) -> list[str]:
    code = f"import sys; {statements}; print(','.join(m for m in ('torch', 'crypten', 'scipy', 'dp_accounting') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return [m for m in done.stdout.strip().split(",") if m]


def test_the_launcher_imports_no_torch_and_parties_no_dp_accounting_without_dp() -> None:
    # Each takes seconds to import: the launcher would pay torch serially before any party
    # starts, and every party and dealer would pay dp-accounting's scipy in a job without DP.
    launcher = "import mpcfl.cli, mpcfl.launch.local; from mpcfl.jobs.schema import load_job; load_job('configs/breast_cancer_lr.yaml')"
    assert _imported_after(launcher) == []
    assert _imported_after("import mpcfl.launch.worker, mpcfl.tasks.train.runner, mpcfl.tasks.federated.runner") == ["torch"]
