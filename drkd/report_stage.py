"""The `report` stage's run: every model's metrics and detections -> the summary json, the
headline json, the markdown table and the plots, logged to one MLflow run. Kept apart from
drkd.report, whose summary helpers the leaderboard uses without the plots' imports."""

from __future__ import annotations

from pathlib import Path

from drkd import plots, relations_plot, report
from drkd.config import Params, UserError
from drkd.files import require_files, write_json, write_text
from drkd.tracking import stage_run


def write_report(params: Params, models: list[str], eval_dir: Path, histories: list[Path],
                 data: Path, summary_file: Path, table_file: Path, plots_dir: Path,
                 headline_file: Path | None = None,
                 relation_files: tuple[Path, Path, Path] | None = None) -> str:
    """Every model's ``eval_dir/<NAME>/metrics.json`` and ``detections.json`` and the loss
    histories -> the summary json, the headline json (each later model's gain and gap closed),
    the markdown table and the plots (``plots_dir``), all logged to one MLflow run.
    ``relation_files`` (teacher, distilled student, DRKD modules) adds the relation plots.
    Returns the table's overall part, for the console."""
    if len(set(models)) != len(models):
        raise UserError(f"--models: duplicate names in {models}")
    metrics_files = {m: eval_dir / m / "metrics.json" for m in models}
    detection_files = {m: eval_dir / m / "detections.json" for m in models}
    require_files([*metrics_files.values(), *detection_files.values(), *histories,
                   *(relation_files or ()), data / "val.json"])
    metrics = {m: report.read_metrics(f) for m, f in metrics_files.items()}
    titles = [h.stem.removeprefix("train_") for h in histories]
    if len(set(titles)) < len(titles):  # one panel would silently replace the other
        raise UserError(f"--histories: two files named alike ({', '.join(map(str, histories))}); "
                        "each names its loss panel")
    curves = {t: report.read_history(h) for t, h in zip(titles, histories, strict=True)}
    curves = {name: h for name, h in curves.items() if h["step"]}  # trained for 0 steps: no panel
    evaluate = params.evaluate
    logged = {
        "models": ",".join(models),
        "evaluate": {  # the keys this stage reads, as in its params deps in dvc.yaml
            "num_vis_images": evaluate.num_vis_images,
            "vis_score_thresh": evaluate.vis_score_thresh,
        },
    }
    with stage_run(params.tracking, "report", logged, data) as run:
        run.log_dataset(data / "val.json", "evaluation")  # its images in detections.png
        summary = report.summarize(metrics)
        write_json(summary, summary_file)
        if headline_file:
            write_json(report.headline_gain(summary), headline_file)
        table = report.markdown_table(metrics)
        write_text(table, table_file)
        plots.plot_loss_curves(curves, plots_dir / "loss_curves.png")
        plots.plot_ap_by_size(metrics, plots_dir / "ap_by_size.png")
        plots.write_ap_by_size_csv(metrics, plots_dir / "ap_by_size.csv")
        detections = {m: report.read_json(f) for m, f in detection_files.items()}
        plots.plot_detections(data / "val.json", detections, evaluate.num_vis_images,
                              evaluate.vis_score_thresh, plots_dir / "detections.png")
        written = []
        if relation_files:
            teacher, distilled, modules = relation_files
            written = relations_plot.plot_relations(
                teacher, distilled, modules, data / "val.json", evaluate.num_vis_images, plots_dir)
        run.log_metrics(report.summary_numbers(summary))
        for path in (summary_file, headline_file, table_file):
            if path:
                run.log_artifact(path)
        for name in ("loss_curves.png", "ap_by_size.png", "ap_by_size.csv", "detections.png"):
            run.log_artifact(plots_dir / name, "plots")
        for path in written:
            run.log_artifact(path, "plots")
    return table.split("\n\n## Per-class")[0]
