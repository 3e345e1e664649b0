"""fastresnet: the ResNets of He et al. (2015), trained and run fast on NVIDIA GPUs."""

__version__ = "0.1.0"

from fastresnet.convert import ConversionReport, convert, unfuse  # noqa: E402
from fastresnet.fold import fold_bn  # noqa: E402

__all__ = ["ConversionReport", "convert", "fold_bn", "unfuse", "__version__"]
