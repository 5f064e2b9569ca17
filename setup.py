"""keras-feed: feature-level ensemble knowledge distillation (FEED) for Keras 3."""

import setuptools

setuptools.setup(
    name="keras-feed",
    version="0.2.0",
    description=(
        "Distil an ensemble of teacher networks into one student at the "
        "feature-map level (FEED, Park & Kwak) with Keras 3 and TensorFlow."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["keras_feed", "keras_feed.*"]),
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3.12",
        "tensorflow-datasets>=4.9",
        # tensorflow-datasets imports it to prepare any dataset without declaring it.
        "importlib_resources",
        "absl-py>=1.0",
        "tensorboard>=2.16",
        "numpy",
        "matplotlib",
    ],
    # onnx: keras-feed-export --format=onnx (tf2onnx, through Keras' model.export)
    # and running the .onnx file (onnxruntime; keras-feed-eval reads it).
    # jax[cpu]: the tests run the distiller's core on the JAX backend as well.
    extras_require={
        "onnx": ["onnx>=1.14", "tf2onnx>=1.16", "onnxruntime>=1.17"],
        "test": ["pytest>=7", "jax[cpu]", "onnx>=1.14", "tf2onnx>=1.16", "onnxruntime>=1.17"],
    },
    entry_points={
        "console_scripts": [
            "keras-feed-train=keras_feed.cli.train:run",
            "keras-feed-eval=keras_feed.cli.evaluate:run",
            "keras-feed-export=keras_feed.cli.export:run",
            "keras-feed-analyze=keras_feed.cli.analyze:run",
        ]
    },
)
