"""The 3D CRF-RNN's cost next to the hybrid network's, and what the trained CRF adds on real EM.

Speed: seconds of forward and of forward + backward, and peak memory, on one (7, 296, 296, 5) window, for the
paper-size HybridUNet2D3D (features 64) and the CRF (7 x 7 x 3 bilateral window, 5 mean-field iterations, at full
xy resolution and with the bilateral term down-sampled 2x in xy). Each is measured in a fresh process (peak
resident memory of that measurement alone), once with torch's default threads and once with one thread: on a shared,
oversubscribed machine every multi-threaded kernel waits for a busy core, which costs the CRF's many small kernels
far more than the network's large convolutions, so both figures are printed next to the load average.

Accuracy: on the platelet slice and on ISBI 2012, stage 1 (the network alone, demo_cpu.json settings shortened)
then stage 2 (configs/variants/crf_stage2.json with the network frozen, so that the comparison is the same
stage-1 model with and without the trained CRF), both through ``python -m monai.bundle run``; validation MIoU of
both. Prints the figures and writes JSON.

Usage (from the repository root): python benchmarks/crf.py [--parts "['speed','accuracy']"] [--stage1_epochs 3]
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import fire
import torch

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
sys.path.insert(0, str(BUNDLE))
from scripts.crf import CRFRNN  # noqa: E402
from scripts.io import SAMPLE_DATA  # noqa: E402
from scripts.losses import WeightedCrossEntropyLoss  # noqa: E402
from scripts.networks import HybridUNet2D3D  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # provenance, beside this file
from provenance import write_report  # noqa: E402

WINDOW = (296, 296, 5)
CLASSES = 7
MODELS = {
    "network": "HybridUNet2D3D, features 64",
    "crf": "CRFRNN, window 7x7x3, 5 iterations",
    "crf_downsample2": "CRFRNN, window 7x7x3, 5 iterations, bilateral xy down-sampling 2",
}
DATASETS = {
    "platelet": {
        "variant": [],
        # one section: single-section windows as in demo_cpu.json
        "windows": {"train_window": [256, 256, 1], "val_window": [256, 256, 1]},
    },
    "isbi2012": {
        "variant": ["configs/variants/isbi2012.json"],
        # 20 sections: windows as many voxels as demo_cpu.json's, 5 sections deep so that the CRF's z terms train
        "windows": {"train_window": [128, 128, 5], "val_window": [256, 256, 5]},
    },
}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def _reset_peak() -> None:
    """Reset the peak resident size to the current one (Linux), so that it measures what follows alone."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _measure(model: str, threads: int, queue) -> None:
    """Child process: time forward (eval, no grad) and forward + backward (train) of one model on one window."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    image = torch.randn(1, 1, *WINDOW)
    target = torch.cat([torch.randint(0, CLASSES, (1, 1, *WINDOW)).float(), torch.rand(1, 1, *WINDOW)], 1)
    if model == "network":
        net = HybridUNet2D3D(out_channels=CLASSES)
        loss_function = WeightedCrossEntropyLoss(head_weights=(1.0, 0.33))

        def forward():
            return net(image)

    else:
        net = CRFRNN(CLASSES, iterations=5, bilateral_downsample=2 if model == "crf_downsample2" else 1)
        unary = torch.randn(1, CLASSES, *WINDOW, requires_grad=True)  # stands for the network's logits
        loss_function = WeightedCrossEntropyLoss()

        def forward():
            return net(unary, image)

    with torch.no_grad():
        net.eval()
        forward()  # warm-up: allocator, kernels
        start = time.perf_counter()
        forward()
        forward_s = time.perf_counter() - start
    net.train()
    _reset_peak()
    before = _rss_kib("VmRSS")
    start = time.perf_counter()
    loss_function(forward(), target).backward()
    train_s = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    queue.put(
        {
            "forward_s": round(forward_s, 2),
            "forward_backward_s": round(train_s, 2),
            "peak_rss_gb": round(peak / 2**20, 3),
            "peak_increase_gb": round((peak - before) / 2**20, 3),
            "process_max_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
            "threads": torch.get_num_threads(),
        }
    )


def speed(threads_options: list[int]) -> dict:
    context = multiprocessing.get_context("spawn")
    results: dict = {}
    for threads in threads_options:
        key = f"threads_{threads or torch.get_num_threads()}"
        results[key] = {"loadavg_before": os.getloadavg()}
        for model in MODELS:
            queue = context.Queue()
            process = context.Process(target=_measure, args=(model, threads, queue))
            process.start()
            results[key][model] = queue.get()
            process.join()
            print(f"{key} {model} ({MODELS[model]}): {json.dumps(results[key][model])}", flush=True)
        net, crf = results[key]["network"], results[key]["crf"]
        results[key]["crf_over_network_forward_backward"] = round(
            crf["forward_backward_s"] / net["forward_backward_s"], 3
        )
        results[key]["loadavg_after"] = os.getloadavg()
    return results


def _bundle_run(run_id: str, config_files: list[str], overrides: dict, threads: int) -> None:
    command = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", json.dumps(config_files)]
    for key, value in overrides.items():
        command += [f"--{key}", json.dumps(value) if isinstance(value, (list, dict)) else str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    result = subprocess.run(command, cwd=BUNDLE, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")


def _validate(config_files: list[str], overrides: dict, checkpoint: Path, scratch: Path) -> dict:
    """Validation MIoU of a checkpoint with a config's own validation (same windows, same metric)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / f) for f in config_files])
    parser.update({"bundle_root": str(BUNDLE), "output_dir": str(scratch), "ckpt_dir": str(scratch), **overrides})
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    parser.get_parsed_content("network").load_state_dict(state.get("model", state))
    evaluator = parser.get_parsed_content("validate#evaluator")
    evaluator.run()
    metrics = evaluator.state.metrics
    return {"miou_all": round(float(metrics["val_miou_all"]), 4), "miou_org": round(float(metrics["val_miou_org"]), 4)}


def accuracy(
    datasets: list[str], data_dir: Path, workdir: Path, stage1_epochs: int, stage2_epochs: int, threads: int
) -> dict:
    results = {}
    for name in datasets:
        case = DATASETS[name]
        if not data_dir.joinpath(name).is_dir():
            print(f"SKIPPED {name}: no real data in {data_dir / name}")
            continue
        run = workdir / name
        start = time.time()
        stage1_files = ["configs/train.json", *case["variant"], "configs/variants/demo_cpu.json"]
        common = {"dataset_dir": str(data_dir), "seed": 0, **case["windows"]}
        stage1 = {**common, "max_epochs": stage1_epochs, "val_interval": 50}
        _bundle_run(
            "training",
            stage1_files,
            {**stage1, "output_dir": run / "e1", "ckpt_dir": run / "s1", "overwrite": True},
            threads,
        )
        stage1_s = time.time() - start
        stage2_files = [*stage1_files, "configs/variants/crf_stage2.json"]
        stage2 = {
            **common,
            "stage1_network_def#features": 16,  # demo_cpu.json's width (its network_def is replaced by the stack)
            "stage1_checkpoint": str(run / "s1" / "model.pt"),
            "crf_train_network": False,
            "max_epochs": stage2_epochs,
            "val_interval": 50,
        }
        _bundle_run(
            "training",
            stage2_files,
            {**stage2, "output_dir": run / "e2", "ckpt_dir": run / "s2", "overwrite": True},
            threads,
        )
        stage2_s = time.time() - start - stage1_s
        without = _validate(stage1_files, common, run / "s1" / "model.pt", run / "scratch")
        with_crf = _validate(stage2_files, stage2, run / "s2" / "model.pt", run / "scratch")
        crf = torch.load(run / "s2" / "model.pt", map_location="cpu", weights_only=True)
        crf = {k[4:]: v for k, v in crf.get("model", crf).items() if k.startswith("crf.")}
        learnt = {k[4:]: round(float(v.exp()), 3) for k, v in crf.items() if k.startswith("log_")}
        results[name] = {
            "stage1": without,
            "stage1_plus_trained_crf": with_crf,
            "trained_crf_lengths_and_weights": learnt,
            "stage1_steps": stage1_epochs * 50,
            "stage2_steps": stage2_epochs * 50,
            "stage1_seconds": round(stage1_s, 1),
            "stage2_seconds": round(stage2_s, 1),
        }
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    return results


def main(
    parts: tuple[str, ...] = ("speed", "accuracy"),
    threads_options: tuple[int, ...] = (0, 1),
    datasets: tuple[str, ...] = ("platelet", "isbi2012"),
    stage1_epochs: int = 3,
    stage2_epochs: int = 1,
    training_threads: int = 1,
    data_dir: str | None = None,
    workdir: str = "runs/crf_benchmark",
    output: str = "benchmarks/results/crf.json",
) -> None:
    """
    Args:
        parts: "speed" and/or "accuracy".
        threads_options: torch threads of the speed measurements (0: torch's default).
        datasets: real data sets of the accuracy part.
        stage1_epochs, stage2_epochs: epochs of 50 windows of each stage.
        training_threads: OMP_NUM_THREADS of the training runs (0: default); 1 is faster on a busy 2-core machine.
        data_dir: the real data (default the repository's ``sample_data``).
        workdir: checkpoints and logs of the accuracy runs.
        output: the JSON written.
    """
    report: dict = {"device": "cpu", "window_xyz": list(WINDOW), "classes": CLASSES, "cpus": os.cpu_count()}
    if "speed" in parts:
        report["speed"] = speed(list(threads_options))
    if "accuracy" in parts:
        data = Path(data_dir) if data_dir else SAMPLE_DATA
        work = Path(workdir).resolve()
        report["accuracy"] = accuracy(list(datasets), data, work, stage1_epochs, stage2_epochs, training_threads)
    print(json.dumps(report, indent=2))
    write_report(report, output)


if __name__ == "__main__":
    fire.Fire(main)
