"""mkdocs hook: write the CLI and configuration reference from the code at build time.

The pages ``reference/cli.md`` and ``reference/config.md`` do not exist in the source
tree, and the list of test modules on ``testing.md`` is filled in from their docstrings. They are generated on every build from the argparse parsers of
``memtrain/cli/*.py`` (``memtrain.cli.build_parser``) and the keyword-only
dataclasses of ``memtrain/config.py``, so they cannot drift from what the commands
accept. ``mkdocs build --strict`` fails if generation fails.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import typing
from pathlib import Path

CLI_PAGE = "reference/cli.md"
CONFIG_PAGE = "reference/config.md"
TEST_MARKER = "<!-- test-modules -->"
_DEFAULT = re.compile(r"\s*\[default: ([^\]]*)\]\s*$")


def _cell(text: object) -> str:
    """Text safe inside a markdown table cell (no raw HTML, no column breaks)."""
    s = " ".join(str(text).split())
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|").replace("*", "\\*")


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    # argparse has no public accessor for its subcommand parsers.
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _config_defaults() -> dict[str, object]:
    """YAML key -> default, for every field of FitConfig."""
    from memtrain import config as C

    out = {}
    for section, f in C._sections():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, list):
            default = ",".join(default)
        out[C._key(section, f.name)] = default
    return out


def _flag_cell(action: argparse.Action) -> str:
    if not action.option_strings:
        return _code(action.metavar or action.dest.upper())
    names = ", ".join(f"`{o}`" for o in action.option_strings)
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
        return names
    metavar = action.metavar or (action.dest.upper().replace(".", "_") if not action.choices else "{" + ",".join(action.choices) + "}")
    return f"{names} `{metavar}`"


def _options_table(actions: list[argparse.Action], config_defaults: dict[str, object], fit: bool) -> list[str]:
    head = "| flag | YAML key | default | meaning |\n|---|---|---|---|" if fit else "| flag | default | meaning |\n|---|---|---|"
    rows = [head]
    for a in actions:
        if isinstance(a, argparse._HelpAction) or a.help == argparse.SUPPRESS:
            continue
        help_text = a.help or ""
        match = _DEFAULT.search(help_text)
        default = ""
        if match:
            default, help_text = match.group(1), help_text[: match.start()]
        elif a.dest in config_defaults:
            value = config_defaults[a.dest]
            default = "" if value is None else str(value)
        elif a.default not in (None, False, argparse.SUPPRESS) and a.option_strings:
            default = str(a.default)
        if a.required:
            default = "required"
        key = a.dest if a.dest in config_defaults else ""
        cells = [_flag_cell(a)] + ([_code(key)] if fit else []) + [_code(_cell(default)) if default and default != "required" else default, _cell(help_text)]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def cli_markdown() -> str:
    from memtrain.cli import SUBCOMMANDS, build_parser

    parser = build_parser()
    subs = _subparsers(parser)
    config_defaults = _config_defaults()
    lines = [
        "# Command-line reference",
        "",
        "Generated at build time from the parsers in `memtrain/cli/*.py` and the fields of `memtrain/config.py`; "
        "`memtrain COMMAND --help` prints the same text. Bad input to any command is one line `memtrain: error: ...` "
        "naming the flag or file and what was expected, exit code 2.",
        "",
        *vocabulary_markdown(subs),
    ]
    for name in SUBCOMMANDS:
        p = subs[name]
        lines += [f"## `memtrain {name}`", ""]
        if p.description:
            first, _, rest = p.description.strip().partition("\n")
            lines += [first.split(":", 1)[-1].strip() if first.startswith("`") else first, "", rest.strip(), ""]
        lines += ["```text", p.format_usage().strip(), "```", ""]
        fit = name == "fit"
        for group in p._action_groups:
            actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
            if not actions:
                continue
            if fit or len([g for g in p._action_groups if g._group_actions]) > 1:
                lines += [f"### {group.title}" if fit else f"**{group.title}**", ""]
            lines += _options_table(actions, config_defaults if fit else {}, fit)
            lines.append("")
        if p.epilog:
            lines += ["```text", p.epilog.strip(), "```", ""]
    return "\n".join(lines)


def vocabulary_markdown(subs: dict[str, argparse.ArgumentParser]) -> list[str]:
    """The flags several subcommands share (one name, one meaning) and the old spellings still accepted."""
    from memtrain import vocabulary as V

    where: dict[str, list[str]] = {}
    for name, p in subs.items():
        for a in p._actions:
            if a.help != argparse.SUPPRESS:
                for o in a.option_strings:
                    if o not in ("-h", "--help"):
                        where.setdefault(o, []).append(name)
    doc = inspect.cleandoc(V.__doc__ or "").split("\n\n", 1)[1].replace("``", "`")
    lines = [
        "## Shared flags",
        "",
        doc,
        "",
        "| flag | subcommands |",
        "|---|---|",
        *(f"| `{o}` | {', '.join(names)} |" for o, names in sorted(where.items()) if len(names) > 1),
        "",
        "Renamed:",
        "",
        "| old | new |",
        "|---|---|",
        *(f"| `{old}` | `{new}` |" for old, new in V.RENAMED.items()),
        *(f"| YAML `{old}` | `{new}` |" for old, new in V.RENAMED_KEYS.items()),
        "",
    ]
    return lines


def config_markdown() -> str:
    from memtrain import config as C

    hints = typing.get_type_hints(C.FitConfig)
    lines = [
        "# Configuration reference",
        "",
        "Generated at build time from the keyword-only dataclasses in `memtrain/config.py`. "
        "A `--config FILE` preset and the `config.yaml` every run saves use these keys; every key is also a "
        "`memtrain fit` flag (see the [command-line reference](cli.md#memtrain-fit)). "
        "Precedence, lowest first: these defaults, the YAML file, the flags typed.",
        "",
        "## Defaults as a YAML preset",
        "",
        "```yaml",
        C.dump_yaml(C.FitConfig()).strip(),
        "```",
        "",
    ]
    defaults = _config_defaults()
    sections: dict[str | None, list] = {}
    for section, f in C._sections():
        sections.setdefault(section, []).append(f)
    for section, fields in sections.items():
        title = section or "top level"
        lines += [f"## `{title}`" if section else "## top level", ""]
        if section:
            doc = (hints[section].__doc__ or "").strip()
            lines += [doc, ""]
        lines += ["| YAML key | flag | type | default | meaning |", "|---|---|---|---|---|"]
        for f in fields:
            key = C._key(section, f.name)
            tp, optional = C._leaf_type(section, f)
            type_name = getattr(tp, "__name__", str(tp)).replace("list", "list of str") + (" or null" if optional else "")
            choices = f.metadata.get("choices")
            if choices:
                type_name = " / ".join(f"`{c}`" for c in choices)
            default = defaults[key]
            lines.append(
                f"| `{key}` | `{C.flag_of(section, f)}` | {type_name} | {_code(_cell(default)) if default is not None else 'null'} | {_cell(f.metadata['help'])} |"
            )
        lines.append("")
    return "\n".join(lines)


def test_modules_markdown(root: Path) -> str:
    """A table of the test modules under ``root``/tests and the first line of their docstrings."""
    rows = ["| module | what it checks |", "|---|---|"]
    for path in sorted((root / "tests").glob("test_*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        rows.append(f"| `tests/{path.name}` | {_cell(doc.splitlines()[0] if doc else '')} |")
    return "\n".join(rows)


def on_page_markdown(markdown, page, config, files):
    if TEST_MARKER in markdown:
        markdown = markdown.replace(TEST_MARKER, test_modules_markdown(Path(config.config_file_path).parent))
    return markdown


_ROLE = re.compile(r":(?:meth|class|func|data|mod|attr|obj):(<code>)~?")


def on_page_content(html, page, config, files):
    """Docstrings use Sphinx roles (:class:`X`); mkdocstrings renders them as text before the code span: drop the role."""
    return _ROLE.sub(r"\1", html)


def on_files(files, config):
    from mkdocs.structure.files import File

    for uri, text in ((CLI_PAGE, cli_markdown()), (CONFIG_PAGE, config_markdown())):
        files.append(File.generated(config, uri, content=text))
    return files
