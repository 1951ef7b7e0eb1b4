"""The documentation site builds strictly, and every example on its getting-started and guide pages runs.

Examples run in page order (mkdocs.yml's navigation) in one temporary copy of the repository,
as a reader would follow them, with this checkout's ``mpcfl`` on PATH. Markers in an HTML
comment on the line before a fenced block (see docs/development.md):
``not-run: REASON``, ``expect-error: TEXT``, ``docs-test: FILE KEY=VALUE ...``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import REPO

DOCS = REPO / "docs"
RUN_SECTIONS = ("getting-started/", "guides/")  # pages whose examples must run
RUNNABLE = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python", "py": "python"}
NOT_CODE = {"yaml", "text", "json", "toml", "ini", "csv"}
COPIED = ("configs", "examples", "launchers", "parties")
BLOCK_TIMEOUT_S = 240
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*(not-run|expect-error|docs-test):\s*(.*?)\s*-->\s*$")
TEST_NOTE = "The documentation's tests run"  # a page that runs a changed job must say so


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    lang: str
    code: str
    marker: str | None = None
    argument: str = ""

    def __str__(self) -> str:
        return f"{self.page}:{self.line} ({self.lang or 'no language'})"


def nav_pages() -> list[str]:
    """Every page of mkdocs.yml's navigation, in order."""
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8").replace("!!python", "#"))
    pages: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, str):
            pages.append(node)
        elif isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)

    walk(config["nav"])
    return pages


def blocks_of(text: str, page: str) -> list[Block]:
    """The fenced blocks of a markdown page, each with the marker on the line before it, if any."""
    lines = text.splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, lang = opening.group(1), opening.group(2).lower()
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        code = "\n".join(line[len(indent):] if line.startswith(indent) else line for line in lines[i + 1:end])
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(before)
        found.append(Block(page, i + 1, lang, code + "\n", *(marker.groups() if marker else (None, ""))))
        i = end + 1
    return found


def run_pages() -> list[str]:
    return [page for page in nav_pages() if page.startswith(RUN_SECTIONS)]


def _set_key(job: Path, dotted: str, value: str) -> None:
    spec = yaml.safe_load(job.read_text(encoding="utf-8"))
    node = spec
    *path, last = dotted.split(".")
    for key in path:
        node = node.setdefault(key, {})
    node[last] = yaml.safe_load(value)
    job.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = process.communicate(timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        return subprocess.CompletedProcess(command, -9, out + f"\n(ran past {BLOCK_TIMEOUT_S}s; killed)")
    return subprocess.CompletedProcess(command, process.returncode, out)


def check_block(block: Block, workspace: Path, env: dict[str, str], page_text: str) -> str | None:
    """Runs one block as its marker says; the reason it fails, or None."""
    if block.lang in NOT_CODE:
        return None
    if block.marker == "not-run":
        return None if block.argument else f"{block}: not-run needs a reason"
    if block.lang not in RUNNABLE:
        return f"{block}: a fenced block must name its language ({', '.join(sorted(set(RUNNABLE) | NOT_CODE))}), or be marked not-run"
    if block.marker == "docs-test":
        if TEST_NOTE not in page_text:
            return f"{block}: the page changes the job for its tests but does not say so ({TEST_NOTE!r} ...)"
        job, *settings = block.argument.split()
        for setting in settings:
            key, _, value = setting.partition("=")
            _set_key(workspace / job, key, value)
    if RUNNABLE[block.lang] == "bash":
        command = ["bash", "-euo", "pipefail", "-c", block.code]
    else:
        script = workspace / f".docs-block-{Path(block.page).stem}-{block.line}.py"
        script.write_text(block.code, encoding="utf-8")
        command = [sys.executable, str(script)]
    done = _run(command, workspace, env)
    tail = done.stdout[-4000:]
    if block.marker == "expect-error":
        if done.returncode == 0:
            return f"{block}: expected to fail with {block.argument!r}, but it succeeded:\n{tail}"
        if block.argument not in done.stdout:
            return f"{block}: failed without {block.argument!r}:\n{tail}"
        return None
    if done.returncode != 0:
        return f"{block}: exit status {done.returncode}:\n{block.code}\n--- output ---\n{tail}"
    return None


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A copy of the repository's jobs and data, with this checkout's mpcfl and python first on PATH."""
    root = tmp_path_factory.mktemp("docs-examples")
    for name in COPIED:
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "runs"))
    bin_dir = root / ".bin"
    bin_dir.mkdir()
    for name, target in (("python", f'exec "{sys.executable}" "$@"'), ("mpcfl", f'exec "{sys.executable}" -m mpcfl "$@"')):
        shim = bin_dir / name
        shim.write_text(f"#!/bin/sh\n{target}\n", encoding="utf-8")
        shim.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "MPCFL_LEDGER_DIR": str(root / "ledgers"),  # never the user's privacy ledgers
    }
    return root, env


@pytest.mark.parametrize("page", run_pages())
def test_every_example_on_the_page_runs(page: str, workspace: tuple[Path, dict[str, str]]) -> None:
    root, env = workspace
    text = (DOCS / page).read_text(encoding="utf-8")
    failures = [f for block in blocks_of(text, page) if (f := check_block(block, root, env, text))]
    assert not failures, "\n\n".join(failures)


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-5000:]
    schema = (tmp_path / "site" / "reference" / "job-schema" / "index.html").read_text(encoding="utf-8")
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    # The generated pages hold every key and every subcommand the code has today.
    sys.path.insert(0, str(DOCS / "hooks"))
    try:
        import reference
    finally:
        sys.path.remove(str(DOCS / "hooks"))
    from mpcfl.jobs import schema as jobs

    models = reference._models_reachable([getattr(jobs, name) for name in reference.JOB_MODELS])
    for name, model in models.items():
        assert f'id="{name.lower()}"' in schema, name
        for key, field in model.model_fields.items():
            assert field.exclude or f"<code>{key}</code>" in schema, f"{name}.{key}"
    for name, _, _ in reference._subcommands(reference.build_cli_parser()):
        assert f"<code>mpcfl {name}</code>" in cli, name
    # Every public name of `import mpcfl` has its entry in the API reference.
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    import mpcfl

    for name in mpcfl.__all__:
        assert f'id="{mpcfl._API[name]}.{name}"' in api, name


def test_every_page_is_in_the_navigation() -> None:
    on_disk = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert on_disk == set(nav_pages())


def test_the_checks_catch_a_failing_or_unmarked_example(tmp_path: Path) -> None:
    env = {**os.environ}
    page = """
```bash
exit 3
```

<!-- expect-error: no such key -->
```bash
echo fine
```

```
mpcfl run somewhere-else.yaml
```

<!-- not-run: needs two hosts -->
```bash
exit 1
```

```python
print("ok")
```
"""
    results = [check_block(b, tmp_path, env, page) for b in blocks_of(page, "t.md")]
    assert results[0] is not None and "exit status 3" in results[0]
    assert results[1] is not None and "expected to fail" in results[1]
    assert results[2] is not None and "must name its language" in results[2]
    assert results[3] is None and results[4] is None


def test_every_code_fence_is_closed() -> None:
    # A fence left open swallows the rest of the page, examples included.
    for page in nav_pages():
        fences = [line for line in (DOCS / page).read_text(encoding="utf-8").splitlines() if line.lstrip().startswith("```")]
        assert len(fences) % 2 == 0, page
