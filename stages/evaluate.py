"""DVC stage `evaluate@<NAME>`: one detector checkpoint -> COCO metrics and raw detections on val.

``--metrics`` (``eval/NAME/metrics.json``) holds AP, AP50, AP75, APs, APm, APl, AR100
(fractions 0..1, -1 where val has no ground truth of that size), ``per_class_AP`` {category
name: AP}, ``parameters`` and ``inference_ms_per_image``. ``--headline``
(``metrics/NAME.json``, the DVC metrics file) holds the first seven only: what
``dvc metrics show`` compares.

``inference_ms_per_image`` is latency, not throughput: the mean wall time of one forward
pass at batch size 1 (the detector's own resize/normalise and postprocessing included, data
loading excluded, CUDA synchronised) over the first ``evaluate.timing_images`` val images,
after one untimed warm-up pass. With ``timing_images: 0`` it is the batched mean from the
metrics pass instead (``evaluate.batch_size`` images per forward).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from drkd import cli
from drkd.checkpoint import check_categories, load_detector, model_card
from drkd.config import load_params
from drkd.data.coco import CocoDetection
from drkd.data.transforms import eval_transforms
from drkd.devices import pick_device
from drkd.evaluation import STAT_NAMES, coco_metrics, ms_per_image, predict
from drkd.files import require_files, write_json
from drkd.models import count_parameters
from drkd.tracking import mlflow_name, stage_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name", help="model name (teacher, student, ...)")
    parser.add_argument("--checkpoint", required=True, help="model checkpoint to evaluate")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--metrics", required=True, help="metrics json to write (all of them)")
    parser.add_argument("--headline", help="json of the COCO summary numbers alone to write")
    parser.add_argument("--detections", required=True, help="raw COCO detections json to write")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    data = Path(args.data)
    require_files([data / "val.json"])
    dataset = CocoDetection(data / "val.json", eval_transforms())
    model, checkpoint = load_detector(args.checkpoint)
    check_categories(args.checkpoint, checkpoint, dataset)
    device = pick_device()
    logged = {
        "name": args.name,
        "checkpoint": args.checkpoint,
        "model": checkpoint["model_config"],
        # the keys this stage reads, as in its params deps in dvc.yaml
        "evaluate": {
            "batch_size": params.evaluate.batch_size,
            "timing_images": params.evaluate.timing_images,
        },
    }
    with stage_run(
        params.tracking, f"evaluate_{args.name}", logged, [data / "train.json", data / "val.json"]
    ) as run:
        val = run.log_dataset(data / "val.json", "evaluation")
        # The model its training run logged; else (trained untracked, or in another store)
        # this run logs it, so the metrics below still lead to the weights.
        example = dataset.root / dataset.images[0]["file_name"] if len(dataset) else None
        model_id = run.find_model(Path(args.checkpoint)) or run.log_model(
            args.name, Path(args.checkpoint), model_card(checkpoint), example
        )
        detections, batched_ms = predict(model, dataset, params.evaluate.batch_size, device)
        metrics = coco_metrics(data / "val.json", detections)
        ms = batched_ms
        if params.evaluate.timing_images:
            ms = ms_per_image(model, dataset, params.evaluate.timing_images, device)
        metrics["parameters"] = count_parameters(model)
        metrics["inference_ms_per_image"] = round(ms, 3)
        write_json(detections, args.detections)
        write_json(metrics, args.metrics)
        if args.headline:
            write_json({key: metrics[key] for key in STAT_NAMES}, args.headline)
        run.log_metrics(
            {
                **{
                    key: metrics[key]
                    for key in (*STAT_NAMES, "parameters", "inference_ms_per_image")
                },
                **{f"AP_class.{mlflow_name(c)}": ap for c, ap in metrics["per_class_AP"].items()},
            },
            model_id=model_id,
            dataset=val,
        )
        run.log_artifact(args.metrics)
    print(
        f"{args.name}: AP {100 * metrics['AP']:.1f}  AP50 {100 * metrics['AP50']:.1f}  "
        f"{metrics['parameters'] / 1e6:.2f} M params  {ms:.1f} ms/image ({device.type})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
