"""Params presets: partial params files (presets/*.yaml) applied on top of params.yaml.

    python -m stages.preset presets/smoke.yaml --exp-run  # `dvc exp run` with the preset's values
    python -m stages.preset presets/smoke.yaml --apply    # merge into params.yaml in place
    python -m stages.preset presets/smoke.yaml            # print the `-S` flags (to paste)

Every way, the merged result is validated by the strict loader first (drkd.params_file).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from drkd import cli
from drkd.config import read_yaml_file
from drkd.params_file import apply, check, flags, overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("preset")
    parser.add_argument("--params", default="params.yaml")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--apply", action="store_true", help="write the merged params file")
    mode.add_argument("--exp-run", action="store_true",
                      help="run `dvc exp run` with the preset's values (params.yaml's folder)")
    args = parser.parse_args(argv)
    preset = read_yaml_file(args.preset) or {}
    if args.apply:
        apply(Path(args.params), preset, args.preset)
        return 0
    check(Path(args.params), preset, args.preset)
    if not args.exp_run:
        print(flags(preset))
        return 0
    # An argument list, not a shell line: no value is split at its spaces.
    command = ["dvc", "exp", "run", *(f for o in overrides(preset) for f in ("-S", o))]
    print(f"[preset] {args.preset}: {' '.join(command)}", flush=True)
    return subprocess.run(command, cwd=Path(args.params).resolve().parent).returncode


if __name__ == "__main__":
    sys.exit(cli.run(main))
