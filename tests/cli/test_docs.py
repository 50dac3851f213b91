"""The documentation site's generated parts: the CLI reference and the benchmark results.

The strict site build itself (``mkdocs build --strict``) runs in ``.ci/run``.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import inspect
import re
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any, get_type_hints

import pytest

import bergson
from bergson.cli import COMMANDS

REPO = Path(__file__).resolve().parents[2]


def _load_hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bergson_docs_hooks", REPO / "docs" / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


hooks = _load_hooks()


@pytest.fixture(scope="module")
def reference() -> str:
    return hooks.cli_reference()


def _sections(markdown: str) -> dict[str, str]:
    parts = re.split(r"^## ", markdown, flags=re.MULTILINE)
    return {p.split("\n", 1)[0].strip(): p for p in parts[1:]}


def _attribute_docstrings(cls: type) -> dict[str, str]:
    """Field docstrings read from the class sources (the string right after each field), the
    most derived class winning: an extraction independent of tyro's."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0]
        assert isinstance(body, ast.ClassDef)
        for stmt, nxt in zip(body.body, body.body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _fields(cls: type, prefix: str = "") -> list[tuple[str, Any, str, Any]]:
    """(dotted name, annotation, docstring, default) of every leaf field, nested groups expanded."""
    hints = get_type_hints(cls, include_extras=True)
    docs = _attribute_docstrings(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = getattr(tp, "__origin__", tp)
        if isinstance(inner, type) and dataclasses.is_dataclass(inner):
            out += _fields(inner, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else dataclasses.MISSING
        out.append((prefix + f.name, tp, docs.get(f.name, ""), default))
    return out


def _unescape(markdown: str) -> str:
    return re.sub(r"\\([\\*_|\[])", r"\1", markdown).replace("&lt;", "<")


def _is_positional(tp: Any) -> bool:
    return any("Positional" in repr(m) for m in getattr(tp, "__metadata__", ()))


def test_cli_reference_documents_every_command_and_field(reference: str) -> None:
    sections = _sections(reference)
    assert list(sections) == list(COMMANDS)
    for command, (module, summary, *_) in COMMANDS.items():
        section = sections[command]
        text = _unescape(section)
        assert summary in text, command
        cls = importlib.import_module(module).CONFIG
        rows = [line for line in section.splitlines() if line.startswith("| `")]
        for name, tp, doc, default in _fields(cls):
            flag = name.upper() if _is_positional(tp) else f"--{name}"
            row = next((r for r in rows if r.startswith(f"| `{flag}`")), None)
            assert row is not None, f"{command}: {flag} missing from the reference"
            assert doc, f"{cls.__name__}.{name} has no docstring (it is the --help text)"
            assert doc.replace("%%", "%") in _unescape(row), f"{command} {flag}: help text differs"
            if isinstance(default, (bool, int, float)) or (isinstance(default, str) and default):
                assert f"`{default}`" in row, f"{command} {flag}: default {default!r} not shown"
            if tp is bool:
                group, _, leaf = name.rpartition(".")
                negation = f"--{group}.no_{leaf}" if group else f"--no_{leaf}"
                assert f"`{negation}`" in row, f"{command}: {negation} missing"


def test_cli_reference_flags_parse(reference: str) -> None:
    """Every flag the reference lists is accepted by the real parser."""
    from bergson.cli import parse

    sections = _sections(reference)
    cases = {
        "build": ["RUN", "--dataset", "d.jsonl", "--no_truncation", "--projection_dim", "8"],
        "query": ["--index", "x", "--faiss.nprobe", "4", "--unit_norm"],
        "magic": ["--run_path", "r", "--training.lr", "0.5", "--query.dataset", "q"],
    }
    for command, args in cases.items():
        for arg in args:
            if arg.startswith("--"):
                assert f"`{arg}`" in sections[command], f"{command}: {arg} not in the reference"
        parse(command, args)


def test_data_group_aliases_are_documented(reference: str) -> None:
    sections = _sections(reference)
    assert "`--data.dataset` (or `--dataset`)" in sections["build"]
    assert (
        "`--data.truncation`, `--data.no_truncation` (or `--truncation`, `--no_truncation`)"
        in sections["build"]
    )
    # ekfac's `query` group has no short spellings: `--dataset` belongs to its `data` group
    assert "`--query.dataset` |" in sections["ekfac"]


def test_api_pages_cover_the_public_api() -> None:
    pages = "\n".join(p.read_text() for p in (REPO / "docs" / "api").glob("*.md"))
    documented = set(re.findall(r"^::: bergson\.(\w+)$", pages, flags=re.MULTILINE))
    public = set(bergson.__all__) - {"__version__"}
    assert public <= documented, sorted(public - documented)
    assert documented <= public, sorted(documented - public)


def _fake_repo(tmp_path: Path) -> Path:
    results = tmp_path / "benchmarks" / "quality" / "results"
    results.mkdir(parents=True)
    (results / "lm.md").write_text(
        "# LM quality\n\n| method | LDS |\n| --- | --- |\n| magic | 0.9 |\n\n![plot](lm.png)\n\n"
        "See [the script](../lm.py).\n"
    )
    (results / "lm.png").write_bytes(b"\x89PNG fake")
    (results / "extra.md").write_text("## Extra table\n")
    return tmp_path


def test_results_markers_inline_present_files(tmp_path: Path) -> None:
    repo = _fake_repo(tmp_path)
    page = "intro\n\n<!-- bergson:results benchmarks/quality/results/lm.md | python -m benchmarks.quality.lm -->\n"
    out = hooks.expand_markers(page, "benchmarks/quality.md", tmp_path / "docs", repo)
    assert "\n### LM quality" in out  # demoted under the page's second-level section
    assert "| magic | 0.9 |" in out
    # the image points at the site's copy, relative to the page; one image, not two
    assert "![plot](../data/benchmarks/quality/results/lm.png)" in out
    assert out.count("](../data/benchmarks/quality/results/lm.png)") == 1  # no second image appended
    # a link to a file the site does not hold becomes text naming the file
    assert "the script (`benchmarks/quality/lm.py`)" in out
    assert "python -m benchmarks.quality.lm" in out
    assert "not generated yet" not in out


def test_results_markers_say_how_to_generate_missing_files(tmp_path: Path) -> None:
    repo = _fake_repo(tmp_path)
    page = "<!-- bergson:results benchmarks/peers/results/peers.md | python -m benchmarks.peers.run -->\n"
    out = hooks.expand_markers(page, "benchmarks/peers.md", tmp_path / "docs", repo)
    assert "not generated yet: run `python -m benchmarks.peers.run`" in out
    assert "<!--" not in out


def test_png_without_markdown_is_shown(tmp_path: Path) -> None:
    repo = _fake_repo(tmp_path)
    (repo / "benchmarks" / "quality" / "results" / "lm.md").unlink()
    page = "<!-- bergson:results benchmarks/quality/results/lm.md | python -m benchmarks.quality.lm -->\n"
    out = hooks.expand_markers(page, "benchmarks/quality.md", tmp_path / "docs", repo)
    assert "![lm.png](../data/benchmarks/quality/results/lm.png)" in out
    assert "not generated yet" not in out


def test_other_results_lists_unreferenced_files(tmp_path: Path) -> None:
    repo = _fake_repo(tmp_path)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "quality.md").write_text(
        "<!-- bergson:results benchmarks/quality/results/lm.md | python -m benchmarks.quality.lm -->\n"
    )
    out = hooks.expand_markers(hooks.OTHER_MARKER, "benchmarks/index.md", docs, repo)
    assert "#### Extra table" in out and "extra.md" in out
    assert "Reproduce" not in out  # no command is known for a stray file
    assert "LM quality" not in out


def test_on_files_adds_the_reference_and_result_images(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    from mkdocs.config import load_config
    from mkdocs.structure.files import Files

    repo = _fake_repo(tmp_path)
    (repo / "docs").mkdir()
    hooks_path = (REPO / "docs" / "hooks.py").as_posix()
    (repo / "mkdocs.yml").write_text(f"site_name: t\nhooks:\n  - {hooks_path}\n")
    config = load_config(str(repo / "mkdocs.yml"))
    files = config.plugins.on_files(Files([]), config=config)  # the event as mkdocs runs it
    uris = {f.src_uri for f in files}
    assert uris == {"reference/cli.md", "data/benchmarks/quality/results/lm.png"}
    cli = next(f for f in files if f.src_uri == "reference/cli.md")
    assert cli.content_string.startswith("# CLI reference")


# flags the hand-written pages may name besides bergson's own: the YAML/help options handled
# outside the config dataclasses, torchrun's, and the example script's
OTHER_FLAGS = {
    "--config",
    "--help",
    "--nnodes",
    "--node_rank",
    "--master_addr",
    "--master_port",
    "--num_docs",
    "--run_dir",
}


def test_hand_written_pages_name_only_real_options() -> None:
    """No page invents an option: every `--flag` outside the benchmark pages is one that some
    command accepts (a group written `--group.*` must be a real group)."""
    known: set[str] = set()
    for command in COMMANDS:
        for option in hooks.command_options(command)[1]:
            known.update(option.flags, option.aliases)
    from bergson.config.cascade import CASCADE_CONFIGS  # score --candidates: the cascade's configs
    from bergson.config.io import ALIASES  # the original package's spellings, read as ours

    known |= {f"--{f.name}" for cls in CASCADE_CONFIGS.values() for f in dataclasses.fields(cls)}

    known |= {f"--{key.rstrip('.')}" for key in ALIASES} | {"--debug"}
    groups = {flag.split(".", 1)[0] for flag in known if "." in flag}
    bad = []
    for page in sorted((REPO / "docs").rglob("*.md")):
        if "benchmarks" in page.relative_to(REPO / "docs").parts:
            continue  # benchmark scripts have their own flags
        for flag in set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_.]*[a-z0-9]", page.read_text())):
            if flag not in known and flag not in groups and flag not in OTHER_FLAGS:
                bad.append(f"{page.name}: {flag}")
    assert not bad, bad
