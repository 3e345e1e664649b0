"""The paper's experiments as commands: `python -m fastresnet.experiments NAME`.

    python -m fastresnet.experiments degradation                      # digits, minutes on a CPU
    python -m fastresnet.experiments degradation --data ~/cifar-10-batches-py --depths 20,32,44,56
    python -m fastresnet.experiments layer-responses --checkpoint runs/plain20-... runs/resnet20-...
    python -m fastresnet.experiments depth-sweep --data ~/cifar-10-batches-py --with-1202
    python -m fastresnet.experiments shortcuts --depth 32
    python -m fastresnet.experiments warmup --data ~/cifar-10-batches-py     # ResNet-110 with and without
    python -m fastresnet.experiments degradation --dataset fashion-mnist    # apt-get install dataset-fashion-mnist

Each trains its nets with `fastresnet.training.train` (the same fast path as
`python -m fastresnet.train`), writes PNG figures, JSON numbers and a
markdown table under `--out`, prints where they went, and, run again after
an interruption, skips finished runs and resumes unfinished ones.
"""

from . import degradation, depth_sweep, layer_responses, shortcuts, warmup
from .settings import Settings

EXPERIMENTS = {
    degradation.NAME: degradation,
    layer_responses.NAME: layer_responses,
    depth_sweep.NAME: depth_sweep,
    shortcuts.NAME: shortcuts,
    warmup.NAME: warmup,
}

__all__ = ["EXPERIMENTS", "Settings", "degradation", "depth_sweep", "layer_responses", "shortcuts", "warmup"]
