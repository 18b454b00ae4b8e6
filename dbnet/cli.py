"""The `dbnet` command line: parses options, builds objects, calls the library."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from dbnet import __version__
from dbnet.errors import DBNetError

if TYPE_CHECKING:
    from dbnet.data.check import AuditReport

app = typer.Typer(
    name="dbnet",
    help="Train, evaluate and deploy DBNet text detectors.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
data_app = typer.Typer(help="Inspect datasets before training on them.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turns errors caused by user input into one line on stderr and exit code 1."""
    try:
        yield
    except (DBNetError, OSError) as exc:
        # An OSError is the user's when it is about a path: missing, not allowed, or naming
        # the file the system refused (read-only folder, a file where a folder goes, disk full).
        expected = (DBNetError, FileNotFoundError, NotADirectoryError, PermissionError)
        if not isinstance(exc, expected) and getattr(exc, "filename", None) is None:
            raise
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dbnet {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False,
) -> None:
    """Train, evaluate and deploy DBNet text detectors."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )


# ---- data check / data show --------------------------------------------------------------

# Lines of each problem list printed in the readable summary; --json prints them all.
_SHOWN_PROBLEMS = 50


@data_app.command("check")
def data_check(
    root: Annotated[
        Path,
        typer.Argument(
            exists=True, file_okay=False, help="Dataset folder (images/ + gts/, or both in one)."
        ),
    ],
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of a summary.")
    ] = False,
    strict: Annotated[
        bool, typer.Option("--strict", help="Exit with 1 when any error is found.")
    ] = False,
    min_text_size: Annotated[
        float,
        typer.Option("--min-text-size", help="Shorter side (px) under which text is ignored."),
    ] = 8,
    shrink_ratio: Annotated[
        float, typer.Option("--shrink-ratio", help="Shrink ratio of the training targets.")
    ] = 0.4,
    verify: Annotated[
        bool,
        typer.Option("--verify/--no-verify", help="Decode every image to find truncated files."),
    ] = True,
) -> None:
    """Audit a dataset: counts, ignored instances by reason, every problem with file and line.

    Exit code 1 when the set is unusable: no readable image with a gt file,
    no usable text instance, or (with --strict) any error.
    """
    # Imported here: the audit pulls in the geometry libraries, which `dbnet --help` does not need.
    from dbnet.data.check import audit_dataset

    with user_errors():
        report = audit_dataset(
            root,
            strict=strict,
            min_text_size=min_text_size,
            shrink_ratio=shrink_ratio,
            verify_images=verify,
        )

    if json_output:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _print_audit(report)
    if report.failures:
        for failure in report.failures:
            typer.secho(f"unusable: {failure}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


def _print_audit(report: AuditReport) -> None:
    """Prints an audit report as a few lines of counts, then its problems, one a line."""
    ignored = ", ".join(f"{reason} {count}" for reason, count in sorted(report.ignored.items()))
    typer.echo(f"dataset    {report.root}")
    typer.echo(f"images     {report.images} ({report.empty_images} without text)")
    typer.echo(
        f"instances  {report.instances}: {report.care} care, {report.usable} usable"
        f", {report.repaired} repaired"
    )
    typer.echo(f"ignored    {ignored or 'none'}")
    for title, problems in (("errors", report.errors), ("warnings", report.warnings)):
        typer.echo(f"{title:<10} {len(problems)}")
        for problem in problems[:_SHOWN_PROBLEMS]:
            typer.echo(f"  {problem}")
        if len(problems) > _SHOWN_PROBLEMS:
            typer.echo(f"  ... and {len(problems) - _SHOWN_PROBLEMS} more (see --json)")


@data_app.command("show")
def data_show(
    directory: Annotated[
        Path,
        typer.Argument(exists=True, file_okay=False, help="Dataset folder (images/ + gts/)."),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", dir_okay=False, help="Picture to write (.png).")
    ],
    index: Annotated[
        int, typer.Option("--index", "-i", min=0, help="Sample index, in image-name order.")
    ] = 0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random augmentation.")] = 0,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            exists=True,
            dir_okay=False,
            help="YAML configuration whose data section sets the augmentation and targets.",
        ),
    ] = None,
) -> None:
    """Draw one augmented training sample and its targets in one picture.

    Left to right: the crop with its polygons (green: care, red: ###), the shrink map
    (purple where the loss mask is 0) and the threshold map.
    """
    with user_errors():
        # Imported here: the dataset pulls in torch, which `dbnet --help` does not need.
        from dbnet.config import load_config
        from dbnet.data.dataset import DetectionDataset
        from dbnet.visualize import save_sample_picture

        data_config = load_config(config).data
        dataset = DetectionDataset(directory, data_config, train=True, seed=seed)
        written = save_sample_picture(dataset, index, out)
    typer.echo(f"wrote {written}")


# ---- train -------------------------------------------------------------------------------


@app.command("train")
def train_command(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            exists=True,
            dir_okay=False,
            help="YAML configuration. Optional with --resume (the checkpoint's is used).",
        ),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-s",
            metavar="KEY=VALUE",
            help="Change one setting, e.g. --set train.batch_size=4 (repeatable).",
        ),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            exists=True,
            help="Run folder (its checkpoints/last.pt) or checkpoint file to continue.",
        ),
    ] = None,
    more_overrides: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="KEY=VALUE", help="More settings, as with --set.", show_default=False
        ),
    ] = None,
) -> None:
    """Train a detector: a new run folder with config.yaml, train.log, TensorBoard events
    and checkpoints/last.pt and best.pt; ends with precision, recall and hmean of best.pt.

    Ctrl-C or SIGTERM saves last.pt and stops; --resume continues exactly where it stopped.
    Under torchrun each process runs this command and train.batch_size is per process.
    """
    # Imported here: torch takes seconds to load, which `dbnet --help` does not need.
    from dbnet.engine.train import prepare_config, read_final_eval, train

    with user_errors():
        started = time.time()
        settings = [*(overrides or []), *(more_overrides or [])]
        run_dir = train(prepare_config(config, settings, resume), resume)
        scores = read_final_eval(run_dir, written_after=started)

    minutes, seconds = divmod(round(time.time() - started), 60)
    typer.echo(f"run folder: {run_dir} (finished in {minutes} min {seconds:02d} s)")
    if scores is not None:
        _print_final_eval(scores)
    typer.echo(f"TensorBoard: tensorboard --logdir {run_dir}")


def _print_final_eval(scores: dict) -> None:
    """Prints which weights were scored on which set, then the scores table."""
    checkpoint = Path(scores["checkpoint"]).name
    chosen = ", best validation hmean" if checkpoint == "best.pt" else ", final weights"
    split = "test set" if scores.get("split") == "test" else "validation set"
    typer.echo(
        f"final evaluation: {checkpoint} (step {scores['step']}{chosen}) on the {split} "
        f"{scores['data_dir']} ({scores['images']} images, eval size {scores['eval_size']})"
    )
    _print_scores(scores)


# ---- eval / predict / export -------------------------------------------------------------


@app.command("eval")
def eval_command(
    gt_dir: Annotated[
        Path | None,
        typer.Option(
            "--gt-dir",
            exists=True,
            help="Folder or .zip of gt_<name>.txt files (ICDAR 2015 format).",
            rich_help_panel="Result files",
        ),
    ] = None,
    pred_dir: Annotated[
        Path | None,
        typer.Option(
            "--pred-dir",
            exists=True,
            help="Folder or .zip of res_<name>.txt files: x1,y1,...,x4,y4[,score] per line.",
            rich_help_panel="Result files",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            exists=True,
            dir_okay=False,
            help="YAML configuration (default: the one stored in the checkpoint).",
            rich_help_panel="Model",
        ),
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint",
            dir_okay=False,
            help="Trained model to run on the dataset; it fixes the architecture.",
            rich_help_panel="Model",
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            exists=True,
            file_okay=False,
            help="Dataset folder to evaluate on (default: data.val_dir of the configuration).",
            rich_help_panel="Model",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            file_okay=False,
            help="Folder for res_<name>.txt, submission.zip and scores.json; never an existing "
            "one (-2, -3, ... is appended). Default: <run folder>/eval-<data>-<time>.",
            rich_help_panel="Model",
        ),
    ] = None,
    sweep: Annotated[
        bool,
        typer.Option(
            "--sweep",
            help="Also score box_thresh 0.30 to 0.80 by 0.05 (or eval.sweep_box_thresh), "
            "in a separate table: optimistic when chosen on the test set.",
            rich_help_panel="Model",
        ),
    ] = False,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-s",
            metavar="KEY=VALUE",
            help="Change one setting, e.g. --set postprocess.box_thresh=0.5 (repeatable).",
            rich_help_panel="Model",
        ),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of a table.")
    ] = False,
) -> None:
    """Score text detections with the ICDAR 2015 protocol: precision, recall, hmean.

    Give result files with their gt files (--gt-dir, --pred-dir), or a model (--checkpoint).
    With a model: its stored configuration is used, --config is merged over it and --set
    applies last (the architecture always comes from the checkpoint). The model runs once
    per image; the detections are written as res_<name>.txt files and a submission zip.
    """
    files_mode = gt_dir is not None or pred_dir is not None
    model_options = (config, data, out, overrides or None, sweep or None)
    model_mode = checkpoint is not None or any(v is not None for v in model_options)
    if files_mode == model_mode:
        raise typer.BadParameter("give either --gt-dir and --pred-dir, or --checkpoint")
    if files_mode and (gt_dir is None or pred_dir is None):
        raise typer.BadParameter("--gt-dir and --pred-dir go together")
    if model_mode and checkpoint is None:
        raise typer.BadParameter("--config, --data, --out, --sweep and --set need --checkpoint")

    with user_errors():
        if files_mode:
            # Imported here: the metric pulls in shapely, which `dbnet --help` does not need.
            from dbnet.metrics import evaluate_folders

            result = evaluate_folders(gt_dir, pred_dir)
        else:
            # Imported here: the engine pulls in torch, which `dbnet --help` does not need.
            from dbnet.engine.evaluate import evaluate_checkpoint

            result = evaluate_checkpoint(
                checkpoint=checkpoint,
                config_path=config,
                data_dir=data,
                out_dir=out,
                sweep=sweep,
                overrides=overrides or [],
            )

    if json_output:
        typer.echo(json.dumps(result, default=str))
        return
    _print_scores(result)
    if "out_dir" in result:
        typer.echo(f"{result['images']} images; result files in {result['out_dir']}")
        typer.echo(f"submission: {result['zip']}")
    if "sweep" in result:
        _print_sweep(result["sweep"], result["box_thresh"])


def _print_scores(result: dict) -> None:
    """Prints precision, recall, hmean and their counts as a table."""
    title = "ICDAR 2015 detection"
    if "box_thresh" in result:
        title += f" (box_thresh {result['box_thresh']:g})"
    table = Table(title=title)
    for header in ("Precision", "Recall", "Hmean", "Matched", "GT care", "Det care"):
        table.add_column(header, justify="right")
    table.add_row(
        *(f"{result[k]:.4f}" for k in ("precision", "recall", "hmean")),
        *(str(result[k]) for k in ("matched", "gt_care", "det_care")),
    )
    Console().print(table)


def _print_sweep(sweep: dict, fixed: float) -> None:
    """Prints the box_thresh sweep, one row per threshold, with its warning."""
    table = Table(title="box_thresh sweep (chosen on this set: optimistic)", caption=sweep["note"])
    for header in ("box_thresh", "Precision", "Recall", "Hmean", "Matched", "Det care", ""):
        table.add_column(header, justify="right")
    for row in sweep["results"]:
        marks = [
            mark
            for mark, on in (("fixed", row["box_thresh"] == fixed), ("best", row == sweep["best"]))
            if on
        ]
        table.add_row(
            f"{row['box_thresh']:.2f}",
            *(f"{row[k]:.4f}" for k in ("precision", "recall", "hmean")),
            *(str(row[k]) for k in ("matched", "det_care")),
            ", ".join(marks),
        )
    Console().print(table)


@app.command("predict")
def predict_command(
    inputs: Annotated[
        list[Path],
        typer.Argument(exists=True, help="Image files, or folders of images (not recursive)."),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            file_okay=False,
            help="Folder for <name>.jpg, res_<name>.txt and predictions.json (may exist).",
        ),
    ],
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint",
            exists=True,
            dir_okay=False,
            help="Trained PyTorch checkpoint to run.",
            rich_help_panel="Model",
        ),
    ] = None,
    onnx: Annotated[
        Path | None,
        typer.Option(
            "--onnx",
            exists=True,
            dir_okay=False,
            help="ONNX file written by `dbnet export`, run with onnxruntime.",
            rich_help_panel="Model",
        ),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Change the stored configuration, e.g. --set postprocess.box_thresh=0.5.",
            rich_help_panel="Model",
        ),
    ] = None,
    device: Annotated[
        str, typer.Option("--device", help="auto, cpu or cuda.", rich_help_panel="Model")
    ] = "auto",
    scores: Annotated[
        bool,
        typer.Option("--scores/--no-scores", help="Append the score to each res_<name>.txt line."),
    ] = False,
    draw: Annotated[
        bool, typer.Option("--draw/--no-draw", help="Write the pictures with detections drawn.")
    ] = True,
) -> None:
    """Detect text in images with a checkpoint or an exported ONNX model.

    Writes, per image, the picture with its detections drawn (<name>.jpg) and the
    ICDAR 2015 result file (res_<name>.txt: x1,y1,...,x4,y4 integers per line, a score
    appended with --scores), and predictions.json for all images. An unreadable image is
    reported and skipped; the exit code is then 1, after the other images are done.
    """
    if (checkpoint is None) == (onnx is None):
        raise typer.BadParameter("give exactly one of --checkpoint and --onnx")

    with user_errors():
        # Imported here: the predictor pulls in torch, which `dbnet --help` does not need.
        from dbnet.engine.predict import Predictor, predict_images

        if checkpoint is not None:
            predictor = Predictor.from_checkpoint(checkpoint, device, overrides or [])
        else:
            predictor = Predictor.from_onnx(onnx, device, overrides or [])
        run = predict_images(predictor, inputs, out, draw=draw, with_scores=scores)

    boxes = sum(len(p.detections) for p in run.predictions)
    typer.echo(f"{len(run.predictions)} images, {boxes} detections -> {run.json_path}")
    if run.failed:
        for file, reason in run.failed:
            typer.secho(f"skipped {file}: {reason}", fg=typer.colors.RED, err=True)
        typer.secho(f"{len(run.failed)} images could not be read", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


@app.command("export")
def export_command(
    checkpoint: Annotated[
        Path,
        typer.Option("--checkpoint", exists=True, dir_okay=False, help="Checkpoint to export."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", dir_okay=False, help="The .onnx file.")],
    opset: Annotated[
        int | None,
        typer.Option("--opset", help="ONNX operator set (default 18; 19 for deformable convs)."),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Change the configuration embedded in the file, e.g. postprocess.box_thresh=0.5.",
        ),
    ] = None,
) -> None:
    """Export a checkpoint's probability branch to ONNX, with its configuration embedded.

    Input `image` (N, 3, H, W) float32, normalised RGB, H and W multiples of 32; output
    `prob` (N, 1, H, W); batch, height and width are dynamic. The file is checked with
    onnx.checker and onnxruntime before it is written. Run it with `dbnet predict --onnx`.
    """
    with user_errors():
        # Imported here: the exporter pulls in torch and onnx, which `dbnet --help` does not need.
        from dbnet.export import export_checkpoint

        report = export_checkpoint(checkpoint, out, opset, overrides or [])
    typer.echo(
        f"wrote {report.path} (opset {report.opset}; max |torch - onnxruntime| "
        f"{report.max_abs_diff:.1e} on a {'x'.join(map(str, report.check_shape))} input)"
    )


# ---- synth -------------------------------------------------------------------------------


def _parse_size(value: str) -> tuple[int, int]:
    """Reads WIDTHxHEIGHT, such as 640x480, as (width, height)."""
    width, sep, height = value.lower().partition("x")
    if not sep or not width.strip().isdigit() or not height.strip().isdigit():
        raise typer.BadParameter(f"expected WIDTHxHEIGHT such as 640x480, got {value!r}")
    return int(width), int(height)


@app.command("synth")
def synth(
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", file_okay=False, help="Folder to create (it may exist if empty)."
        ),
    ],
    count: Annotated[int, typer.Option("--count", "-n", min=1, help="Number of images.")],
    seed: Annotated[
        int, typer.Option("--seed", min=0, help="Random seed: one seed, one set of files.")
    ] = 0,
    size: Annotated[
        str, typer.Option("--size", help="Image size as WIDTHxHEIGHT.", show_default=True)
    ] = "640x480",
) -> None:
    """Write synthetic scene-text images with exact word boxes, in ICDAR 2015 layout.

    Creates OUT/images/img_N.jpg and OUT/gts/gt_img_N.txt (tiny and blurred words are ###,
    some images have no text). Never writes into a folder that already holds files.
    """
    width, height = _parse_size(size)
    with user_errors():
        # Imported here: the generator pulls in OpenCV, which `dbnet --help` does not need.
        from dbnet.data.synth import generate_dataset

        summary = generate_dataset(out, count, seed, size=(width, height))
    typer.echo(
        f"wrote {summary.images} images ({summary.words} words, {summary.dont_care} ###, "
        f"{summary.empty_images} without text) to {summary.out_dir} in {summary.seconds:.1f} s"
    )


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
