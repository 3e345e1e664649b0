"""Experiments over several seeds (the paper's "best (mean +- std)") and the ResNet-110 warm-up comparison,
scaled down to digits and a few steps."""

import contextlib
import fcntl
import json
import math
import threading
import time

import pytest

from fastresnet.experiments import degradation, warmup
from fastresnet.experiments.__main__ import main as experiments_main
from fastresnet.experiments.runs import by_epoch_over_seeds, over_seeds
from fastresnet.experiments.settings import Settings, configs_over_seeds
from fastresnet.experiments.tables import by_epoch_tables, over_seeds_cell, parse_markdown_table
from fastresnet.training.fields import ConfigError


def tiny(out, **kwargs) -> Settings:
    return Settings(out=out, iterations=2, eval_every=0, batch_size=8, progress="off",
                    overrides={"plot": "false"}, **kwargs)


def test_over_seeds_is_the_papers_best_mean_and_std():
    runs = [{"seed": s, "final_train_error": t, "final_test_error": e, "train_curve": [[1, t]],
             "by_epoch": [{"epoch": 1, "lr": 0.1, "train_error": t, "test_error": e}]}
            for s, t, e in ((0, 10.0, 7.0), (1, 12.0, 6.0), (2, 11.0, 8.0))]
    combined = over_seeds(runs)
    assert combined["seeds"] == [0, 1, 2] and combined["train_curve"] == [[1, 10.0]]  # the first seed's curves
    assert combined["final_test_error"] == 7.0 and combined["final_test_error_best"] == 6.0
    assert math.isclose(combined["final_test_error_std"], 1.0) and combined["final_test_error_seeds"] == [7.0, 6.0, 8.0]
    assert combined["final_train_error"] == 11.0
    assert over_seeds_cell(combined) == "6.00 (7.00 ± 1.00)"
    assert over_seeds_cell(over_seeds(runs[:1])) == "7.00"


def test_by_epoch_over_seeds_is_their_mean_and_empty_where_a_seed_has_no_value():
    def run(*rows):
        return [{"epoch": e, "lr": 0.1, "train_error": t, "test_error": v} for e, t, v in rows]
    combined = by_epoch_over_seeds([run((1, 30.0, 20.0), (2, 10.0, None), (3, 5.0, 4.0)),
                                    run((1, 20.0, 10.0), (2, 30.0, 8.0)),
                                    run((1, 40.0, 30.0), (2, 20.0, 6.0), (3, 7.0, 5.0))])
    assert combined == [{"epoch": 1, "lr": 0.1, "train_error": 30.0, "test_error": 20.0},
                        {"epoch": 2, "lr": 0.1, "train_error": 20.0, "test_error": None},  # the first run not tested
                        {"epoch": 3, "lr": 0.1, "train_error": None, "test_error": None}]  # the second stopped
    summaries = [{"seed": s, "final_train_error": 1.0, "final_test_error": 1.0, "by_epoch": run((1, t, t))}
                 for s, t in ((0, 30.0), (1, 20.0))]
    table = by_epoch_tables([over_seeds(summaries)], ["resnet20"])
    assert "Training error % by epoch, the mean of its logged windows (mean over 2 seeds)" in table
    assert parse_markdown_table(table.split("Test error % after each epoch")[1])[0]["resnet20"] == "25.00"


def test_configs_train_every_net_of_a_seed_before_the_next_seed(tmp_path):
    configs = configs_over_seeds(tiny(tmp_path, seeds=(0, 3)), [("plain20", ""), ("resnet20", "B")])
    assert [(c.seed, c.model, c.shortcut) for c in configs] == [
        (0, "plain20", ""), (0, "resnet20", "B"), (3, "plain20", ""), (3, "resnet20", "B")]
    assert len({c.run_name for c in configs}) == 4
    for bad in ((), (1, 1), (-1,)):
        with pytest.raises(ConfigError, match="--seeds"):
            tiny(tmp_path, seeds=bad)


def test_degradation_over_two_seeds_reports_best_mean_and_std(tmp_path):
    result = degradation.run(tiny(tmp_path, seeds=(0, 1)), (20, 32), say=lambda *_: None)
    assert len(list((tmp_path / "runs").glob("[!.]*"))) == 8  # four nets, two seeds
    assert result["runs"]["resnet20"]["seeds"] == [0, 1]
    rows = parse_markdown_table((tmp_path / "degradation-depths-20-32-seeds-0-1" / "table.md").read_text())
    header = "test error %, best (mean ± std) of 2 seeds"
    errors = result["runs"]["plain32"]["final_test_error_seeds"]
    assert rows[1]["net"] == "plain-32"
    assert rows[1][header] == f"{min(errors):.2f} ({sum(errors) / 2:.2f} ± {abs(errors[0] - errors[1]) / 2 ** 0.5:.2f})"
    train = result["runs"]["plain32"]["final_train_error_seeds"]
    train_cell = rows[1]["train error %, best (mean ± std) of 2 seeds"]
    assert train_cell.startswith(f"{min(train):.2f} ({sum(train) / 2:.2f} ± ")


def test_seeds_flag_is_checked(capsys):
    assert experiments_main(["degradation", "--seeds", "0,x"]) == 2
    assert "--seeds '0,x'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def warmed(tmp_path_factory):
    out = tmp_path_factory.mktemp("warmup")
    settings = Settings(out=out, iterations=8, eval_every=0, batch_size=8, progress="off",
                        overrides={"plot": "false", "log_every": "1"})
    first = warmup.run(settings, depth=20, steps=3, say=lambda *_: None)
    said = []
    again = warmup.run(settings, depth=20, steps=3, say=said.append)
    return {"out": out, "settings": settings, "first": first, "again": again, "said": said}


def test_warmup_trains_the_first_steps_with_and_without(warmed):
    curves = warmed["first"]["curves"]
    assert [r["step"] for r in curves["with warm-up"]["records"]] == [1, 2, 3]
    with_lr = [r["lr"] for r in curves["with warm-up"]["records"]]
    without_lr = {r["lr"] for r in curves["without warm-up"]["records"]}
    # both lrs scale with the batch (8 of the recipe's 128); the warm-up may end after its first window
    assert with_lr[0] == 0.01 * 8 / 128 and set(with_lr) <= {0.01 * 8 / 128, 0.1 * 8 / 128}
    assert without_lr == {0.1 * 8 / 128}
    runs = sorted(p.name for p in (warmed["out"] / "runs").glob("[!.]*"))
    assert len(runs) == 2
    table = parse_markdown_table((warmed["out"] / "warmup-depth-20-steps-3" / "table.md").read_text())
    assert [row["run"] for row in table] == ["with warm-up", "without warm-up"]


def test_warmup_again_reads_its_runs_without_training(warmed):
    assert not any(line.startswith("resnet20 (") for line in warmed["said"])  # no "training ..." line
    assert warmed["again"]["curves"] == warmed["first"]["curves"]


def test_a_diverged_run_is_remembered_and_decides_the_verdict(warmed):
    without = warmed["first"]["curves"]["without warm-up"]["run_dir"]
    (warmed["out"] / "runs" / without.rsplit("/", 1)[1] / warmup.DIVERGED_NAME).write_text(
        json.dumps({"message": "the loss became NaN", "step": 2}))
    result = warmup.run(warmed["settings"], depth=20, steps=3, say=lambda *_: None)
    assert result["curves"]["without warm-up"]["diverged"] == "the loss became NaN"
    assert result["shown"] is True


def test_warmup_flags_are_checked(tmp_path, capsys):
    assert experiments_main(["warmup", "--depth", "18", "--out", str(tmp_path)]) == 2
    assert experiments_main(["warmup", "--steps", "500", "--out", str(tmp_path)]) == 2  # digits runs 400 steps
    err = capsys.readouterr().err
    assert "--depth 18" in err and "--steps 500" in err


@contextlib.contextmanager
def held_by_another_process(out, run_name: str):
    """The run's lock, held as a second experiment command training it would hold it."""
    from fastresnet.experiments.runs import LOCKS_NAME

    locks = out / "runs" / LOCKS_NAME
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{run_name}.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        yield


def test_a_run_another_process_trains_is_waited_for_not_trained_twice(tmp_path):
    from fastresnet.experiments.runs import train_or_resume
    from fastresnet.experiments.settings import train_config

    cfg = train_config(tiny(tmp_path), "resnet20")
    run_dir = tmp_path / "runs" / cfg.run_name
    said, outcome = [], {}
    with held_by_another_process(tmp_path, cfg.run_name):
        waiter = threading.Thread(target=lambda: outcome.update(result=train_or_resume(cfg, said.append)))
        waiter.start()
        time.sleep(1.0)
        assert not run_dir.exists() and said == [f"    another process is training {cfg.run_name}; waiting for it"]
    waiter.join(timeout=300)
    assert outcome["result"].finished and outcome["result"].action == "trained"


def test_a_run_another_process_trains_is_put_off_until_the_others_are_trained(tmp_path):
    from fastresnet.experiments.runs import DONE_NAME, train_all

    configs = configs_over_seeds(tiny(tmp_path), [("resnet20", ""), ("plain20", "")])
    busy, free = (tmp_path / "runs" / c.run_name for c in configs)
    said, result = [], {}
    with held_by_another_process(tmp_path, configs[0].run_name):
        worker = threading.Thread(target=lambda: result.update(done=train_all(configs, said.append)))
        worker.start()
        deadline = time.monotonic() + 300
        while not (free / DONE_NAME).exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (free / DONE_NAME).exists() and not busy.exists()  # the second run trained while the first waited
        assert f"    another process is training {configs[0].run_name}; coming back to it after the others" in said
    worker.join(timeout=300)
    outcomes, finished = result["done"]
    assert finished and [o.name for o in outcomes] == [c.run_name for c in configs]  # in the configs' order
    assert [o.action for o in outcomes] == ["trained", "trained"] and (busy / DONE_NAME).exists()
