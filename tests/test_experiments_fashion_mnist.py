"""`python -m fastresnet.experiments ... --dataset fashion-mnist`: its budgets, its folder, a tiny run."""

import json
from pathlib import Path

import pytest
import torch
from data_helpers import write_fake_fashion_mnist

from fastresnet.data import fashion_mnist
from fastresnet.experiments.__main__ import main as experiments_main
from fastresnet.experiments.settings import (
    DIGITS_BUDGET,
    FASHION_MNIST_CPU_BUDGET,
    FASHION_MNIST_QUICK_BUDGET,
    PAPER_CIFAR_BUDGET,
    Settings,
    train_config,
)
from fastresnet.experiments.tables import parse_markdown_table
from fastresnet.training.fields import ConfigError


@pytest.fixture(scope="module")
def fm_root(tmp_path_factory):
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("fm") / "fashion-mnist")


def test_the_cpu_preset_on_a_cpu_and_the_papers_schedule_on_a_gpu(fm_root, monkeypatch):
    settings = Settings(dataset="fashion-mnist", data=str(fm_root))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert settings.budget() == FASHION_MNIST_CPU_BUDGET
    cfg = train_config(settings, "resnet56")
    assert (cfg.length, cfg.lr_milestones, cfg.unit) == (30 * 468, (7020, 10530), "step")  # 30 epochs, lr / 10 at 1/2, 3/4
    fifteen_epochs = train_config(Settings(dataset="fashion-mnist", data=str(fm_root), iterations=15 * 468), "resnet56")
    assert (fifteen_epochs.length, fifteen_epochs.lr_milestones) == (15 * 468, (3510, 5265))  # the first schedule's runs
    quick = Settings(dataset="fashion-mnist", data=str(fm_root), quick=True)
    assert quick.budget() == FASHION_MNIST_QUICK_BUDGET
    assert train_config(quick, "resnet56").run_name != cfg.run_name
    assert (cfg.data.backend, cfg.data.root, cfg.lr, cfg.data.batch_size) == ("fashion-mnist", str(fm_root), 0.1, 128)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert settings.budget() == PAPER_CIFAR_BUDGET
    assert train_config(settings, "resnet110").warmup_until_train_error == 80.0  # the recipe's, unchanged
    assert Settings(dataset="fashion-mnist", overrides={"device": "cpu"}).budget() == FASHION_MNIST_CPU_BUDGET
    assert Settings().budget() == DIGITS_BUDGET
    with pytest.raises(ConfigError, match="--quick is a Fashion-MNIST preset"):
        Settings(quick=True)
    assert Settings(dataset="fashion-mnist", data=str(fm_root), iterations=50).budget().milestones == (25, 38)


def test_the_dataset_follows_the_folder_and_defaults_to_the_apt_install(fm_root, tmp_path, monkeypatch):
    assert Settings(data=str(fm_root)).dataset == "fashion-mnist"
    assert Settings().dataset == "digits"
    monkeypatch.setattr(fashion_mnist, "DEFAULT_ROOT", fm_root)
    assert Settings(dataset="fashion-mnist").data_config().root == str(fm_root)
    monkeypatch.setattr(fashion_mnist, "DEFAULT_ROOT", tmp_path / "not-installed")
    with pytest.raises(ConfigError, match="apt-get install dataset-fashion-mnist"):
        Settings(dataset="fashion-mnist").data_config()
    with pytest.raises(ConfigError, match="digits set is bundled"):
        Settings(dataset="digits", data=str(fm_root))
    with pytest.raises(ConfigError, match="give it with --data"):
        Settings(dataset="cifar10").data_config()


def test_shortcuts_run_on_fashion_mnist_from_the_command_line(fm_root, tmp_path, capsys):
    argv = ["shortcuts", "--dataset", "fashion-mnist", "--data", str(fm_root), "--iterations", "2",
            "--eval-every", "0", "--batch-size", "8", "--progress", "off", "--set", "plot=false",
            "--out", str(tmp_path)]
    assert experiments_main(argv) == 0
    text = (tmp_path / "shortcuts" / "table.md").read_text()
    assert "(fashion-mnist, 2 iterations)" in text
    assert [r["option"] for r in parse_markdown_table(text)] == ["A", "B", "C"]
    result = json.loads((tmp_path / "shortcuts" / "results.json").read_text())
    assert result["dataset"] == "fashion-mnist" and result["settings"]["dataset"] == "fashion-mnist"
    configs = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/config.json")]
    assert len(configs) == 3 and {c["data"]["backend"] for c in configs} == {"fashion-mnist"}
    assert "shortcuts" in capsys.readouterr().out


def test_not_installed_is_a_bad_argument_naming_the_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fashion_mnist, "DEFAULT_ROOT", tmp_path / "not-installed")
    assert experiments_main(["degradation", "--dataset", "fashion-mnist", "--out", str(tmp_path)]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_depth_sweep_leaves_resnet110_out_of_the_cpu_preset_only(fm_root, monkeypatch):
    from fastresnet.experiments import depth_sweep
    from fastresnet.experiments.__main__ import build_parser
    from fastresnet.experiments.settings import settings_from_args

    def depths(argv):
        args = build_parser().parse_args(["depth-sweep", "--dataset", "fashion-mnist", "--data", str(fm_root), *argv])
        return depth_sweep.main(args, settings_from_args(args))

    monkeypatch.setattr(depth_sweep, "run", lambda settings, depths: depths)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert depths([]) == (20, 32, 44, 56)
    assert depths(["--depths", "20,110"]) == (20, 110)
    assert depths(["--iterations", "64000"]) == (20, 32, 44, 56)  # the preset is the dataset's, not its length
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert depths([]) == (20, 32, 44, 56, 110)


def test_the_cpu_presets_run_names_are_pinned(monkeypatch):
    """Fashion-MNIST runs on a CPU take hours and are resumed by name across sessions: a change that
    renames them (a new default, a changed recipe) must be deliberate, so these names are pinned."""
    from fastresnet.experiments import settings as settings_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(settings_module, "resolve_root", lambda root: fashion_mnist.DEFAULT_ROOT)
    def names(**budget) -> dict:
        settings = Settings(dataset="fashion-mnist", out=Path("/runs-go-here"), **budget)
        models = ("plain20", "resnet20", "resnet56", "resnet110")
        return {model: train_config(settings, model).run_name for model in models}

    assert names() == {"plain20": "plain20-2489d035", "resnet20": "resnet20-64d4c5e6",
                       "resnet56": "resnet56-83b13578", "resnet110": "resnet110-98180765"}
    # the 15-epoch runs of the results page
    assert names(iterations=15 * 468) == {"plain20": "plain20-475147c3", "resnet20": "resnet20-2a154305",
                                          "resnet56": "resnet56-38e62c4d", "resnet110": "resnet110-62f7bfcb"}


def test_runs_on_a_cpu_train_fp32_whatever_its_bf16_units_and_bf16_is_another_run(monkeypatch):
    """amp=auto on a CPU is a timed choice that differs between machines; the experiments pin fp32 there, so
    one command trains the same runs on every CPU, and bf16 asked for by --set gets names of its own."""
    from fastresnet.experiments import settings as settings_module

    monkeypatch.setattr(settings_module, "resolve_root", lambda root: fashion_mnist.DEFAULT_ROOT)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fp32 = train_config(Settings(dataset="fashion-mnist"), "resnet56")
    assert fp32.amp == "off" and fp32.run_name == "resnet56-83b13578"
    bf16 = train_config(Settings(dataset="fashion-mnist", overrides={"amp": "bf16"}), "resnet56")
    assert bf16.amp == "bf16" and bf16.run_name not in ("resnet56-83b13578", "")
    assert bf16.run_name.startswith("resnet56-")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train_config(Settings(dataset="fashion-mnist"), "resnet56").amp == "auto"  # bf16 on every GPU
