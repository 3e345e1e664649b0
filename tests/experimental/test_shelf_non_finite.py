"""The experimental shelf's BatchNorm and conv backward kernels put NaN and Inf where torch does, as
tests/test_non_finite.py checks for the main tree's: each shelf candidate pinned, through Triton's
interpreter, against nn.BatchNorm2d (+ add) + ReLU and torchvision's BasicBlock. Each candidate's check
on its first call of a problem meets the planted values too: NaN and Inf where the main tree's path has
them are no mismatch."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_non_finite import (
    INF, NAN, PROPERTY, check_batch_norm_act_steps, check_block_steps, conv_plants, plants,
)

import fastresnet.experimental.bn_act  # noqa: F401  (registers the shelf's BatchNorm candidates)
import fastresnet.experimental.conv_stats  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|overflow|divide by zero) encountered:RuntimeWarning")

BN_PINS = ["batch_norm_act.forward=triton_single", "batch_norm_act.backward=triton_pipelined",
           "batch_norm_act.eval=triton_one_launch"]


@settings(PROPERTY, max_examples=6)
@given(
    pins=st.sampled_from(BN_PINS),
    shape=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3)),
    channels_last=st.booleans(),
    momentum=st.sampled_from([0.1, None]),
    affine=st.booleans(),
    residual=st.booleans(),
    relu=st.booleans(),
    steps=st.lists(st.tuples(st.booleans(), plants, plants, plants), min_size=1, max_size=2),
)
@example(pins=BN_PINS[0], shape=(2, 3, 2, 2), channels_last=True, momentum=0.1, affine=True, residual=True, relu=True,
         steps=[(True, [(5, NAN)], [(2, INF)], []), (True, [(3, 1e30)], [], [])])
@example(pins=BN_PINS[1], shape=(2, 3, 2, 2), channels_last=False, momentum=None, affine=True, residual=True,
         relu=True, steps=[(True, [(4, -INF)], [], [(6, NAN)])])
@example(pins=BN_PINS[2], shape=(2, 3, 2, 2), channels_last=True, momentum=0.1, affine=True, residual=False,
         relu=True, steps=[(True, [(1, NAN)], [], []), (False, [(9, INF)], [], [])])
def test_shelf_batch_norm_act_puts_nan_and_inf_where_torch_does(pins, shape, channels_last, momentum, affine,
                                                                residual, relu, steps):
    check_batch_norm_act_steps("triton", pins, shape, channels_last, momentum, 1e-5, affine, True, residual, relu,
                               steps)


@pytest.mark.parametrize("backward", ["triton_wgrad", "triton_dgrad", "triton_bwd"])
@settings(PROPERTY, max_examples=1)
@given(geometry=st.sampled_from([(4, 4, 1), (4, 8, 2)]), steps=st.lists(
    st.tuples(st.just(True), conv_plants, st.just(False)), min_size=1, max_size=1))
@example(geometry=(4, 4, 1), steps=[(True, [(5, NAN)], False)])
@example(geometry=(4, 8, 2), steps=[(True, [(30, 1e30), (7, -INF)], False)])
def test_shelf_conv_backward_puts_nan_and_inf_where_torch_does(backward, geometry, steps):
    """The shelf's conv_stats backward kernels (the ReLU's mask recomputed in the dgrad epilogue)."""
    check_block_steps("triton", f"conv_stats.backward={backward}", geometry, 4, steps)
