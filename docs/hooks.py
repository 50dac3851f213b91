"""mkdocs hooks: pages made at build time from the code and from benchmark results.

* ``reference/cli.md`` is generated from the ``COMMANDS`` table of :mod:`bergson.cli` and
  the argument parser tyro builds from each command's config dataclass (the parser
  ``bergson COMMAND --help`` prints), so the reference cannot drift from the CLI.
* Every ``benchmarks/**/results/*.png`` file of the repository is copied into the site
  under ``data/``, and a page line ``<!-- bergson:results PATH | COMMAND -->`` is replaced
  by the results file ``PATH`` (markdown, its headings demoted and its links pointed at
  the copies), followed by the same-named ``.png`` unless the markdown already shows it.
  A missing file becomes a note saying which command generates it, so that a strict build
  passes before any benchmark has run. ``<!-- bergson:other-results -->`` lists the
  results files that no marker mentions.
"""

from __future__ import annotations

import dataclasses
import importlib
import posixpath
import re
import warnings
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

REPO = Path(__file__).resolve().parents[1]
CLI_PAGE = "reference/cli.md"
DATA_DIR = "data"
RESULTS_GLOB = "benchmarks/**/results/*"
MARKER = re.compile(r"^<!--\s*bergson:results\s+(\S+)\s*\|\s*(.+?)\s*-->\s*$", re.MULTILINE)
OTHER_MARKER = "<!-- bergson:other-results -->"

# ---------------------------------------------------------------------------------------------
# CLI reference


def _type_name(tp: Any) -> str:
    """A short, readable spelling of a field's annotation."""
    origin = get_origin(tp)
    if origin is not None and getattr(origin, "__name__", "") == "Annotated":
        return _type_name(get_args(tp)[0])
    if origin is not None and str(origin) == "typing.Literal":
        return " \\| ".join(f"`{a}`" for a in get_args(tp))
    args = get_args(tp)
    if origin is list:
        return f"list[{_type_name(args[0])}]" if args else "list"
    if args and type(None) in args:  # Optional[...] / X | None
        inner = [a for a in args if a is not type(None)]
        return " \\| ".join(_type_name(a) for a in inner) + " \\| None"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _default_text(value: Any) -> str:
    if value is None:
        return "`None`"
    if isinstance(value, str):
        return f"`{value!r}`" if value == "" else f"`{value}`"
    if isinstance(value, list):
        return "`[]`" if not value else "`" + " ".join(map(str, value)) + "`"
    return f"`{value}`"


_CODE_SPAN = re.compile(r"(``.+?``|`[^`]+`)")
_DEFAULT_SUFFIX = re.compile(r"\s*\(default: [^()]*\)$")


def _escape(text: str) -> str:
    """Markdown-safe prose: escape what would start emphasis, tables or HTML outside code spans."""
    parts = _CODE_SPAN.split(text)
    for i in range(0, len(parts), 2):  # even parts are outside code spans
        parts[i] = (
            parts[i]
            .replace("\\", "\\\\")
            .replace("*", "\\*")
            .replace("_", "\\_")
            .replace("|", "\\|")
            .replace("<", "&lt;")
            .replace("[", "\\[")
        )
    parts[1::2] = [p.replace("|", "\\|") for p in parts[1::2]]
    return "".join(parts)


def clean_help(help_text: str | None) -> str:
    """tyro's help string without its '(default: ...)' suffix and argparse's '%%' escapes."""
    text = " ".join((help_text or "").split()).replace("%%", "%")
    return _DEFAULT_SUFFIX.sub("", text)


@dataclasses.dataclass
class Option:
    """One option of a command as the CLI accepts it."""

    dest: str
    """Dotted field path in the config dataclass (``data.dataset``)."""
    flags: list[str]
    """Flag spellings (``--truncation``, ``--no_truncation``); the metavar for positionals."""
    aliases: list[str]
    """Other accepted spellings (``--dataset`` for ``--data.dataset``)."""
    type: str
    default: str
    help: str


def _field_info(cls: type, dest: str) -> tuple[Any, Any]:
    """(annotation, default) of the dotted field ``dest`` of ``cls``."""
    head, _, rest = dest.partition(".")
    fld = next(f for f in dataclasses.fields(cls) if f.name == head)
    hints = get_type_hints(cls, include_extras=True)
    if rest:
        inner = hints[head]
        return _field_info(inner, rest)
    if fld.default is not dataclasses.MISSING:
        default = fld.default
    elif fld.default_factory is not dataclasses.MISSING:
        default = fld.default_factory()
    else:
        default = dataclasses.MISSING
    return hints[head], default


def command_options(command: str) -> tuple[type, list[Option]]:
    """The config class of ``bergson COMMAND`` and its options, in ``--help`` order."""
    import tyro.extras

    from bergson.cli import COMMANDS, _expand_group_aliases

    cls = importlib.import_module(COMMANDS[command][0]).CONFIG
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # get_parser: kept for introspection
        parser = tyro.extras.get_parser(cls, use_underscores=True)
    options = []
    for action in parser._actions:
        if action.dest == "help":
            continue
        annotation, default = _field_info(cls, action.dest)
        flags = list(action.option_strings) or [str(action.metavar)]
        # a field's own flags first; other names of it (e.g. --unit_norm) are listed as aliases
        own = [
            f
            for f in flags
            if f.lstrip("-").replace("no_", "", 1).split(".")[-1] == action.dest.split(".")[-1]
        ]
        aliases = [f for f in flags if own and f not in own and not f.startswith("--no_")]
        flags = own or flags
        for flag in action.option_strings if "." in action.dest else ():
            short = "--" + flag.rsplit(".", 1)[1]  # --data.no_truncation -> --no_truncation
            if _expand_group_aliases(cls, [short]) == [flag]:
                aliases.append(short)
        options.append(
            Option(
                dest=action.dest,
                flags=flags,
                aliases=aliases,
                type=_type_name(annotation),
                default="(required)" if default is dataclasses.MISSING else _default_text(default),
                help=clean_help(action.help),
            )
        )
    return cls, options


def _option_row(opt: Option) -> str:
    flags = ", ".join(f"`{f}`" for f in opt.flags)
    if opt.aliases:
        flags += " (or " + ", ".join(f"`{a}`" for a in opt.aliases) + ")"
    return f"| {flags} | {opt.type} | {opt.default} | {_escape(opt.help)} |"


def cli_reference() -> str:
    """The markdown of the CLI reference page."""
    from bergson.cli import COMMANDS

    lines = [
        "# CLI reference",
        "",
        "Generated when the site is built, from the `COMMANDS` table of `bergson.cli` and the",
        "config dataclasses of `bergson.config` (the parser behind `bergson COMMAND --help`), so",
        "it always matches the installed command line.",
        "",
        "Every command also accepts `--config FILE.yaml`: the same options read from YAML (nested",
        "groups as mappings, e.g. `data: {dataset: corpus.jsonl}`); flags given after it override",
        "the file. A leading `FILE.yaml` argument is read the same way (`bergson magic run.yaml`).",
        "Each run writes its resolved `config.yaml` next to its output. A boolean option `--x`",
        "is switched off with `--no_x`; a list option takes several values (`--modules A B`).",
        "",
        "| Command | What it does |",
        "| --- | --- |",
    ]
    lines += [f"| [`{name}`](#{name}) | {_escape(summary)} |" for name, (_, summary, *_) in COMMANDS.items()]
    for name, (_, summary, *_) in COMMANDS.items():
        cls, options = command_options(name)
        positional = [o.flags[0] for o in options if not o.flags[0].startswith("-")]
        usage = " ".join(["bergson", name, *positional, "[OPTIONS]"])
        lines += [
            "",
            f"## {name}",
            "",
            _escape(summary),
            "",
            f"```\n{usage}\n```",
            "",
            f"Python: `bergson.{cls.__name__}` (see the [API reference](../api/configs.md)). "
            + (
                "Runs on several workers with `--nproc_per_node` or torchrun "
                "(see [Scaling out](../scaling-out.md))."
                if COMMANDS[name].workers
                else "Runs in one process."
            ),
            "",
            "| Option | Type | Default | Description |",
            "| --- | --- | --- | --- |",
        ]
        lines += [_option_row(o) for o in options]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Benchmark results


def results_files(repo: Path | None = None) -> list[str]:
    """Repository-relative paths of every benchmark results file (markdown and PNG)."""
    repo = repo or REPO
    found = [p for p in repo.glob(RESULTS_GLOB) if p.is_file() and p.suffix in (".md", ".png")]
    return sorted(p.relative_to(repo).as_posix() for p in found)


def site_uri(repo_path: str) -> str:
    """Where a copied results file lives in the site."""
    return f"{DATA_DIR}/{repo_path}"


_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)(\s+\"[^\"]*\")?\)")


def _rewrite_links(text: str, source: str, page_uri: str, available: set[str]) -> str:
    """Point relative links of the results file ``source`` at the site's copies (or unlink them)."""
    page_dir = posixpath.dirname(page_uri)

    def fix(m: re.Match[str]) -> str:
        bang, label, target, title = m.group(1), m.group(2), m.group(3), m.group(4) or ""
        if re.match(r"^[a-z]+:|^#|^/", target):
            return m.group(0)
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(source), target))
        if resolved in available:
            rel = posixpath.relpath(site_uri(resolved), page_dir or ".")
            return f"{bang}[{label}]({rel}{title})"
        return f"{label or target} (`{resolved}`)"

    return _LINK.sub(fix, text)


def _demote(text: str, levels: int) -> str:
    """Push every ATX heading ``levels`` deeper (at most h6), outside fenced code."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if not fenced and re.match(r"^#{1,6}\s", line):
            hashes = len(line) - len(line.lstrip("#"))
            line = "#" * min(6, hashes + levels) + line[hashes:]
        out.append(line)
    return "\n".join(out)


def results_block(path: str, command: str | None, page_uri: str, repo: Path | None = None) -> str:
    """The markdown that replaces one results marker on the page ``page_uri`` (its headings pushed
    two levels down: markers sit under the page's second-level sections)."""
    repo = repo or REPO
    available = set(results_files(repo))
    md = path if path.endswith(".md") else None
    png = posixpath.splitext(path)[0] + ".png"
    parts: list[str] = []
    shows_png = False
    if md and md in available:
        body = (repo / md).read_text(encoding="utf-8")
        shows_png = posixpath.basename(png) in body
        parts.append(_demote(_rewrite_links(body, md, page_uri, available), 2).strip())
    if png in available and not shows_png:
        rel = posixpath.relpath(site_uri(png), posixpath.dirname(page_uri) or ".")
        parts.append(f"![{posixpath.basename(png)}]({rel})")
    if not parts:
        how = f": run `{command}`" if command else ""
        return f'!!! note "Not generated yet"\n    `{path}` is not generated yet{how}.\n'
    if command:
        parts.append(f"*Reproduce with `{command}` (writes `{path}`).*")
    return "\n\n".join(parts) + "\n"


def other_results_block(referenced: set[str], page_uri: str, repo: Path | None = None) -> str:
    """Results files that no page marker shows, inlined one after another."""
    rest = [p for p in results_files(repo) if p.endswith(".md") and p not in referenced]
    if not rest:
        return "No other results files yet.\n"
    blocks = [f"### `{p}`\n\n" + results_block(p, None, page_uri, repo) for p in rest]
    return "\n".join(blocks)


def referenced_results(docs_dir: Path) -> set[str]:
    """Every results path named by a marker on some page."""
    found: set[str] = set()
    for page in docs_dir.rglob("*.md"):
        found.update(m.group(1) for m in MARKER.finditer(page.read_text(encoding="utf-8")))
    return found


def expand_markers(markdown: str, page_uri: str, docs_dir: Path, repo: Path | None = None) -> str:
    """Replace every results marker of a page's markdown."""
    text = MARKER.sub(lambda m: results_block(m.group(1), m.group(2), page_uri, repo), markdown)
    if OTHER_MARKER in text:
        text = text.replace(OTHER_MARKER, other_results_block(referenced_results(docs_dir), page_uri, repo))
    return text


# ---------------------------------------------------------------------------------------------
# mkdocs events


def _repo(config: Any) -> Path:
    """The repository root: the directory of mkdocs.yml."""
    return Path(config.config_file_path).resolve().parent


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    files.append(File.generated(config, CLI_PAGE, content=cli_reference()))
    repo = _repo(config)
    for path in results_files(repo):
        if path.endswith(".png"):
            files.append(File.generated(config, site_uri(path), abs_src_path=str(repo / path)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return expand_markers(markdown, page.file.src_uri, Path(config["docs_dir"]), _repo(config))
