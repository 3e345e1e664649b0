"""`python -m fastresnet.experiments`: a scaled-down degradation on digits, resume, layer responses.

One module-scoped experiment (plain-20/32 and ResNet-20/32, two steps each,
batch 8) is interrupted, resumed and re-run; the other tests read its runs.
"""

import dataclasses
import json
import math
import shutil

import pytest
import torch

from fastresnet.data import DataConfig, build_loaders
from fastresnet.experiments import degradation, layer_responses
from fastresnet.experiments.__main__ import main as experiments_main
from fastresnet.experiments.runs import DONE_NAME, by_epoch
from fastresnet.experiments.settings import PAPER_CIFAR_BUDGET, Settings, parse_depths, train_config
from fastresnet.experiments.tables import parse_markdown_table
from fastresnet.models import get_model
from fastresnet.training.checkpoint import CheckpointError, load_checkpoint
from fastresnet.training.fields import ConfigError
from fastresnet.training.metrics import read_jsonl

DEPTHS = (20, 32)
NETS = {"plain-20": "plain20", "plain-32": "plain32", "ResNet-20": "resnet20", "ResNet-32": "resnet32"}


def tiny(out, stop_at_step=0) -> Settings:
    # No per-run curves.png (a presentation field: the runs stay the same runs); the experiment's figure is drawn.
    return Settings(out=out, iterations=2, eval_every=0, batch_size=8, progress="off", stop_at_step=stop_at_step,
                    overrides={"plot": "false"})


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiments")
    logs = {"interrupted": [], "resumed": [], "rerun": []}
    interrupted = degradation.run(tiny(out, stop_at_step=1), DEPTHS, say=logs["interrupted"].append)
    plain20 = next((out / "runs").glob("plain20-*"))
    first_records = read_jsonl(plain20 / "metrics.jsonl")
    runs_after_interruption = len(list((out / "runs").glob("[!.]*")))  # not the hidden .locks
    done_after_interruption = (plain20 / DONE_NAME).exists()
    resumed = degradation.run(tiny(out), DEPTHS, say=logs["resumed"].append)
    checkpoints = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/checkpoint.pt")}
    rerun = degradation.run(tiny(out), DEPTHS, say=logs["rerun"].append)
    return {"out": out, "logs": logs, "interrupted": interrupted, "resumed": resumed, "rerun": rerun,
            "plain20": plain20, "first_records": first_records, "checkpoints": checkpoints,
            "runs_after_interruption": runs_after_interruption, "done_after_interruption": done_after_interruption}


def run_dir(out, model):
    return next((out / "runs").glob(f"{model}-*"))


def test_interrupted_run_keeps_its_checkpoint(experiment):
    assert experiment["interrupted"] is None
    assert [r["step"] for r in experiment["first_records"] if r["kind"] == "train"] == [1]
    assert experiment["runs_after_interruption"] == 1  # the experiment stopped at its first run
    assert not experiment["done_after_interruption"]


def test_rerun_resumes_the_unfinished_run(experiment):
    log = "\n".join(experiment["logs"]["resumed"])
    assert log.count("resumed:") == 1 and log.count("trained:") == 3, log
    records = read_jsonl(experiment["plain20"] / "metrics.jsonl")
    assert records[0] == experiment["first_records"][0]  # the step-1 record of the first invocation is kept
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]  # no step counted twice
    assert load_checkpoint(experiment["plain20"])["step"] == 2
    assert (experiment["plain20"] / DONE_NAME).is_file()


def test_rerun_of_a_finished_experiment_trains_nothing(experiment):
    log = "\n".join(experiment["logs"]["rerun"])
    assert log.count("finished earlier:") == 4, log
    assert {p: p.stat().st_mtime_ns for p in experiment["checkpoints"]} == experiment["checkpoints"]
    assert experiment["rerun"]["runs"] == experiment["resumed"]["runs"]


def test_table_numbers_are_those_of_the_metrics_files(experiment):
    out = experiment["out"]
    folder = out / "degradation-depths-20-32"  # not the default 20,56: its own folder
    assert (folder / "figure6.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = parse_markdown_table((folder / "table.md").read_text())
    assert [r["net"] for r in rows] == list(NETS)
    saved = json.loads((folder / "results.json").read_text())
    for row in rows:
        model = NETS[row["net"]]
        records = read_jsonl(run_dir(out, model) / "metrics.jsonl")
        evals = [r for r in records if r["kind"] == "eval"]
        last_train = [r for r in records if r["kind"] == "train" and r["step"] == 2]  # the last 10% of 2 steps
        assert len(evals) == 1 and len(last_train) == 1
        assert row["test error %"] == f"{evals[-1]['top1_error']:.2f}"
        assert row["train error %"] == f"{last_train[0]['error']:.2f}"
        assert saved["runs"][model]["final_test_error"] == evals[-1]["top1_error"]
        assert int(row["params"]) == sum(p.numel() for p in get_model(model).parameters())
    assert saved["verdict"]["shown"] == (saved["verdict"]["plain_rises"] and saved["verdict"]["residual_falls"])


def test_by_epoch_tables_are_those_of_the_metrics_files(experiment):
    text = (experiment["out"] / "degradation-depths-20-32" / "table.md").read_text()
    train_rows = parse_markdown_table(text.split("Training error % by epoch")[1])
    test_rows = parse_markdown_table(text.split("Test error % after each epoch")[1])
    for label, model in NETS.items():
        records = read_jsonl(run_dir(experiment["out"], model) / "metrics.jsonl")
        windows = [r["error"] for r in records if r["kind"] == "train"]  # two steps: all in epoch 1
        evals = [r for r in records if r["kind"] == "eval"]
        assert [r["epoch"] for r in train_rows] == [r["epoch"] for r in test_rows] == ["1"]
        assert train_rows[0][label] == f"{sum(windows) / len(windows):.2f}"
        assert test_rows[0][label] == f"{evals[-1]['top1_error']:.2f}"


def test_by_epoch_counts_a_window_for_the_epoch_it_ends_in():
    train = [{"epoch": e, "step": s, "error": err, "lr": lr} for e, s, err, lr in
             [(0.5, 2, 40.0, 0.1), (1.0, 4, 30.0, 0.1), (1.5, 6, 20.0, 0.01), (2.25, 9, 10.0, 0.01)]]
    evals = [{"epoch": 1.0, "step": 4, "top1_error": 35.0}, {"epoch": 2.25, "step": 9, "top1_error": 15.0}]
    assert by_epoch(train, evals) == [
        {"epoch": 1, "lr": 0.1, "train_error": 35.0, "test_error": 35.0},
        {"epoch": 2, "lr": 0.01, "train_error": 20.0, "test_error": None},
        {"epoch": 3, "lr": 0.01, "train_error": 10.0, "test_error": 15.0},  # a last, partial epoch counts as one
    ]


def test_error_axis_ends_where_the_nets_part_not_at_their_first_steps(monkeypatch):
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    from fastresnet.experiments import figures

    def summary(final: float) -> dict:
        return {"train_curve": [[1, 90.0], [9, final - 1]], "test_curve": [[9, final]]}

    fig, ax = plt.subplots()
    figures.error_curves(ax, [summary(6.0), summary(7.5)], ["a", "b"], "t")
    assert ax.get_ylim() == (0, figures.ERROR_AXIS_TOP * 7.5)  # the worst final test error, not step 1's 90%
    figures.error_curves(ax, [summary(6.0), summary(60.0)], ["a", "b"], "t")
    assert ax.get_ylim() == (0, 100)
    plt.close(fig)

    # Figure 6's two panels share the axis: it holds the worst net of both, whichever panel draws last.
    monkeypatch.setattr(figures, "_save", lambda fig, path: fig)
    fig = figures.figure6(None, [summary(12.0)], [summary(6.0)], (56,))
    assert [a.get_ylim() for a in fig.axes] == [(0, figures.ERROR_AXIS_TOP * 12.0)] * 2
    plt.close(fig)


def test_figures_say_which_seed_the_curves_are_and_that_the_bars_are_means(monkeypatch):
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    from fastresnet.experiments import figures

    monkeypatch.setattr(figures, "_save", lambda fig, path: fig)
    one = {"seed": 0, "seeds": [0], "train_curve": [[9, 5.0]], "test_curve": [[9, 6.0]], "final_test_error": 6.0}
    three = dict(one, seeds=[0, 1, 2], final_test_error=6.5)

    def legends(fig):
        curves, bars = fig.axes
        return curves.get_legend().get_title().get_text(), [t.get_text() for t in bars.get_legend().get_texts()]

    fig = figures.curves_and_finals(None, [one], ["resnet20"], "t")
    assert legends(fig) == ("bold: test, thin: train", ["this run"])
    plt.close(fig)
    fig = figures.curves_and_finals(None, [three, dict(three, seed=0)], ["resnet20", "resnet56"], "t")
    assert legends(fig) == ("bold: test, thin: train\nthe runs of seed 0", ["mean of 3 seeds"])
    plt.close(fig)


def nets(*errors: float) -> list[dict]:
    """One-seed summaries with these final training errors."""
    return [{"final_train_error": e, "seeds": [0]} for e in errors]


def test_verdict_needs_plain_rising_by_the_margin_and_residual_falling():
    assert degradation.verdict(nets(10.0, 12.0, 15.0), nets(9.0, 8.0, 7.5), margin=0.5)["shown"]
    assert not degradation.verdict(nets(10.0, 10.4), nets(9.0, 8.0), margin=0.5)["shown"]  # plain rises too little
    assert not degradation.verdict(nets(10.0, 12.0), nets(9.0, 9.0), margin=0.5)["shown"]  # ResNet does not fall
    v = degradation.verdict(nets(10.0, 12.0, 11.0), nets(9.0, 8.0, 7.0), margin=0.5)
    assert not v["plain_rises"] and v["residual_falls"]
    assert [s["difference"] for s in v["plain"]["steps"]] == [2.0, -1.0]
    assert v["decided"] is None and v["word"] == "not shown on one seed (its spread not measured)"

def hand_response_stds(checkpoint_dir, model_name):
    """Every response collected whole with forward hooks, then one torch.std over all of it."""
    state = load_checkpoint(checkpoint_dir)
    model = get_model(model_name)
    model.load_state_dict(state["model"])
    model.eval()
    blocks = len(model.layer1)
    names = ["bn1"] + [f"layer{s}.{b}.bn{k}" for s in (1, 2, 3) for b in range(blocks) for k in (1, 2)]
    modules = dict(model.named_modules())
    outputs = {name: [] for name in names}
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: outputs[n].append(o.detach().clone()))
               for n in names]
    data = build_loaders(DataConfig(backend="digits", batch_size=8, val_batch_size=500), device=torch.device("cpu"))
    with torch.no_grad():
        for images, _ in data.val:
            model(images)
    for h in handles:
        h.remove()
    return names, [torch.cat(outputs[n]).double().std(correction=0).item() for n in names]


def test_layer_responses_equal_a_hand_computation_with_hooks(experiment):
    out = experiment["out"]
    checkpoints = [str(run_dir(out, m)) for m in ("plain20", "resnet20")]
    result = layer_responses.run(tiny(out), DEPTHS, checkpoints=checkpoints, say=lambda *_: None)
    for net, model in zip(result["nets"], ("plain20", "resnet20")):
        names, expected = hand_response_stds(run_dir(out, model), model)
        assert net["model"] == model
        assert net["layers"] == [n.replace("bn", "conv") for n in names]  # 19 3x3 convs, network order
        assert len(net["stds"]) == 19
        for got, want, name in zip(net["stds"], expected, names):
            assert math.isclose(got, want, rel_tol=1e-6), (name, got, want)
    folder = out / "layer-responses"
    assert (folder / "figure7.png").is_file() and (folder / "results.json").is_file()
    rows = parse_markdown_table((folder / "table.md").read_text())
    assert [r["net"] for r in rows] == ["plain-20", "ResNet-20"]
    assert rows[0]["mean std"] == f"{sum(result['nets'][0]['stds']) / 19:.2f}"


def test_layer_responses_of_a_run_saved_when_num_classes_defaulted_to_1000(experiment, tmp_path):
    """Runs saved before data.num_classes became optional hold 1000 on every back end: measured as they trained."""
    state = load_checkpoint(run_dir(experiment["out"], "plain20"))
    state["config"]["data"]["num_classes"] = 1000
    torch.save(state, tmp_path / "checkpoint.pt")
    old = layer_responses.measure(tmp_path, torch.device("cpu"))
    assert old["stds"] == layer_responses.measure(run_dir(experiment["out"], "plain20"), torch.device("cpu"))["stds"]


def test_layer_responses_need_only_the_records_of_runs_trained_elsewhere(experiment, tmp_path):
    """A finished run's record holds its responses, measured at its end: copied without its checkpoint (as
    the results pages keep runs), it serves layer-responses with the numbers its checkpoint gives."""
    out = tmp_path / "elsewhere"
    for model in ("plain20", "resnet20"):
        shutil.copytree(run_dir(experiment["out"], model), out / "runs" / run_dir(experiment["out"], model).name,
                        ignore=shutil.ignore_patterns("*.pt"))
    result = layer_responses.run(tiny(out), (20,), say=lambda *_: None)
    for net, model in zip(result["nets"], ("plain20", "resnet20")):
        assert net["stds"] == layer_responses.measure(run_dir(experiment["out"], model), torch.device("cpu"))["stds"]
    # a record from before runs kept their responses, without its checkpoint: an error naming what is missing
    done = run_dir(out, "resnet20") / DONE_NAME
    record = json.loads(done.read_text())
    del record["responses"]
    done.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r"resnet20-\w+ finished before .* checkpoint.pt is not there"):
        layer_responses.run(tiny(out), (20,), say=lambda *_: None)


def test_paper_recipe_on_cifar_and_resnet110_warmup(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(b"")
    cfg = train_config(Settings(out=tmp_path, data=str(folder)), "resnet110")
    assert (cfg.length, cfg.lr_milestones, cfg.data.batch_size, cfg.lr) == (64000, (32000, 48000), 128, 0.1)
    assert (cfg.weight_decay, cfg.momentum, cfg.data.backend, cfg.unit) == (1e-4, 0.9, "cifar10", "step")
    assert (cfg.warmup_until_train_error, cfg.warmup_lr, cfg.warmup_kind) == (80.0, 0.01, "constant")
    assert PAPER_CIFAR_BUDGET.iterations == 64000
    assert train_config(Settings(out=tmp_path, data=str(folder)), "resnet56").warmup_until_train_error == 0
    with pytest.raises(ConfigError, match="not a cifar-10-batches-py folder"):
        train_config(Settings(out=tmp_path, data=str(tmp_path / "nowhere")), "resnet20")


def test_run_names_follow_the_settings(tmp_path):
    a = train_config(tiny(tmp_path), "resnet20")
    assert a.run_name == train_config(tiny(tmp_path, stop_at_step=1), "resnet20").run_name
    assert a.run_name == train_config(tiny(tmp_path), "resnet20", "A").run_name  # A is the CIFAR default
    assert a.run_name != train_config(tiny(tmp_path), "resnet20", "B").run_name
    assert a.run_name != train_config(Settings(out=tmp_path, iterations=3), "resnet20").run_name


def test_an_experiment_on_other_nets_or_seeds_keeps_each_ones_outputs(tmp_path):
    default = parse_depths(degradation.DEFAULT_DEPTHS, degradation.DEPTHS)
    assert Settings(out=tmp_path).outputs_folder("degradation", depths=(default, default)) == tmp_path / "degradation"
    folder = Settings(out=tmp_path, seeds=(0, 1, 2)).outputs_folder("degradation", depths=((20, 32, 44, 56), default))
    assert folder == tmp_path / "degradation-depths-20-32-44-56-seeds-0-1-2"
    assert Settings(out=tmp_path, seeds=(1,)).outputs_folder("warmup", depth=(110, 110), steps=(400, 800)) == \
        tmp_path / "warmup-steps-400-seeds-1"


def test_a_config_field_added_at_its_default_keeps_the_run_names(tmp_path, monkeypatch):
    """Runs take hours: a later TrainConfig field must not orphan them under a new name."""
    from fastresnet.experiments import runs
    from fastresnet.training import TrainConfig

    before = train_config(tiny(tmp_path), "resnet20")
    grown = dataclasses.make_dataclass("GrownConfig", [("new_knob", int, dataclasses.field(default=3))],
                                       bases=(TrainConfig,))
    monkeypatch.setattr(runs, "TrainConfig", grown)
    after = grown(**{f.name: getattr(before, f.name) for f in dataclasses.fields(TrainConfig)})
    assert runs.run_name(after) == runs.run_name(before)
    assert runs.run_name(dataclasses.replace(after, new_knob=4)) != runs.run_name(before)


@pytest.mark.parametrize("argv, message", [
    (["degradation", "--depths", "20"], "at least two"),
    (["degradation", "--depths", "20,21"], "choose from"),
    (["shortcuts", "--depth", "18"], "choose one of"),
    (["depth-sweep", "--set", "lr"], "FIELD=VALUE"),
    (["depth-sweep", "--iterations", "100", "--milestones", "50,100"], "inside the run"),
    (["depth-sweep", "--set", "no_such_field=1"], "unknown config field"),
    (["degradation", "--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_bad_arguments_are_clear_errors(argv, message, capsys, tmp_path):
    assert experiments_main([*argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.cuda
def test_degradation_and_layer_responses_on_the_gpu(tmp_path):
    """The GPU path (bf16 autocast, channels_last, fused blocks; compile off to keep it short) end to end."""
    settings = Settings(out=tmp_path, iterations=4, eval_every=0, batch_size=64, progress="off",
                        overrides={"compile": "off"})
    result = degradation.run(settings, DEPTHS, say=lambda *_: None)
    assert set(result["runs"]) == set(NETS.values())
    for summary in result["runs"].values():
        assert math.isfinite(summary["final_test_error"]) and math.isfinite(summary["final_train_error"])
    config = json.loads((run_dir(tmp_path, "resnet20") / "config.json").read_text())
    assert config["amp"] == "auto" and config["device"] == "auto"
    responses = layer_responses.run(settings, DEPTHS)
    assert all(len(n["stds"]) == (19 if n["model"].endswith("20") else 31) for n in responses["nets"])
    assert all(math.isfinite(s) and s > 0 for n in responses["nets"] for s in n["stds"])
