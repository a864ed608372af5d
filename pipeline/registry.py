"""MLflow: one run per trial, registered versions, aliases, promotion.

The embedded default is a local SQLite store with an artifact folder beside it; any tracking
URI works by config. A registered version's source is the trial's logged pyfunc model
(:mod:`pipeline.pyfunc_model`: models-from-code around the JSON spec + safetensors folder), so
``mlflow.pyfunc.load_model`` and ``mlflow models serve`` take it and loading it back never
unpickles anything. Runs logged before that flavor existed register their ``model/`` folder.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config import RegistryConfig
from pipeline.errors import PrunepipeError

CHALLENGER, CHAMPION = "challenger", "champion"
# metrics copied onto a registered version as tags, so `promote` and users see them there
# the run tag naming the trial's logged pyfunc model (MLflow 3 logged-model id)
MODEL_ID_TAG = "prunepipe.model_id"
# a trial run's folder (its worker logs) and its Tune trial id, for the search that ends it
OUTPUT_DIR_TAG, TRIAL_TAG = "prunepipe.output_dir", "prunepipe.trial"
# a run's segment of its trial's journal (pipeline/journal.py): `sync` finds the run by it
JOURNAL_KEY_TAG = "prunepipe.journal_key"
# MLflow 3's UI opens an experiment without this tag on the GenAI traces overview
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
VERSION_METRICS = ("val_top1", "val_top5", "macs", "params", "macs_reduction", "img_s", "speedup", "speedup_low",
                   "speedup_high", "speed_reliable", "speedup_efficiency", "target_speedup", "target_measured_speedup",
                   "channels_last", "compiled_speedup", "compiled_img_s")

logging.getLogger("mlflow").setLevel(logging.WARNING)
logging.getLogger("alembic").setLevel(logging.WARNING)


class RegistryError(PrunepipeError, RuntimeError):
    """A registry lookup or action that cannot be done (unknown model, missing alias...)."""


def _artifact_root(tracking_uri: str) -> str | None:
    if tracking_uri.startswith("sqlite:///"):
        return str(Path(tracking_uri.removeprefix("sqlite:///")).parent / "artifacts")
    return None  # a server decides


# MLflow's HTTP client retries a refused connection 7 times with exponential backoff (about
# 4 minutes, seen here) before it raises, on every call. A trial keeps its records in its
# journal (pipeline/journal.py) instead, so it only needs to learn quickly that the store is
# down: a few seconds for a refused connection, under a minute for a silent host. A user's own
# setting of these variables wins.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


def bound_http_retries() -> None:
    """Cap MLflow's HTTP retries and timeout for this process (and the workers it starts),
    unless the user set them."""
    for key, value in HTTP_LIMITS.items():
        os.environ.setdefault(key, value)


def connect(cfg: RegistryConfig) -> MlflowClient:
    """Point MLflow at ``cfg.tracking_uri`` (creating the SQLite folder) and select the
    experiment; :class:`RegistryError` (one line) if the store does not answer."""
    uri = cfg.tracking_uri
    bound_http_retries()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri  # child processes (Ray workers) see the same store
    client = MlflowClient(uri)
    try:
        exp = client.get_experiment_by_name(cfg.experiment)
    except Exception as err:  # noqa: BLE001 - MLflow wraps a refused connection in its generic exception
        raise RegistryError(f"registry.tracking_uri = {uri}: the MLflow store does not answer "
                            f"({first_line(err)})") from None
    if exp is None:
        root = _artifact_root(uri)
        try:
            client.create_experiment(cfg.experiment, artifact_location=Path(root).as_uri() if root else None)
        except MlflowException:
            pass  # another trial created it first
    exp = mlflow.set_experiment(cfg.experiment)
    if exp.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return client


def first_line(err: BaseException, limit: int = 300) -> str:
    """An exception as one short line (MLflow's messages carry whole tracebacks of the cause)."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_name(method: str, knob: str = "", suffix: str = "") -> str:
    """What a person reads in the runs list: ``l1 r0.40 <suffix>``, ``lossvar δ0.02``. ``knob``
    is the setting that decided the widths, already written by the method that knows it (the
    launch layer asks the method for it); empty parts are left out."""
    return " ".join(p for p in (method, knob, suffix) if p)


def dataset_ref(root: str | Path, split: str, manifest: dict[str, Any]) -> dict[str, str]:
    """What identifies the shards' folder as an MLflow dataset input (``context`` = split):
    its resolved path, name and a digest of the manifest and the split (MLflow keeps one input
    per digest in a run, so two runs on the same shards show the same datasets). Small and
    JSON-able: a trial's journal keeps it instead of the whole manifest."""
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps([manifest, split], sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"source": str(Path(root).resolve()), "name": str(manifest.get("name") or Path(root).name),
            "digest": digest, "split": split}


def log_datasets(refs: list[dict[str, str]], run_id: str) -> None:
    """The :func:`dataset_ref` entries as dataset inputs of run ``run_id`` (metadata only:
    :class:`mlflow.data.meta_dataset.MetaDataset`)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    with warnings.catch_warnings():
        # MLflow registers its local-folder source once per local scheme ('' and 'file'), two
        # classes of one name, and warns on every path that both match: the answer is the same
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        inputs = [DatasetInput(MetaDataset(source=resolve_dataset_source(r["source"]), name=r["name"],
                                           digest=r["digest"])._to_mlflow_entity(),
                               tags=[InputTag(MLFLOW_DATASET_CONTEXT, r["split"])]) for r in refs]
    if inputs:
        MlflowClient().log_inputs(run_id, datasets=inputs)


def log_dataset(root: str | Path, split: str, manifest: dict[str, Any], run_id: str | None = None) -> None:
    """The shards' folder as a dataset input of run ``run_id`` (default: the active run)."""
    log_datasets([dataset_ref(root, split, manifest)], run_id or mlflow.active_run().info.run_id)


def param_values(params: dict[str, Any]) -> dict[str, str]:
    """Params as MLflow stores them (a value is capped at 6000 characters; 500 is plenty)."""
    return {k: str(v)[:500] for k, v in params.items()}


def log_params(params: dict[str, Any], run_id: str | None = None) -> None:
    items = list(param_values(params).items())
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        mlflow.log_params(dict(items[i : i + 100]), run_id=run_id)


def metric_values(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}


def log_metrics(metrics: dict[str, Any], step: int | None = None, run_id: str | None = None,
                timestamp: int | None = None) -> None:
    """Numbers of ``metrics``; a given ``timestamp`` (ms) makes logging the same record twice a
    no-op (MLflow drops a metric equal in key, value, step and timestamp)."""
    mlflow.log_metrics(metric_values(metrics), step=step, run_id=run_id, timestamp=timestamp)


def register(client: MlflowClient, model_name: str, run_id: str, metrics: dict[str, Any],
             alias: str | None = CHALLENGER, description: str | None = None) -> int:
    """Register the run's pyfunc model (or, for older runs, its ``model/`` folder) as a new
    version with its metrics as tags and ``description`` (the model card), and alias it
    (unless ``alias`` is None)."""
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        client.create_registered_model(model_name, description="Pruned models from prunepipe: MLflow pyfunc around "
                                       "spec.json + model.safetensors; each version's description is its model card")
    run = client.get_run(run_id)
    model_id = run.data.tags.get(MODEL_ID_TAG)
    source = f"models:/{model_id}" if model_id else f"{run.info.artifact_uri}/model"
    tags = {k: f"{float(metrics[k]):.6g}" for k in VERSION_METRICS if k in metrics}
    mv = client.create_model_version(model_name, source=source, run_id=run_id, tags=tags, model_id=model_id,
                                     description=description)
    if alias is not None:
        client.set_registered_model_alias(model_name, alias, mv.version)
    return int(mv.version)


def end_if_running(client: MlflowClient, run_id: str, status: str = "KILLED") -> bool:
    """End run ``run_id`` as ``status`` if it still reads RUNNING (its process died before it
    could end it); True if it did. A run that ended is left as it is."""
    if client.get_run(run_id).info.status != "RUNNING":
        return False
    client.set_terminated(run_id, status)
    return True


def versions_of_run(client: MlflowClient, model_name: str, run_id: str) -> list:
    """The versions of ``model_name`` registered from run ``run_id`` (none if the model is new)."""
    return list(client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'"))


def resolve_version(client: MlflowClient, uri: str, store: str | None = None):
    """``models:/name@alias`` or ``models:/name/version`` → the registered model version
    (``store`` names the registry in the error message)."""
    rest = uri.removeprefix("models:/")
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        name, version = rest.rsplit("/", 1)
        return client.get_model_version(name, version)
    except (MlflowException, ValueError) as err:
        raise RegistryError(f"{uri}: not found in the registry at {store or mlflow.get_tracking_uri()} "
                            f"({str(err).splitlines()[0]})") from None


def download_model(uri: str, tracking_uri: str | None, into: str | Path) -> Path:
    """A ``models:/name@alias`` or ``models:/name/version`` URI → a local pruned-model folder
    inside the existing folder ``into``: the caller owns it, because each download is a whole
    model (downloads left in /tmp once filled gigabytes of a shared disk)."""
    client = MlflowClient(tracking_uri) if tracking_uri else MlflowClient()
    mv = resolve_version(client, uri, tracking_uri)
    return pruned_folder(Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(into))))


def load_registered(uri: str, tracking_uri: str | None = None):
    """(model, spec) of a registered version; the download is removed as soon as it is loaded."""
    from pipeline.spec import load_pruned

    with tempfile.TemporaryDirectory(prefix="prunepipe-model-") as tmp:
        return load_pruned(download_model(uri, tracking_uri, into=tmp))


def pruned_folder(path: Path) -> Path:
    """The spec + safetensors folder inside a downloaded version: the pyfunc model keeps it
    under ``artifacts/`` (MLflow names it after the logged folder); an older version is that
    folder itself."""
    from pipeline.spec import SPEC_FILE

    if not (path / "MLmodel").is_file():
        return path
    found = sorted((path / "artifacts").glob(f"*/{SPEC_FILE}"))
    if len(found) != 1:
        raise RegistryError(f"{path}: expected one pruned-model folder in the pyfunc model's artifacts, "
                            f"found {len(found)}")
    return found[0].parent


def version_by_alias(client: MlflowClient, model_name: str, alias: str):
    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None
