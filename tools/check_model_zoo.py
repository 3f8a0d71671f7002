"""The MONAI model zoo's CI checks, run on this repository's bundle.

Checks, each reported as PASS or FAIL with the reason:

1. required files: ``LICENSE``, ``configs/metadata.json``, ``configs/inference.json``, ``docs/README.md``,
   ``docs/data_license.txt``, and ``large_files.yml`` listing every weight file in ``models/`` with its hash;
2. metadata: its ``version`` has a ``changelog`` entry; ``verify_metadata`` against the schema file;
3. config JSON indented by 4 spaces, as the model zoo formats it;
4. ``verify_net_in_out`` of ``network_def`` with ``inference.json``;
5. ``ckpt_export`` of ``models/model.pt`` (random weights where none ships) to TorchScript that ``torch.jit.load``
   reads and that gives the eager network's output;
6. no file tracked by git over 25 MB;
7. ``flake8``, ``black --check`` and ``isort --check`` at line length 120.

Usage (from the repository root): python tools/check_model_zoo.py [--schema tools/schemas/meta_schema_20240725.json]
Exits 1 if any check fails.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import fire
import torch
import yaml
from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
sys.path.insert(0, str(BUNDLE))  # the configs' `$import scripts` is the bundle's package
MAX_FILE_BYTES = 25 * 1024 * 1024
REQUIRED = ["LICENSE", "configs/metadata.json", "configs/inference.json", "docs/README.md", "docs/data_license.txt"]
CODE_DIRS = ["bundle", "tests", "benchmarks", "tools"]


class CheckFailed(Exception):
    """A model-zoo check did not pass; the message says why."""


def _run(command: list[str], cwd: Path) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise CheckFailed(
            f"`{' '.join(command)}` exited {result.returncode}:\n{(result.stdout + result.stderr)[-3000:]}"
        )
    return result.stdout + result.stderr


def weight_files() -> list[Path]:
    """The bundle's model files (``models/*.pt``, ``*.ts``) that ship with it."""
    return sorted(p for p in (BUNDLE / "models").glob("*") if p.suffix in (".pt", ".ts", ".onnx"))


def check_required_files() -> str:
    missing = [name for name in REQUIRED if not (BUNDLE / name).is_file()]
    if missing:
        raise CheckFailed(f"missing in {BUNDLE}: {missing}")
    weights = weight_files()
    if not weights:
        return "required files present; no weights in models/"
    listing = BUNDLE / "large_files.yml"
    if not listing.is_file():
        raise CheckFailed(f"{listing} missing: it must list {[p.name for p in weights]}")
    entries = {e["path"]: e for e in yaml.safe_load(listing.read_text())["large_files"]}
    for path in weights:
        entry = entries.get(f"models/{path.name}")
        if entry is None:
            raise CheckFailed(f"{listing}: no entry for models/{path.name}")
        digest = hashlib.new(entry["hash_type"], path.read_bytes()).hexdigest()
        if digest != entry["hash_val"]:
            raise CheckFailed(
                f"{listing}: {entry['hash_type']} of models/{path.name} is {digest}, listed {entry['hash_val']}"
            )
    return f"required files present; large_files.yml lists {[p.name for p in weights]} with matching hashes"


def check_metadata(schema: Path) -> str:
    metadata = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    if metadata["version"] not in metadata.get("changelog", {}):
        raise CheckFailed(f"configs/metadata.json: version {metadata['version']} has no changelog entry")
    if not schema.is_file():
        raise CheckFailed(f"schema {schema} not found (pass --schema)")
    command = ["verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", str(schema)]
    _run([sys.executable, "-m", "monai.bundle", *command], BUNDLE)
    return f"version {metadata['version']} in changelog; verify_metadata passed against {schema.name}"


def check_json_format() -> str:
    files = sorted((BUNDLE / "configs").rglob("*.json"))
    for path in files:
        text = path.read_text()
        json.loads(text)
        for line in text.splitlines():
            indent = len(line) - len(line.lstrip(" "))
            if indent % 4:
                raise CheckFailed(f"{path}: line indented by {indent} spaces, not a multiple of 4: {line.strip()[:60]}")
    return f"{len(files)} config files indented by 4"


def check_net_in_out() -> str:
    command = ["verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json"]
    _run(
        [sys.executable, "-m", "monai.bundle", *command, "--config_file", "configs/inference.json", "--n", "2"], BUNDLE
    )
    return "verify_net_in_out passed"


def check_export() -> str:
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser["bundle_root"] = str(BUNDLE)
    network = parser.get_parsed_content("network_def").eval()
    shipped = BUNDLE / "models" / "model.pt"
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = shipped if shipped.is_file() else Path(tmp) / "model.pt"
        if not shipped.is_file():
            torch.save(network.state_dict(), checkpoint)
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        network.load_state_dict(state.get("model", state))
        exported = Path(tmp) / "model.ts"
        command = ["ckpt_export", "network_def", "--filepath", str(exported), "--ckpt_file", str(checkpoint)]
        if "model" in state:  # a CheckpointSaver file: {"model": state_dict}
            command += ["--key_in_ckpt", "model"]
        command += ["--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json"]
        _run([sys.executable, "-m", "monai.bundle", *command], BUNDLE)
        scripted = torch.jit.load(str(exported))
        image = torch.randn(1, 1, 64, 64, 3)
        with torch.inference_mode():
            torch.testing.assert_close(scripted(image), network(image), rtol=1e-4, atol=1e-5)
    return f"ckpt_export of {'models/model.pt' if shipped.is_file() else 'random weights'} loads and matches eager"


def check_file_sizes() -> str:
    tracked = _run(["git", "ls-files", "-z"], REPO).split("\0")
    large = [(f, (REPO / f).stat().st_size) for f in tracked if f and (REPO / f).is_file()]
    large = [(f, size) for f, size in large if size > MAX_FILE_BYTES]
    if large:
        raise CheckFailed(f"files over 25 MB: {large}")
    return f"{len(tracked) - 1} tracked files, none over 25 MB"


def check_code_style() -> str:
    dirs = [d for d in CODE_DIRS if (REPO / d).is_dir()]
    _run([sys.executable, "-m", "flake8", "--max-line-length", "120", "--extend-ignore", "E203", *dirs], REPO)
    _run([sys.executable, "-m", "black", "--check", "-l", "120", *dirs], REPO)
    _run([sys.executable, "-m", "isort", "--check-only", "--profile", "black", "-l", "120", *dirs], REPO)
    return f"flake8, black, isort clean at line length 120 in {dirs}"


def main(schema: str = str(REPO / "tools" / "schemas" / "meta_schema_20240725.json")) -> None:
    """Run every check, print PASS/FAIL lines, exit 1 if any failed."""
    checks: list[tuple[str, Callable[[], str]]] = [
        ("required files", check_required_files),
        ("metadata", lambda: check_metadata(Path(schema))),
        ("config format", check_json_format),
        ("network in/out", check_net_in_out),
        ("TorchScript export", check_export),
        ("file sizes", check_file_sizes),
        ("code style", check_code_style),
    ]
    failed = 0
    for name, check in checks:
        try:
            print(f"PASS {name}: {check()}", flush=True)
        except Exception as error:  # noqa: BLE001 - a crashing check is a failed check, reported like the others
            failed += 1
            print(f"FAIL {name}: {type(error).__name__}: {error}", flush=True)
    print(f"{len(checks) - failed} of {len(checks)} model-zoo checks passed")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    fire.Fire(main)
