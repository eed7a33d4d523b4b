"""The README's commands name things that exist, and every relative link in the docs resolves.

Each command in README.md's shell blocks is checked without running it: the scripts it names
exist, ``pip install`` names only extras that pyproject.toml defines (and never the bare package
name: it is not on PyPI), ``efficient-rollout`` arguments parse with the CLI's own argparse
parser, and example scripts define the options passed to them. A command no checker knows fails,
so a new kind of command gets a checker. Every relative link in README.md and docs/**/*.md must
point at an existing file, and an ``#anchor`` at a heading of that page. No network, no model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_PAGES = ("engines/native.md", "engines/vllm.md", "engines/sglang.md", "verl.md", "controller.md",
             "configuration.md", "metrics.md", "faults.md", "measured.md", "troubleshooting.md")
SEPARATORS = {";", "&&", "||", "|", "&"}


# --- parsing ---------------------------------------------------------------------------------------

def shell_commands(markdown: str) -> list[list[str]]:
    """Every command (a token list) in the markdown's bash/sh/shell blocks, comments dropped."""
    commands = []
    for block in re.findall(r"^```(?:bash|sh|shell|console)[ \t]*\n(.*?)^```", markdown, re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
            lexer.whitespace_split = True
            command: list[str] = []
            for token in list(lexer) + [";"]:
                if token in SEPARATORS:
                    if command:
                        commands.append(command)
                    command = []
                else:
                    command.append(token)
    return commands


def _without_code(markdown: str) -> str:
    markdown = re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", markdown)


def links(markdown: str) -> list[str]:
    """Targets of the markdown's links and images, outside code."""
    return re.findall(r"!?\[[^\]]*\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)", _without_code(markdown))


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors of a page: lower case, punctuation dropped, spaces to hyphens."""
    seen: dict[str, int] = {}
    result = set()
    prose = re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t]*#*$", prose, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")
        result.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return result


def pyproject_extras() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib
    except ImportError:  # Python 3.10: the section's keys, read plainly
        section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
        return set(re.findall(r"^([A-Za-z0-9_-]+)\s*=", section, re.M))
    return set(tomllib.loads(text)["project"]["optional-dependencies"])


# --- checkers: each returns a list of problems (empty: fine) -----------------------------------------

def check_cli(argv: list[str]) -> list[str]:
    from verl_efficientrollout.cli import _parser

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            _parser().parse_args(argv)
        except SystemExit as exc:  # --help exits 0; a bad subcommand or option exits 2
            if exc.code not in (0, None):
                return [f"efficient-rollout {' '.join(argv)}: {err.getvalue().strip().splitlines()[-1]}"]
    return []


def _launch_modes() -> set[str]:
    """The modes examples/grpo/_launch.sh accepts (its case labels)."""
    return set(re.findall(r"^\s*([a-z]+)\)", (ROOT / "examples/grpo/_launch.sh").read_text(), re.M))


def check_script(path: str, args: list[str]) -> list[str]:
    if not (ROOT / path).is_file():
        return [f"{path} does not exist"]
    if path == "scripts/bench.sh":  # arguments go to efficient-rollout bench
        return check_cli(["bench", *args])
    if path.startswith("examples/grpo/") and path.endswith(".sh"):
        if not args or args[0] not in _launch_modes():
            return [f"{path} takes a mode first, one of {sorted(_launch_modes())}, got {args[:1]}"]
    return []


def check_example(path: str, args: list[str]) -> list[str]:
    if not (ROOT / path).is_file():
        return [f"{path} does not exist"]
    source = (ROOT / path).read_text()
    options = [arg.split("=")[0] for arg in args if arg.startswith("--")]
    return [f"{path} has no option {option}" for option in options
            if not re.search(rf"add_argument\(\s*\"{re.escape(option)}\"", source)]


def check_module(name: str, args: list[str]) -> list[str]:
    """``python -m NAME``: the module exists (found on disk, not imported)."""
    parts = name.split(".")
    spec = importlib.util.find_spec(parts[0])
    if spec is None:
        return [f"python -m {name}: no module {parts[0]}"]
    if len(parts) > 1:
        base = Path(next(iter(spec.submodule_search_locations or [""]))).joinpath(*parts[1:])
        if not (base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()):
            return [f"python -m {name}: no such module"]
    if name == "verl_efficientrollout.cli":
        return check_cli(args)
    return []


def check_pip(args: list[str]) -> list[str]:
    if args[:1] != ["install"]:
        return [f"pip {' '.join(args)}: only pip install is checked"]
    problems, extras = [], pyproject_extras()
    words = iter(args[1:])
    for word in words:
        if word in ("-r", "--requirement"):
            path = next(words, "")
            if not (ROOT / path).is_file():
                problems.append(f"pip install -r {path}: no such file")
            continue
        if word in ("-e", "--editable"):
            word = next(words, "")
        elif word.startswith("-"):
            continue
        match = re.fullmatch(r"([^\[\s@]+)\s*(?:\[([^\]]*)\])?\s*(?:@\s*(\S+))?", word)
        if match is None:
            problems.append(f"pip install: cannot read {word!r}")
            continue
        name, wanted, url = match.groups()
        ours = name in (".", "./") or name.replace("_", "-").lower() == "verl-efficientrollout"
        if not ours:
            continue  # another package (e.g. the default model's wheel)
        if name not in (".", "./") and not (url or "").startswith("git+"):
            problems.append(f"pip install {word}: verl-efficientrollout is not on PyPI; "
                            "install a checkout or a git URL")
        unknown = sorted({e.strip() for e in (wanted or "").split(",") if e.strip()} - extras)
        if unknown:
            problems.append(f"pip install {word}: no extra {unknown} in pyproject.toml (it has {sorted(extras)})")
    return problems


def check_command(command: list[str]) -> list[str]:
    while command and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", command[0]):  # VAR=value prefixes
        command = command[1:]
    program, args = command[0], command[1:]
    name = program.rsplit("/", 1)[-1]
    if program == "bash":
        return check_script(args[0], args[1:]) if args else ["bash without a script"]
    if name == "efficient-rollout":
        return check_cli(args)
    if name in ("pip", "pip3"):
        return check_pip(args)
    if re.fullmatch(r"python(3(\.\d+)?)?", name):
        if args[:2] == ["-m", "pip"]:
            return check_pip(args[2:])
        if args[:1] == ["-m"] and len(args) > 1:
            return check_module(args[1], args[2:])
        return check_example(args[0], args[1:]) if args else ["python without a script"]
    if program == "git":
        return [] if args[:1] == ["clone"] else [f"git {' '.join(args)}: only git clone is expected"]
    if program == "cd":
        return []
    return [f"no checker for the command {' '.join(command)!r}: add one to tests/test_readme.py"]


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def link_problems(page: Path) -> list[str]:
    problems = []
    for target in links(page.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        where = f"{_shown(page)}: link {target}"
        if not resolved.exists():
            problems.append(f"{where}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text()):
            problems.append(f"{where}: no heading #{anchor} in {_shown(resolved)}")
    return problems


def markdown_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


# --- tests -------------------------------------------------------------------------------------------

README = (ROOT / "README.md").read_text()


def test_the_readme_keeps_the_two_commands_and_ci_runs_the_test_command():
    commands = shell_commands(README)
    assert ["bash", "scripts/bench.sh"] in commands and ["bash", "scripts/test.sh"] in commands
    assert "exec bash scripts/test.sh" in (ROOT / ".ci/run").read_text()


@pytest.mark.parametrize("command", shell_commands(README), ids=lambda c: " ".join(c)[:60])
def test_every_readme_command_names_what_exists(command):
    assert check_command(command) == []


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert link_problems(page) == []


def test_every_docs_page_exists_opens_with_a_title_and_its_subject_and_the_readme_links_it():
    for name in DOC_PAGES:
        page = ROOT / "docs" / name
        lines = page.read_text().splitlines()
        assert lines[0].startswith("# ") and lines[1] == "" and lines[2].startswith("This page covers"), name
        assert f"](docs/{name})" in README, f"README does not link docs/{name}"


def test_the_checkers_catch_broken_commands_and_links(tmp_path):
    """The checks above can fail: each broken command or link here is caught."""
    assert check_command(["bash", "scripts/bench.sh", "--no-such-option"])
    assert check_command(["bash", "scripts/no_such_script.sh"])
    assert check_command(["DRY_RUN=1", "bash", "examples/grpo/gsm8k_qwen2.5-0.5b.sh", "fast"])
    assert check_command([".venv/bin/efficient-rollout", "no-such-subcommand"])
    assert check_command(["efficient-rollout", "calibrate", "--gpus", "8"])
    assert check_command(["pip", "install", "verl-efficientrollout[verl]"])  # not on PyPI
    assert check_command(["pip", "install", "-e", ".[no-such-extra]"])
    assert check_command(["pip", "install", "verl-efficientrollout[vllm,nope] @ git+https://h/o/r.git"])
    assert check_command(["python", "examples/soak.py", "--minutes", "3"])
    assert check_command(["python3", "-m", "verl_efficientrollout.no_such_module"])
    assert check_command(["make", "all"])
    assert check_command(["pip", "install", "-e", ".[verl]"]) == []
    (tmp_path / "target.md").write_text("# The machines\n\n## What runs where\n")
    page = tmp_path / "page.md"
    page.write_text("[gone](no_such_page.md) [anchor](target.md#no-such-heading) [ok](target.md#what-runs-where)\n"
                    "`[in code](ignored.md)` [web](https://example.org/x.md)\n")
    found = [p.rsplit(": ", 1)[1] for p in link_problems(page)]
    assert found == ["no such file", "no heading #no-such-heading in target.md"]
