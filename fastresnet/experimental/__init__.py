"""The experimental shelf: candidates that have not run on a GPU, kept apart from the proven core.

fastresnet.ops.tuning loads this package when FASTRESNET_EXPERIMENTAL=1 (bench/gpu_check.sh sets it), and
only then are its candidates offered; each is checked on its first call of a problem against a path of
the main tree (common.checked): one that computes wrong warns and raises, which leaves it out of the
measurement however fast it is. An illegal memory access cannot be caught that way, hence the switch.
A candidate moves into the main tree in the commit that records the GPU run proving it (bench/RESULTS.md).

  bn_act.py        batch_norm_act: "triton_single" forward, "triton_pipelined" backward, "triton_one_launch"
                   and "triton_wide" eval (kernels/experimental/bn_act.py)
  conv_bn_act.py   conv_bn_act: "triton:<tile>", "triton_gemm:<tile>" (TMA + wgmma, 1x1), "cublaslt_fused" (1x1)
  conv_stats.py    conv_stats.forward "triton:<tile>"; conv_stats.backward "triton_wgrad", "triton_dgrad",
                   "triton_bwd" (kernels/experimental/conv_train_bwd.py), their tiles conv_wgrad.tile and
                   conv_dgrad.tile
  cudnn_graph.py   fused_block "cudnn_graph": cuDNN's own conv + statistics fusion (nvidia-cudnn-frontend)
  common.py        the first-call check, and FASTRESNET_TILES
"""

from fastresnet.experimental import bn_act, conv_bn_act, conv_stats, cudnn_graph  # noqa: F401 (each registers)
