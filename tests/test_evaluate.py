"""`python -m fastresnet.evaluate --bn_batches N`: BatchNorm statistics recomputed from training batches."""

import json

import pytest
import torch

from fastresnet.data import DataConfig
from fastresnet.evaluate import main as evaluate_main
from fastresnet.training import TrainConfig, train
from fastresnet.training.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """ResNet-20 after two epochs of digits (88% test accuracy; 95% with recomputed statistics), and a
    copy of its checkpoint whose BatchNorm running statistics are wrong."""
    out = tmp_path_factory.mktemp("evaluate")
    cfg = TrainConfig(model="resnet20", out_dir=str(out), run_name="run", progress="off", plot=False, length=2,
                      eval_every=0, data=DataConfig(backend="digits", batch_size=64))
    assert train(cfg)["status"] == "completed"
    state = load_checkpoint(out / "run")
    for name, tensor in state["model"].items():
        if name.endswith("running_mean"):
            tensor.add_(3.0)
        elif name.endswith("running_var"):
            tensor.mul_(50.0)
    torch.save(state, out / "wrong-statistics.pt")
    return out


def evaluate(checkpoint, tmp_path, *flags) -> dict:
    output = tmp_path / f"eval-{len(list(tmp_path.glob('eval-*')))}.json"
    assert evaluate_main(["--checkpoint", str(checkpoint), "--output", str(output), *flags]) == 0
    return json.loads(output.read_text())


def test_recomputed_statistics_undo_wrong_running_statistics(trained, tmp_path):
    good = evaluate(trained / "run", tmp_path)["top1"]
    wrong = evaluate(trained / "wrong-statistics.pt", tmp_path)
    recomputed = evaluate(trained / "wrong-statistics.pt", tmp_path, "--bn_batches", "20")
    assert good > 80 and wrong["top1"] < 50, (good, wrong["top1"])  # the weights are good, the statistics not
    assert recomputed["top1"] > good - 3 and recomputed["bn_batches"] == 20 and wrong["bn_batches"] == 0


def test_recomputed_statistics_are_the_same_from_the_same_batches(trained, tmp_path):
    first = evaluate(trained / "wrong-statistics.pt", tmp_path, "--bn-batches", "3")
    again = evaluate(trained / "wrong-statistics.pt", tmp_path, "--bn-batches", "3")
    assert first["loss"] == again["loss"]


@pytest.mark.parametrize("batches, message", [("-1", "--bn_batches -1: give a number of training batches"),
                                              ("1000", "--bn_batches 1000: the training set has")])
def test_bad_batch_counts_are_clear_errors(trained, tmp_path, capsys, batches, message):
    assert evaluate_main(["--checkpoint", str(trained / "run"), "--bn_batches", batches]) == 2
    assert message in capsys.readouterr().err
