"""Editing params files: partial params (presets, tuned values) applied on top of a params
file, as `dvc exp run -S` flags or merged in place with its comments kept (ruamel round-trip),
always validated by the strict loader first."""

from __future__ import annotations

import io
import json
import re
import shlex
from collections import Counter
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedSeq

from drkd.config import (
    ConfigError,
    Params,
    UserError,
    flatten,
    merge,
    parse_params,
    read_yaml_file,
)
from drkd.files import write_text


def hydra_value(value: Any) -> str:
    """``value`` in the override grammar `dvc exp run -S` parses (Hydra's): strings quoted, so
    `=`, spaces and number-like text stay strings; lists and dicts without spaces."""
    if isinstance(value, str):  # Hydra doubles only the backslashes before a quote or the end
        return "'" + re.sub(r"(\\*)('|$)", lambda m: 2 * m[1] + "\\" * len(m[2]) + m[2],
                            value) + "'"
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)  # numbers, true / false, null


def overrides(partial: dict[str, Any]) -> list[str]:
    """`dvc exp run -S` values that apply ``partial``: `++key=value`, Hydra's add-or-override,
    since a preset may set keys params.yaml leaves at their defaults."""
    return [f"++{key}={hydra_value(value)}" for key, value in flatten(partial).items()]


def flags(partial: dict[str, Any]) -> str:
    """``overrides`` as `-S` flags quoted for a shell prompt (paste them, or ``eval`` them:
    ``$(...)`` alone splits a quoted value at its spaces)."""

    def quoted(word: str) -> str:  # "..." reads better than '...'"'"'...' around Hydra's quotes
        return f'"{word}"' if not set(word) & set('"$`\\!') else shlex.quote(word)

    return " ".join(f"-S {quoted(o)}" for o in overrides(partial))


def check(params_file: Path, partial: dict[str, Any], source: str) -> None:
    """Validate ``params_file`` with ``partial`` merged in (errors name ``source``)."""
    if not isinstance(partial, dict):
        raise ConfigError(f"{source}: expected a mapping of params sections, "
                          f"got a {type(partial).__name__}")
    base = read_yaml_file(params_file) or {}
    try:
        parse_params(merge(base, partial))
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def apply(params_file: Path, partial: dict[str, Any], source: str) -> None:
    """Merge ``partial`` into ``params_file`` in place, keeping its comments and layout
    (ruamel round-trip); validated by the strict loader first, written atomically."""
    check(params_file, partial, source)
    text = params_file.read_text()
    editor = YAML()
    editor.preserve_quotes = True  # `uri: ""` stays as written
    document = editor.load(text)

    def update(node: Any, values: dict[str, Any]) -> None:
        for key, value in values.items():
            old = node.get(key)
            if isinstance(value, dict) and isinstance(old, dict):
                update(old, value)
            elif isinstance(value, list) and isinstance(old, CommentedSeq) and (
                old.fa.flow_style() or not old  # `[]` is written in flow style either way
            ):
                node[key] = CommentedSeq(value)  # [a, b] replaced by [c, d], not by a block
                node[key].fa.set_flow_style()
            else:
                node[key] = value

    update(document, partial)
    buffer = io.StringIO()
    editor.dump(document, buffer)
    # ruamel drops a comment inside a flow collection that spans lines ({a: 1,  # note\n b: 2}):
    # refuse rather than lose what the user wrote.
    lost = comments(text) - comments(buffer.getvalue())
    if lost:
        line, comment = min((comment_line(text, c), c) for c in lost)
        raise ConfigError(
            f"{params_file}:{line}: cannot keep the comment {comment!r} when writing (it sits in a "
            "{...} or [...] over several lines); write that one in block style or "
            "apply by hand: " + flags(partial)
        )
    write_text(buffer.getvalue(), params_file)


def comment_line(text: str, comment: str) -> int:
    """The 1-based line of ``text`` where the whole comment ``comment`` first stands (not one
    that merely starts with it)."""
    match = re.search(r"(?:^|\s)(" + re.escape(comment) + r")$", text, re.MULTILINE)
    return text.count("\n", 0, match.start(1)) + 1 if match else 0


def comments(text: str) -> Counter[str]:
    """The YAML comments of ``text`` (a `#` at a line's start or after a space), by content."""
    return Counter(m.group(1) for m in re.finditer(r"(?:^|\s)(#[^\n]*)", text))


def promote(params_file: str, params: Params, method: str, path: Path, row: str,
            apply_it: bool, study: str = "") -> None:
    """The best_params.yaml (``path``) of a study of ``method`` (named ``study``, checked
    against the file's header): print the `dvc exp run -S ...` line, or with ``apply_it`` merge
    it into the params file (``params``: it, loaded); with ``row`` as a new compare.methods
    row of ``method`` instead of into `distill`. Into `distill`, it also sets distill.method to
    ``method``: tuned values of a method the study does not run would change nothing."""
    if not path.is_file():
        raise UserError(f"{path}: not found (run python -m stages.tune first)")
    found = re.match(r"# Best of Optuna study '([^']*)'", path.read_text())
    if study and found and found.group(1) != study:
        raise UserError(f"{path}: the best of study '{found.group(1)}', not of '{study}' "
                        "(tune.study_name, --method); run that study or pick its --out")
    best = read_yaml_file(path) or {}
    if not isinstance(best, dict) or not set(best) <= {"distill", "student"}:
        raise ConfigError(f"{path}: expected a partial params file with distill / student")
    if not row and method != params.distill.method:
        best["distill"] = {"method": method, **best.get("distill", {})}
    flat = flatten(best)
    if row:  # a comparison row beside the method's own: published and tuned on one board
        if set(best) != {"distill"}:
            raise UserError(f"{path}: tunes {', '.join(k for k in flat if k[:8] != 'distill.')}"
                            "; a compare row sets `distill` only (promote without --row)")
        if row in params.compare.methods:
            raise UserError(f"{params_file}: compare.methods has a row {row!r} already; "
                            "pick a new name (or delete that row first)")
        best = {"compare": {"methods": {row: {"method": method, **best["distill"]}}}}
        flat = flatten(best)
    params_path = Path(params_file)
    if not apply_it:
        check(params_path, best, str(path))
        target = "compare/dvc.yaml " if row else ""  # the row runs in `make compare`
        print(f"dvc exp run {target}{flags(best)}")
        return
    apply(params_path, best, str(path))
    print(f"[tune] {params_path}: set {', '.join(f'{k}={v!r}' for k, v in flat.items())}")
    if row:
        print(f"[tune] `make compare` now runs row {row!r}'s cells")
        return
    print("[tune] `dvc repro` now reruns distill and what follows")
    if "student.train.lr" in flat:
        print(
            "[tune] student.train.lr changed: the baseline student (train_student) "
            "retrains too, so the comparison stays like for like"
        )
