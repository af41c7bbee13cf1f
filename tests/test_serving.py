"""A trained detector as an MLflow pyfunc model (drkd/serving.py): logged by a run, loaded by
URI in a fresh process, registered with an alias, and served by `mlflow models serve`, each
giving the detections `stages.predict` writes for the same image."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import free_port, toy_model
from drkd.checkpoint import model_card, model_checkpoint, save_atomic
from drkd.config import TrackingConfig
from drkd.data.coco import CocoDetection
from drkd.models import build_detector
from drkd.tracking import stage_run
from stages import predict


@pytest.fixture
def logged(tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A detecting toy checkpoint logged and registered in a fresh sqlite store, and what
    `stages.predict` finds on one validation image (batch 1)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # the store's artifacts (./mlruns) go there too
    split = CocoDetection(tiny_data / "val.json")
    model = build_detector(toy_model(), split.num_classes)
    with torch.no_grad():
        model.head.classification_head.cls_logits.bias.fill_(2.0)  # it detects
    ckpt = tmp_path / "student_drkd.pt"
    state = model_checkpoint(model, toy_model(), split.category_ids, split.category_names)
    save_atomic(state, ckpt)
    image = split.root / split.images[0]["file_name"]
    with stage_run(TrackingConfig(), "distill", {}) as run:
        model_id = run.log_model("student_drkd", ckpt, model_card(state), image)
        run.register(model_id, "toy-student", "candidate")
    assert model_id
    out = tmp_path / "expected.json"
    assert predict.main([str(ckpt), str(image), "--batch-size", "1", "--out", str(out)]) == 0
    return {"uri": uri, "model_id": model_id, "image": str(image), "expected": str(out)}


def expected_rows(logged: dict[str, str]) -> list[list[object]]:
    detections = json.loads(Path(logged["expected"]).read_text())
    assert len(detections) > 50  # the comparison is over real detections
    return [[0, d["category_id"], d["category_name"], *d["bbox"], d["score"]]
            for d in detections]


# The project's own checkout is taken off sys.path (the venv's editable install puts it there),
# so the model can only run on the code logged with it.
LOAD_AND_PREDICT = """
import base64, json, os, sys
sys.path = [p for p in sys.path if os.path.realpath(p) != sys.argv[3]]
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
import drkd
assert "code" in drkd.__file__.split(os.sep), drkd.__file__  # the model's own copy
image = base64.b64encode(open(sys.argv[2], "rb").read()).decode("ascii")
print(json.dumps(model.predict(pd.DataFrame({"image": [image]})).values.tolist()))
"""
ROOT = Path(__file__).resolve().parents[1]


# Every third-party module the drkd modules loaded with drkd.serving import by name, with the
# distributions that provide it.
DIRECT_IMPORTS = """
import ast, json, sys
from importlib import metadata
import drkd.serving
names = set()
for name, module in list(sys.modules.items()):
    if name.split(".")[0] == "drkd" and getattr(module, "__file__", None):
        for node in ast.walk(ast.parse(open(module.__file__).read())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
names -= set(sys.stdlib_module_names) | {"drkd", "__future__"}
dists = metadata.packages_distributions()
print(json.dumps({n: sorted(d.lower() for d in dists.get(n, [n])) for n in sorted(names)}))
"""


def test_the_model_lists_every_package_its_code_imports(logged: dict[str, str]) -> None:
    """`mlflow models serve` builds an environment from the model's requirements: each
    distribution the served code imports is there (MLflow adds itself), torch and torchvision
    and ruamel.yaml at this environment's versions."""
    from importlib import metadata

    import mlflow

    listed = Path(mlflow.pyfunc.get_model_dependencies(f"models:/{logged['model_id']}"))
    requirements = {line.split("==")[0].lower(): line for line in listed.read_text().split()}
    done = subprocess.run([sys.executable, "-c", DIRECT_IMPORTS], capture_output=True, text=True,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = json.loads(done.stdout)  # module -> the distributions that provide it
    assert {"torch", "torchvision", "ruamel", "PIL", "pandas"} <= set(imported)
    missing = {name for name, dists in imported.items() if not set(dists) & set(requirements)}
    assert missing == set(), (missing, requirements)
    for name in ("torch", "torchvision", "ruamel.yaml"):
        assert requirements[name] == f"{name}=={metadata.version(name).split('+')[0]}"


@pytest.mark.parametrize(("text", "why"), [("not base64!", "not base64 text"),
                                           (12, "not base64 text"),
                                           ("aGVsbG8=", "not an image file (PNG, JPEG, ...)")])
def test_a_row_that_is_no_image_is_named(text: object, why: str) -> None:
    from mlflow.exceptions import MlflowException

    from drkd.serving import decode_image

    with pytest.raises(MlflowException) as raised:
        decode_image(text, row=3)  # type: ignore[arg-type]
    assert raised.value.message == f"row 3: {why}"
    assert raised.value.get_http_status_code() == 400


@pytest.mark.slow
def test_loaded_by_uri_in_a_fresh_process(logged: dict[str, str], tmp_path: Path) -> None:
    """Both the model's own URI and the registry alias load in a process that never imported
    the project (its code comes with the model), and predict what stages.predict wrote."""
    for uri in (f"models:/{logged['model_id']}", "models:/toy-student@candidate"):
        done = subprocess.run([sys.executable, "-c", LOAD_AND_PREDICT, uri, logged["image"],
                               str(ROOT)],
                              capture_output=True, text=True, cwd=tmp_path,
                              env={"MLFLOW_TRACKING_URI": logged["uri"], "PATH": "/usr/bin"})
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads(done.stdout.strip().splitlines()[-1]) == expected_rows(logged), uri


@pytest.mark.slow
def test_served_by_mlflow_models_serve(logged: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen(
        [str(mlflow_cli), "models", "serve", "-m", "models:/toy-student@candidate",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        cwd=tmp_path, env={"MLFLOW_TRACKING_URI": logged["uri"],
                           "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        import base64

        image = base64.b64encode(Path(logged["image"]).read_bytes()).decode("ascii")
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[image]]}})
        deadline, answer = time.monotonic() + 120, None
        while answer is None and time.monotonic() < deadline:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/invocations", body.encode(),
                    {"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=30) as response:
                    answer = json.loads(response.read())
            except OSError:
                assert server.poll() is None, server.stderr.read() if server.stderr else ""
                time.sleep(1)
        assert answer is not None, "the server did not answer in 120 s"
        rows = [[r[c] for c in ("image", "category_id", "category_name", "x", "y", "w", "h",
                                "score")] for r in answer["predictions"]]
        assert rows == expected_rows(logged)
        bad = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[image], ["x"]]}})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", bad.encode(),
                                         {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 400
        assert "row 1: not base64 text" in refused.value.read().decode()
    finally:
        server.terminate()
        server.wait(timeout=30)
