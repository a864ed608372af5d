"""An MLflow ``pyfunc`` flavor for pruned models, logged with MLflow's *models-from-code*.

MLflow stores no pickled Python object here: the logged model holds the code file
:mod:`pipeline.mlflow_model_code` (which calls ``mlflow.models.set_model``), a copy of the few
``pipeline`` modules it needs (``code_paths``) and the pruned-model folder (``spec.json`` +
``model.safetensors``) as an artifact. ``mlflow.pyfunc.load_model`` runs that code file, and
:meth:`PrunedModel.load_context` rebuilds the network with :func:`pipeline.spec.load_pruned`:
the same path ``prunepipe`` itself loads through, and nothing is unpickled.

The signature says what a client sends and gets back: a float32 image batch
``(N, 3, H, W)``, already normalised as in training, in; logits ``(N, classes)`` out.
"""

from __future__ import annotations

import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch

PRUNED_ARTIFACT = "pruned"  # the artifact key (and folder) of spec.json + model.safetensors
MODEL_NAME = "model"  # the logged model's name inside its run
CODE_FILE = Path(__file__).with_name("mlflow_model_code.py")
# what the code file imports at load time: copied into the model so a serving host needs no prunepipe
CODE_MODULES = ("__init__.py", "errors.py", "textfiles.py", "config.py", "weights_header.py", "models.py", "spec.py",
                "pyfunc_model.py")
# the distributions the loader imports, pinned to the versions it was logged with
REQUIREMENTS = ("torch", "torchvision", "safetensors", "numpy", "pydantic", "pyyaml", "mlflow")


class PrunedModel(mlflow.pyfunc.PythonModel):
    """Pyfunc wrapper: an image batch in, the pruned network's logits out (CPU, eval mode)."""

    def load_context(self, context) -> None:
        from pipeline.spec import load_pruned

        self.model, self.spec = load_pruned(context.artifacts[PRUNED_ARTIFACT])

    # np.ndarray is the one array hint MLflow takes without inferring a (list-of-rows) schema of
    # its own from it (and without warning that the hint is missing): the tensor signature logged
    # with the model stays the contract
    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        x = np.asarray(model_input, dtype=np.float32)
        size = int(self.spec.get("image_size", 224))
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"input: expected an image batch of shape (N, 3, {size}, {size}), got {x.shape}")
        with torch.inference_mode():
            return self.model(torch.from_numpy(x)).numpy()


def pinned_requirements() -> list[str]:
    """``name==version`` for each distribution the loader needs, as installed here (the local
    ``+cu...`` build tag dropped: the index serves the plain version)."""
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in REQUIREMENTS]


def signature(num_classes: int, image_size: int):
    """Tensor signature: float32 ``(-1, 3, S, S)`` images → float32 ``(-1, classes)`` logits."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, image_size, image_size))]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes))]))


def input_example(image_size: int) -> np.ndarray:
    """One deterministic normalised-looking image (MLflow stores it and checks predict runs on it)."""
    return np.random.default_rng(0).standard_normal((1, 3, image_size, image_size)).astype(np.float32)


def log_pyfunc(folder: str | Path, name: str = MODEL_NAME):
    """Log the pruned-model ``folder`` as a pyfunc model of the active run; returns MLflow's ``ModelInfo``."""
    from pipeline.spec import read_spec

    folder = Path(folder)
    spec = read_spec(folder)
    size, classes = int(spec.get("image_size", 224)), int(spec["num_classes"])
    with tempfile.TemporaryDirectory(prefix="prunepipe-code-") as tmp:
        pkg = Path(tmp) / "pipeline"
        pkg.mkdir()
        for module in CODE_MODULES:
            shutil.copy2(Path(__file__).with_name(module), pkg / module)
        return mlflow.pyfunc.log_model(
            name=name, python_model=str(CODE_FILE), artifacts={PRUNED_ARTIFACT: str(folder)},
            code_paths=[str(pkg)], signature=signature(classes, size), input_example=input_example(size),
            pip_requirements=pinned_requirements(),
        )
