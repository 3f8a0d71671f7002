"""Block-wise, resumable inference (scripts.blockwise): equal to MONAI's sliding window, resumable, refusing to mix."""

import copy
import json
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
import torch
import zarr
from monai.bundle import ConfigParser
from monai.data.utils import dense_patch_slices
from monai.handlers import CheckpointLoader
from monai.inferers import SlidingWindowInferer, SlidingWindowSplitter
from monai.networks.nets import BasicUNet
from monai.transforms import NormalizeIntensity

from bundle_cli import bundle_run
from conftest import BUNDLE, CONFIG_NETWORK, require_data
from scripts.baselines import SectionWise2D
from scripts.blockwise import BlockwiseInference, WindowGrid, block_boxes, intensity_statistics
from scripts.blockwise_workflow import open_datalist_volumes, prepare_network
from scripts.crf import CRFRNN
from scripts.crf_stack import NetworkWithCRF
from scripts.ensembles import EnsembleNetwork
from scripts.inference import FittedSlidingWindowInferer, FlipTTA
from scripts.networks import HybridUNet2D3D
from scripts.volumes import ArrayVolume, open_volume


def tiny_network(seed: int = 0, **options) -> torch.nn.Module:
    torch.manual_seed(seed)
    return HybridUNet2D3D(out_channels=2, features=4, **options).eval()


def synthetic_volume(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, shape).astype(np.uint8)


def blockwise_logits(inference: BlockwiseInference, volume) -> torch.Tensor:
    mean, std = intensity_statistics(volume, inference.block_size, progress=False)
    grid = inference.grid(volume)
    logits = None
    for box in block_boxes(volume.shape, inference.block_size):
        block = inference.predict_block(volume, grid, box, mean, std)
        if logits is None:
            logits = torch.zeros((block.shape[0], *volume.shape))
        logits[(slice(None), *(slice(lo, hi) for lo, hi in box))] = block
    return logits


def reference_logits(network, array: np.ndarray, inferer) -> torch.Tensor:
    """The in-memory pipeline: NormalizeIntensity over the whole volume, then MONAI's sliding window."""
    image = NormalizeIntensity()(torch.from_numpy(array.astype(np.float32))[None])[None]
    with torch.inference_mode():
        return inferer(image, network)[0]


def assert_same_labels(labels: np.ndarray, logits: torch.Tensor) -> None:
    """Labels equal the argmax of ``logits`` wherever the two best classes are not tied up to float rounding."""
    top2 = torch.topk(logits, 2, dim=0).values
    clear = (top2[0] - top2[1] > 1e-4).numpy()
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(labels[clear], logits.argmax(0).numpy()[clear])


@pytest.mark.parametrize(
    "roi, block, batch, fit_axes",
    [((32, 32, 8), (24, 24, 3), 1, ()), ((32, 32, 8), (40, 16, 2), 3, (2,))],
    ids=["padded-z", "fitted-z"],
)
def test_matches_sliding_window_on_synthetic_volume(roi, block, batch, fit_axes, tmp_path):
    # z (5) is smaller than the window (8): padded like MONAI, or the window cut to the volume (fit_axes)
    array = synthetic_volume((70, 50, 5))
    network = tiny_network()
    inference = BlockwiseInference(network, roi, 0.25, block, batch, fit_axes=fit_axes, save_uncertainty=True)
    if fit_axes:
        inferer = FittedSlidingWindowInferer(roi, fit_axes, sw_batch_size=batch, overlap=0.25, mode="gaussian")
    else:
        inferer = SlidingWindowInferer(roi, sw_batch_size=batch, overlap=0.25, mode="gaussian")
    expected = reference_logits(network, array, inferer)
    volume = ArrayVolume(array, spacing=(1, 1, 1))
    torch.testing.assert_close(blockwise_logits(inference, volume), expected, atol=1e-5, rtol=1e-5)

    result = inference(volume, tmp_path / "v_seg.zarr")
    assert result.computed == len(block_boxes(array.shape, block)) > 4 and result.skipped == 0
    assert_same_labels(open_volume(tmp_path / "v_seg.zarr").read([[0, 70], [0, 50], [0, 5]]), expected)
    entropy = torch.special.entr(torch.softmax(expected, 0)).sum(0).numpy()
    uncertainty = open_volume(f"{tmp_path / 'v_seg.zarr'}:/uncertainty").read([[0, 70], [0, 50], [0, 5]])
    np.testing.assert_allclose(uncertainty.astype(np.float32), entropy, atol=2e-3)


def test_fitted_divisor_matches_the_in_memory_inferer_and_caps_windows_spanning_blocks():
    array = synthetic_volume((44, 60, 3))
    network = tiny_network()
    inferer = FittedSlidingWindowInferer((64, 64, 8), (2,), 16, overlap=0.25, mode="gaussian")
    expected = reference_logits(network, array, inferer)
    volume = ArrayVolume(array, spacing=(1, 1, 1))
    inference = BlockwiseInference(network, (64, 64, 8), 0.25, (64, 64, 2), fit_axes=(2,), fit_divisor=16)
    assert inference.grid(volume).roi_size == (48, 64, 3)  # one window, padded to multiples of 16
    torch.testing.assert_close(blockwise_logits(inference, volume), expected, atol=1e-5, rtol=1e-5)
    # x spans two 32-wide blocks: capped at a quarter block (8 -> the divisor 16); y within one block: fitted
    spanning = BlockwiseInference(network, (64, 64, 8), 0.25, (32, 64, 2), fit_axes=(2,), fit_divisor=16)
    assert spanning.grid(volume).roi_size == (16, 64, 3)


@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint16", ">i2", "float32"])
def test_intensity_statistics_are_those_of_the_whole_volume(dtype):
    # 8- and 16-bit integers through their histogram (signed and big-endian ones too), floats by Chan's update
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else np.finfo(np.float16)
    array = rng.integers(int(info.min), int(info.max) + 1, (30, 20, 7)).astype(dtype)
    mean, std = intensity_statistics(ArrayVolume(array), (16, 8, 3), progress=False)
    np.testing.assert_allclose([mean, std], [array.astype(np.float64).mean(), array.astype(np.float64).std()])
    with pytest.raises(ValueError, match="the image is constant"):
        intensity_statistics(ArrayVolume(np.full((30, 20, 7), 3, dtype)), (16, 8, 3), progress=False)


def test_window_grid_is_sliding_window_inference_grid_not_splitter_grid():
    # why WindowGrid uses MONAI's private _get_scan_interval: the public SlidingWindowSplitter lays another grid
    # (its last window runs past the volume end where sliding_window_inference moves it back inside)
    grid = WindowGrid((100, 1, 1), (32, 1, 1), overlap=0.25)
    monai_starts = sorted({s.start for s, *_ in dense_patch_slices((100, 1, 1), (32, 1, 1), (24, 1, 1))})
    assert grid.axis_starts[0].tolist() == monai_starts == [0, 24, 48, 68]
    splitter = SlidingWindowSplitter((32, 1, 1), overlap=0.25)
    assert sorted({location[0] for _, location in splitter(torch.zeros(1, 1, 100, 1, 1))}) != monai_starts


def test_matches_sliding_window_on_isbi_crop():
    (path,) = require_data("isbi2012/images.tif")
    with open_volume(path) as isbi:
        array = isbi.read([[100, 260], [200, 360], [10, 15]])  # 160 x 160 x 5, shallower than the window
    network = tiny_network(1)
    roi = (64, 64, 8)
    inference = BlockwiseInference(network, roi, 0.25, (64, 48, 3))
    expected = reference_logits(network, array, SlidingWindowInferer(roi, overlap=0.25, mode="gaussian"))
    actual = blockwise_logits(inference, ArrayVolume(array))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_runs_on_cpu():
    array = synthetic_volume((32, 32, 4))
    network = tiny_network()
    fp32 = blockwise_logits(BlockwiseInference(network, (32, 32, 4), block_size=(16, 32, 4)), ArrayVolume(array))
    bf16 = blockwise_logits(
        BlockwiseInference(network, (32, 32, 4), block_size=(16, 32, 4), bf16=True), ArrayVolume(array)
    )
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)
    torch.testing.assert_close(bf16, fp32, atol=0.05 * float(fp32.abs().max()), rtol=0)


@pytest.mark.parametrize("kind", ["hybrid-3d", "crf-stack", "section-wise-2d"])
def test_channels_last_changes_layout_not_results(kind):
    torch.manual_seed(0)
    if kind == "hybrid-3d":
        network = HybridUNet2D3D(out_channels=2, features=4).eval()
    elif kind == "crf-stack":
        network = NetworkWithCRF(HybridUNet2D3D(out_channels=2, features=4), CRFRNN(2, iterations=2)).eval()
    else:
        network = SectionWise2D(BasicUNet(2, 1, 2, features=(4, 4, 8, 8, 8, 4))).eval()
    volume = ArrayVolume(synthetic_volume((48, 40, 6)))
    contiguous = blockwise_logits(BlockwiseInference(copy.deepcopy(network), (32, 32, 6), channels_last=False), volume)
    inference = BlockwiseInference(network, (32, 32, 6), channels_last=True)
    weights_3d = [p for p in network.parameters() if p.dim() == 5]
    assert bool(weights_3d) == (kind != "section-wise-2d")
    assert all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in weights_3d)
    assert kind == "section-wise-2d" or any(not p.is_contiguous() for p in weights_3d), "the layout changed"
    assert all(p.is_contiguous() for p in network.parameters() if p.dim() != 5), "other weights untouched"
    torch.testing.assert_close(blockwise_logits(inference, volume), contiguous, atol=1e-5, rtol=1e-5)


CHILD = r"""
import json, logging, sys, time
sys.path.insert(0, sys.argv[4])
import torch
from scripts.blockwise import BlockwiseInference
from scripts.networks import HybridUNet2D3D
from scripts.volumes import open_volume
logging.basicConfig(level=logging.INFO, format="%(message)s")
source, output, slow = sys.argv[1], sys.argv[2], sys.argv[3] == "slow"
torch.manual_seed(0)
network = HybridUNet2D3D(out_channels=2, features=4)
inference = BlockwiseInference(network, [32, 32, 4], 0.25, [32, 32, 4], progress=False)
if slow:  # leaves time to be killed between blocks
    predict = inference.predict_block
    inference.predict_block = lambda *args: (time.sleep(0.5), predict(*args))[1]
result = inference(open_volume(source), output)
print(json.dumps({"computed": result.computed, "skipped": result.skipped}))
"""


def test_resumes_after_sigkill(tmp_path):
    array = synthetic_volume((96, 64, 8))
    zarr.save_array(tmp_path / "in.zarr", np.ascontiguousarray(array.transpose(2, 1, 0)))
    source, output = str(tmp_path / "in.zarr"), tmp_path / "out" / "in_seg.zarr"
    blocks = len(block_boxes(array.shape, (32, 32, 4)))
    markers = tmp_path / "out" / "in_seg.zarr.blocks"

    child = subprocess.Popen([sys.executable, "-c", CHILD, source, str(output), "slow", str(BUNDLE)])
    deadline = time.monotonic() + 120
    while not list(markers.glob("*.done")) and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    finished = {p.name: p.stat().st_mtime_ns for p in markers.glob("*.done")}
    assert 1 <= len(finished) < blocks

    rerun = subprocess.run(
        [sys.executable, "-c", CHILD, source, str(output), "fast", str(BUNDLE)], capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming, {len(finished)} of {blocks} blocks already finished" in rerun.stdout + rerun.stderr
    assert json.loads(rerun.stdout.splitlines()[-1]) == {"computed": blocks - len(finished), "skipped": len(finished)}
    assert {p.name: p.stat().st_mtime_ns for p in markers.glob("*.done") if p.name in finished} == finished

    uninterrupted = BlockwiseInference(tiny_network(0), [32, 32, 4], 0.25, [32, 32, 4], progress=False)
    uninterrupted(open_volume(source), tmp_path / "reference_seg.zarr")
    np.testing.assert_array_equal(
        zarr.open_array(output / "labels", mode="r")[...],
        zarr.open_array(tmp_path / "reference_seg.zarr" / "labels", mode="r")[...],
    )


def test_restart_recomputes_unmarked_blocks_and_refuses_other_settings(tmp_path):
    zarr.save_array(tmp_path / "in.zarr", synthetic_volume((4, 32, 48)))
    volume, output = open_volume(tmp_path / "in.zarr"), tmp_path / "in_seg.zarr"
    inference = BlockwiseInference(tiny_network(), (32, 32, 4), 0.25, (24, 32, 4), progress=False)
    assert inference(volume, output).computed == 2
    labels = zarr.open_array(output / "labels", mode="r+")
    expected = labels[...]
    labels[:, :, :24] = 9  # a block whose marker never came: rewritten from scratch
    (output.parent / "in_seg.zarr.blocks" / "x0_y0_z0.done").unlink()
    result = inference(volume, output)
    assert (result.computed, result.skipped) == (1, 1)
    np.testing.assert_array_equal(labels[...], expected)

    with pytest.raises(ValueError, match=r"in_seg\.zarr was started with other settings \(overlap: \[0\.25"):
        BlockwiseInference(tiny_network(), (32, 32, 4), 0.5, (24, 32, 4), progress=False)(volume, output)
    with pytest.raises(ValueError, match=r"other settings \(network: "):
        BlockwiseInference(tiny_network(1), (32, 32, 4), 0.25, (24, 32, 4), progress=False)(volume, output)
    with pytest.raises(ValueError, match=r"other settings \(block_size: "):
        BlockwiseInference(tiny_network(), (32, 32, 4), 0.25, (32, 32, 4), progress=False)(volume, output)
    (tmp_path / "foreign.zarr").mkdir()
    with pytest.raises(ValueError, match=r"foreign\.zarr exists and is not a block-wise result"):
        inference(volume, tmp_path / "foreign.zarr")


def test_network_fingerprint_follows_weight_changes_and_is_hashed_once_otherwise(monkeypatch):
    import scripts.block_markers as block_markers

    network = tiny_network()
    fingerprint = BlockwiseInference(network, (32, 32, 4)).fingerprint
    hashed = []
    monkeypatch.setattr(block_markers, "network_fingerprint", lambda n: hashed.append(1) or str(len(hashed)))
    first = fingerprint()
    assert fingerprint() == first and len(hashed) == 1  # nothing changed: not hashed again
    weight = next(network.parameters())
    with torch.no_grad():
        weight.add_(1)  # in place, as a checkpoint loads
    assert fingerprint() != first and len(hashed) == 2
    weight.data = weight.data.clone()  # replaced
    assert len({fingerprint(), fingerprint()}) == 1 and len(hashed) == 3
    network.net_2d.encoder[0][0].adn.A = torch.nn.Identity()  # the structure
    fingerprint()
    assert len(hashed) == 4


def test_datalist_volumes_check_spacing(tmp_path):
    zarr.save_array(tmp_path / "a.zarr", synthetic_volume((4, 32, 48)))
    tifffile.imwrite(tmp_path / "b.tif", synthetic_volume((4, 32, 48)))
    datalist = tmp_path / "datalist.json"
    items = [{"image": "a.zarr", "spacing": [4, 4, 50]}, {"image": "b.tif"}]
    datalist.write_text(json.dumps({"testing": items}))
    volumes = open_datalist_volumes(datalist, tmp_path, input_spacing=[4.02, 4, 50], target_spacing=[4, 4, 50])
    assert [v.shape for v in volumes] == [(48, 32, 4)] * 2 and volumes[1].spacing == (4.02, 4, 50)
    with pytest.raises(ValueError, match=r"b\.tif: its voxel size is unknown"):
        open_datalist_volumes(datalist, tmp_path, target_spacing=[4, 4, 50])
    with pytest.raises(ValueError, match=r"a\.zarr: spacing \[4\.0, 4\.0, 50\.0\] differs from target_spacing"):
        open_datalist_volumes(datalist, tmp_path, target_spacing=[10, 10, 50])


def _save_tiny_checkpoint(path, seed=0, wrap=True):
    state = tiny_network(seed, **CONFIG_NETWORK).state_dict()
    torch.save({"model": state} if wrap else state, path)
    return str(path)


@pytest.mark.parametrize("ensemble_last", [True, False])
def test_config_network_composes_with_ensemble_and_tta(ensemble_last, tmp_path):
    files = ["configs/inference.json", "configs/large_volume.json", "configs/ensemble.json"]
    if not ensemble_last:
        files[1:] = files[:0:-1]
    members = [_save_tiny_checkpoint(tmp_path / "a.pt", 0), _save_tiny_checkpoint(tmp_path / "b.pt", 1, wrap=False)]
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / f) for f in files])
    overrides = {"bundle_root": str(BUNDLE), "network_def#features": 4, "class_names": ["a", "b"], "tta_axes": [0, 1]}
    overrides["precision"] = "float32"  # compared with float32 members below
    parser.update({**overrides, "ensemble_checkpoints": members, "device": torch.device("cpu")})
    network = parser.get_parsed_content("blockwise_network")
    assert isinstance(network, FlipTTA) and isinstance(network.network, EnsembleNetwork)
    x = torch.randn(1, 1, 16, 16, 2)
    with torch.inference_mode():
        members = [tiny_network(0, **CONFIG_NETWORK), tiny_network(1, **CONFIG_NETWORK)]
        expected = FlipTTA(EnsembleNetwork(members), (0, 1))(x)
        torch.testing.assert_close(network(x), expected)


def test_windows_per_pass_follow_the_voxel_cap():
    array = synthetic_volume((70, 50, 3))
    network = tiny_network()
    batches = []
    forward = network.forward
    network.forward = lambda x: (batches.append(x.shape[0]), forward(x))[1]
    capped = BlockwiseInference(network, (32, 32, 1), 0.25, (70, 50, 3), sw_batch_size=4, sw_batch_voxels=2048)
    uncapped = BlockwiseInference(network, (32, 32, 1), 0.25, (70, 50, 3), sw_batch_size=4)
    volume = ArrayVolume(array)
    expected = blockwise_logits(uncapped, volume)
    assert max(batches) == 4
    batches.clear()
    torch.testing.assert_close(blockwise_logits(capped, volume), expected)
    assert max(batches) == 2  # two 32 x 32 windows make the 2048 voxels


@pytest.mark.parametrize("window, blocks", [([1024, 1024, 1], [4096, 4096, 2]), ([296, 296, 5], [1024, 1024, 32])])
def test_large_volume_blocks_keep_section_windows_whole(window, blocks):
    # single-section windows: blocks as wide as four windows, so that the window is not capped below
    # inference.json's (see BlockwiseInference's fit_divisor); thicker windows: blocks deep enough for them in z
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs/inference.json"), str(BUNDLE / "configs/large_volume.json")])
    parser["infer_window"] = window
    assert parser.get_parsed_content("block_size") == blocks
    if window[2] == 1:
        inference = BlockwiseInference(tiny_network(), window, 0.25, blocks, fit_divisor=16, fit_min=(256, 256))
        assert inference.window(SimpleNamespace(shape=(10000, 10000, 40))) == window


def test_prepare_network_loads_ckpt_path(tmp_path):
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs/inference.json"), str(BUNDLE / "configs/large_volume.json")])
    parser.update({"bundle_root": str(BUNDLE), "network_def#features": 4, "class_names": ["a", "b"]})
    parser.update({"ckpt_path": _save_tiny_checkpoint(tmp_path / "m.pt", 3), "device": torch.device("cpu")})
    network = parser.get_parsed_content("blockwise_network")
    assert not network.training
    torch.testing.assert_close(network.state_dict(), tiny_network(3, **CONFIG_NETWORK).state_dict())

    bare = tiny_network(0, **CONFIG_NETWORK)
    loader = CheckpointLoader(
        load_path=_save_tiny_checkpoint(tmp_path / "bare.pt", 4, wrap=False), load_dict={"model": bare}
    )
    assert isinstance(prepare_network(bare, [loader], tta_axes=[2]), FlipTTA)
    torch.testing.assert_close(bare.state_dict(), tiny_network(4, **CONFIG_NETWORK).state_dict())
    loader.load_path = str(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match=r"nope\.pt \(ckpt_path\) not found"):
        prepare_network(bare, [loader])


def test_cli_on_isbi_writes_zarr_and_tiff(tmp_path):
    (images,) = require_data("isbi2012/images.tif")
    overrides = {
        "datalist": "$@bundle_root + '/configs/datalists/isbi2012.json'",
        "class_names": ["cell interior", "membrane"],
        "target_spacing": [4.0, 4.0, 50.0],
        "network_def#features": 4,
        "ckpt_path": _save_tiny_checkpoint(tmp_path / "model.pt"),
        "output_dir": str(tmp_path / "out"),
        "block_size": [512, 512, 10],
        "output_format": "input",
    }
    bundle_run("inference", ["configs/inference.json", "configs/large_volume.json"], overrides)
    labels = tifffile.imread(tmp_path / "out" / "images_seg.tif")
    assert labels.shape == tifffile.TiffFile(images).series[0].shape == (20, 512, 512)
    assert set(np.unique(labels)) <= {0, 1}
    stored = zarr.open_array(tmp_path / "out" / "images_seg.zarr" / "labels", mode="r")
    np.testing.assert_array_equal(stored[...], labels)
    assert len(list((tmp_path / "out" / "images_seg.zarr.blocks").glob("*.done"))) == 2
