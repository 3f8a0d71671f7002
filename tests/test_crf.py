"""Anisotropic 3D CRF-RNN (seed 000): gradients, the mean-field update against a dense computation, anisotropy,
learning on real EM, the network + CRF stack and the two-stage recipe through the CLI."""

import itertools
import math

import itk
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from bundle_cli import bundle_run
from conftest import BUNDLE, SAMPLE_DATA, require_data
from scripts.crf import CRFRNN, BilateralMessage, _pair_offsets
from scripts.crf_stack import NetworkWithCRF
from scripts.losses import WeightedCrossEntropyLoss
from scripts.networks import HybridUNet2D3D

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
LENGTHS = ["log_sigma_xy", "log_sigma_z", "log_theta_xy", "log_theta_z", "log_theta_intensity"]


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run many small kernels: on a shared 2-core machine every multi-threaded one waits for a busy
    core, which makes them several times slower than one thread (the CLI subprocesses keep their threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _projected(crf: CRFRNN, unary: torch.Tensor, image: torch.Tensor):
    """A random linear functional of the CRF's output as a function of its parameters, and their values: one
    backward pass gives the analytical gradient, so gradcheck compares every parameter's at little cost."""
    names = [n for n, _ in crf.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in crf.parameters())
    weights = torch.randn_like(unary)

    def function(*values: torch.Tensor) -> torch.Tensor:
        return (torch.func.functional_call(crf, dict(zip(names, values)), (unary, image)) * weights).sum()

    return function, params


@pytest.mark.parametrize("sections", [3, 1])
@pytest.mark.parametrize("device", DEVICES)
def test_bilateral_message_gradcheck(device, sections):
    """Gradients w.r.t. the filtered probabilities, the (multi-channel) features and every offset weight, also on a
    single section (the z offsets then only meet padding and are skipped)."""
    torch.manual_seed(0)
    radius = (1, 2, 1)  # (z, x, y) working layout
    kw = {"dtype": torch.float64, "device": device, "requires_grad": True}
    q = torch.rand(2, 3, sections, 5, 3, **kw)
    features = torch.randn(2, 2, sections, 5, 3, **kw)
    log_weights = torch.randn(len(_pair_offsets(radius)), **kw)
    assert torch.autograd.gradcheck(lambda *a: BilateralMessage.apply(*a, radius), (q, features, log_weights))


@pytest.mark.parametrize("downsample", [1, 2])
@pytest.mark.parametrize("device", DEVICES)
def test_crf_parameters_gradcheck(device, downsample):
    """Every learnable parameter of the module (lengths, intensity length, term weights, compatibility)."""
    torch.manual_seed(0)
    crf = CRFRNN(3, spacing=(10, 10, 30), window=(5, 3, 3), iterations=2, bilateral_downsample=downsample)
    crf = crf.to(device=device, dtype=torch.float64)
    unary = torch.randn(1, 3, 6, 5, 4, dtype=torch.float64, device=device)
    image = torch.randn(1, 1, 6, 5, 4, dtype=torch.float64, device=device)
    function, params = _projected(crf, unary, image)
    assert len(params) == 8
    assert torch.autograd.gradcheck(function, params)
    # and through the unary, as when the stack trains end to end
    assert torch.autograd.gradcheck(lambda u: crf(u, image), (unary.clone().requires_grad_(),), fast_mode=True)


def _gauss(offset, lengths):
    return math.exp(-0.5 * sum((d / s) ** 2 for d, s in zip(offset, lengths)))


def test_one_mean_field_step_equals_a_dense_computation():
    """A direct double loop over voxel pairs of the truncated CRF, with non-default parameters."""
    crf = CRFRNN(3, spacing=(8, 10, 40), spatial_sigma=(15, 50), bilateral_theta=(20, 35), window=(5, 3, 3))
    crf = crf.double().eval()
    crf.iterations = 1
    with torch.no_grad():
        crf.compatibility.copy_(torch.tensor([[0.0, 1.5, 0.7], [1.0, 0.2, 2.0], [0.4, 1.1, -0.3]]))
        crf.log_spatial_weight.fill_(math.log(1.7))
        crf.log_bilateral_weight.fill_(math.log(2.6))
        crf.log_theta_intensity.fill_(math.log(0.8))
    shape = (5, 4, 3)  # X, Y, Z all different: catches any axis mix-up
    unary = torch.zeros(1, 3, *shape, dtype=torch.float64)
    unary[0, 0, :2] = 2.0  # class 0 on the left, class 1 on the right, a class-2 blob in the middle
    unary[0, 1, 3:] = 1.5
    unary[0, 2, 2, 1:3, 1] = 3.0
    unary[0, :, 4, 3, 2] = torch.tensor([0.5, -1.0, 0.25])
    image = torch.zeros(1, 1, *shape, dtype=torch.float64)
    image[0, 0, 3:] = 1.0  # an intensity edge between x = 2 and x = 3
    image[0, 0, :, :, 2] += 0.3
    with torch.no_grad():
        got = crf(unary, image)

    spacing = crf.spacing
    sigma = [crf.log_sigma_xy.exp().item() / spacing[0], crf.log_sigma_xy.exp().item() / spacing[1]]
    sigma.append(crf.log_sigma_z.exp().item() / spacing[2])
    theta = [crf.log_theta_xy.exp().item() / spacing[0], crf.log_theta_xy.exp().item() / spacing[1]]
    theta.append(crf.log_theta_z.exp().item() / spacing[2])
    theta_i = crf.log_theta_intensity.exp().item()
    r_s, r_b = crf.spatial_radius, crf.bilateral_radius
    box = [range(-r, r + 1) for r in r_s]
    norm_s = sum(_gauss(o, sigma) for o in itertools.product(*box))
    norm_b = sum(_gauss(o, theta) for o in itertools.product(*[range(-r, r + 1) for r in r_b]))
    q = torch.softmax(unary, 1)[0]
    expected = torch.empty_like(unary[0])
    voxels = list(itertools.product(*[range(s) for s in shape]))
    w_s, w_b = crf.log_spatial_weight.exp().item(), crf.log_bilateral_weight.exp().item()
    for i in voxels:
        message = torch.zeros(3, dtype=torch.float64)
        for j in voxels:
            o = [b - a for a, b in zip(i, j)]
            if i == j:
                continue
            if all(abs(d) <= r for d, r in zip(o, r_s)):
                message += w_s * _gauss(o, sigma) / norm_s * q[(slice(None), *j)]
            if all(abs(d) <= r for d, r in zip(o, r_b)):
                contrast = math.exp(-0.5 * ((image[(0, 0, *i)] - image[(0, 0, *j)]).item() / theta_i) ** 2)
                message += w_b * _gauss(o, theta) / norm_b * contrast * q[(slice(None), *j)]
        expected[(slice(None), *i)] = unary[(0, slice(None), *i)] - crf.compatibility.detach() @ message
    torch.testing.assert_close(got[0], expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("spacing, anisotropic", [((10, 10, 50), True), ((10, 10, 10), False)])
def test_anisotropic_spacing_smooths_more_along_xy_than_z(spacing, anisotropic):
    """A lone class-1 voxel among undecided ones on a flat image: with 50 nm sections, one update with the same
    physical lengths pulls its x and y neighbours far more than its z neighbours; with isotropic voxels all six
    equally."""
    crf = CRFRNN(2, spacing=spacing, spatial_sigma=30.0, bilateral_theta=30.0, spatial_weight=4.0, iterations=1)
    crf = crf.eval()
    unary = torch.zeros(1, 2, 9, 9, 5)  # undecided everywhere but in the centre
    unary[:, 1, 4, 4, 2] = 6.0
    with torch.no_grad():
        gain = torch.softmax(crf(unary, torch.zeros(1, 1, 9, 9, 5)), 1)[0, 1] - torch.softmax(unary, 1)[0, 1]
    along_x, along_y, along_z = gain[5, 4, 2], gain[4, 5, 2], gain[4, 4, 3]
    torch.testing.assert_close(along_x, along_y)
    assert along_x > 0
    if anisotropic:
        assert along_x > 2 * along_z > 0
    else:
        torch.testing.assert_close(along_x, along_z, rtol=1e-4, atol=1e-6)


def _real_crop(dataset: str) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """A normalised image crop ``(1, 1, X, Y, Z)``, its labels ``(1, X, Y, Z)`` and voxel size (x, y, z)."""
    files = {"platelet": ("platelet/50-slice0-image.tif", "platelet/50-slice0-labels.tif", (10.0, 10.0, 50.0))}
    files["isbi2012"] = ("isbi2012/images.tif", "isbi2012/labels.tif", (4.0, 4.0, 50.0))
    image_file, label_file, spacing = files[dataset]
    arrays = []
    for path in require_data(image_file, label_file):
        array = itk.GetArrayFromImage(itk.imread(str(path))).astype(np.float32)
        array = array[None] if array.ndim == 2 else array  # a single page has no z
        arrays.append(torch.from_numpy(array.transpose(2, 1, 0)[200:264, 200:264, :5].copy()))  # (Z, Y, X) -> X, Y, Z
    image, labels = arrays
    return ((image - image.mean()) / image.std())[None, None], labels.long()[None], spacing


@pytest.mark.parametrize("dataset", ["platelet", "isbi2012"])
def test_training_on_real_em_moves_the_lengths(dataset):
    """A few Adam steps of the CRF alone on noisy unaries of real labels lower the loss and move every length."""
    image, labels, spacing = _real_crop(dataset)
    classes = 7 if dataset == "platelet" else 2
    torch.manual_seed(0)
    onehot = torch.nn.functional.one_hot(labels, classes).permute(0, 4, 1, 2, 3).float()
    unary = 3.0 * onehot + 2.0 * torch.randn_like(onehot)  # a weak, noisy classifier
    crf = CRFRNN(classes, spacing=spacing, window=(5, 5, 3), iterations=2).train()
    before = {n: p.detach().clone() for n, p in crf.named_parameters()}
    optimizer = torch.optim.Adam(crf.parameters(), lr=0.05)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(crf(unary, image), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    for name, value in crf.named_parameters():
        if name in LENGTHS:
            assert abs(value.item() - before[name].item()) > 1e-3, name


def test_network_with_crf_keeps_the_deep_supervision_contract():
    torch.manual_seed(0)
    network = HybridUNet2D3D(out_channels=3, features=4)
    stack = NetworkWithCRF(network, CRFRNN(3, window=(3, 3, 3), iterations=2, train_iterations=1))
    x = torch.randn(2, 1, 16, 16, 3)
    out = stack.train()(x)
    heads = network(x)
    assert out.shape == (2, 2, 3, 16, 16, 3)
    torch.testing.assert_close(out[:, 1], heads[:, 1])  # the 2D head passes through
    torch.testing.assert_close(out[:, 0], stack.crf(heads[:, 0], x))
    target = torch.cat([torch.randint(0, 3, (2, 1, 16, 16, 3)).float(), torch.rand(2, 1, 16, 16, 3)], 1)
    WeightedCrossEntropyLoss(head_weights=(1.0, 0.33))(out, target).backward()
    assert all(p.grad is not None for p in stack.parameters())
    with torch.no_grad():
        refined = stack.eval()(x)
        torch.testing.assert_close(refined, stack.crf(network(x), x))
    assert refined.shape == (2, 3, 16, 16, 3)

    groups = stack.parameter_groups(crf_learning_rate=0.01)
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in stack.parameters())
    assert groups[-1]["name"] == "crf" and groups[-1]["lr"] == 0.01 and groups[-1]["weight_decay"] == 0.0
    frozen = stack.parameter_groups(train_network=False)
    assert len(frozen) == 1 and not any(p.requires_grad for p in network.parameters())


@pytest.mark.parametrize("device", DEVICES)
def test_same_code_on_every_device_and_half_precision_input(device):
    torch.manual_seed(0)
    crf = CRFRNN(3, window=(3, 3, 3), iterations=2).to(device)
    unary, image = torch.randn(1, 3, 8, 8, 3, device=device), torch.randn(1, 1, 8, 8, 3, device=device)
    reference = CRFRNN(3, window=(3, 3, 3), iterations=2)(unary.cpu(), image.cpu())
    torch.testing.assert_close(crf(unary, image).cpu(), reference, rtol=1e-4, atol=1e-5)
    out = crf(unary.half(), image.half())
    assert out.dtype == torch.float32 and out.device.type == device
    with pytest.raises(ValueError, match="image must be"):
        crf(unary, image[..., :2])


CASES = {
    "platelet": {
        "variant": [],
        "image": "platelet/50-slice0-image.tif",
        "seg": "50-slice0-image_seg.tif",
        "windows": {"train_window": [128, 128, 1], "val_window": [800, 240, 1]},
        "infer_window": [800, 800, 1],
    },
    "isbi2012": {
        "variant": ["configs/variants/isbi2012.json"],
        "image": "isbi2012/images.tif",
        "seg": "images_seg.tif",
        "windows": {"train_window": [64, 64, 3], "val_window": [256, 256, 5]},
        "infer_window": [256, 256, 20],
    },
}
# one training step per stage, no edge term (an expression: the CLI reads a bare false as a string); a small CRF
STEP = {
    "windows_per_volume": 2,
    "batch_size": 2,
    "max_epochs": 1,
    "val_interval": 100,
    "train#weight_map#edge": "$False",
}
CRF_TINY = {"stage1_network_def#features": 8, "crf_def#window": [3, 3, 3], "crf_def#iterations": 2}


@pytest.mark.parametrize("dataset", sorted(CASES))
@pytest.mark.slow
def test_two_stage_recipe_through_the_cli(dataset, tmp_path, monkeypatch):
    """Stage 1 trains the network alone, stage 2 the stack from its checkpoint, inference runs the stack (with
    ensemble.json stacked after the variant on the platelet slice)."""
    case = CASES[dataset]
    require_data(case["image"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the runs' kernels are small: see one_thread
    common = {"dataset_dir": str(SAMPLE_DATA)}
    train = {**common, **STEP, **case["windows"]}
    bundle_run(
        "training",
        ["configs/train.json", *case["variant"]],
        {**train, "network_def#features": 8, "output_dir": str(tmp_path / "e1"), "ckpt_dir": str(tmp_path / "s1")},
    )
    stage2 = ["configs/variants/crf_stage2.json"]
    bundle_run(
        "training",
        ["configs/train.json", *case["variant"], *stage2],
        {
            **train,
            **CRF_TINY,
            "crf_def#train_iterations": 1,
            "stage1_checkpoint": str(tmp_path / "s1" / "model.pt"),
            "output_dir": str(tmp_path / "e2"),
            "ckpt_dir": str(tmp_path / "s2"),
        },
    )
    stage1, stack = (torch.load(tmp_path / s / "model_last.pt", weights_only=True) for s in ("s1", "s2"))
    stage1, stack = stage1.get("model", stage1), stack.get("model", stack)  # one saved object: no "model" key
    assert {f"network.{k}" for k in stage1} | {f"crf.{n}" for n in ("compatibility", *LENGTHS)} <= set(stack)
    assert not torch.equal(stack["crf.log_theta_xy"], torch.tensor(math.log(30.0)))  # trained

    inference = {**common, **CRF_TINY, "output_dir": str(tmp_path / "out"), "infer_window": case["infer_window"]}
    ensemble = []
    if dataset == "platelet":
        ensemble = ["configs/ensemble.json"]
        inference["ensemble_checkpoints"] = [str(tmp_path / "s2" / "model.pt")] * 2
    else:
        inference["ckpt_path"] = str(tmp_path / "s2" / "model.pt")
    bundle_run("inference", ["configs/inference.json", *case["variant"], *stage2, *ensemble], inference)
    source, seg = itk.imread(str(SAMPLE_DATA / case["image"])), itk.imread(str(tmp_path / "out" / case["seg"]))
    assert itk.GetArrayFromImage(seg).shape == itk.GetArrayFromImage(source).shape


def test_stage2_variant_sets_only_keys_inference_can_take():
    """Top-level keys only (nested ids must exist in both train.json and inference.json), and the stack parses
    after inference.json, alone and under ensemble.json."""
    variant = ConfigParser.load_config_file(BUNDLE / "configs" / "variants" / "crf_stage2.json")
    assert not any("#" in key or "::" in key for key in variant)
    parser = ConfigParser()
    parser.read_config([BUNDLE / "configs" / "inference.json", BUNDLE / "configs" / "variants" / "crf_stage2.json"])
    parser["bundle_root"] = str(BUNDLE)
    parser["stage1_network_def#features"] = 4
    stack = parser.get_parsed_content("network_def")
    assert isinstance(stack, NetworkWithCRF) and stack.crf.num_classes == 7
    assert stack.crf.spacing == (10.0, 10.0, 50.0) and stack.crf.iterations > stack.crf.train_iterations
