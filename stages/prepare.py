"""DVC stage `prepare`: params.yaml `data` -> data/prepared/{train,val}.json, images, stats.json."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from drkd import cli
from drkd.config import load_params, to_dict
from drkd.data.prepare import prepare
from drkd.tracking import data_hash, stage_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="data/prepared")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    out = Path(args.out)
    logged = {"seed": params.seed, "data": to_dict(params.data)}
    with stage_run(params.tracking, "prepare", logged) as run:
        stats = prepare(params.data, params.seed, out)
        run.set_tags({"data_hash": data_hash(out)})
        run.log_metrics(
            {
                f"{split}.{key}": stats[split][key]
                for split in ("train", "val")
                for key in ("images", "instances")
            }
        )
        run.log_artifact(out / "stats.json")
    print(
        f"prepared {stats['train']['images']} train / {stats['val']['images']} val images "
        f"({stats['train']['instances']} / {stats['val']['instances']} instances) in {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
