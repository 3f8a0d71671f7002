"""The model zoo's CI checks (tools/check_model_zoo.py) pass on the bundle, and each can fail."""

import subprocess
import sys

import pytest
import torch

from conftest import BUNDLE, METADATA_SCHEMA, REPO

sys.path.insert(0, str(REPO / "tools"))
import check_model_zoo  # noqa: E402


def test_all_model_zoo_checks_pass():
    result = subprocess.run(
        [sys.executable, "tools/check_model_zoo.py", "--schema", str(METADATA_SCHEMA)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    assert "7 of 7 model-zoo checks passed" in result.stdout


@pytest.fixture
def bundle_copy(tmp_path, monkeypatch):
    copy = tmp_path / "bundle"
    for name in check_model_zoo.REQUIRED:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes((BUNDLE / name).read_bytes())
    (copy / "models").mkdir()
    monkeypatch.setattr(check_model_zoo, "BUNDLE", copy)
    return copy


def test_missing_file_and_unlisted_or_changed_weights_fail(bundle_copy):
    (bundle_copy / "docs" / "data_license.txt").unlink()
    with pytest.raises(check_model_zoo.CheckFailed, match="data_license.txt"):
        check_model_zoo.check_required_files()
    (bundle_copy / "docs" / "data_license.txt").write_text("terms")
    torch.save({"w": torch.zeros(3)}, bundle_copy / "models" / "model.pt")
    with pytest.raises(check_model_zoo.CheckFailed, match="large_files.yml missing"):
        check_model_zoo.check_required_files()
    (bundle_copy / "large_files.yml").write_text(
        'large_files:\n  - path: "models/model.pt"\n    url: ""\n    hash_val: "0123"\n    hash_type: "md5"\n'
    )
    with pytest.raises(check_model_zoo.CheckFailed, match="md5 of models/model.pt"):
        check_model_zoo.check_required_files()


def test_version_without_changelog_and_bad_indent_fail(bundle_copy):
    metadata = bundle_copy / "configs" / "metadata.json"
    metadata.write_text(metadata.read_text().replace('"version": "', '"version": "9.9.9-', 1))
    with pytest.raises(check_model_zoo.CheckFailed, match="no changelog entry"):
        check_model_zoo.check_metadata(METADATA_SCHEMA)
    (bundle_copy / "configs" / "inference.json").write_text('{\n  "a": 1\n}\n')
    with pytest.raises(check_model_zoo.CheckFailed, match="indented by 2"):
        check_model_zoo.check_json_format()
