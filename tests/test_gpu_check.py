"""benchmarks/gpu_check.py --smoke: every part of the GPU check runs its code paths on the CPU
(tiny sizes) and reports; the end-to-end part trains two processes (gloo), resumes, and its
checks pass. The figures are not asserted (no timed tests), only that they were measured."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from data_pipelines.imagenet import dali_available

REPO = pathlib.Path(__file__).resolve().parents[1]
# The smoke run's models: CIFAR ResNet-20 (parts 1-2) and ResNet-18 (part 4), convolutions + classifier.
RESNET20_MASKED_LAYERS = 22
RESNET18_MASKED_LAYERS = 21


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "gpu_check.md").read_text().startswith("# GPU check (smoke")
    return json.loads((out / "gpu_check.json").read_text())


@pytest.mark.slow
@pytest.mark.dist
def test_smoke_measures_every_part_or_says_why(smoke: dict) -> None:
    parts = smoke["parts"]
    assert list(parts) == ["train_step", "mask_update", "input_pipeline", "end_to_end"]
    assert smoke["meta"]["smoke"] and smoke["meta"]["device_type"] == "cpu" and not smoke["failed_checks"]

    step = parts["train_step"]
    assert step["status"] == "measured" and step["masked_layers"] == RESNET20_MASKED_LAYERS
    variants = {(r["compile"], r["variant"]) for r in step["rows"]}
    assert len(variants) == 14  # dense + 2 densities x 3 apply modes, eager and compiled
    assert all(r["step_ms"] > 0 and r["images_per_s"] > 0 and r["ratio"] > 0 for r in step["rows"])
    assert all(r["apply_ms"] > 0 for r in step["rows"] if r["variant"] != "dense")
    assert smoke["apply_mode_choice"]["device"] == "cpu"
    assert smoke["apply_mode_choice"]["mode"] in ("float", "bool", "foreach")

    update = parts["mask_update"]
    assert [r["method"] for r in update["rows"]] == ["RigL", "GraNet"]
    assert all(r["update_ms"] > 0 and 0 < r["share_of_interval"] and r["update_frequency"] == 4000
               for r in update["rows"])

    rows = {r["pipeline"]: r for r in parts["input_pipeline"]["rows"]}
    assert rows["torchvision decode_jpeg (cpu)"]["images_per_s"] > 0
    assert rows["DALI mixed (nvJPEG)"]["status"].startswith("not measured: ")
    if dali_available()[0]:
        assert rows["DALI CPU"]["images_per_s"] > 0
        assert parts["input_pipeline"]["dali_mixed_build_without_gpu"].startswith(("built", "not buildable: "))
    else:
        assert rows["DALI CPU"]["status"].startswith("not measured: DALI missing")


@pytest.mark.slow
@pytest.mark.dist
def test_smoke_end_to_end_resumes_with_the_same_masks_and_logs_the_sparse_numbers(smoke: dict) -> None:
    e2e = smoke["parts"]["end_to_end"]
    assert e2e["status"] == "measured" and e2e["processes"] == 2
    assert e2e["loader"] == "dali" if dali_available()[0] else e2e["loader"].startswith("torchvision (DALI missing")
    assert e2e["masked_layers"] == RESNET18_MASKED_LAYERS
    checks = e2e["checks"]
    for name in ("masks_identical_after_resume", "masks_updated_before_checkpoint", "resumed_from_checkpoint",
                 "run_reached_last_step", "metrics_itop_rate_logged", "metrics_flops_logged",
                 "metrics_layer_densities_logged"):
        assert checks[name] is True, name
    assert e2e["itop_rate_at_checkpoint"] > 0.1 and e2e["final_itop_rate"] >= e2e["itop_rate_at_checkpoint"]
    assert e2e["train_flops"] > 0
    assert e2e["wandb"] == "checked" or e2e["wandb"].startswith("not measured: ")
    if e2e["wandb"] == "checked":
        assert e2e["wandb_layer_keys"] == RESNET18_MASKED_LAYERS
        assert checks["wandb_itop_rate_and_flops_logged"] and checks["wandb_one_run_across_resume"]
