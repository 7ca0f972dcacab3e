"""The ``metriclab`` command line: a thin typer app over library functions."""

from __future__ import annotations

import atexit
import contextlib
import fnmatch
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

import metriclab
from metriclab.errors import MetricLabError, exit_on_user_error

app = typer.Typer(
    name="metriclab",
    help="Deep metric learning toolkit: inspect plugins, evaluate, visualize and compare training runs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console()
errors = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        console.print(f"metriclab {metriclab.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    version: Annotated[
        bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
) -> None:
    """metriclab: deep metric learning from recipe to evaluated run."""
    ctx.obj = {"debug": debug}
    # Python's last garbage collections walk every object torch, umap and sklearn created: ~0.7 s of a
    # `compare`'s exit. Frozen objects are skipped; the process ends right after, so nothing is kept longer.
    atexit.register(gc.freeze)


@app.command()
def plugins(
    ctx: typer.Context,
    pattern: Annotated[
        str, typer.Argument(help="Kind ('loss' or 'losses') or wildcard name pattern ('pml.*Loss').")
    ] = "*",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    load: Annotated[
        list[str] | None,
        typer.Option(
            "--plugins", help="Also load this plugin module or .py file and list its components (repeatable)."
        ),
    ] = None,
) -> None:
    """List registered encoders, losses, miners, datasets, optimizers and schedulers with the package each came from.

    Encoder families (``timm:<model>``, ``torchvision:<model>``) are one row each; a pattern naming the
    family lists its members (``metriclab plugins 'timm:convnext*'``).
    """
    from metriclab import registry

    with exit_on_user_error(ctx.obj["debug"]):
        for spec in load or []:
            registry.load_plugin(spec)
        kinds, title = list(registry.REGISTRIES.values()), f"metriclab components matching '{pattern}'"
        kind = registry.kind_of(pattern)
        if kind is not None:
            kinds, title, pattern = (
                [registry.registry(kind)],
                f"metriclab {registry.registry(kind).kind} components",
                "*",
            )
        entries = [e for r in kinds for e in r.entries(pattern)]
        rows = [(e.kind, e.name, e.source, e.description) for e in entries]
        if ":" not in pattern:  # a family is one row saying how to list its members, not a thousand rows
            for r in kinds:
                for f in r.families.values():
                    if fnmatch.fnmatchcase(f"{f.prefix}:<model>", pattern):
                        listing = f"{len(f.members()):,} models; list: metriclab plugins '{f.prefix}:*resnet*'"
                        rows.append((r.kind, f"{f.prefix}:<model>", f"{f.source} ({listing})", ""))
        if not rows:
            raise MetricLabError(f"no component matches '{pattern}'; run `metriclab plugins` to list all")
    if as_json:
        arguments = {(e.kind, e.name): e.arguments for e in entries}
        listed = [
            {"kind": k, "name": n, "source": s, "description": d, "arguments": arguments.get((k, n), {})}
            for k, n, s, d in rows
        ]
        print(json.dumps(listed, indent=2, default=repr))
        return
    table = Table(title=title, caption="metriclab plugins NAME --json: its arguments and defaults")
    for column in ("kind", "name", "from", "description"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)


# -- evaluate / visualize / compare: thin wrappers over metriclab.evaluation and metriclab.viz.figures ---

RunArgs = Annotated[list[Path], typer.Argument(help="Run directories written by a recipe.", show_default=False)]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON to stdout instead of tables.")]
PluginsOption = Annotated[
    list[str] | None,
    typer.Option(
        "--plugins",
        help="Plugin module or .py file the runs were trained with (repeatable). A run's own plugin list "
        "is never imported by itself: plugins are code, load only those you trust.",
    ),
]


class _StatusHandler(logging.Handler):
    """Shows the library loggers' INFO records as the spinner text and WARNINGs as notes, all on stderr."""

    def __init__(self, status: Any) -> None:
        super().__init__(logging.INFO)
        self.status = status

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            errors.print(f"[yellow]note:[/] {message}", highlight=False)
        else:
            self.status.update(f"{message} ...")


@contextlib.contextmanager
def _reporting(debug: bool, what: str) -> Iterator[None]:
    """User errors as one line (exit 2); progress of the library as a spinner on stderr, so stdout stays clean."""
    logger = logging.getLogger("metriclab")  # the parent of metriclab.evaluation's and metriclab.viz.figures' loggers
    with exit_on_user_error(debug), errors.status(what) as status:
        handler = _StatusHandler(status)
        logger.addHandler(handler)
        previous, logger.propagate = logger.level, False
        logger.setLevel(logging.INFO)
        try:
            yield
        except OSError as err:
            # A full disk or a read-only folder while writing metrics.json, embeddings or figures (written atomically,
            # so nothing is left half-written): the file and the cause, not a traceback.
            from metriclab.runs import DISK_ERRNOS

            if err.errno not in DISK_ERRNOS or err.filename is None:
                raise
            raise MetricLabError(
                f"could not write {err.filename} ({err.strerror}); free disk space or fix the permissions there, "
                "then run the command again"
            ) from err
        finally:
            logger.removeHandler(handler)
            logger.setLevel(previous)
            logger.propagate = True


def _runs(paths: Sequence[Path], plugins: Sequence[str] | None) -> list:
    from metriclab import registry
    from metriclab.runs import Run

    for spec in plugins or []:
        registry.load_plugin(spec)
    return [Run(p) for p in paths]


def _parse_ks(k: list[int] | None, ks: str | None) -> tuple[int, ...]:
    values = list(k or [])
    if ks:
        try:
            values += [int(part) for part in ks.replace(" ", "").split(",") if part]
        except ValueError as err:
            raise MetricLabError(f"--ks must be comma-separated integers like 1,5,10, got '{ks}'") from err
    values = sorted(set(values or [1, 5, 10]))
    if values[0] < 1:
        raise MetricLabError(f"k values must be at least 1, got {values}; pass e.g. --ks 1,5,10")
    return tuple(values)


HEADERS = {
    "precision@": "P@",
    "recall@": "R@",
    "map@r": "MAP@R",
    "r_precision": "R-prec",
    "knn_accuracy": "kNN acc",
    "nmi": "NMI",
    "ami": "AMI",
    "roc_auc": "ROC-AUC",
    "eer": "EER",
    "threshold": "threshold",
    "verification_accuracy": "accuracy",
    "trustworthiness": "trust",
    "silhouette": "silhouette",
    "seconds": "seconds",
}
LOWER_IS_BETTER = {"eer"}
# Distance thresholds of different models are not comparable; seconds and counts are shown, not judged.
NOT_RANKED = {"threshold", "seconds", "queries", "queries_scored", "gallery"}


def _header(key: str) -> str:
    for prefix, short in HEADERS.items():
        if key == prefix or (prefix.endswith("@") and key.startswith(prefix)):
            return short + key[len(prefix) :] if prefix.endswith("@") else short
    return key


def _cell(value: Any, key: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if key in ("threshold", "seconds") else f"{value:.4f}"
    return str(value)


def _best(values: Sequence[Any], key: str) -> Any:
    """The best of the numeric ``values`` of metric ``key`` (None when not ranked or nothing to rank)."""
    numbers = [v for v in values if isinstance(v, (int, float))]
    if len(values) < 2 or not numbers or key in NOT_RANKED:
        return None
    return min(numbers) if key in LOWER_IS_BETTER else max(numbers)


def _marked(values: Sequence[Any], key: str) -> list[str]:
    best = _best(values, key)
    return [f"[bold green]{_cell(v, key)}[/]" if best is not None and v == best else _cell(v, key) for v in values]


def comparison_table(rows: list[dict[str, Any]]) -> Table:
    """A rich table of compare rows: one per 2-D view, best score per column in bold green."""
    table = Table(title="2-D views of the same test points", title_justify="left", header_style="bold")
    table.add_column("run", overflow="fold")
    table.add_column("view", overflow="fold")
    keys = ["knn_accuracy", "trustworthiness", "silhouette", "seconds"]
    for key in keys:
        table.add_column(_header(key).replace("kNN acc", "5-NN acc"), justify="right")
    columns = [_marked([r[key] for r in rows], key) for key in keys]
    for i, row in enumerate(rows):
        table.add_row(row["run"], row["projection"], *[column[i] for column in columns])
    return table


def evaluation_table(results: list[dict[str, Any]]) -> Table:
    """One rich table of evaluate results: a row per metric, a column per run, best value per row in bold green.

    Metrics are rows so that two dozen metrics of several runs fit an 80-column terminal.
    """
    table = Table(
        title="Retrieval and verification on the test set",
        title_justify="left",
        header_style="bold",
        caption=f"kNN acc: majority vote of the {results[0]['knn_k']} nearest; threshold: a distance",
        caption_justify="left",
    )
    table.add_column("metric")
    for r in results:
        table.add_column(f"{r['name']}\n{r['metric']}", justify="right", overflow="fold")
    sections = [
        ("test_loo", "test set, leave-one-out"),
        ("test_vs_train", "test queries vs train gallery"),
        ("query_gallery", "the dataset's queries vs its gallery"),
        ("verification", "pair verification (held-out pairs)"),
    ]
    # Per-category scores of the dataset's protocol: one "category metric" row each.
    results = [{**r, "by_category": _category_rows(r.get("by_category"))} for r in results]
    sections.append(("by_category", "the dataset's queries, per category"))
    for section, title in sections:
        keys = list(dict.fromkeys(key for r in results for key in r.get(section) or {}))
        if not keys:
            continue
        table.add_row(f"[bold]{title}[/]", *[""] * len(results), end_section=False)
        for key in keys:
            table.add_row(f"  {_header(key)}", *_marked([(r.get(section) or {}).get(key) for r in results], key))
        table.add_section()
    return table


def _category_rows(by_category: dict | None) -> dict[str, Any]:
    shown = ("precision@1", "map@r")
    return {f"{name} {key}": m[key] for name, m in (by_category or {}).items() for key in shown if key in m}


@app.command()
def evaluate(
    ctx: typer.Context,
    runs: RunArgs,
    k: Annotated[list[int] | None, typer.Option("--k", help="A k for precision@k and recall@k (repeatable).")] = None,
    ks: Annotated[str | None, typer.Option("--ks", help="Comma-separated ks, e.g. 1,5,10 (default).")] = None,
    metric: Annotated[
        str | None, typer.Option("--metric", help="euclidean or cosine distance \\[default: the run's recipe metric].")
    ] = None,
    reembed: Annotated[
        bool, typer.Option("--reembed", help="Embed test and train splits again from model.safetensors (and save).")
    ] = False,
    dataset: Annotated[
        str | None, typer.Option("--dataset", help="Evaluate on another registered dataset with the same image shape.")
    ] = None,
    data_dir: Annotated[str | None, typer.Option("--data-dir", help="Folder to read the dataset from.")] = None,
    dataset_args: Annotated[
        list[str] | None,
        typer.Option(
            "--dataset-args",
            help="KEY=VALUE argument of the dataset (repeatable), e.g. dataset_root=DIR for a CSV; they replace "
            "the run's own for --dataset.",
        ),
    ] = None,
    knn_k: Annotated[int, typer.Option("--knn-k", help="Neighbours voting in k-NN classification.")] = 5,
    pairs: Annotated[int, typer.Option("--pairs", help="Balanced pairs sampled for verification.")] = 20000,
    seed: Annotated[int, typer.Option("--seed", help="Seed for pairs and k-means.")] = 0,
    processes: Annotated[
        int,
        typer.Option(
            "--processes",
            help="Rank the queries on N local processes (same scores as one). Under `accelerate launch -m "
            "metriclab evaluate` the launcher's processes are used instead.",
        ),
    ] = 1,
    clustering: Annotated[
        bool | None,
        typer.Option(
            "--clustering/--no-clustering",
            help="NMI/AMI by k-means \\[default: on unless test items x classes exceed 10 million].",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOption = False,
    plugins: PluginsOption = None,
) -> None:
    """Retrieval (precision@k, recall@k, MAP@R, R-precision, k-NN accuracy, NMI/AMI) and pair verification.

    Two protocols: the test set searched leave-one-out, and test queries searched in the train set.
    Results are added to each run's metrics.json under evaluations[METRIC]; several runs are shown side by side.
    """
    from metriclab.evaluation import evaluate_run
    from metriclab.recipe import key_values

    debug = ctx.obj["debug"]
    results = []
    with _reporting(debug, "evaluating"):
        ks_ = _parse_ks(k, ks)
        for run in _runs(runs, plugins):
            start = time.perf_counter()
            options = {"knn_k": knn_k, "num_pairs": pairs, "seed": seed, "processes": processes}
            options |= {"clustering": clustering, "dataset_args": key_values(dataset_args)}
            result = evaluate_run(run, ks_, metric, reembed, dataset, data_dir, **options)
            results.append(result)
            if result["rank"] == 0:
                seconds = time.perf_counter() - start
                on = f" on {result['processes']} processes" if result["processes"] > 1 else ""
                errors.print(f"evaluated {run.path}{on} in {seconds:.1f} s", style="dim", highlight=False)
    if results and results[0]["rank"] != 0:
        return  # under a launcher, rank 0 reports for everyone
    if as_json:
        print(json.dumps(results, indent=2))
        return
    console.print(evaluation_table(results))
    for result in results:
        source = "saved embeddings" if result["embeddings"] == "saved" else result["embeddings"]
        console.print(
            f"[dim]{result['name']}: {source}, {result['test_size']} test / "
            f"{result['train_size'] or 0} train; added to {Path(result['run']) / 'metrics.json'} "
            f"evaluations['{result['key']}'][/]",
            highlight=False,
            soft_wrap=True,
        )


def _has_display() -> bool:
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _show(paths: Sequence[Path]) -> None:
    if not _has_display():
        errors.print("[yellow]note:[/] --show: no display here (DISPLAY is not set); open the files listed above")
        return
    for path in paths:
        typer.launch(str(path))


@app.command()
def visualize(
    ctx: typer.Context,
    run: Annotated[Path, typer.Argument(help="A run directory written by a recipe.", show_default=False)],
    method: Annotated[
        str, typer.Option("--method", help="Projection of N-D embeddings to 2-D: umap, pca or tsne.")
    ] = "umap",
    formats: Annotated[
        list[str] | None, typer.Option("--format", help="png (default), svg or pdf; repeatable.")
    ] = None,
    output_dir: Annotated[
        Path | None, typer.Option("--output-dir", help="Where to write \\[default: RUN/figures].")
    ] = None,
    only: Annotated[
        list[str] | None,
        typer.Option("--only", help="Draw only these: scatter, thumbnails, gallery, animation, curves; repeatable."),
    ] = None,
    queries: Annotated[int, typer.Option("--queries", help="Test queries in the retrieval gallery.")] = 8,
    k: Annotated[int, typer.Option("--k", help="Results shown per query in the gallery.")] = 5,
    show: Annotated[bool, typer.Option("--show", help="Open the figures where a display exists.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed for projections and query choice.")] = 0,
    as_json: JsonOption = False,
    plugins: PluginsOption = None,
) -> None:
    """Figures of a run: 2-D embedding scatter, image thumbnails, retrieval gallery, training GIF and curves.

    Embeddings of more than 2 dimensions are projected with --method (named in each title); the GIF
    projects every epoch with one PCA fitted on the last epoch, so the frames share their axes.
    """
    from metriclab.viz.figures import FIGURES, visualize_run

    with _reporting(ctx.obj["debug"], "visualizing"):
        (loaded,) = _runs([run], plugins)
        paths = visualize_run(
            loaded, method, formats or ["png"], output_dir, only or FIGURES, queries=queries, k=k, seed=seed
        )
    if as_json:
        print(json.dumps({"run": str(run), "files": [str(p) for p in paths]}, indent=2))
    else:
        for path in paths:
            console.print(f"wrote {path}", highlight=False, soft_wrap=True)
    if show:
        _show(paths)


@app.command()
def compare(
    ctx: typer.Context,
    runs: RunArgs,
    max_points: Annotated[
        int, typer.Option("--max-points", help="Test points used (a fixed random subset when there are more).")
    ] = 10000,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", help="Figure path, or a folder for compare.png \\[default: FIRST_RUN/figures/compare.png]."
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the subset and the projections.")] = 0,
    show: Annotated[bool, typer.Option("--show", help="Open the figure where a display exists.")] = False,
    as_json: JsonOption = False,
    plugins: PluginsOption = None,
) -> None:
    """UMAP of the raw pixels next to each run's 2-D view of the same test points, with faithfulness scores.

    A 2-D embedding is shown as learned; an N-D one through UMAP and PCA. The table gives 5-NN accuracy
    in 2-D, trustworthiness (sklearn; '-' where nothing was projected), silhouette and seconds per projection.
    The first UMAP in a fresh environment compiles numba kernels (cached on disk afterwards).
    """
    from metriclab.viz.figures import compare_runs

    with _reporting(ctx.obj["debug"], "comparing"):
        figure, rows = compare_runs(_runs(runs, plugins), max_points=max_points, output=output, seed=seed)
    if as_json:
        print(json.dumps({"figure": str(figure), "rows": rows}, indent=2))
    else:
        console.print(comparison_table(rows))
        console.print(f"wrote {figure}", highlight=False, soft_wrap=True)
    if show:
        _show([figure])


# -- embed / search / export: thin wrappers over metriclab.inference -------------------------------

RunArg = Annotated[Path, typer.Argument(help="A run directory written by a recipe.", show_default=False)]
DeviceOption = Annotated[
    str | None, typer.Option("--device", help="cpu, cuda or cuda:N \\[default: cuda when available].")
]
BatchOption = Annotated[int, typer.Option("--batch-size", help="Images embedded per batch.")]


@contextlib.contextmanager
def _progress(what: str) -> Iterator[Any]:
    """A rich progress bar on stderr (a terminal; into a file or pipe it would leave only empty lines); yields a
    ``(done, total)`` callback."""
    if not errors.is_terminal:
        yield lambda done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=errors, transient=True) as bar:
        task = bar.add_task(what, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _load_model(run: Path, plugins: Sequence[str] | None, device: str | None) -> Any:
    from metriclab.inference import load_model

    (loaded,) = _runs([run], plugins)
    return load_model(loaded, device)


@app.command()
def embed(
    ctx: typer.Context,
    run: RunArg,
    inputs: Annotated[
        str,
        typer.Argument(
            help="A folder of images (class sub-folders become labels), a dataset CSV (columns label, path; "
            "optionally split, is_query, is_gallery) or DATASET:SPLIT such as mnist:test.",
            show_default=False,
        ),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Embedding file to write: .npz or .parquet.")],
    batch_size: BatchOption = 256,
    device: DeviceOption = None,
    skip_unreadable: Annotated[
        bool,
        typer.Option(
            "--skip-unreadable", help="Leave out image files that cannot be read (listed in the file's meta)."
        ),
    ] = False,
    as_json: JsonOption = False,
    plugins: PluginsOption = None,
) -> None:
    """Embed images with a trained run; writes embeddings, labels (when known) and image paths.

    Every file's header is read first, so an unreadable image stops the command before it embeds anything.
    """
    from metriclab.inference.search import embed_inputs, save_embedding_set

    with _reporting(ctx.obj["debug"], "loading the model"):
        model = _load_model(run, plugins, device)
        start = time.perf_counter()
        with _progress(f"embedding {inputs}") as progress:
            data = embed_inputs(model, inputs, batch_size, progress, skip_unreadable)
        seconds = time.perf_counter() - start
        path = save_embedding_set(output, data)
    summary = {
        "output": str(path),
        "count": len(data),
        "dim": int(data.embeddings.shape[1]),
        "labels": data.labels is not None,
        "device": str(model.device),
        "seconds": round(seconds, 3),
        "skipped_unreadable": data.meta.get("skipped_unreadable", []),
    }
    if skipped := summary["skipped_unreadable"]:
        errors.print(
            f"left out {len(skipped)} unreadable image(s), listed in the file's meta: {', '.join(skipped[:3])}"
            + (" ..." if len(skipped) > 3 else ""),
            highlight=False,
            soft_wrap=True,
        )
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    labelled = "with labels" if data.labels is not None else "without labels"
    console.print(
        f"embedded {len(data):,} images ({data.meta['source']}, {labelled}) into {summary['dim']}-D on "
        f"{model.device} in {seconds:.1f} s; wrote {path}",
        highlight=False,
        soft_wrap=True,
    )


def _search_table(queries: Any, gallery: Any, result: Any, left_out: int = 0) -> Table:
    mine = f"; {left_out:,} queries' own gallery image left out" if left_out else ""
    table = Table(
        title=f"{result.indices.shape[1]} nearest of {len(gallery):,} gallery images ({result.metric} distance{mine})",
        title_justify="left",
        header_style="bold",
    )
    for name, justify in (("query", "left"), ("#", "right"), ("path", "left"), ("distance", "right")):
        table.add_column(name, justify=justify, overflow="fold")
    if gallery.labels is not None:
        table.add_column("label")
    for q in range(len(queries)):
        for rank, (j, d) in enumerate(zip(result.indices[q], result.distances[q], strict=True), start=1):
            row = [str(queries.paths[q]) if rank == 1 else "", str(rank), str(gallery.paths[j]), f"{d:.4f}"]
            if gallery.labels is not None:
                same = queries.labels is not None and gallery.labels[j] == queries.labels[q]
                row.append(f"[green]{gallery.labels[j]}[/]" if same else str(gallery.labels[j]))
            table.add_row(*row, end_section=rank == len(result.indices[q]))
    return table


def _search_figure(model: Any, queries: Any, gallery: Any, result: Any, path: Path) -> Path:
    import numpy as np

    from metriclab.viz import plots

    k = result.indices.shape[1]
    shown = min(len(queries), 8)
    q_boxes, g_boxes = queries.boxes(), gallery.boxes()
    q_images = model.images(queries.paths[:shown], None if q_boxes is None else q_boxes[:shown])
    found = result.indices[:shown].reshape(-1)
    r_images = model.images(gallery.paths[found], None if g_boxes is None else g_boxes[found])
    r_images = r_images.reshape(shown, k, *r_images.shape[1:])
    names: list[str] = ["(unlabelled)"]
    q_ids = np.zeros(shown, dtype=np.int64)
    r_ids = np.zeros((shown, k), dtype=np.int64)
    title = f"{k} nearest gallery images, {result.metric} distance"
    if gallery.labels is not None:
        names = sorted(
            {str(v) for v in gallery.labels} | {str(v) for v in (queries.labels if queries.labels is not None else [])}
        )
        lookup = {n: i for i, n in enumerate(names)}
        r_ids = np.vectorize(lambda v: lookup[str(v)])(gallery.labels[result.indices[:shown]])
        if queries.labels is not None:
            q_ids = np.array([lookup[str(v)] for v in queries.labels[:shown]])
        else:
            names = names + ["?"]
            q_ids[:] = len(names) - 1
    judged = queries.labels is not None and gallery.labels is not None  # else no frame says right or wrong
    return plots.retrieval_gallery(
        q_images, q_ids, r_images, r_ids, path, class_names=names, title=title, judged=judged
    )


@app.command()
def search(
    ctx: typer.Context,
    run: RunArg,
    queries: Annotated[
        list[str],
        typer.Argument(
            help="Query image files, a folder, a dataset CSV, DATASET:SPLIT, or an embedding file.",
            show_default=False,
        ),
    ],
    gallery: Annotated[
        str,
        typer.Option(
            "--gallery", help="An embedding file from `metriclab embed` (embedded once), or images to embed now."
        ),
    ],
    k: Annotated[int, typer.Option("--k", "-k", help="Results per query.")] = 5,
    metric: Annotated[
        str | None, typer.Option("--metric", help="euclidean or cosine \\[default: the run's recipe metric].")
    ] = None,
    approximate: Annotated[
        bool,
        typer.Option("--approximate", help="faiss IVF index instead of exact search; prints its recall@k vs exact."),
    ] = False,
    figure: Annotated[
        Path | None, typer.Option("--figure", help="Write a gallery figure (first 8 queries) to this .png/.svg/.pdf.")
    ] = None,
    evaluate: Annotated[
        bool,
        typer.Option("--evaluate", help="Also score the labelled queries against the labelled gallery (MAP@R, P@k)."),
    ] = False,
    batch_size: BatchOption = 256,
    device: DeviceOption = None,
    as_json: JsonOption = False,
    plugins: PluginsOption = None,
) -> None:
    """The K nearest gallery images of each query, exact by default (chunked: no full distance matrix)."""
    from metriclab.inference.search import embedding_set, own_items, search_scores
    from metriclab.inference.search import search as nearest

    with _reporting(ctx.obj["debug"], "loading the model"):
        model = _load_model(run, plugins, device)
        with _progress("embedding the gallery") as progress:
            data = embedding_set(model, gallery, batch_size, progress)
        with _progress("embedding the queries") as progress:
            query_set = embedding_set(model, queries if len(queries) > 1 else queries[0], batch_size, progress)
        # Scored queries leave their own gallery item out (as evaluate's leave-one-out): so do the results shown.
        own = own_items(query_set, data) if evaluate else None
        left_out = int((own >= 0).sum()) if own is not None else 0
        method = "faiss-ivf" if approximate else None
        result = nearest(query_set.embeddings, data, k, metric or model.metric, approximate=method, exclude=own)
        scores = search_scores(query_set, data, k, result.metric) if evaluate else None
        if evaluate and any("is_query" in d.columns or "split" in d.columns for d in (query_set, data)):
            errors.print(
                "note: a CSV's split and is_query/is_gallery marks are kept in the files but not applied here: every "
                "row given is searched (less itself). `metriclab evaluate RUN --dataset csv --data-dir FILE.csv` "
                "scores the CSV's own protocol",
                highlight=False,
            )
        written = _search_figure(model, query_set, data, result, figure) if figure is not None else None
    if as_json:
        rows = [
            {
                "query": str(query_set.paths[q]),
                **({"label": query_set.labels[q].item()} if query_set.labels is not None else {}),
                "results": [
                    {
                        "path": str(data.paths[j]),
                        "distance": float(d),
                        "index": int(j),
                        **({"label": data.labels[j].item()} if data.labels is not None else {}),
                    }
                    for j, d in zip(result.indices[q], result.distances[q], strict=True)
                ],
            }
            for q in range(len(query_set))
        ]
        out = {"metric": result.metric, "k": int(result.indices.shape[1]), "exact": result.exact, "queries": rows}
        out["own_items_left_out"] = left_out
        if not result.exact:
            out["recall_vs_exact"] = result.recall
        if scores is not None:
            out["scores"] = scores
        print(json.dumps(out, indent=2))
    else:
        console.print(_search_table(query_set, data, result, left_out))
        if scores is not None:
            console.print(_scores_line(scores, len(query_set)), highlight=False)
    if not result.exact:
        errors.print(
            f"approximate search (faiss IVF): recall@{result.indices.shape[1]} {result.recall:.4f} against exact "
            f"search on {result.recall_queries} queries",
            highlight=False,
        )
    if written is not None:
        errors.print(f"wrote {written}", highlight=False, soft_wrap=True)


def _scores_line(scores: dict, queries: int) -> str:
    """One line of ``search --evaluate``'s scores, saying which queries they cover."""
    scored, held = scores["queries_scored"], scores["queries_in_gallery"]
    shown = ", ".join(f"{_header(key)} {value:.4f}" for key, value in scores.items() if not key.startswith("queries"))
    notes = [f"{queries - scored:,} have no other item of their class in the gallery"] if scored < queries else []
    notes += [f"{held:,} are gallery items, each left out of its own ranking"] if held else []
    whom = f"{scored:,} labelled queries" if scored == queries else f"{scored:,} of {queries:,} labelled queries"
    return f"{whom} vs the gallery: {shown}" + (f" ({'; '.join(notes)})" if notes else "")


@app.command()
def export(
    ctx: typer.Context,
    run: RunArg,
    fmt: Annotated[str, typer.Option("--format", help="onnx or torchscript.")] = "onnx",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="File to write \\[default: RUN/model.FORMAT].")
    ] = None,
    check_inputs: Annotated[
        str | None,
        typer.Option("--check-inputs", help="Images to check the export on \\[default: the run's test split]."),
    ] = None,
    as_json: JsonOption = False,
    plugins: PluginsOption = None,
) -> None:
    """Export the run's network (dynamic batch; preprocessing in the metadata) and check it against PyTorch."""
    from metriclab.inference.export import export_model

    with _reporting(ctx.obj["debug"], "loading the model"):
        model = _load_model(run, plugins, "cpu")
        suffix = {"onnx": ".onnx", "torchscript": ".pt"}.get(fmt, f".{fmt}")
        path = output if output is not None else Path(run) / f"model{suffix}"
        spec = check_inputs or f"{model.run.config.get('recipe', {}).get('dataset')}:test"
        items = model.inputs(spec)
        count = min(len(items), 64)
        images = items.batches(model.input_shape, model.transform)(0, count)
        result = export_model(model, path, fmt, images)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    console.print(
        f"wrote {result['path']} ({fmt}, dynamic batch, preprocessing in its metadata); ran it on {count} images "
        f"of {items.source} at batch sizes {result['batch_sizes']}: largest difference vs PyTorch "
        f"{result['max_abs_diff']:.2e}",
        highlight=False,
        soft_wrap=True,
    )
