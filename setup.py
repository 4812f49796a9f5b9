"""Installs the FLAIR benchmark package and its command-line entry points.

Dependencies are installed by `make install` from requirements.lock, the
whole resolution of requirements.txt with overrides.txt (TFF 0.87's own pins
do not resolve; see README "Install").
"""

import setuptools

setuptools.setup(
    name="flair-benchmark",
    version="0.1.0",
    description="Federated learning benchmarks on FLAIR with TensorFlow Federated",
    python_requires=">=3.9,<3.12",
    packages=setuptools.find_packages(include=["benchmark", "benchmark.*"]),
    py_modules=["download_dataset", "prepare_tfrecords", "export_pfl_hdf5"],
    entry_points={
        "console_scripts": [
            "flair-download=download_dataset:run",
            "flair-prepare=prepare_tfrecords:run",
            "flair-export-pfl-hdf5=export_pfl_hdf5:run",
            "flair-central=benchmark.central_main:run",
            "flair-federated=benchmark.federated_main:run",
            "flair-active=benchmark.active_main:run",
            "flair-explore=benchmark.explore:run",
            "flair-synthetic=benchmark.synthetic_dataset:run",
            "flair-report=benchmark.report:run",
        ],
    },
)
