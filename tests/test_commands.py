"""Every command's command line as a newcomer meets it: `--help` that describes its own command and
lists each flag it takes once, every listed flag accepted, and a flag that cannot apply to the chosen
back end, schedule, model or command refused in one line that names it, never ignored."""

from __future__ import annotations

import collections
import re
from pathlib import Path

import pytest
import torch
from test_user_errors import one_line_error

from fastresnet import evaluate, profile, train, tune
from fastresnet.data import DataConfig, build_loaders
from fastresnet.data.__main__ import main as data_main
from fastresnet.data.__main__ import parse_args as data_parse_args
from fastresnet.errors import EXIT_USER_ERROR
from fastresnet.experiments import EXPERIMENTS
from fastresnet.experiments.__main__ import build_parser as experiments_parser
from fastresnet.experiments.__main__ import main as experiments_main
from fastresnet.training import cli
from fastresnet.training.config import TrainConfig, validate
from fastresnet.training.checkpoint import load_checkpoint
from fastresnet.training.fields import apply_flat, flat_fields, flatten

SYNTHETIC = ["--data.backend", "synthetic", "--data.image_size", "8", "--data.batch_size", "4",
             "--data.num_classes", "10", "--data.synthetic_steps", "2", "--data.synthetic_val_steps", "1"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """A finished one-step digits run, as the README's main job leaves one."""
    out = tmp_path_factory.mktemp("runs")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    args = ["--unit", "step", "--length", "1", "--progress", "off", "--plot", "false", "--out_dir", str(out),
            "--run_name", "digits"]
    assert train.main(args) == 0
    torch.set_num_threads(previous)
    return out / "digits"


# --- --help: each command's own


def help_text(main, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    return capsys.readouterr().out


def listed_flags(text: str) -> dict[str, bool]:
    """{flag: whether it takes a value} of every option --help lists (-h/--help left out)."""
    flags = {}
    for match in re.finditer(r"^  (?:-\w, )?(--[\w.-]+)( \S+)?", text, flags=re.MULTILINE):
        if match.group(1) != "--help":
            flags.setdefault(match.group(1), match.group(2) is not None)
    return flags


def all_listed(text: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^  (?:-\w, )?(--[\w.-]+)", text, flags=re.MULTILINE)]


# (main, argv before --help, the start of the description: the command named in its own words)
HELPS = {
    "train": (train.main, [], "`python -m fastresnet.train`: train any model"),
    "evaluate": (evaluate.main, [], "`python -m fastresnet.evaluate --checkpoint"),
    "tune": (tune.main, [], "`python -m fastresnet.tune`: make every measured choice of a training run"),
    "profile": (profile.main, [], "`python -m fastresnet.profile`: where a training (or inference) step's time goes"),
    "data": (data_main, [], "`python -m fastresnet.data`: check a dataset folder"),
    "data verify": (data_main, ["verify"], "Check a dataset folder"),
    "data make-fake-imagenet": (data_main, ["make-fake-imagenet"], "Write an ImageFolder"),
    "experiments": (experiments_main, [], "`python -m fastresnet.experiments NAME`: the paper's experiments"),
    **{f"experiments {name}": (experiments_main, [name], f"`{name}`: ") for name in EXPERIMENTS},
}


@pytest.mark.parametrize("name", HELPS)
def test_help_describes_its_own_command_and_lists_each_flag_once(name, capsys):
    main, argv, description = HELPS[name]
    text = help_text(main, [*argv, "--help"], capsys)
    lines = text.splitlines()
    assert lines[0].startswith(f"usage: python -m fastresnet.{name}"), lines[0]
    assert text.count("usage:") == 1, text
    first_paragraph = text.split("\n\n")[1].strip()
    assert first_paragraph.startswith(description), f"{name} --help describes: {first_paragraph[:200]}"
    others = [module.__doc__.splitlines()[0] for command, module in
              (("train", train), ("evaluate", evaluate), ("tune", tune), ("profile", profile)) if command != name]
    assert not [line for line in others if line in text], f"{name} --help holds another command's description"
    counts = collections.Counter(all_listed(text))
    assert not [flag for flag, n in counts.items() if n > 1], f"listed twice: {counts}"


def test_evaluate_lists_no_training_flag_and_tune_and_profile_none_of_a_run_s_outputs(capsys):
    fields = set(flat_fields(TrainConfig))
    evaluate_flags = {f[2:] for f in listed_flags(help_text(evaluate.main, ["--help"], capsys))} & fields
    assert not evaluate_flags & {"lr", "length", "schedule", "model", "compile", "log_every", "data.recipe"}
    assert {"data.root", "data.ten_crop", "data.batch_size", "device", "amp"} <= evaluate_flags
    for main in (tune.main, profile.main):
        flags = {f[2:] for f in listed_flags(help_text(main, ["--help"], capsys))}
        assert not flags & {"lr", "length", "warmup", "schedule", "eval_every", "log_every", "plot", "profile"}
        assert {"model", "data.batch_size", "amp", "compile", "fused_blocks", "recipe", "resume"} <= flags


def test_every_training_setting_has_a_group_that_decides_which_commands_take_it():
    groups = (cli.MODEL_FIELDS, cli.SCHEDULE_FIELDS, cli.OPTIMIZER_FIELDS, cli.SPEED_FIELDS, cli.RUN_FIELDS,
              cli.DATA_FIELDS)
    grouped = [name for group in groups for name in group]
    assert sorted(grouped) == sorted(flat_fields(TrainConfig)), "a TrainConfig field is in no group, or in two"


# Values for the listed flags that are not TrainConfig fields: what a user would give.
OPTION_VALUES = {
    "--profile": "1", "--recipe": "paper-cifar", "--resume": "{run}", "--checkpoint": "{run}",
    "--output": "{tmp}/eval.json", "--steps": "1", "--export": "{tmp}/decisions.json",
    "--import": "{tmp}/decisions.json", "--providers": "fastresnet", "--mode": "inference", "--warmup_steps": "0",
    "--out": "{tmp}/out", "--workers": "2", "--classes": "2", "--images-per-class": "3",
    "--val-images-per-class": "1", "--seed": "1", "--seeds": "0,1", "--depths": "20,32", "--depth": "20", "--margin": "1",
    "--threshold": "1", "--dataset": "digits", "--data": "{tmp}/cifar-10-batches-py", "--iterations": "10",
    "--milestones": "5", "--stop-at-step": "100", "--eval-every": "1", "--batch-size": "32", "--set": "compile=off",
    "--progress": "off", "--bn_batches": "2",
}
CONTEXT = {"--quick": ["--dataset", "fashion-mnist"]}  # what a flag needs beside it to apply
REQUIRED = {  # arguments a command cannot parse without
    "evaluate": ["--checkpoint", "{run}"],
    "data verify": ["verify", "{tmp}/folder"],
    "data make-fake-imagenet": ["make-fake-imagenet", "{tmp}/new", "--classes", "2", "--images-per-class", "3"],
}


def parse_only(name: str, argv: list[str]) -> None:
    """Parse the command's flags as it does before it runs; a user error raises."""
    if name == "train":
        validate(train.parse(argv).config)
    elif name == "evaluate":
        evaluate.parse(argv)
    elif name in ("tune", "profile"):
        {"tune": tune, "profile": profile}[name].parse(argv)
    elif name.startswith("data "):
        data_parse_args(argv)
    else:
        from fastresnet.experiments.settings import settings_from_args

        settings_from_args(experiments_parser().parse_args([name.split()[1], *argv]))


@pytest.mark.parametrize("name", [n for n in HELPS if n not in ("data", "experiments")])
def test_every_flag_a_help_lists_is_accepted_by_its_command(name, digits_run, tmp_path, capsys):
    main, argv, _ = HELPS[name]
    flags = listed_flags(help_text(main, [*argv, "--help"], capsys))
    defaults = cli._flat_defaults(TrainConfig())
    saved = flatten(load_checkpoint(digits_run, needs=("config",))["config"])
    for flag, takes_value in flags.items():
        field = flag[2:]
        if not takes_value:
            value = []
        elif field in defaults:  # a setting: the value in force (for evaluate, the checkpoint's)
            value = saved.get(field, defaults[field]) if name == "evaluate" else defaults[field]
            value = [",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)]
        else:
            assert flag in OPTION_VALUES, f"{name} lists {flag}: add a value a user would give to OPTION_VALUES"
            value = [OPTION_VALUES[flag]]
        given = [*REQUIRED.get(name, []), *CONTEXT.get(flag, []), flag, *value]
        given = [a.replace("{tmp}", str(tmp_path)).replace("{run}", str(digits_run)) for a in given]
        try:
            parse_only(name, given)
        except Exception as err:  # noqa: BLE001 - whatever it is, the flag is refused
            pytest.fail(f"{name} lists {flag} but refuses `{' '.join(given)}`: {err}")


# --- a setting that cannot apply is refused, naming it


@pytest.mark.parametrize("argv, message", [
    (["--data.ten_crop", "true"], "--data.ten_crop true: the digits back end"),
    (["--data.image_size", "64"], "--data.image_size 64: the digits back end"),
    (["--data.workers", "2"], "--data.workers 2: the digits back end"),
    (["--data.num_classes", "100"], "--data.num_classes 100: the digits back end"),
    (["--data.backend", "synthetic", "--data.cifar_split", "45k5k"], "--data.cifar_split 45k5k: the synthetic"),
    (["--data.backend", "synthetic", "--data.drop_last", "false"], "--data.drop_last false: the synthetic"),
    (["--data.backend", "torchvision", "--data.root", "x", "--data.recipe", "paper-scale", "--data.rrc_scale",
      "0.2,1"], "--data.rrc_scale 0.2,1.0: the paper-scale recipe does not use it"),
    (["--schedule", "step", "--lr_milestones", "3", "--min_lr", "0.01"], "--min_lr 0.01: it is read only by the "
                                                                          "cosine"),
    (["--plateau_patience", "2"], "--plateau_patience 2: it is read only by the plateau schedule"),
    (["--lr_decay", "5"], "--lr_decay 5: it is read only by the step and plateau schedules"),
    (["--warmup_lr", "0.05"], "--warmup_lr 0.05: it is read only by a warm-up"),
    (["--model", "plain20", "--zero_init_residual", "true"], "--zero_init_residual true: plain20 is a plain net"),
])
def test_train_refuses_a_setting_that_cannot_apply(argv, message, tmp_path, capsys):
    short = ["--unit", "step", "--length", "1", "--progress", "off"]  # should the flag be taken, a short run
    assert train.main([*short, *argv, "--out_dir", str(tmp_path / "runs")]) == EXIT_USER_ERROR
    one_line_error(capsys, message)
    assert not (tmp_path / "runs").exists()


def test_evaluate_refuses_ten_crop_on_digits_and_training_flags_by_name(digits_run, capsys):
    for argv, message in (
        (["--data.ten_crop", "true"], "--data.ten_crop true: the digits back end does not read it"),
        (["--lr", "0.1"], "--lr: python -m fastresnet.evaluate does not use it"),
        (["--profile", "2"], "unknown config field 'profile'"),
        (["--model", "resnet32"], "--model: python -m fastresnet.evaluate does not use it"),
        (["--resume", str(digits_run)], "--resume: evaluate takes --checkpoint"),
        (["--recipe", "paper-cifar"], "--recipe: evaluate takes --checkpoint"),
    ):
        assert evaluate.main(["--checkpoint", str(digits_run), *argv]) == EXIT_USER_ERROR
        one_line_error(capsys, message)


TINY_STEP = ["--data.batch_size", "2"]  # should the flag be taken, a short tune or profile


@pytest.mark.parametrize("main, argv, message", [
    (tune.main, ["--lr", "0.2"], "--lr: python -m fastresnet.tune does not use it"),
    (tune.main, ["--out_dir", "runs"], "--out_dir: python -m fastresnet.tune does not use it"),
    (tune.main, ["--profile", "3"], "unknown config field 'profile'"),
    (profile.main, ["--length", "3"], "--length: python -m fastresnet.profile does not use it"),
    (profile.main, ["--warmup", "1"], "--warmup: that is training's learning-rate warm-up; the profile's "
                                      "unprofiled steps are --warmup_steps"),
    (profile.main, ["--data.ten_crop", "true"], "--data.ten_crop true: the digits back end"),
])
def test_tune_and_profile_refuse_what_does_not_shape_a_step(main, argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*TINY_STEP, *argv]) == EXIT_USER_ERROR
    one_line_error(capsys, message)
    assert not any(tmp_path.iterdir())


def test_the_library_refuses_a_data_setting_its_back_end_does_not_read():
    with pytest.raises(ValueError, match=r"DataConfig.ten_crop true: the digits back end does not read it"):
        build_loaders(DataConfig(backend="digits", ten_crop=True), device=torch.device("cpu"))


def test_a_setting_that_applies_is_taken():
    cfg = train.parse([*SYNTHETIC, "--schedule", "plateau", "--plateau_patience", "2", "--lr_decay", "5"])
    validate(cfg.config)
    assert (cfg.config.plateau_patience, cfg.config.lr_decay, cfg.config.data.image_size) == (2, 5.0, 8)
    folder = apply_flat(TrainConfig(), {"data.backend": "torchvision", "data.root": "x", "data.ten_crop": "true",
                                        "data.recipe": "paper-scale", "data.lighting_std": "0.2"}, "test")
    validate(folder)


def test_make_fake_imagenet_says_how_many_images_per_class_it_wrote(tmp_path, capsys):
    assert data_main(["make-fake-imagenet", str(tmp_path / "fake"), "--classes", "2", "--images-per-class", "3"]) == 0
    out = capsys.readouterr().out
    assert "2 classes, 3 train and 1 val images per class" in out, out
    assert len(list((tmp_path / "fake" / "val").glob("*/*.JPEG"))) == 2
