"""The README and docs/ stay true to the code: every link resolves, every `make` target
and `python -m` module they name exists and answers --help, every `ddk` command they
name is one, and every config field they name (`section.field`) is a field of the
config tree. Cheap checks only: nothing here runs a stage."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ddk.pipeline.config import Config
from ddk.stages.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def test_readme_is_short():
    lines = _text(ROOT / "README.md").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/ (limit {README_MAX_LINES})"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _text(doc)):
        if re.match(r"[a-z]+://", target) or target.startswith("#"):
            continue
        if not (doc.parent / target.split("#")[0]).exists():
            missing.append(target)
    assert not missing, f"{doc.relative_to(ROOT)}: links to missing files {missing}"


def test_every_doc_is_linked_from_the_index():
    index = _text(ROOT / "docs" / "README.md")
    unlinked = [p.name for p in DOCS[1:] if p.name != "README.md" and f"]({p.name})" not in index]
    assert not unlinked, f"docs/README.md does not link {unlinked}"


def _all_docs() -> str:
    return "\n".join(_text(p) for p in DOCS)


def test_make_targets_exist():
    makefile = _text(ROOT / "Makefile")
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, re.M))
    named = set(re.findall(r"(?:^|`)make ([a-z][\w-]*)", _all_docs(), re.M))  # in backticks or a command line
    assert named, "no `make` command found in the docs (the pattern is broken)"
    assert not named - targets, f"the docs name make targets the Makefile lacks: {sorted(named - targets)}"


def test_ddk_commands_exist():
    # `ddk X` in backticks, or a command line starting with ddk / .venv/bin/ddk
    named = set(re.findall(r"(?:^|`|\.venv/bin/)ddk ([a-z][\w-]*)(?: ([a-z][\w-]*))?", _all_docs(), re.M))
    assert named, "no `ddk` command found in the docs (the pattern is broken)"
    runner = CliRunner()
    bad = []
    for command, sub in sorted(named):
        group = cli.commands.get(command)
        if group is None:
            bad.append(command)
        elif sub and hasattr(group, "commands") and sub not in group.commands:
            bad.append(f"{command} {sub}")
    assert not bad, f"the docs name ddk commands that do not exist: {bad}"
    for name, command in cli.commands.items():
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0, f"ddk {name} --help failed: {result.output}"


def test_python_modules_answer_help():
    """Every `python -m ddk.X` the docs name imports and prints its --help (in one child
    interpreter, so the imports are paid once)."""
    named = set(re.findall(r"python -m (ddk(?:\.\w+)+)", _all_docs()))
    assert named, "no `python -m ddk...` found in the docs (the pattern is broken)"
    # and every benchmark and tool with a command line, named in the docs or not
    scripts = {f"ddk.{f.parent.name}.{f.stem}" for folder in ("benchmarks", "tools") for f in (ROOT / folder).glob("*.py")
               if "def main(" in _text(f)}
    modules = sorted(named | scripts)
    script = (
        "import runpy, sys\n"
        "failed = []\n"
        f"for m in {modules!r}:\n"
        "    sys.argv = [m, '--help']\n"
        "    try:\n"
        "        runpy.run_module(m, run_name='__main__', alter_sys=False)\n"
        "        failed.append((m, 'no SystemExit from --help'))\n"
        "    except SystemExit as e:\n"
        "        if e.code not in (0, None): failed.append((m, e.code))\n"
        "    except Exception as e:\n"
        "        failed.append((m, repr(e)))\n"
        "print('FAILED', failed)\n"
        "sys.exit(1 if failed else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def _fields(cls) -> dict[str, object]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _resolves(path: list[str]) -> bool:
    cls = Config
    for part in path:
        if not dataclasses.is_dataclass(cls):
            return False  # a dict field (e.g. domain_mix) takes any key, but none is named here
        f = _fields(cls).get(part)
        if f is None:
            return False
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        cls = type(default) if dataclasses.is_dataclass(default) else None
    return True


def test_config_fields_named_in_the_docs_exist():
    sections = [f.name for f in dataclasses.fields(Config) if f.name != "source_path"]
    pattern = re.compile(rf"(?<![\w.])((?:{'|'.join(sections)})(?:\.[a-z_]+)+)\b")
    unknown = set()
    for doc in DOCS:
        for name in pattern.findall(_text(doc)):
            parts = name.split(".")
            if parts[-1] in {"toml", "py", "json", "jsonl", "md", "png", "parquet"}:  # file names (cache.py)
                continue
            if parts[0] == "corpus" and len(parts) > 2 and parts[1] == "domains":
                parts = ["corpus"]  # corpus.domains entries are DomainSource tables
            if not _resolves(parts):
                unknown.add(f"{doc.relative_to(ROOT)}: {name}")
    assert not unknown, "the docs name config fields that do not exist:\n" + "\n".join(sorted(unknown))
