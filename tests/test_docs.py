"""The documentation shows commands radiag accepts and links that lead somewhere.

Every fenced `bash` block of README.md, docs/*.md and cluster/README.md is read line by
line (backslash continuations joined, `#` comments dropped). A line that invokes
`radiag ...` (also as `.venv/bin/radiag`, `$VENV/bin/radiag` or `python -m radiag.cli`,
behind `VAR=value` assignments, after `ray job submit ... --`, or through a variable set
earlier in the same block, such as `$SUBMIT`) must name a command of the typer app, and
that command must accept every option and value shown: it is parsed by the command
itself (`make_context`), exactly as the shell would hand it over, without running it. A
line that runs `python -m jobs.<entry>` must name a module in jobs/, and the entry's
command (the `run_command("...")` it calls) must accept the options shown. Each case is
one (file, line) pair, so a failure names the doc and the line.

Nothing here starts Ray or a subprocess: radiag.cli is imported once.

Placeholders: values such as `my.yaml`, `s3://...` or `$TOKEN` are passed as the strings
they are, which the parser accepts wherever a path or text is expected. Only a command
*name* given by a variable this file cannot resolve (`radiag $COMMAND`) cannot be checked;
such a line is skipped with that reason (none of the current docs has one).

Relative Markdown links in the same files must point at files that exist, and a
`page.md#anchor` link at a heading of that page (GitHub's anchor rule).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pytest
import typer

from radiag.cli import app

try:  # typer 0.2x parses with its own copy of click (typer._click), whose errors are these
    from typer.exceptions import TyperException as _TyperError
except ImportError:  # older typer parses with click itself
    _TyperError = click.ClickException
PARSE_ERRORS = (click.ClickException, _TyperError)
EXITS = (click.exceptions.Exit, typer.Exit)

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "cluster" / "README.md",
]
CLI = typer.main.get_group(app)

SHELL_LANGUAGES = {"bash", "sh", "shell"}
OPERATORS = {";", "&&", "||", "|", "&", "(", ")", ";;"}
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))$")
PYTHON = re.compile(r"python(?:3(?:\.\d+)?)?")
WRAPPERS = {"time", "nohup", "exec", "env", "sudo"}
"""Words that run the command after them (`env A=b radiag ...`)."""


def _relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@dataclass
class ShellLine:
    """One logical line of a bash block: where it starts, its text, the block's variables."""

    file: Path
    line: int
    text: str
    variables: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{_relative(self.file)}:{self.line}"


def _fences(lines: list[str]) -> list[tuple[str, int, int]]:
    """(language, first line index, end index) of every fenced code block."""
    blocks = []
    i = 0
    while i < len(lines):
        opening = re.match(r"\s*(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        if not opening:
            i += 1
            continue
        fence, language = opening.groups()
        end = i + 1
        while end < len(lines) and not (
            lines[end].strip().startswith(fence[0] * len(fence))
            and set(lines[end].strip()) == {fence[0]}
        ):
            end += 1
        blocks.append((language.lower(), i + 1, end))
        i = end + 1
    return blocks


def _tokens(text: str) -> list[str]:
    """Shell words and operators of one line, comments dropped."""
    text = re.sub(r"\$\(([A-Z_][A-Z0-9_]*)\)", r"${\1}", text)  # make's $(VENV) as ${VENV}
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def _simple_commands(tokens: list[str]) -> list[list[str]]:
    commands, current = [], []
    for token in tokens:
        if token in OPERATORS:
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    return [command for command in commands if command]


def shell_lines(path: Path) -> list[ShellLine]:
    """Every logical line of every bash block of a Markdown file, with the variables the
    block assigned before it (`SUBMIT="ray job submit ... --"`)."""
    lines = path.read_text().splitlines()
    found = []
    for language, start, end in _fences(lines):
        if language not in SHELL_LANGUAGES:
            continue
        variables: dict[str, str] = {}
        i = start
        while i < end:
            first, text = i, lines[i]
            while text.rstrip().endswith("\\") and i + 1 < end:
                i += 1
                text = text.rstrip()[:-1] + " " + lines[i]
            i += 1
            found.append(ShellLine(path, first + 1, text, dict(variables)))
            try:
                commands = _simple_commands(_tokens(text))
            except ValueError:
                continue  # an unbalanced quote; checked below if it names radiag
            for command in commands:
                words = command[1:] if command[0] == "export" else command
                if words and all(ASSIGNMENT.match(word) for word in words):
                    for word in words:
                        name, value = word.split("=", 1)
                        variables[name] = value
    return found


@dataclass
class Invocation:
    kind: str  # "radiag" or "jobs"
    args: list[str]
    module: str = ""


def _expand(words: list[str], variables: dict[str, str]) -> list[str]:
    """Resolve a variable in command position (`$SUBMIT python -m ...`) from the block."""
    variable = VARIABLE.match(words[0]) if words else None
    if variable and (variable[1] or variable[2]) in variables:
        return shlex.split(variables[variable[1] or variable[2]]) + words[1:]
    return words


def invocations(line: ShellLine) -> list[Invocation]:
    """The radiag commands and job entries a shell line runs."""
    found = []
    for command in _simple_commands(_tokens(line.text)):
        words = _expand(command, line.variables)
        while words:
            while words and ASSIGNMENT.match(words[0]):  # RAY_ADDRESS=... ray job submit
                words = words[1:]
            if not words:
                break
            words = _expand(words, line.variables)
            name = words[0].rsplit("/", 1)[-1]  # .venv/bin/radiag, ${VENV}/bin/radiag
            if name == "radiag":
                found.append(Invocation("radiag", words[1:]))
            elif PYTHON.fullmatch(name) and words[1:2] == ["-m"] and len(words) > 2:
                if words[2] == "radiag.cli":
                    found.append(Invocation("radiag", words[3:]))
                elif words[2].startswith("jobs."):
                    found.append(Invocation("jobs", words[3:], words[2]))
            elif name == "ray" and "--" in words:  # ray job submit ... -- <entrypoint>
                words = words[words.index("--") + 1 :]
                continue
            elif name in WRAPPERS:
                words = words[1:]
                continue
            break
    return found


def _cases() -> list[tuple[ShellLine, Invocation]]:
    cases = []
    for path in DOC_FILES:
        for line in shell_lines(path):
            if not re.search(r"\bradiag\b|\bjobs\.", line.text):
                continue
            try:
                found = invocations(line)
            except ValueError as error:  # shlex: no closing quotation
                found = [Invocation("unparsable", [str(error)])]
            cases += [(line, invocation) for invocation in found]
    return cases


CASES = _cases()


def _subcommands(command: Any) -> dict[str, Any] | None:
    """A group's commands by name; None for a leaf command. (typer's groups are not
    click.Group subclasses in every typer version, so this asks for `commands`.)"""
    commands = getattr(command, "commands", None)
    return commands if isinstance(commands, dict) else None


def _check(where: str, shown: str, command: Any, args: list[str]) -> None:
    """Parse `args` with `command` as the shell would hand them over; fail naming the doc."""
    assert _subcommands(command) is None, f"{where}: `{shown}` is a group, not a command"
    try:
        command.make_context(shown, list(args), resilient_parsing=False)
    except EXITS as done:  # --help and the like: the command accepted it
        assert done.exit_code == 0, f"{where}: `{shown}` exits with {done.exit_code}"
    except PARSE_ERRORS as error:
        pytest.fail(f"{where}: `{shown} {shlex.join(args)}`: {error.format_message()}")


def _radiag(where: str, args: list[str]) -> None:
    command = CLI
    path = ["radiag"]
    args = list(args)
    while (commands := _subcommands(command)) is not None:
        if not args or args[0].startswith("-"):
            pytest.fail(f"{where}: `{' '.join(path)}` needs one of {sorted(commands)}")
        name = args.pop(0)
        if name.startswith("$"):
            pytest.skip(f"{where}: the command name {name} is a variable this test cannot resolve")
        if name not in commands:
            pytest.fail(
                f"{where}: `{' '.join(path)}` has no command {name!r} (it has {sorted(commands)})"
            )
        command = commands[name]
        path.append(name)
    _check(where, " ".join(path), command, args)


def _job(where: str, module: str, args: list[str]) -> None:
    entry = ROOT / Path(*module.split(".")).with_suffix(".py")
    assert entry.is_file(), f"{where}: `python -m {module}`: no file {_relative(entry)}"
    runs = re.findall(r"run_command\(\s*[\"']([\w-]+)[\"']\s*\)", entry.read_text())
    assert len(runs) == 1, f"{where}: {_relative(entry)} runs no single radiag command"
    assert runs[0] in CLI.commands, f"{where}: {_relative(entry)} runs unknown `radiag {runs[0]}`"
    _check(where, f"python -m {module}", CLI.commands[runs[0]], args)


@pytest.mark.parametrize(
    ("line", "invocation"),
    CASES,
    ids=[f"{line.where}:{inv.module or inv.kind}" for line, inv in CASES],
)
def test_documented_command_is_accepted(line: ShellLine, invocation: Invocation) -> None:
    if invocation.kind == "unparsable":
        pytest.fail(f"{line.where}: not a shell line: {invocation.args[0]}")
    if invocation.kind == "jobs":
        _job(line.where, invocation.module, invocation.args)
    else:
        _radiag(line.where, invocation.args)


def test_the_docs_show_commands_where_expected() -> None:
    """The scan finds what the docs hold, so an empty parametrization cannot pass quietly."""
    by_file: dict[str, set[str]] = {}
    for line, invocation in CASES:
        by_file.setdefault(_relative(line.file), set()).add(invocation.kind)
    assert "radiag" in by_file.get("README.md", set())
    assert "radiag" in by_file.get("docs/stage-contract.md", set())
    assert "jobs" in by_file.get("docs/cluster.md", set())
    assert "jobs" in by_file.get("cluster/README.md", set())
    assert len(CASES) >= 25


def test_the_parser_reads_the_shell_forms_the_docs_may_use() -> None:
    """The forms named in the module docstring are recognised, and an unknown option or a
    wrong value is refused."""
    block = ShellLine(ROOT / "README.md", 1, "", {"SUBMIT": "ray job submit --working-dir . --"})
    forms = {
        "radiag run --config configs/demo.yaml": ("radiag", ["run", "--config", "configs/demo.yaml"]),
        ".venv/bin/radiag models prepare  # a comment": ("radiag", ["models", "prepare"]),
        "$VENV/bin/radiag evaluate --run runs/demo": ("radiag", ["evaluate", "--run", "runs/demo"]),
        "$(VENV)/bin/radiag evaluate --run r": ("radiag", ["evaluate", "--run", "r"]),
        ".venv/bin/python -m radiag.cli baseline -c x.yaml": ("radiag", ["baseline", "-c", "x.yaml"]),
        "A=1 B=2 ray job submit --working-dir . -- python -m jobs.run --config c.yaml": (
            "jobs", ["--config", "c.yaml"],
        ),
        "$SUBMIT python -m jobs.evaluate --config c.yaml": ("jobs", ["--config", "c.yaml"]),
        "cd /x && env A=1 radiag baseline": ("radiag", ["baseline"]),
    }  # fmt: skip
    for text, (kind, args) in forms.items():
        block.text = text
        (found,) = invocations(block)
        assert (found.kind, found.args) == (kind, args), text
    for text in ("kubectl create serviceaccount radiag", "echo radiag run", "# radiag run"):
        block.text = text
        assert invocations(block) == [], text
    with pytest.raises(pytest.fail.Exception, match=r"(?i)no such option"):
        _radiag("x.md:1", ["run", "--no-such-option"])
    with pytest.raises(pytest.fail.Exception, match="has no command 'nope'"):
        _radiag("x.md:1", ["cohort", "nope"])
    with pytest.raises(pytest.fail.Exception, match=r"x\.md:1"):
        _radiag("x.md:1", ["distill", "--student", "bogus", "--config", "c.yaml"])


def _heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (outside code blocks)."""
    lines = path.read_text().splitlines()
    in_code = {i for _, start, end in _fences(lines) for i in range(start - 1, end + 1)}
    anchors: set[str] = set()
    for i, line in enumerate(lines):
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading and i not in in_code:
            slug = re.sub(r"[^\w\- ]", "", heading[1].strip().lower()).replace(" ", "-")
            anchor, n = slug, 0
            while anchor in anchors:
                n += 1
                anchor = f"{slug}-{n}"
            anchors.add(anchor)
    return anchors


def _links() -> list[tuple[str, Path, str]]:
    """(file:line, file, target) of every relative Markdown link outside code."""
    links = []
    for path in DOC_FILES:
        lines = path.read_text().splitlines()
        in_code = {i for _, start, end in _fences(lines) for i in range(start - 1, end + 1)}
        for i, line in enumerate(lines):
            if i in in_code:
                continue
            prose = re.sub(r"`[^`]*`", "", line)
            for target in re.findall(r"\]\(([^)\s]+)\)", prose):
                if not re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, mailto:, ...
                    links.append((f"{_relative(path)}:{i + 1}", path, target))
    return links


LINKS = _links()


@pytest.mark.parametrize(("where", "page", "target"), LINKS, ids=[w for w, _, _ in LINKS])
def test_relative_link_resolves(where: str, page: Path, target: str) -> None:
    file_part, _, anchor = target.partition("#")
    destination = (page.parent / file_part).resolve() if file_part else page
    assert destination.exists(), f"{where}: {target} -> no {destination}"
    if anchor and destination.suffix == ".md":
        anchors = _heading_anchors(destination)
        assert anchor in anchors, f"{where}: {target}: no heading #{anchor} in {destination.name}"


def test_continuations_and_block_variables_are_read(tmp_path: Path) -> None:
    """A command split over lines is one case at its first line; a variable assigned in a
    block is known to the lines after it, not to another block."""
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n```bash\n"
        'RUN="radiag"   # the command\n'
        "$RUN transfer --from a \\\n"
        "    --cohort c.yaml --run b   # trailing comment\n"
        "```\n\n```python\nradiag run --nonsense\n```\n\n```bash\n$RUN run\n```\n"
    )
    lines = shell_lines(page)
    assert [(line.line, line.variables) for line in lines] == [
        (4, {}),
        (5, {"RUN": "radiag"}),
        (14, {}),
    ]
    (found,) = invocations(lines[1])
    assert found.args == ["transfer", "--from", "a", "--cohort", "c.yaml", "--run", "b"]
    assert invocations(lines[2]) == []
