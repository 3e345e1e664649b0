"""The torch-facing ops over the Triton kernels: one file per op, and the tuner that chooses between
implementations (tuning.py).

  bn_act.py        batch_norm_act, affine_act, bn_act_stats
  conv_bn_act.py   inference conv + folded BatchNorm (+ residual) (+ ReLU)
  conv_stats.py    training conv with its output's BatchNorm statistics, and its backward
  layout.py        the one import of the kernels, dtypes, memory formats, conv output shapes, the checks

Every op is the same three steps, eagerly and under torch.compile: validate its inputs, ask its tuned
choice once (fastresnet.ops.tuning, which alone times and caches), call its torch.library custom op with
the chosen path. A BatchNorm's parameters are weight and bias, as in torch; scale and shift are a
BatchNorm folded to one multiply-add per channel.
"""
