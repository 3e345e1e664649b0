"""batch_norm_act's candidates that have not run on a GPU (kernels/experimental/bn_act.py):

  "triton_single"      the training forward in one launch (statistics and normalisation by one program per
                       16 channels): offered up to SINGLE_PASS_MAX_ROWS rows, where host time and launches
                       decide; op batch_norm_act.forward (and .step)
  "triton_pipelined"   the backward with its reduction's row loop software-pipelined; batch_norm_act.backward
  "triton_one_launch"  inference in one launch, the running statistics folded in the kernel; batch_norm_act.eval
  "triton_wide"        the same over whole-row tiles, above 64 channels

Each is checked on its first call of a problem against the main tree's "triton" path.
"""

from __future__ import annotations

from fastresnet.experimental.common import checked
from fastresnet.ops import bn_act as ops
from fastresnet.ops.layout import as_rows, kernels

# triton_single runs one program per 16 channels, which can only pay off while the whole activation is
# small: offered up to the 14x14 stage at batch 256 (50,176 rows).
SINGLE_PASS_MAX_ROWS = 2**16


def _shelf_kernels():
    from fastresnet.kernels.experimental import bn_act

    return bn_act


def _single(x, weight, bias, residual, eps, relu):
    weight, bias = ops._fp32(weight, bias, x)
    y, mean, invstd, var_unbiased = _shelf_kernels().bn_train_fwd_single(x, weight, bias, eps, residual=residual,
                                                                        relu=relu)
    return y, mean, invstd, var_unbiased, ops._no_reserve(x), 0


def _forward(x, weight, bias, residual, eps, relu):
    return ops._batch_norm_act_train(x, weight, bias, residual, eps, relu, "triton")


def _pipelined(grad_y, x, weight, bias, residual, mean, invstd, relu, pipelined=True):
    weight, bias = ops._fp32(weight, bias, x)
    launch = _shelf_kernels().affine_act_bwd_pipelined if pipelined else kernels().bn_act.affine_act_bwd
    dx, sum_g, sum_gx, dres = launch(as_rows(grad_y), x, weight, bias, center=mean, invstd=invstd, residual=residual,
                                     relu=relu, param_grads=True, batch_stats=True)
    return dx, sum_gx * invstd, sum_g, dres


def _backward(grad_y, x, weight, bias, residual, mean, invstd, relu):
    return _pipelined(grad_y, x, weight, bias, residual, mean, invstd, relu, pipelined=False)


def _one_launch(x, running_mean, running_var, weight, bias, eps, residual, relu, wide=False):
    return _shelf_kernels().bn_eval_act_fwd(x, weight, bias, running_mean, running_var, eps, residual=residual,
                                            relu=relu, wide=wide)


def _wide(x, running_mean, running_var, weight, bias, eps, residual, relu):
    return _one_launch(x, running_mean, running_var, weight, bias, eps, residual, relu, wide=True)


def _eval(x, running_mean, running_var, weight, bias, eps, residual, relu):
    return ops.batch_norm_act(x, running_mean, running_var, weight, bias, False, 0.0, eps, residual, relu,
                              path="triton")


def _small(x) -> bool:
    return x.shape[0] * x.shape[2] * x.shape[3] <= SINGLE_PASS_MAX_ROWS


ops.EXPERIMENTAL.update({
    "triton_single": checked("batch_norm_act.forward", "triton_single", _single, _forward,
                             outputs=lambda out: (out[0], out[2])),  # y and invstd: a mean near 0 has no precision
    "triton_pipelined": checked("batch_norm_act.backward", "triton_pipelined", _pipelined, _backward,
                                outputs=lambda grads: grads),
    "triton_one_launch": checked("batch_norm_act.eval", "triton_one_launch", _one_launch, _eval),
    "triton_wide": checked("batch_norm_act.eval", "triton_wide", _wide, _eval),
})
ops.BN_FORWARD.add_experimental("triton_single", _small)
ops.BN_STEP.add_experimental("triton_single", _small)
ops.BN_BACKWARD.add_experimental("triton_pipelined")
ops.BN_EVAL.add_experimental("triton_one_launch")
ops.BN_EVAL.add_experimental("triton_wide", lambda x: x.shape[1] > 64)  # narrower, the same tiles
