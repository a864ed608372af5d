"""A trial's output folder before any work: writable, free of stale temp files, and holding no
checkpoint of other settings.

A checkpoint carries a *fingerprint*: the settings that shape the weights it holds. Resuming
a checkpoint under other settings would train one model and label it as another (the spec and
MLflow would say ``l2``/0.2 while the weights are the old ``l1``/0.5 model), so a mismatch
stops with one line naming the keys that differ, or the old state is discarded when asked
(``prunepipe prune --restart``). Never both.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pipeline.config import Config, ConfigError, config_to_dict, flatten
from pipeline.distributed import DistInfo, broadcast_object

CHECKPOINT = "checkpoint.pt"
# what a finished or interrupted trial leaves in its output_dir; --restart removes these only
# (an output_dir may also hold a search's trials/ or baseline/, which are not this trial's)
TRIAL_FILES = (CHECKPOINT, "bad_samples.tsv", "widths.png", "model/spec.json", "model/model.safetensors")

# Settings that may change between a run and its resumption: where things go; how a step is
# executed (a checkpoint resumes on DDP or DeepSpeed and on any world size, so the per-rank batch
# and accumulation may change with it); how the result is measured or logged; what a search does
# around the trial; and the length of training (a longer train.epochs or budget_epochs on the
# same folder continues after the last finished epoch: a supported resume, tested in test_ddp).
_NOT_SHAPING = (
    "name", "output_dir", "measure.", "search.", "registry.", "baseline.", "prune.options",
    "data.backend", "data.num_workers", "data.dali_device", "data.on_error", "data.max_bad_fraction",
    "data.batch_size", "data.shuffle_buffer", "train.backend", "train.zero_stage", "train.grad_accum",
    "train.max_failures", "train.deepspeed_config", "train.amp", "train.channels_last", "train.epochs",
    "train.budget_epochs",
)


def fingerprint(cfg: Config) -> dict[str, Any]:
    """The settings that shape the model a checkpoint of ``cfg`` holds, as flat dotted keys:
    everything but :data:`_NOT_SHAPING`, and only the configured method's own options."""
    flat = flatten(config_to_dict(cfg))
    out = {k: v for k, v in flat.items() if not k.startswith(_NOT_SHAPING)}
    method = cfg.prune.method
    out.update(flatten(cfg.prune.options.get(method, {}), f"prune.options.{method}."))
    return out


def fingerprint_json(cfg: Config) -> str:
    """:func:`fingerprint` as the string a checkpoint stores (``weights_only`` loads strings)."""
    return json.dumps(fingerprint(cfg), sort_keys=True)


def check_fingerprint(stored: Any, cfg: Config, where: Path) -> None:
    """ConfigError unless ``stored`` (a checkpoint's fingerprint) matches ``cfg``'s."""
    hint = "use another output_dir, or rerun `prune` with --restart to discard it"
    if not isinstance(stored, str):
        raise ConfigError(f"output_dir: {str(where)!r} was written without a settings fingerprint "
                          f"(an older prunepipe); {hint}")
    try:
        old = json.loads(stored)
    except json.JSONDecodeError:
        old = None
    if not isinstance(old, dict):
        raise ConfigError(f"output_dir: {str(where)!r} has an unreadable settings fingerprint; {hint}")
    new = fingerprint(cfg)
    differ = sorted(k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>"))
    if differ:
        shown = ", ".join(f"{k} {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in differ[:4])
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        raise ConfigError(f"output_dir: {str(where)!r} holds a checkpoint of other settings ({shown}{more}); {hint}")


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete the temp files an atomic write leaves when its process is SIGKILLed
    (``.checkpoint.pt.*``, ``.model.safetensors.*``, ...; a checkpoint's is as big as the model).
    Called by rank 0 before a trial starts, when nothing else writes there."""
    removed = []
    for sub in (folder, folder / "model"):
        if not sub.is_dir():
            continue
        for name in (CHECKPOINT, "model.safetensors", "spec.json"):
            for tmp in sub.glob(f".{name}.*"):
                if tmp.is_file():
                    tmp.unlink()
                    removed.append(tmp)
    return removed


def discard_trial(folder: Path) -> None:
    """``--restart``: remove the trial files of an earlier run in ``folder`` (nothing else)."""
    for rel in TRIAL_FILES:
        path = folder / rel
        if path.is_file():
            path.unlink()


def _probe(folder: Path, key: str) -> None:
    """Create ``folder`` and write and remove a file in it; ConfigError naming ``key`` if not
    possible. Folders the probe had to create are removed again: a run that then stops on bad
    input (a doctored manifest, say) leaves nothing behind."""
    created, p = [], folder
    while not p.exists() and p != p.parent:
        created.append(p)  # deepest first
        p = p.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".prunepipe-write-test.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise ConfigError(f"{key}: {str(folder)!r} is not writable ({err.strerror})") from None
    finally:
        for d in created:
            try:
                d.rmdir()
            except OSError:
                break  # something else wrote there meanwhile: leave it


def check_writable(cfg: Config) -> None:
    """Everything a trial or search writes, probed before any work: ``output_dir`` and, when the
    registry is enabled, a local MLflow store (the SQLite file, its folder, the artifact folder).
    A read-only store found after a full epoch loses that epoch; a server is not probed here."""
    _probe(Path(cfg.output_dir), "output_dir")
    reg = cfg.registry
    if not reg.enabled:
        return
    uri = reg.tracking_uri
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if db.is_dir():
            raise ConfigError(f"registry.tracking_uri: {str(db)!r} is a folder, not a SQLite file")
        _probe(db.parent, "registry.tracking_uri")
        _probe(db.parent / "artifacts", "registry.tracking_uri")
        if db.exists():
            try:
                with open(db, "r+b"):
                    pass
            except OSError as err:
                raise ConfigError(f"registry.tracking_uri: {str(db)!r} is not writable ({err.strerror})") from None
    elif uri.startswith("file:") or "://" not in uri:
        _probe(Path(uri.removeprefix("file://").removeprefix("file:")), "registry.tracking_uri")


def prepare_output(cfg: Config, info: DistInfo, restart: bool) -> None:
    """Before any work: rank 0 checks that the output folder and the MLflow store are writable,
    removes temp files a killed run left, and with ``restart`` discards an earlier run's files.
    A problem is a ConfigError on every rank (none is left waiting in a collective)."""
    problem = None
    if info.is_main:
        try:
            check_writable(cfg)
            remove_stale_temps(Path(cfg.output_dir))
            if restart:
                discard_trial(Path(cfg.output_dir))
        except (ConfigError, OSError) as err:
            problem = str(err)
    problem = broadcast_object(problem, info)
    if problem:
        raise ConfigError(problem)
