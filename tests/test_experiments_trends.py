"""Verdicts over seeds: a step between nets is decided only when it clears twice its standard error."""

import math

from fastresnet.experiments import degradation, depth_sweep, layer_responses
from fastresnet.experiments.runs import over_seeds
from fastresnet.experiments.trends import decided_over, standard_error, steps_text, trend, verdict_word


def net(*errors: float) -> dict:
    """A net trained once per error given, as runs.over_seeds combines its seeds."""
    return over_seeds([{"seed": seed, "final_train_error": e, "final_test_error": e, "train_curve": [],
                        "by_epoch": []}
                       for seed, e in enumerate(errors)])


def test_standard_error_of_a_difference_of_means():
    a, b = net(10.0, 12.0, 11.0), net(7.0, 6.0, 8.0)  # stds 1 and 1, three seeds each
    assert math.isclose(standard_error(a, b, "final_test_error"), math.sqrt(2 / 3))
    assert standard_error(net(10.0), b, "final_test_error") is None  # one seed: no spread to speak of


def test_a_step_is_decided_beyond_two_standard_errors_from_its_bound():
    clear = trend([net(10.0, 12.0, 11.0), net(7.0, 6.0, 8.0)], "final_test_error")  # -4 against 2 x 0.82
    assert clear["holds"] and clear["decided"] and verdict_word(True, clear["decided"]) == "shown"
    close = trend([net(10.0, 12.0, 11.0), net(10.0, 11.0, 9.0)], "final_test_error")  # -1 against 2 x 0.82
    assert close["holds"] and close["decided"] is False
    assert verdict_word(close["holds"], close["decided"]) == "not decided: within the seeds' spread"
    rising = trend([net(10.0, 11.0, 12.0), net(11.6, 11.7, 11.5)], "final_test_error", rises_by=0.5)
    assert rising["holds"] and not rising["decided"]  # +0.6 is only 0.1 above the margin
    assert steps_text(rising).startswith("+0.60 ± ")


def test_a_failing_conjunction_is_decided_by_any_decided_failure():
    up, down, unclear = {"holds": True, "decided": True}, {"holds": False, "decided": True}, \
        {"holds": False, "decided": False}
    assert decided_over([up, up]) is True
    assert decided_over([up, {"holds": True, "decided": False}]) is False
    assert decided_over([unclear, down]) is True
    assert decided_over([up, unclear]) is False
    assert decided_over([up, {"holds": False, "decided": None}]) is None
    assert decided_over([{"holds": True, "decided": None}, up]) is None


def test_degradation_over_seeds_is_shown_only_where_the_seeds_decide_it():
    plain = [net(6.0, 6.2, 5.8), net(11.5, 11.0, 12.0)]
    decided = degradation.verdict(plain, [net(4.0, 4.1, 3.9), net(3.0, 3.2, 2.8)], margin=0.5)
    assert decided["shown"] and decided["decided"] and decided["word"] == "shown"
    noisy = degradation.verdict(plain, [net(4.0, 5.0, 3.0), net(3.5, 4.5, 2.5)], margin=0.5)
    assert noisy["shown"] and noisy["decided"] is False  # ResNet falls 0.5, with a standard error of 0.82


def test_depth_sweep_verdict_reads_the_test_errors_in_depth_order():
    v = depth_sweep.deeper_is_better([net(8.0, 8.2, 7.8), net(7.0, 7.1, 6.9), net(7.2, 7.0, 7.4)])
    assert not v["holds"] and v["decided"] is False and [round(s["difference"], 2) for s in v["steps"]] == [-1.0, 0.2]
    assert depth_sweep.deeper_is_better([net(8.0)])["word"] == "not decided: one depth, nothing to compare"


def test_layer_response_findings_over_seeds():
    def nets(model, *means):  # one net per seed, each with two layers around its mean std
        return [{"model": model, "seed": seed, "stds": [m - 0.1, m + 0.1]} for seed, m in enumerate(means)]

    f = layer_responses.findings(nets("plain20", 1.0, 1.1, 0.9) + nets("resnet20", 0.8, 0.81, 0.79)
                                 + nets("plain56", 1.8, 0.8, 2.8) + nets("resnet56", 0.7, 0.9, 0.8))
    assert math.isclose(f["mean_std"]["plain56"], 1.8) and math.isclose(f["mean_std_spread"]["plain56"], 1.0)
    assert f["resnet_below_plain"]["resnet20"]["holds"] and f["resnet_below_plain"]["resnet20"]["decided"]
    assert f["resnet_below_plain"]["resnet56"]["holds"] and f["resnet_below_plain"]["resnet56"]["decided"] is False
    deeper = f["deeper_resnet_smaller"]  # 0.80 to 0.80: no step down
    assert not deeper["holds"] and [round(s["difference"], 6) for s in deeper["steps"]] == [0.0]
    assert layer_responses.yes_no(f["resnet_below_plain"]["resnet56"]) == "yes (within the seeds' spread)"
    one_seed = layer_responses.findings(nets("plain20", 1.0) + nets("resnet20", 0.8))
    assert layer_responses.yes_no(one_seed["resnet_below_plain"]["resnet20"]) == "yes"
    assert one_seed["deeper_resnet_smaller"] is None
