"""MONAI Label 0.8.5 integration: the bundle served by the ``monaibundle`` sample app, driven over HTTP.

The test does what 3D Slicer's MONAI Label module does: it reads ``/info/``, asks for the next sample, segments a
2D study (one platelet SBF-SEM section) and a 3D study (five ISBI 2012 ssTEM sections), submits labels through
the datastore and trains from them with the trainer options ``/info/`` advertises, then segments again with the
new checkpoint. The server runs from ``.venv-label`` (``bash setup_label_env.sh``), this test from ``.venv``.

The bundle is served as it ships, with its pretrained ``models/model.pt`` and ``models/model.ts``, and once more
with the TorchScript export alone. Only the test's copies are changed: two small training windows an epoch so that
training runs on a 2-core CPU, and the studies' voxel size (TIFF stores no section thickness).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import itk
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from conftest import BUNDLE, REPO, require_data
from scripts.crf_stack import NetworkWithCRF
from tools.variant_bundle import write_variant_bundle

LABEL_VENV = REPO / ".venv-label"
LABEL_PYTHON = LABEL_VENV / "bin" / "python"
SAMPLE_APP = LABEL_VENV / "monailabel" / "sample-apps" / "monaibundle"
# The task type comes from the directory name: it must contain "segmentation".
MODEL = "em_dense_segmentation"
MODEL_TS = "em_dense_segmentation_torchscript"  # the same bundle with models/model.ts alone
MODEL_CRF = "em_crf_stack_segmentation"  # the network + 3D CRF-RNN stack (configs/variants/crf_stage2.json)
MODEL_TASK = "em_mitochondria_segmentation"  # the task configs/tasks/mito_only.json
STUDY_2D, STUDY_3D = "platelet_section", "isbi_stack"
PLATELET_CROP = (slice(192, 448), slice(544, 800))  # (y, x) of the 800x800 section: all seven classes occur here
STARTUP_S, REQUEST_S, TRAIN_S = 180, 180, 420

# Test scale only: two small training windows an epoch (the backward pass dominates on a CPU); the studies' voxel
# size (x, y, z) in nm.
SMALL_TRAIN = {"windows_per_volume": 2, "train_window": [128, 128, 5]}
INPUT_SPACING = [10.0, 10.0, 50.0]
# random weights would get about one voxel in seven right
MIN_ACCURACY = 0.6
# One server for the module: under pytest-xdist its tests must share a worker.
pytestmark = [pytest.mark.xdist_group("monailabel"), pytest.mark.slow]


def _required() -> bool:
    """Whether the run demands the MONAI Label environment (run_tests.sh sets REQUIRE_MONAILABEL)."""
    return os.environ.get("REQUIRE_MONAILABEL", "").strip().lower() not in ("", "0", "false", "no")


def _require_label_env() -> None:
    """Skip (or fail, when required) without .venv-label and its monaibundle sample app."""
    missing = [str(p) for p in (LABEL_PYTHON, SAMPLE_APP) if not p.exists()]
    if not missing:
        return
    message = f"MONAI Label environment not found ({', '.join(missing)}): run `bash setup_label_env.sh`"
    if _required():
        pytest.fail(message + " (REQUIRE_MONAILABEL is set)")
    pytest.skip(message)


def _expected_labels() -> dict[str, int]:
    """Label names and indices MONAI Label should report: metadata.json's channel_def without background."""
    metadata = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    channel_def = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
    return {name.lower(): int(index) for index, name in channel_def.items() if name.lower() != "background"}


# ---------------------------------------------------------------------------------------------------- app setup


def _patch_json(path: Path, updates: dict[str, Any]) -> None:
    """Set top-level keys of a copied config file."""
    config = json.loads(path.read_text())
    config.update(updates)
    path.write_text(json.dumps(config, indent=4))


def _scale_for_cpu(bundle: Path) -> None:
    """Test-scale training and the studies' voxel size in a bundle copy's configs."""
    configs = bundle / "configs"
    _patch_json(configs / "train.json", {**SMALL_TRAIN, "input_spacing": INPUT_SPACING})
    _patch_json(configs / "inference.json", {"input_spacing": INPUT_SPACING})


def _copy_bundle(destination: Path, shipped: list[str]) -> Path:
    """Copy the bundle as it ships: configs, scripts, docs and the named files of ``models/`` only (a working
    copy's ``models/`` may also hold checkpoints of local runs)."""
    shutil.copytree(
        BUNDLE, destination, ignore=shutil.ignore_patterns("__pycache__", "models", "eval", "logs", "outputs")
    )
    (destination / "models").mkdir()
    for name in shipped:
        shutil.copyfile(BUNDLE / "models" / name, destination / "models" / name)
    _scale_for_cpu(destination)
    return destination


def _variant_bundle(destination: Path, variants: list[str]) -> Path:
    """A bundle copy with ``variants`` merged into its configs (scripts.variant_bundle) and weights of its
    network: the shipped network's where the network has them (the CRF stack), random ones otherwise."""
    bundle = write_variant_bundle(variants, destination)
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    if isinstance(network, NetworkWithCRF):
        network.load_network(BUNDLE / "models" / "model.pt")
    torch.save(network.state_dict(), bundle / "models" / "model.pt")
    _scale_for_cpu(bundle)
    return bundle


def _build_app(root: Path) -> tuple[Path, Path]:
    """Copy the sample app and, into its ``model/``, the bundle with its shipped weights, a copy that has only
    the TorchScript export, and two variant bundles (CRF stack, mitochondria-only task); returns the app and the
    first bundle's directory."""
    app = root / "app"
    shutil.copytree(SAMPLE_APP, app, ignore=shutil.ignore_patterns("__pycache__", "logs"))
    bundle = _copy_bundle(app / "model" / MODEL, ["model.pt", "model.ts"])
    _copy_bundle(app / "model" / MODEL_TS, ["model.ts"])
    _variant_bundle(app / "model" / MODEL_CRF, ["configs/variants/crf_stage2.json"])
    _variant_bundle(app / "model" / MODEL_TASK, ["configs/variants/task.json"])  # configs/tasks/mito_only.json
    return app, bundle


def _write_tiff(array: np.ndarray, path: Path, spacing: list[float]) -> None:
    """Write a (Z, Y, X) or (Y, X) array as a (multipage) TIFF with its in-plane voxel size."""
    image = itk.image_from_array(np.ascontiguousarray(array))
    image.SetSpacing(spacing)
    itk.imwrite(image, str(path), True)


def _build_studies(root: Path, platelet: Path, isbi: Path) -> Path:
    """A studies folder with one real 2D and one real 3D EM study, as TIFF files (a datastore default)."""
    studies = root / "studies"
    studies.mkdir()
    section = itk.array_from_image(itk.imread(str(platelet)))
    _write_tiff(section[PLATELET_CROP], studies / f"{STUDY_2D}.tif", [10.0, 10.0])
    stack = itk.array_from_image(itk.imread(str(isbi)))
    _write_tiff(stack[:5, :256, :256], studies / f"{STUDY_3D}.tif", [10.0, 10.0, 50.0])
    return studies


# ---------------------------------------------------------------------------------------------------- HTTP client


@dataclass
class Server:
    """A running MONAI Label server and the files it works on."""

    url: str
    process: subprocess.Popen
    log: Path
    bundle: Path
    studies: Path
    work: Path

    def log_tail(self, lines: int = 60) -> str:
        """Last lines of the server's log (for failure messages)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def request(
        self, method: str, path: str, body: bytes | None = None, content_type: str | None = None
    ) -> tuple[bytes, str]:
        """One HTTP request; returns the body and its content type, or fails with the server's answer and log."""
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_S) as response:
                return response.read(), response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[:2000]
            pytest.fail(f"{method} {path} -> HTTP {error.code}: {detail}\n--- server log ---\n{self.log_tail()}")

    def json(self, method: str, path: str, payload: Any = None) -> Any:
        """A request with an optional JSON body, answered with JSON."""
        body = None if payload is None else json.dumps(payload).encode()
        data, _ = self.request(method, path, body, "application/json" if body is not None else None)
        return json.loads(data)

    def form(
        self, method: str, path: str, fields: dict[str, str], files: dict[str, tuple[str, bytes]]
    ) -> tuple[bytes, str]:
        """A multipart/form-data request, as Slicer's client sends images, labels and parameters."""
        body, content_type = _encode_multipart(fields, files)
        return self.request(method, path, body, content_type)


def _encode_multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """Encode form fields and files; returns the body and its content type."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    for name, (filename, data) in files.items():
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        )
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _decode_multipart(body: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """Split a multipart answer (infer's default: ``params`` JSON and the label file) into {name: (filename, data)}."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    assert match, f"no boundary in {content_type!r}"
    parts: dict[str, tuple[str | None, bytes]] = {}
    for chunk in body.split(b"--" + match.group(1).encode())[1:]:
        if chunk.startswith(b"--"):  # the closing delimiter
            break
        head, _, data = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        head_text = head.decode(errors="replace")
        name = re.search(r'\bname="([^"]*)"', head_text)
        filename = re.search(r'filename="([^"]*)"', head_text)
        assert name, f"multipart part without a name: {head_text!r}"
        parts[name.group(1)] = (filename.group(1) if filename else None, data.removesuffix(b"\r\n"))
    return parts


def _free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """Stop the server and everything it started (its training subprocess too): the whole process group."""
    if process.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Start ``monailabel start_server`` (from .venv-label) on a free loopback port with the bundle and studies."""
    _require_label_env()
    platelet, isbi = require_data("platelet/50-slice0-image.tif", "isbi2012/images.tif")
    root = tmp_path_factory.mktemp("monailabel")
    app, bundle = _build_app(root)
    studies = _build_studies(root, platelet, isbi)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = f"{LABEL_VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    # The server reads PYTHONPATH unguarded when it starts a training task (KeyError without it); the `monailabel`
    # wrapper script would set it, but it runs whatever `python` is first on PATH, so the module is run directly.
    env["PYTHONPATH"] = str(app)
    command = [
        str(LABEL_PYTHON), "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
        "--conf", "models", ",".join((MODEL, MODEL_TS, MODEL_CRF, MODEL_TASK)),
        "--conf", "zoo_source", "github", "--conf", "sam2", "false",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    log = root / "server.log"
    with open(log, "wb") as out:
        # A session of its own, so that the server's whole process group can be stopped at the end.
        process = subprocess.Popen(
            command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    srv = Server(f"http://127.0.0.1:{port}", process, log, bundle, studies, root)
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"MONAI Label server exited with code {process.returncode}:\n{srv.log_tail()}")
            try:
                with urllib.request.urlopen(srv.url + "/info/", timeout=10) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"MONAI Label server not up after {STARTUP_S} s:\n{srv.log_tail()}")
            time.sleep(1)
        yield srv
    finally:
        _stop(process)


# ---------------------------------------------------------------------------------------------------- helpers


def _slicer_params(srv: Server, section: str, name: str) -> dict[str, Any]:
    """The request parameters Slicer sends: each option /info/ lists, choice lists reduced to their first item."""
    config = srv.json("GET", "/info/")[section][name]["config"]
    # an empty choice list (model_filename of a bundle with models/model.ts alone) offers nothing to send
    return {k: v[0] if isinstance(v, list) else v for k, v in config.items() if v != []}


def _read_volume(data: bytes, filename: str, work: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """Read an image file returned by the server; returns the ITK-order array and the voxel spacing."""
    path = work / f"{uuid.uuid4().hex}{''.join(Path(filename).suffixes)}"
    path.write_bytes(data)
    image = itk.imread(str(path))
    return itk.array_from_image(image), tuple(float(s) for s in itk.spacing(image))


def _study(srv: Server, study: str) -> tuple[np.ndarray, tuple[float, ...]]:
    """A study's array and spacing as a client (ITK, like Slicer) reads them."""
    image = itk.imread(str(srv.studies / f"{study}.tif"))
    return itk.array_from_image(image), tuple(float(s) for s in itk.spacing(image))


def _infer(srv: Server, study: str, model: str = MODEL) -> tuple[np.ndarray, dict[str, Any], bytes, str]:
    """Segment a datastore study as Slicer does and check the label's grid and classes.

    Returns the label array, the result parameters, and the label file as sent (bytes, file name).
    """
    params = _slicer_params(srv, "models", model)
    path = f"/infer/{model}?image={urllib.parse.quote(study)}"
    answer = _decode_multipart(*srv.form("POST", path, {"params": json.dumps(params)}, {}))
    assert "image" in answer, f"no label file in the infer answer for {study}: {sorted(answer)}"
    result = json.loads(answer["params"][1])
    filename, data = answer["image"]
    label, spacing = _read_volume(data, filename or "label.nii.gz", srv.work)
    image, image_spacing = _study(srv, study)
    assert label.shape == image.shape, f"{study}: label shape {label.shape} != image shape {image.shape}"
    # Slicer places the label by its geometry: it must lie on the image's grid.
    np.testing.assert_allclose(spacing, image_spacing, rtol=1e-4, err_msg=f"{study}: label spacing")
    values = np.unique(label)
    assert np.array_equal(values, np.round(values)), f"{study}: non-integer label values {values[:10]}"
    known = {0, *srv.json("GET", "/info/")["models"][model]["labels"].values()}
    assert set(values.astype(int).tolist()) <= known, f"{study}: values {values} outside the classes of {model}"
    return label, result, data, filename


def _sha256(path: Path) -> str:
    """Digest of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------- tests


def test_info_lists_the_bundle(server: Server) -> None:
    """/info/ shows the bundle as a 3D segmentation model and trainer with metadata.json's class names."""
    info = server.json("GET", "/info/")
    assert MODEL in info["models"], f"models: {sorted(info['models'])}\n{server.log_tail()}"
    model = info["models"][MODEL]
    assert model["type"] == "segmentation"
    assert model["dimension"] == 3
    assert model["labels"] == _expected_labels()
    assert info["models"][MODEL_TS]["labels"] == _expected_labels()  # served from models/model.ts alone
    assert info["models"][MODEL_CRF]["labels"] == _expected_labels()
    assert info["models"][MODEL_TASK]["labels"] == {"mitochondrion": 1}  # the task's classes, from one task file
    assert MODEL in info["trainers"], f"trainers: {sorted(info['trainers'])}"
    assert info["trainers"][MODEL]["config"]["run_id"] == "run"
    assert info["datastore"]["total"] == 2
    # Slicer's "Next Sample" button.
    sample = server.json("POST", "/activelearning/first", {})
    assert sample["id"] in (STUDY_2D, STUDY_3D)


def test_infer_2d_and_3d_studies(server: Server) -> None:
    """A single section and a section stack both come back as labels on their own grid with known classes."""
    labels = {}
    for study in (STUDY_2D, STUDY_3D):
        labels[study], result, _, _ = _infer(server, study)
        assert result["label_names"] == _expected_labels()
    # the shipped weights are trained: on the 2D study (a crop of the platelet training region) most voxels are right
    truth = itk.array_from_image(itk.imread(str(require_data("platelet/50-slice0-labels.tif")[0])))[PLATELET_CROP]
    accuracy = float((labels[STUDY_2D] == truth).mean())
    assert accuracy > MIN_ACCURACY, f"shipped model: pixel accuracy {accuracy:.3f} on the 2D study"
    # the TorchScript export alone serves the same segmentation
    np.testing.assert_array_equal(_infer(server, STUDY_2D, MODEL_TS)[0], labels[STUDY_2D])
    # the CRF stack (shipped network, CRF at its initial parameters) and the 2-class task model serve too
    stacked = _infer(server, STUDY_2D, MODEL_CRF)[0]
    assert float((stacked == truth).mean()) > MIN_ACCURACY
    _infer(server, STUDY_3D, MODEL_TASK)
    # Section stack, pages (Z, Y, X): the z axis must survive the anisotropic resampling and its inverse.
    assert _study(server, STUDY_3D)[0].shape == (5, 256, 256)
    assert _study(server, STUDY_2D)[0].ndim == 2


def test_save_labels_and_train(server: Server) -> None:
    """Labels saved through the datastore train the model from the trainer options Slicer sends; the new
    checkpoint is written and serves the next inference."""
    # The 2D study gets its ground truth, stored as Slicer stores a single-section labelmap (NIfTI, depth 1).
    truth = itk.array_from_image(itk.imread(str(require_data("platelet/50-slice0-labels.tif")[0])))
    truth_path = server.work / f"{STUDY_2D}_label.nii.gz"
    itk.imwrite(itk.image_from_array(np.ascontiguousarray(truth[PLATELET_CROP][None])), str(truth_path), True)
    # The 3D study gets its own prediction back, as a user who accepts a segmentation submits it.
    _, _, predicted, filename = _infer(server, STUDY_3D)
    for study, name, data in ((STUDY_2D, truth_path.name, truth_path.read_bytes()), (STUDY_3D, filename, predicted)):
        saved = json.loads(
            server.form("PUT", f"/datastore/label?image={study}", {"params": "{}"}, {"label": (name, data)})[0]
        )
        assert saved["label"] == study
    datastore = server.json("GET", "/datastore/?output=all")
    assert all("final" in datastore["objects"][s]["labels"] for s in (STUDY_2D, STUDY_3D)), datastore

    checkpoint = server.bundle / "models" / "model.pt"
    before = _sha256(checkpoint)
    params = _slicer_params(server, "trainers", MODEL)
    params.update({"max_epochs": 1, "val_split": 0.5})  # one study to train on, one to validate on
    task = server.json("POST", f"/train/{MODEL}", params)
    assert task.get("status") in ("SUBMITTED", "RUNNING"), task

    deadline = time.monotonic() + TRAIN_S
    while True:
        status = server.json("GET", "/train/")
        if status["status"] not in ("SUBMITTED", "RUNNING"):
            break
        if time.monotonic() > deadline:
            details = "\n".join(status.get("details", []))
            pytest.fail(f"training still {status['status']} after {TRAIN_S} s:\n{details}")
        time.sleep(2)
    details = "\n".join(status.get("details", []))
    assert status["status"] == "DONE", f"training ended {status['status']}:\n{details}\n{server.log_tail()}"
    assert (server.bundle / "models" / "model_last.pt").exists(), details
    assert _sha256(checkpoint) != before, f"models/model.pt was not rewritten by training:\n{details}"
    # MONAI Label reloads a checkpoint whose modification time changed: the trained weights segment the next study.
    _infer(server, STUDY_2D)
