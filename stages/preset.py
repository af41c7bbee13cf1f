"""Params presets: partial params files (presets/*.yaml) applied on top of params.yaml.

    python -m stages.preset presets/smoke.yaml          # print `-S key=value` flags (dvc exp run)
    python -m stages.preset presets/smoke.yaml --apply  # merge into params.yaml in place

Either way the merged result is validated by the strict loader first.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from drkd import cli
from drkd.config import ConfigError, flatten, parse_params, read_yaml


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = (
            merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("preset")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--apply", action="store_true", help="write the merged params file")
    args = parser.parse_args(argv)
    preset = read_yaml(Path(args.preset).read_text()) or {}
    base = read_yaml(Path(args.params).read_text()) or {}
    merged = merge(base, preset)
    try:
        parse_params(merged)
    except ConfigError as err:
        raise ConfigError(f"{args.preset}: {err}") from None
    if args.apply:
        tmp = Path(args.params).with_name(f".{Path(args.params).name}.tmp")
        tmp.write_text(yaml.safe_dump(merged, sort_keys=False))
        tmp.replace(args.params)
    else:
        print(
            " ".join(
                f"-S {shlex.quote(f'{k}={json.dumps(v)}')}" for k, v in flatten(preset).items()
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
