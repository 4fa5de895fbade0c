"""`capcli train --config FILE`: a recipe is the train command's options by name, in TOML, JSON or YAML, each
value checked and converted exactly as the command line would check and convert it."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from capcli.errors import CapcliError

NOT_IN_RECIPES = ("config", "quiet", "help")


def read_recipe(path: Path, ctx) -> dict:
    """The options of the recipe at `path` by name (lr, max_steps, ...), parsed by the command itself as if
    given on its command line, so a key it has no option for, or a value it would refuse, is refused here."""
    data = _load(Path(path))
    args = []
    for key, value in data.items():
        option = "--" + key.replace("_", "-")
        if key.replace("-", "_") in NOT_IN_RECIPES:
            raise CapcliError(f"{path}: {key!r} cannot be set in a recipe")
        if value is True:
            args.append(option)
        elif value is not False:
            args += [option, str(value)]
    try:
        parsed = ctx.command.make_context(ctx.info_name, args, parent=ctx.parent)
    except Exception as exc:  # the parser's own usage error (click's, vendored by typer): which file, one line
        if not hasattr(exc, "format_message"):
            raise
        raise CapcliError(f"--config {path}: {_in_recipe_words(exc.format_message())}") from None
    given = {key.replace("-", "_") for key in data}
    return {name: value for name, value in parsed.params.items() if name in given}


def _in_recipe_words(message: str) -> str:
    """The parser speaks of options, a recipe has keys: "No such option: --learning-rate" becomes "unknown key
    'learning_rate'", "Invalid value for '--max-steps': ..." becomes "max_steps: ..."."""
    if message.startswith("No such option: --"):
        return f"unknown key {message.split('--', 1)[1].split()[0].replace('-', '_')!r}"
    message = re.sub(r"Invalid value for '--([\w-]+)'", lambda m: m.group(1).replace("-", "_"), message)
    return " ".join(message.split())


def _load(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CapcliError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        if path.suffix == ".toml":
            data = _toml().loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise CapcliError(f"--config {path}: name it .toml, .json or .yaml")
    except CapcliError:
        raise
    except Exception as exc:  # each format's own parse error: say where, in one line
        raise CapcliError(f"--config {path}: cannot parse it ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise CapcliError(f"--config {path}: expected a table of options (key = value)")
    return data


def _toml():
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    import tomli

    return tomli


def with_recipe(options: dict, ctx) -> dict:
    """The command's options with those of its --config recipe under them: an option given on the command
    line (or in the environment) wins over the recipe, and the recipe over the option's default."""
    path = options.pop("config", None)
    if path is None:
        return options
    given = {name: value for name, value in options.items()
             if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"}
    return {**options, **read_recipe(path, ctx), **given}
