"""fastresnet: the ResNets of He et al. (2015), trained and run fast on NVIDIA GPUs."""

__version__ = "0.1.0"
