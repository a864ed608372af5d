"""The models-from-code file MLflow runs to load a pruned model (see :mod:`pipeline.pyfunc_model`).

MLflow executes this file at ``mlflow.pyfunc.load_model`` time; ``set_model`` hands it the
wrapper whose ``load_context`` reads spec + safetensors. Import it only for that.
"""

import mlflow

from pipeline.pyfunc_model import PrunedModel

mlflow.models.set_model(PrunedModel())
