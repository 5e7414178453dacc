"""The command line. Heavy modules are imported inside commands so --help is fast."""

from __future__ import annotations

import logging
import os
import sys

import click

from .errors import ChatroomError

log = logging.getLogger("chatroom")


def _quiet_libraries() -> None:
    """Model libraries print progress bars and notices; the CLI owns the terminal."""
    for name, value in (
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("DIFFUSERS_VERBOSITY", "error"),
        ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
        ("GLOG_minloglevel", "2"),  # mediapipe's native logging
        ("TF_CPP_MIN_LOG_LEVEL", "2"),
    ):
        os.environ.setdefault(name, value)


def _setup_logging(verbose: int) -> None:
    level_name = os.environ.get("CHATROOM_LOG", "").upper()
    level = getattr(logging, level_name, None) if level_name else None
    if not isinstance(level, int):
        level = logging.WARNING - 10 * min(verbose, 2)
    from rich.logging import RichHandler

    from .console import stderr

    handler = RichHandler(console=stderr(), show_path=False, rich_tracebacks=False)
    # Other libraries keep to warnings; CHATROOM_LOG and -v tune chatroom's own.
    logging.basicConfig(
        level=logging.WARNING, format="%(message)s", handlers=[handler], force=True
    )
    logging.getLogger("chatroom").setLevel(level)


class Main(click.Group):
    """Turns our errors into one line and a non-zero exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ChatroomError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: run the same command again to resume", err=True)
            sys.exit(130)


@click.group(cls=Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="chatroom")
def main(verbose: int) -> None:
    """Build annotated image datasets from a domain word and reference images."""
    _quiet_libraries()
    _setup_logging(verbose)


@main.command()
@click.option(
    "-c", "--config", "config_path", type=click.Path(), help="TOML or YAML config."
)
@click.option("--domain", help="Domain name (see `chatroom domains`) or pack folder.")
@click.option("--profile", help="A profile of the domain pack, e.g. paper or offline.")
@click.option("--references", type=click.Path(), help="Folder of reference images.")
@click.option("-n", "--count", type=int, help="Records to produce.")
@click.option(
    "-o", "--output", type=click.Path(), help="Run folder (resumed if it exists)."
)
@click.option("--seed", type=int, help="Base seed; item i uses seed + i.")
@click.option("--reference-sample", type=int, help="Use a seeded random K references.")
@click.option("--max-candidates", type=int, help="Budget: most candidates to generate.")
@click.option(
    "--stop-after",
    type=click.Choice(["attributes", "prompts"]),
    help="Stop after writing this file, to review or edit it.",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a setting, e.g. --set generator.cfg_scale=4 (repeatable).",
)
@click.option(
    "--fresh", is_flag=True, help="Discard an earlier run in the output folder."
)
@click.option(
    "--no-extraction",
    is_flag=True,
    help="Run no extractor: prompts from the domain word alone (an ablation).",
)
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    help="Where model stages run: this process, or Ray actors (docs/ray.md).",
)
@click.option("--address", help="Ray cluster to join (default: start a local Ray).")
def run(
    config_path,
    domain,
    profile,
    references,
    count,
    output,
    seed,
    reference_sample,
    max_candidates,
    stop_after,
    overrides,
    fresh,
    no_extraction,
    executor,
    address,
):
    """Generate a dataset: extract, prompt, generate, filter, annotate, write."""
    from .runview import run_with_display

    flags = {
        "domain": domain,
        "profile": profile,
        "references": references,
        "count": count,
        "output": output,
        "seed": seed,
        "reference_sample": reference_sample,
        "max_candidates": max_candidates,
        "stop_after": stop_after,
        "extraction": False if no_extraction else None,
        "executor": executor,
        "address": address,
    }
    summary = run_with_display(config_path, flags, list(overrides), fresh)
    if summary.status == "budget exhausted":
        sys.exit(3)


@main.command()
def plugins():
    """List plugins, their versions and stages, and those that failed to load."""
    from .views import show_plugins

    show_plugins()


@main.command()
def domains():
    """List the domain packs that are installed."""
    from .views import show_domains

    show_domains()


@main.command()
@click.option(
    "-c", "--config", "config_path", type=click.Path(), help="TOML or YAML config."
)
@click.option("--domain", help="Domain name or pack folder.")
@click.option("--profile", help="A profile of the domain pack, e.g. paper or offline.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def doctor(config_path, domain, profile, overrides):
    """Check each configured backend: libraries, weights, servers, keys."""
    from .views import show_doctor

    if not show_doctor(config_path, domain, list(overrides), profile):
        sys.exit(1)


@main.command()
@click.argument("run_folder", metavar="OUT", type=click.Path())
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["parquet", "webdataset", "hub"]),
    required=True,
    help="hub: Parquet shards and a dataset card pushed to the Hugging Face Hub.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    help="Export folder (default: OUT-FORMAT; OUT-parquet for hub).",
)
@click.option(
    "--shard-size",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Most records per shard.",
)
@click.option("--repo", metavar="ORG/NAME", help="hub: the dataset repo.")
@click.option("--private", is_flag=True, help="hub: make a new repo private.")
@click.option(
    "--token-env",
    default="HF_TOKEN",
    show_default=True,
    metavar="VAR",
    help="hub: the environment variable that holds the access token.",
)
@click.option("--revision", default="main", show_default=True, help="hub: the branch.")
@click.option("--license", metavar="ID", help="hub: the card's licence id.")
def export(
    run_folder, fmt, output, shard_size, repo, private, token_env, revision, license
):
    """Write a finished run as Parquet or WebDataset shards with a manifest,
    or push it to the Hugging Face Hub with a dataset card."""
    if fmt == "hub":
        _push(
            run_folder, output, shard_size, repo, private, token_env, revision, license
        )
        return
    given = [
        flag
        for flag, value, default in (
            ("--repo", repo, None),
            ("--private", private, False),
            ("--token-env", token_env, "HF_TOKEN"),
            ("--revision", revision, "main"),
            ("--license", license, None),
        )
        if value != default
    ]
    if given:
        raise click.UsageError(f"{', '.join(given)} only go with --format hub")
    from .export import export_run

    result = export_run(run_folder, fmt, output, shard_size)
    shards = len(result.shards)
    click.echo(
        f"exported {result.records} records in {shards} shard{'s' * (shards != 1)} "
        f"to {result.dest} ({len(result.skipped)} skipped; see {result.manifest})"
    )


def _push(run_folder, output, shard_size, repo, private, token_env, revision, license):
    from .hub import push_to_hub

    if not repo:
        raise click.UsageError("--format hub needs --repo ORG/NAME")
    result = push_to_hub(
        run_folder,
        repo,
        dest=output,
        shard_size=shard_size,
        private=private,
        token_env=token_env,
        revision=revision,
        license=license,
    )
    if not result.changed:
        click.echo(
            f"{result.url} (branch {result.revision}) already holds this export "
            "and card: nothing to push"
        )
        return
    shards = len(result.export.shards)
    deleted = f", {len(result.deleted)} stale shards deleted" if result.deleted else ""
    click.echo(
        f"pushed {result.records} records in {shards} shard{'s' * (shards != 1)} "
        f"and a dataset card to {result.url} (branch {result.revision}{deleted}; "
        f"{len(result.export.skipped)} skipped)"
    )
    click.echo(f"commit: {result.commit_url}")


@main.command()
@click.argument("folder", metavar="DIR", type=click.Path())
@click.option(
    "-o", "--output", type=click.Path(), required=True, help="Run folder (resumed)."
)
@click.option("--domain", help="Domain name (see `chatroom domains`) or pack folder.")
@click.option("--profile", help="A profile of the domain pack, e.g. paper or offline.")
@click.option(
    "-c", "--config", "config_path", type=click.Path(), help="TOML or YAML config."
)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
@click.option(
    "--fresh", is_flag=True, help="Discard an earlier run in the output folder."
)
def curate(folder, output, domain, profile, config_path, overrides, fresh):
    """Filter and annotate the images of DIR into a dataset, as a run would."""
    from .curate import curate_with_display

    curate_with_display(folder, output, domain, profile, config_path, overrides, fresh)


@main.command()
@click.argument("run_folder", metavar="OUT", type=click.Path())
@click.option(
    "--compare", type=click.Path(), metavar="OTHER_OUT", help="A run to set beside it."
)
@click.option("--open", "open_browser", is_flag=True, help="Open it in a browser.")
@click.option("--no-map", is_flag=True, help="Skip the embedding map.")
@click.option("--no-quality", is_flag=True, help="Skip the quality scores.")
@click.option(
    "--vlm",
    type=click.Path(),
    metavar="CONFIG",
    help="Config whose [vlm] (or [extractor]) answers the statistics questions.",
)
@click.option(
    "--clip", type=click.Path(), metavar="MODEL_DIR", help="Map CLIP image features."
)
@click.option(
    "--nima", type=click.Path(), metavar="WEIGHTS", help="NIMA checkpoint to score."
)
@click.option(
    "--baseline",
    "baselines",
    multiple=True,
    type=click.Path(),
    metavar="DIR",
    help="A folder of other images to score for quality (repeatable).",
)
@click.option(
    "--sample",
    type=click.IntRange(min=1),
    default=200,
    show_default=True,
    help="Most images a set for the statistics and quality (seeded).",
)
def report(
    run_folder,
    compare,
    open_browser,
    no_map,
    no_quality,
    vlm,
    clip,
    nima,
    baselines,
    sample,
):
    """Write OUT/report/index.html and summary.json: funnel, scores, gallery."""
    from .report import build_report
    from .report.load import load_run

    index = build_report(
        run_folder,
        compare=compare,
        embeddings=not no_map,
        quality=not no_quality,
        vlm=vlm,
        clip=clip,
        nima=nima,
        baselines=baselines,
        stat_sample=sample,
        quality_sample=sample,
    )
    click.echo(f"wrote {index}")
    run = load_run(run_folder)
    status = str(run.info.get("status", ""))
    if status != "complete":
        click.echo(
            f"note: the run is {status or 'of unknown status'}; the report covers "
            f"the {len(run.records)} records written so far"
        )
    if open_browser:
        import webbrowser

        webbrowser.open(index.resolve().as_uri())


@main.command("smoke-models")
@click.argument("directory", type=click.Path())
def smoke_models(directory):
    """Write tiny random-weight models and DIRECTORY/smoke.toml to check an install."""
    from pathlib import Path

    from .smoke import write_smoke_models

    path = Path(write_smoke_models(directory))
    config = path if path.suffix == ".toml" else path / "smoke.toml"
    click.echo(f"wrote {config}")
    click.echo(f"try: chatroom run -c {config} --references REFS -n 8 -o OUT")


@main.group()
def prompts():
    """Community prompts: import them, count what they use, derive defaults."""


@prompts.command("import")
@click.argument("sources", metavar="SRC...", nargs=-1, required=True)
@click.option(
    "-o", "--output", type=click.Path(), required=True, help="JSONL file to write."
)
@click.option(
    "--family",
    type=click.Choice(["auto", "sd15", "sdxl"]),
    default="auto",
    show_default=True,
    help="Checkpoint family of the samples; auto guesses from model and size.",
)
@click.option("--overwrite", is_flag=True, help="Replace FILE.jsonl if it exists.")
def prompts_import(sources, output, family, overwrite):
    """Read WebUI images (PNG, JPEG, WebP) and JSONL files into few-shot rows."""
    import json
    from pathlib import Path

    from .community import import_sources
    from .errors import InputError
    from .store import atomic_write_text

    path = Path(output)
    if path.is_dir():
        raise InputError(f"-o {path} is a folder: name the JSONL file to write")
    if any(Path(s).resolve() == path.resolve() for s in sources):
        raise InputError(f"-o {path} is one of the sources: choose another file")
    if path.exists() and not overwrite:
        raise InputError(f"{path} exists: choose another -o or pass --overwrite")
    result = import_sources(sources, family)
    for source, reason in result.skipped:
        click.echo(f"skipped {source}: {reason}", err=True)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in result.rows)
    atomic_write_text(path, text)
    click.echo(
        f"wrote {len(result.rows)} samples to {path} ({len(result.skipped)} skipped)"
    )


@prompts.command("stats")
@click.argument("file", metavar="FILE.jsonl", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--family", type=click.Choice(["sd15", "sdxl"]), help="Only these.")
@click.option("--top", type=click.IntRange(min=1), default=20, show_default=True)
def prompts_stats(file, as_json, family, top):
    """Samplers, steps, CFG, sizes, hires settings and common terms of FILE."""
    import json

    from .community import format_stats, read_rows, statistics

    rows = [r for r in read_rows(file) if not family or r.get("family") == family]
    report = statistics(rows, top=top)
    click.echo(json.dumps(report, indent=1) if as_json else format_stats(report))


@prompts.command("defaults")
@click.argument("file", metavar="FILE.jsonl", type=click.Path())
@click.option("--family", type=click.Choice(["sd15", "sdxl"]), help="Only these.")
def prompts_defaults(file, family):
    """Print a [generator] TOML table of FILE's most common settings."""
    from .community import defaults_toml, read_rows

    rows = [r for r in read_rows(file) if not family or r.get("family") == family]
    click.echo(defaults_toml(rows, str(file)), nl=False)


if __name__ == "__main__":  # pragma: no cover
    main()
