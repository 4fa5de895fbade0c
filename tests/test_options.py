"""Options are declared once: every option of every command reaches the job field (or decoding or training
setting) of its own name, and `train --config` reads the same names from a recipe, refusing unknown ones."""

import enum
import inspect
import json
import typing
from pathlib import Path

import pytest
import typer
from cli_runner import runner

from capcli import cli
from capcli.cli import app

ROOT = Path(__file__).resolve().parent.parent
JOBS = {"extract": "extract_job", "train": "train_job", "caption": "caption_job", "eval": "eval_job",
        "memory build": "memory_job"}
FUNCTIONS = {"extract": "extract", "train": "train", "caption": "caption", "eval": "evaluate",
             "memory build": "memory_build"}
# train's grounding options make one GroundingConfig; --objects names the detector.
DERIVED = {"label_drop": "grounding.drop", "label_swap": "grounding.swap", "train_labels": "grounding.train_labels",
           "grounded": "grounding", "objects": "detector"}
NOT_SETTINGS = ("help", "quiet", "config")


def click_command(name: str):
    command = typer.main.get_command(app)
    for word in name.split():
        command = command.commands[word]
    return command


def a_value(annotation, flag: bool):
    """A valid command-line value for an option of this annotation, and the value its field should then hold."""
    kind, info = typing.get_args(annotation)[:2]
    kind = next((k for k in typing.get_args(kind) if k is not type(None)), kind)  # Optional[X] -> X
    kind = typing.get_args(kind)[0] if typing.get_origin(kind) is list else kind
    if flag:
        return [], True
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        choice = list(kind)[-1].value
        return [choice], choice
    if kind is Path:
        return ["some_path"], Path("some_path")
    if kind in (int, float):
        value = kind((info.min or 0) + 1) if info.max is None else kind(info.max) / 2
        return [str(value)], value
    return ["some text"], "some text"


def where(job, name: str):
    """The value the job holds for an option: its own field, a decoding or training setting, or as derived."""
    path = DERIVED.get(name, name).split(".")
    if hasattr(job, path[0]):
        value = job
        for part in path:
            value = getattr(value, part)
        return value
    for settings in ("decoding", "settings"):
        if name in getattr(job, settings, {}):
            return getattr(job, settings)[name]
    raise AssertionError(f"option {name} reached no field of {type(job).__name__}")


@pytest.mark.parametrize("name", JOBS)
def test_every_option_reaches_the_field_of_its_name(name, monkeypatch):
    captured = []
    monkeypatch.setattr(f"capcli.jobs.{JOBS[name]}", lambda job, report: captured.append(job) or ({}, None))
    args, expected = name.split(), {}
    annotations = {p.name: p.annotation for p in inspect.signature(getattr(cli, FUNCTIONS[name])).parameters.values()}
    for param in click_command(name).params:
        if param.name in NOT_SETTINGS:
            continue
        words, value = a_value(annotations[param.name], getattr(param, "is_flag", False))
        if param.param_type_name == "argument":
            args += words
        else:
            args += [param.opts[0], *words]
        expected[param.name] = value
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    [job] = captured
    for option, value in expected.items():
        held = where(job, option)
        if option == "grounded":
            assert held is not None
        elif option == "objects":
            assert held, "--objects names no detector"
        elif option == "init":
            assert held == str(value)
        else:
            assert held == value or held == [value], f"--{option}: {held!r} != {value!r}"


def test_an_option_without_a_field_is_a_wiring_error():
    from capcli.cli.options import job_from
    from capcli.config import DecodingSettings
    from capcli.jobs import CaptionJob

    with pytest.raises(TypeError, match="beamz"):
        job_from(CaptionJob, {"paths": ["a.jpg"], "beamz": 3}, decoding=DecodingSettings.field_names())


def train_job_of(args: list[str], monkeypatch):
    captured = []
    monkeypatch.setattr("capcli.jobs.train_job", lambda job, report: captured.append(job))
    done = runner.invoke(app, ["train", *args])
    return done, captured[0] if captured else None


@pytest.mark.parametrize("suffix", [".toml", ".json", ".yaml"])
def test_a_recipe_sets_train_options_and_the_command_line_wins(suffix, tmp_path, monkeypatch):
    recipe = {"lr": 0.0003, "max-steps": 500, "grounded": True, "label_drop": 0.1, "objective": "xent"}
    path = tmp_path / f"recipe{suffix}"
    if suffix == ".toml":
        path.write_text("lr = 3e-4\nmax-steps = 500\ngrounded = true\nlabel_drop = 0.1\nobjective = 'xent'\n")
    else:
        path.write_text(json.dumps(recipe))  # JSON is YAML too
    done, job = train_job_of(["--config", str(path), "--data", "d", "--out", "m", "--max-steps", "20"], monkeypatch)
    assert done.exit_code == 0, done.output
    assert job.settings == {"lr": 0.0003, "max_steps": 20, "objective": "xent"}
    assert job.grounding.drop == 0.1 and job.data == Path("d")


def test_an_unknown_or_invalid_key_in_a_recipe_is_refused_naming_it(tmp_path, monkeypatch):
    path = tmp_path / "recipe.toml"
    path.write_text("lr = 3e-4\nlearning_rate = 1\n")
    done, job = train_job_of(["--config", str(path), "--data", "d", "--out", "m"], monkeypatch)
    assert done.exit_code == 2 and job is None
    assert "unknown key 'learning_rate'" in done.output and len(done.output.strip().splitlines()) == 1
    path.write_text("max_steps = 0\n")
    done, job = train_job_of(["--config", str(path), "--data", "d", "--out", "m"], monkeypatch)
    assert done.exit_code == 2 and "max_steps" in done.output and job is None


def test_the_shipped_recipes_are_read_whole(monkeypatch):
    recipes = sorted((ROOT / "recipes").glob("*.toml"))
    assert recipes
    for recipe in recipes:
        done, job = train_job_of(["--config", str(recipe), "--data", "d", "--out", "m", "--init", "i"], monkeypatch)
        assert done.exit_code == 0, f"{recipe.name}: {done.output}"
