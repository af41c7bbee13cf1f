"""DVC stage `distill_settings`: the `distill` keys the pipeline's method reads, resolved.

    python -m stages.distill_settings [--params params.yaml] --out models/distill_settings.json

The `distill` stage depends on this file, not on all of params `distill`: editing a setting
its method does not read (another method's weight, tuned for a compare row) reruns nothing
after this cheap stage, whose output then stays the same.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from drkd import cli
from drkd.config import load_params, method_distill, to_dict
from drkd.files import write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    write_json(method_distill(to_dict(load_params(args.params).distill)), Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
