"""The torch-facing ops over the Triton kernels: one file per op, and the tuner that chooses between
implementations (tuning.py).

  bn_act.py        affine_act, batch_norm_act, bn_act_stats, sync_batch_norm_act
  conv_bn_act.py   inference conv + folded BatchNorm (+ residual) (+ ReLU)
  conv_stats.py    training conv with its output's BatchNorm statistics, and its backward
  cudnn_graph.py   conv_stats through cuDNN's graph API (optional nvidia-cudnn-frontend)
  layout.py        dtypes, memory formats, conv output shapes, the rows the kernels address
"""
