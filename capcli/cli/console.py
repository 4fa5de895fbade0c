"""What the terminal sees: progress and messages on stderr, errors as one line with their exit status, and
an interrupted job's way out."""

from __future__ import annotations

import functools
import inspect
import os
import sys

import typer

from capcli.cli.options import PANEL_OF, QuietOpt, in_panel
from capcli.errors import EXIT_INTERRUPTED, EXIT_SOME_INPUTS_FAILED, CapcliError
from capcli.reporting import Reporter, sigterm_interrupts


class StderrReporter(Reporter):
    """Progress bars and messages on stderr (rich); --quiet keeps only the warnings about single inputs.
    Warnings print above a running bar instead of through it."""

    def __init__(self, quiet: bool):
        from rich.console import Console

        self.quiet = quiet
        self.console = Console(stderr=True, soft_wrap=True)  # long lines stay whole for logs
        self._progress = None

    def line(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, markup=False, highlight=False)

    def warn(self, text: str) -> None:
        self.console.print(f"capcli: {text}", markup=False, highlight=False)

    def progress(self, total: int, description: str):
        if self.quiet:
            return lambda n: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        if self._progress is None:
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TimeRemainingColumn(), console=self.console)
            self._progress.start()
        task = self._progress.add_task(description, total=total)
        return lambda n: self._progress.advance(task, n)

    def end_progress(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class GroupedHelp(typer.core.TyperCommand):
    """Plain help (one line an option where it fits in 80 columns) with the options under the headings of
    their help panels: rich's boxed tables took twice the lines."""

    def format_options(self, ctx, formatter) -> None:
        sections: dict[str, list] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                default = "Arguments" if param.param_type_name == "argument" else "Options"
                sections.setdefault(getattr(param, "rich_help_panel", None) or default, []).append(record)
        for title in sorted(sections, key=lambda t: (t != "Arguments", t != "Options")):
            with formatter.section(title):
                formatter.write_dl(sections[title])


def command(fn, declared: dict, panels: bool):
    """Run a command with a stderr reporter: CapcliError becomes one line on stderr and its exit status,
    Ctrl-C or SIGTERM status 130 (after the job has kept what it finished), failed inputs status 1.
    `declared`: options declared in capcli.cli.options as {name: (annotation, default)} (those several commands
    share, or a command's long list), which the command takes as **declared; `panels`: its options in their
    help panels (capcli.cli.options.PANELS)."""
    from capcli.jobs import JobResult

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        reporter = StderrReporter(kwargs.pop("quiet", False))
        try:
            with sigterm_interrupts():
                result = fn(*args, reporter=reporter, **kwargs)
        except CapcliError as exc:
            reporter.end_progress()
            reporter.warn(f"error: {exc}")
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            reporter.end_progress()
            reporter.warn("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        finally:
            reporter.end_progress()
        if isinstance(result, JobResult) and result.failed:
            raise typer.Exit(EXIT_SOME_INPUTS_FAILED)
    wrapper.__signature__ = _for_typer(fn, declared, panels)
    return wrapper


def subcommand(group: typer.Typer, name: str | None = None, *, declared: dict | None = None, panels: bool = False):
    """Register a function as a command of `group`: run by `command`, its help grouped by GroupedHelp."""
    def register(fn):
        return group.command(name, cls=GroupedHelp)(command(fn, declared or {}, panels))
    return register


def _for_typer(fn, declared: dict, panels: bool):
    """The command's signature for Typer (which passes every option by name): its own options without
    `reporter`, the declared ones, --quiet; with `panels`, each option in its help panel."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    own = [p.replace(kind=keyword) for p in inspect.signature(fn, eval_str=True).parameters.values()
           if p.name != "reporter" and p.kind != p.VAR_KEYWORD]
    params = [*own, *(inspect.Parameter(name, keyword, annotation=annotation, default=default)
                      for name, (annotation, default) in declared.items()),
              inspect.Parameter("quiet", keyword, default=False, annotation=QuietOpt)]
    if panels:
        params = [in_panel(p, PANEL_OF.get(p.name)) for p in params]
    return inspect.Signature(params)


def quiet_library_bars() -> None:
    """Libraries' own progress bars (tqdm: transformers' GGUF conversion, model shards) redraw with carriage
    returns, which smear log files: off when stderr is not a terminal. capcli's own progress says so itself."""
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def exit_without_finalizing(status: int) -> None:
    """Leave at once, once the interrupted job has kept its work and closed its files. An interruption can
    stop torch mid-operation with its worker threads still holding Python objects; tearing the interpreter
    down under them sometimes aborts the process (SIGABRT, "PyThreadState_Get ... finalizing") instead of
    exiting 130, so the interpreter is not torn down."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
