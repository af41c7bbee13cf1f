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

from drkd import cli
from drkd.config import UserError, load_params
from drkd.report_stage import write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", required=True, help="model names, reference first")
    parser.add_argument("--eval-dir", default="eval", help="<eval-dir>/<NAME>/ of each model")
    parser.add_argument("--histories", nargs="*", default=[],
                        help="loss-history CSVs; subplot title = file stem without 'train_'")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--summary", required=True, help="summary json to write")
    parser.add_argument("--headline", help="json of AP gain and gap closed alone to write")
    parser.add_argument("--table", required=True, help="markdown table to write")
    parser.add_argument("--plots-dir", required=True)
    parser.add_argument("--params", default="params.yaml")
    relations = parser.add_argument_group(
        "relation plots", "all three or none: draw pixel_relations.png / instance_relations.png")
    relations.add_argument("--teacher", help="teacher checkpoint (models/teacher.pt)")
    relations.add_argument("--distilled", help="distilled student checkpoint")
    relations.add_argument("--modules", help="its training-only DRKD modules (drkd_modules.pt)")
    args = parser.parse_args(argv)
    given = [args.teacher, args.distilled, args.modules]
    if any(given) and not all(given):
        raise UserError("--teacher, --distilled and --modules go together (relation plots)")
    relation_files = (Path(args.teacher), Path(args.distilled), Path(args.modules)) if all(
        given) else None
    print(write_report(
        load_params(args.params), args.models, Path(args.eval_dir),
        [Path(h) for h in args.histories], Path(args.data), Path(args.summary),
        Path(args.table), Path(args.plots_dir), args.headline and Path(args.headline),
        relation_files))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
