from setuptools import setup

setup(
    name="bn_triton",
    version="0.1.0",
    description="Batch Normalization (arXiv:1502.03167) as Triton kernels with a drop-in "
                "PyTorch front end",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # The kernels live in kernels/ at the root and install as bn_triton.kernels only: a
    # top-level `kernels` package would clash with another project of that name on PyPI.
    packages=["bn_triton", "bn_triton.kernels", "bn_triton.experiments"],
    package_dir={"bn_triton": "bn_triton", "bn_triton.kernels": "kernels"},
    # torch 2.11 / triton 3.6 (the GPU machines) up to torch 2.13 / triton 3.9 (here). torch
    # 2.9 is the oldest with every torch.library API used (custom_op, register_fake,
    # register_autograd and opcheck since 2.4; get_kernel, which the switch falls back
    # through, since 2.9). Triton 3.6 is the oldest release the compile checks and the test
    # suite have run under.
    install_requires=["torch>=2.9", "triton>=3.6", "numpy"],
    # expecttest: torch.testing._internal, whose OpInfo/ModuleInfo samples the parity tests
    # run, imports it.
    # tqdm: the progress bars of the experiments and of benchmarks.gpu_check.
    # pytest-xdist: `pytest -n auto` runs the suite on every core. Its tests are single-threaded
    # Python under the interpreter, so 2 cores take it in about half the time; tests/conftest.py
    # keeps test_compile.py's tests on one worker and splits the cores' threads among them.
    extras_require={"test": ["pytest", "pytest-benchmark", "pytest-xdist", "scikit-learn",
                             "matplotlib", "expecttest", "tqdm"],
                    # benchmarks/: pytest-benchmark files and `python -m benchmarks`' charts
                    "bench": ["matplotlib", "pytest-benchmark", "tqdm"],
                    # python -m bn_triton.experiments: the bundled digits data set, the plots
                    "experiments": ["scikit-learn", "matplotlib", "tqdm"]},
)
