"""Params presets: partial params files (presets/*.yaml) applied on top of params.yaml.

    python -m stages.preset presets/smoke.yaml          # print `-S key=value` flags (dvc exp run)
    python -m stages.preset presets/smoke.yaml --apply  # merge into params.yaml in place

Either way the merged result is validated by the strict loader first (drkd.params_file).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from drkd import cli
from drkd.config import read_yaml_file
from drkd.params_file import apply, check, flags


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("preset")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--apply", action="store_true", help="write the merged params file")
    args = parser.parse_args(argv)
    preset = read_yaml_file(args.preset) or {}
    if args.apply:
        apply(Path(args.params), preset, args.preset)
    else:
        check(Path(args.params), preset, args.preset)
        print(flags(preset))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
