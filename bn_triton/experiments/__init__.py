"""The paper's experiments, run on bn_triton's own layers (Ioffe & Szegedy 2015, arXiv:1502.03167).

    python -m bn_triton.experiments mnist      §4.1, Figure 1: a sigmoid MLP with and without BN
    python -m bn_triton.experiments lr-study   §4.2, Figures 2/3 at a laptop's scale

data.py loads the images (scikit-learn's bundled digits, or MNIST's IDX files); common.py holds
what the experiments share: the device, the printed header, a progress bar, the seed.
"""
