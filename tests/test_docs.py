"""The docs cannot drift from the code: every relative link resolves, every `capcli` command line in a code
block uses options that exist, and the README's test command is the one CI runs."""

import re
import shlex
from pathlib import Path

import pytest
import typer

from capcli.cli import app

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "benchmarks" / "README.md",
        ROOT / "weights" / "default" / "MODEL_CARD.md", ROOT / "recipes" / "README.md",
        ROOT / "experiments" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)


def command_lines(text: str) -> list[str]:
    """The `capcli ...` commands in a Markdown text's code blocks (continued lines joined; after a pipe too)."""
    found = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip().removeprefix("$ ")
            for part in re.split(r"\s(?:\||&&|;)\s", line):
                part = part.strip()
                if part.startswith("capcli ") or re.match(r"^(torchrun|accelerate launch) .* -m capcli ", part):
                    found.append(part[part.index("capcli"):] if part.startswith("capcli") else
                                 "capcli " + part.split(" -m capcli ", 1)[1])
    return found


def unknown_options(line: str) -> list[str]:
    """The options of a `capcli ...` command line that its command does not have."""
    words = shlex.split(line.replace("'", '"'), posix=True)[1:]
    group = typer.main.get_command(app)
    command = group.commands.get(words[0]) if words else None
    if command is None:
        return [f"command {words[0] if words else ''!r}"]
    if isinstance(command, typer.core.TyperGroup) and len(words) > 1:
        command = command.commands.get(words[1], command)
    known = {name for param in command.params for name in [*param.opts, *param.secondary_opts]} | {"--help", "-h"}
    given = [w.split("=")[0] for w in words if re.match(r"^--?[a-zA-Z]", w)]
    return [option for option in given if option not in known]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        assert (doc.parent / target.split("#")[0]).exists(), f"{doc.name}: broken link {target}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_line_in_the_docs_uses_options_that_exist(doc):
    for line in command_lines(doc.read_text(encoding="utf-8")):
        assert unknown_options(line) == [], f"{doc.name}: {line}"


def test_a_misspelt_option_is_caught():
    text = "```bash\ncapcli caption photos/ --sidecar .txt \\\n  --sidecar-nmae full\n```\n"
    [line] = command_lines(text)
    assert unknown_options(line) == ["--sidecar-nmae"]
    assert unknown_options("capcli caption x.jpg --labels --min-score 0.3") == []


def test_the_readme_test_command_is_the_one_ci_runs():
    readme_blocks = FENCE.findall((ROOT / "README.md").read_text(encoding="utf-8"))
    test_command = next(line for block in readme_blocks for line in block.splitlines() if "pytest" in line)
    assert test_command.strip() in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_the_docs_speak_of_versions_and_dates_not_sessions_nor_private_paths():
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        assert not re.search(r"\bsessions?\b", text, re.I), doc.name
        if doc.parent.name != "benchmarks":  # the benchmark scripts look for the project's data folder there
            assert "../shared" not in text, doc.name
