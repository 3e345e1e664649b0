"""The paper's numbers that the experiments are set beside (He et al., 2015)."""

from __future__ import annotations

# Table 6: CIFAR-10 test error (%) and parameters of the CIFAR ResNets (option A shortcuts).
TABLE6_TEST_ERROR = {
    "resnet20": 8.75,
    "resnet32": 7.51,
    "resnet44": 7.17,
    "resnet56": 6.97,
    "resnet110": 6.43,  # best of 5 runs; mean 6.61 +- 0.16
    "resnet1202": 7.93,
}
TABLE6_PARAMS = {
    "resnet20": 0.27e6,
    "resnet32": 0.46e6,
    "resnet44": 0.66e6,
    "resnet56": 0.85e6,
    "resnet110": 1.7e6,
    "resnet1202": 19.4e6,
}

# Table 3: ImageNet validation top-1 error (%, 10-crop) of 34-layer nets by shortcut option.
TABLE3_TOP1_ERROR = {"plain34": 28.54, "A": 25.03, "B": 24.52, "C": 24.19}
TABLE3_FINDING = (
    "Table 3 (ImageNet, 34 layers, top-1 10-crop): A 25.03%, B 24.52%, C 24.19%, plain 28.54%. "
    "All three options are far better than the plain net and differ from each other by under a point "
    "(0.84): projection shortcuts are not essential to addressing degradation."
)

# Figure 6 and Section 4.2: the degradation problem on CIFAR-10.
FIGURE6_FINDING = (
    "Figure 6: the deeper plain nets have higher training error (plain-56 > plain-20), "
    "while the deeper ResNets have lower training error (ResNet-56 < ResNet-20)."
)

# Figure 7: standard deviations of the 3x3 layers' responses.
FIGURE7_FINDING = (
    "Figure 7: ResNets have generally smaller responses than their plain counterparts, "
    "and the deeper ResNet has smaller responses still."
)
