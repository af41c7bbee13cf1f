"""DVC stage `report`: every model's metrics + detections -> summary json, markdown table, plots.

Reads ``<eval-dir>/<NAME>/metrics.json`` and ``<eval-dir>/<NAME>/detections.json`` (what
the evaluate stage writes) for each ``--models`` name (any number >= 1; the first is the
reference for ``gap_to_first``, and with 3 or more, e.g. ``teacher student student_drkd``,
every model after the second gets ``gain_over_<second>`` and ``gap_closed``) and the
loss-history CSVs. Writes the summary json (every metric and delta), the ``--headline`` json
(the DVC metrics file: each later model's AP gain and gap closed alone), the markdown table,
and in ``--plots-dir`` loss_curves.png, ap_by_size.png
(+ ap_by_size.csv for `dvc plots`) and detections.png. With ``--teacher``, ``--distilled``
and ``--modules`` (all three) it also draws the DRKD relation plots pixel_relations.png and
instance_relations.png (drkd/relations_plot.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from drkd import cli, plots, relations_plot
from drkd import report as rep
from drkd.config import UserError, load_params
from drkd.files import require_files, write_json, write_text
from drkd.tracking import stage_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", required=True, help="model names, reference first")
    parser.add_argument("--eval-dir", default="eval", help="<eval-dir>/<NAME>/ of each model")
    parser.add_argument(
        "--histories",
        nargs="*",
        default=[],
        help="loss-history CSVs; subplot title = file stem without 'train_'",
    )
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--summary", required=True, help="summary json to write")
    parser.add_argument("--headline", help="json of AP gain and gap closed alone to write")
    parser.add_argument("--table", required=True, help="markdown table to write")
    parser.add_argument("--plots-dir", required=True)
    parser.add_argument("--params", default="params.yaml")
    relations = parser.add_argument_group(
        "relation plots", "all three or none: draw pixel_relations.png / instance_relations.png"
    )
    relations.add_argument("--teacher", help="teacher checkpoint (models/teacher.pt)")
    relations.add_argument(
        "--distilled", help="distilled student checkpoint (models/student_drkd.pt)"
    )
    relations.add_argument(
        "--modules", help="its training-only DRKD modules (models/drkd_modules.pt)"
    )
    args = parser.parse_args(argv)
    relation_files = [args.teacher, args.distilled, args.modules]
    if any(relation_files) and not all(relation_files):
        raise UserError("--teacher, --distilled and --modules go together (relation plots)")
    params = load_params(args.params)
    if len(set(args.models)) != len(args.models):
        raise UserError(f"--models: duplicate names in {args.models}")
    data = Path(args.data)
    metrics_files = {m: Path(args.eval_dir) / m / "metrics.json" for m in args.models}
    detection_files = {m: Path(args.eval_dir) / m / "detections.json" for m in args.models}
    history_files = [Path(h) for h in args.histories]
    relation_paths = [Path(f) for f in relation_files] if all(relation_files) else []
    require_files(
        [
            *metrics_files.values(),
            *detection_files.values(),
            *history_files,
            *relation_paths,
            data / "val.json",
        ]
    )
    metrics = {m: rep.read_metrics(f) for m, f in metrics_files.items()}
    histories = {h.stem.removeprefix("train_"): rep.read_history(h) for h in history_files}
    plots_dir = Path(args.plots_dir)
    logged = {
        "models": ",".join(args.models),
        "evaluate": {  # the keys this stage reads, as in its params deps in dvc.yaml
            "num_vis_images": params.evaluate.num_vis_images,
            "vis_score_thresh": params.evaluate.vis_score_thresh,
        },
    }
    inputs = [data / "train.json", data / "val.json"]
    with stage_run(params.tracking, "report", logged, inputs) as run:
        run.log_dataset(data / "val.json", "evaluation")  # its images in detections.png
        summary = rep.summarize(metrics)
        write_json(summary, args.summary)
        if args.headline:
            write_json(rep.headline_gain(summary), args.headline)
        write_text(rep.markdown_table(metrics), args.table)
        plots.plot_loss_curves(histories, plots_dir / "loss_curves.png")
        plots.plot_ap_by_size(metrics, plots_dir / "ap_by_size.png")
        plots.write_ap_by_size_csv(metrics, plots_dir / "ap_by_size.csv")
        plots.plot_detections(
            data / "val.json",
            {m: rep.read_json(f) for m, f in detection_files.items()},
            params.evaluate.num_vis_images,
            params.evaluate.vis_score_thresh,
            plots_dir / "detections.png",
        )
        written = []
        if relation_paths:
            written = relations_plot.plot_relations(
                args.teacher,
                args.distilled,
                args.modules,
                data / "val.json",
                params.evaluate.num_vis_images,
                plots_dir,
            )
        run.log_metrics(rep.summary_numbers(summary))
        for path in (args.summary, args.headline, args.table):
            if path:
                run.log_artifact(path)
        for name in ("loss_curves.png", "ap_by_size.png", "ap_by_size.csv", "detections.png"):
            run.log_artifact(plots_dir / name, "plots")
        for path in written:
            run.log_artifact(path, "plots")
    print(rep.markdown_table(metrics).split("\n\n## Per-class")[0])
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
