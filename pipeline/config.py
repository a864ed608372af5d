"""One validated config schema for every workflow.

A config is data: YAML in, dotted ``key=value`` overrides from the CLI and from Ray Tune
alike (a trial is just a set of overrides). Anything wrong fails here, before any work,
with a :class:`ConfigError` whose message is one line naming the key and what is allowed.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from pipeline.errors import PrunepipeError
from pipeline.textfiles import read_text_file

ARCHS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)


class ConfigError(PrunepipeError, ValueError):
    """A config problem, with a one-line message that names the offending key."""


# A config is a few kilobytes; a cap on what is read bounds a hostile file (or /dev/zero) before
# the YAML parser sees it, and refusing aliases bounds what the parser can expand it into.
MAX_CONFIG_BYTES = 1 << 20
SEED_MAX = 2**31 - 1  # DALI and numpy take 32-bit seeds; torch.manual_seed overflows past 2**64
# MLflow's built-in tracking stores; anything else fails deep inside MLflow after work was done
TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader minus the two things that make a config lie or explode:
    aliases (``*a``: a 550-byte "billion laughs" expands to gigabytes, so none are allowed)
    and duplicate keys (PyYAML keeps the last one silently)."""

    def compose_node(self, parent, index):  # noqa: ANN001, ANN201 - PyYAML's signature
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are not allowed "
                              "in a config; write the value out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # noqa: ANN001, ANN201 - PyYAML's signature
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool) and key is not None:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: a mapping key must be a plain value")
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, what: str) -> Any:
    """``text`` as YAML through :class:`_StrictLoader`; any problem is a one-line ConfigError naming ``what``."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as err:
        raise ConfigError(f"{what}: {err}") from None
    except yaml.YAMLError as err:
        mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
        where = f"line {mark.line + 1}: {problem}" if mark is not None and problem else str(err).splitlines()[0]
        raise ConfigError(f"{what} is not valid YAML: {where}") from None
    except RecursionError:
        raise ConfigError(f"{what} is nested too deeply") from None


class _Strict(BaseModel):
    # extra="forbid" is what turns a typo (`prune.ratio`) into an error instead of a silent no-op.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    arch: Literal[ARCHS] = "resnet18"  # type: ignore[valid-type]
    weights: str | None = None  # local state-dict file (.safetensors or a weights-only .pt)


class DataConfig(_Strict):
    # webdataset: PIL in a PyTorch DataLoader (the fallback); dali: NVIDIA DALI (GPU decoding
    # where there is a GPU, its CPU pipeline where there is not); synthetic: no I/O (benchmarks)
    backend: Literal["webdataset", "dali", "synthetic"] = "webdataset"
    root: str = "data/digits"  # folder holding train/ and val/ shards and dataset.json
    image_size: int = Field(32, ge=8, le=1024)
    batch_size: int = Field(64, ge=1, le=4096)  # per rank
    num_workers: int = Field(0, ge=0, le=64)  # DataLoader worker processes; DALI: its CPU threads (min 1)
    # webdataset with num_workers > 0: a worker that hands over no batch for this long is stuck (a
    # read that never returns, a deadlock after fork); the rank stops with an error and the worker's
    # stack instead of leaving every rank waiting. 0 waits for ever.
    worker_timeout_s: float = Field(600.0, ge=0.0)
    # how those workers start. forkserver: forked from a clean single-threaded server, not from
    # the rank, whose gloo/NCCL, OpenMP and progress-bar threads may hold a lock at the moment of
    # fork that the child then waits on for ever (pytorch/pytorch#130610: DDP with a train and a
    # val loader hangs by chance; Python 3.14 made forkserver its default for this reason).
    # forkserver and spawn import the program's main module again: a script of your own that
    # builds loaders needs the `if __name__ == "__main__":` guard (prunepipe's commands have it).
    # fork: the old default, for a dataset that cannot be pickled or a script without that guard.
    worker_start: Literal["forkserver", "spawn", "fork"] = "forkserver"
    dali_device: Literal["auto", "cpu", "gpu"] = "auto"  # where DALI decodes: auto = gpu when there is one
    # bad samples (undecodable bytes, missing or bad labels, truncated shards): skip and count
    # them, or stop at the first; an epoch skipping more than max_bad_fraction stops either way
    on_error: Literal["skip", "fail"] = "skip"
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0)
    augment: Literal["none", "light", "imagenet"] = "light"
    shuffle_buffer: int = Field(512, ge=0)
    # synthetic backend only: how big the fake epoch is and how many classes it has
    synthetic_samples: int = Field(256, ge=1)
    synthetic_classes: int = Field(10, ge=2)


class PruneConfig(_Strict):
    method: str = "l1"
    prune_ratio: float = Field(0.5, ge=0.0, lt=1.0)  # fraction of channels REMOVED
    scope: Literal["inner", "all"] = "inner"  # "all" also prunes the residual streams
    round_to: int = Field(1, ge=1, le=128)  # kept widths rounded to a multiple (8 on tensor cores)
    epochs: int = Field(0, ge=0)  # pruning-phase epochs of a training-aware method
    # method knobs, per method: {sfp: {...}, lossvar: {delta: 0.05}}. Namespaced so that a search
    # choosing among methods can also tune one method's knobs.
    options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # how many channels each group keeps (methods/allocate.py): uniform (prune_ratio for every
    # group), loss (lossvar's loss-variation rates) or latency (the most importance within a
    # latency budget, methods/latency_alloc.py); unset: latency when target_speedup is given, else
    # the method's own default (lossvar: loss, every other method: uniform). Its options:
    # allocator_options.
    allocate: str | None = None
    allocator_options: dict[str, Any] = Field(default_factory=dict)
    # whole residual blocks removed before the widths are chosen (pipeline/blocks.py): a count,
    # or a fraction of the identity-shortcut blocks; 0 keeps every block
    blocks: int | float = Field(0, ge=0)
    # a measured speed-up to reach instead of a ratio (docs/architecture.md, "Pruning to a
    # measured speed-up"): the latency allocator's budget is the dense model's latency ÷ this, and
    # the trial corrects it on measured probe models until it is met; unset: prune_ratio decides
    target_speedup: float | None = Field(None, gt=1.0, le=100.0)
    # how many times the trial may correct the latency budget on a measured miss (> 3 %)
    target_corrections: int = Field(3, ge=0, le=10)

    @field_validator("blocks", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"{value!r}: a count of blocks or a fraction, not a boolean")
        return value

    @field_validator("blocks")
    @classmethod
    def _block_count(cls, value: int | float) -> int | float:
        if isinstance(value, float) and value >= 1:
            if value != int(value):
                raise ValueError(f"{value!r}: a count of blocks (a whole number) or a fraction below 1")
            return int(value)
        return value


class PhaseConfig(_Strict):
    """Optimizer and schedule settings of the pruning phase that differ from the fine-tune's
    (``train.*``); a field left unset inherits ``train``'s. AutoPruner prunes at lr 1e-3 and
    weight decay 5e-4, then fine-tunes at 1e-4."""

    lr: float | None = Field(None, gt=0.0, le=10.0)
    momentum: float | None = Field(None, ge=0.0, lt=1.0)
    nesterov: bool | None = None
    weight_decay: float | None = Field(None, ge=0.0, le=1.0)
    warmup_epochs: int | None = Field(None, ge=0)
    schedule: Literal["cosine", "step"] | None = None
    milestones: list[int] | None = None
    gamma: float | None = Field(None, gt=0.0, le=1.0)
    cycle_epochs: int | None = Field(None, ge=1)


class TrainConfig(_Strict):
    epochs: int = Field(2, ge=0)  # fine-tune epochs after surgery (unless budget_epochs is set)
    # total epochs per trial, pruning-phase epochs included: fine-tune = budget − pruning epochs,
    # so one-shot and training-aware methods compare on the same budget (searches, benchmarks)
    budget_epochs: int | None = Field(None, ge=1)
    lr: float = Field(0.05, gt=0.0, le=10.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    weight_decay: float = Field(1e-4, ge=0.0, le=1.0)
    warmup_epochs: int = Field(0, ge=0)
    # cosine: half cosine over the phase; step: lr × gamma at each epoch in milestones (the
    # papers' "×0.1 every 30 epochs"), restarting every cycle_epochs when set
    schedule: Literal["cosine", "step"] = "cosine"
    milestones: list[int] = Field(default_factory=list)
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    cycle_epochs: int | None = Field(None, ge=1)
    # the pruning phase's own optimizer/schedule settings (unset fields: the ones above)
    prune_phase: PhaseConfig = Field(default_factory=PhaseConfig)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, off on CPU
    channels_last: Literal["auto", "on", "off"] = "auto"  # auto: on for GPU
    max_failures: int = Field(2, ge=0)  # Ray Train restarts of a trial's worker group
    bn_recalib_batches: int = Field(10, ge=0)  # after the cut: re-estimate BN statistics (0 = off)
    # the training backend (pipeline/backends): ddp, or deepspeed (ZeRO 0-2, DeepSpeed owns
    # backward, step, loss scaling and clipping); recipe and methods run unchanged on either
    backend: str = "ddp"
    zero_stage: int = Field(0, ge=0, le=2)  # deepspeed only: 1 partitions optimizer state, 2 gradients too
    grad_accum: int = Field(1, ge=1, le=1024)  # micro-batches (data.batch_size each) per optimizer step
    grad_clip: float = Field(0.0, ge=0.0)  # max global gradient norm; 0 = off
    # deepspeed only: a JSON file whose keys are merged over the config derived from this one
    deepspeed_config: str | None = None

    @field_validator("channels_last", mode="before")
    @classmethod
    def _on_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare on/off as a boolean: `train.channels_last=on` means "on"
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, name: str) -> str:
        from pipeline.backends import backend_names  # same layer; no backend module is imported

        if name not in backend_names():
            raise ValueError(f"allowed values are {', '.join(backend_names())}")
        return name

    @model_validator(mode="after")
    def _schedule(self) -> TrainConfig:
        _check_schedule(self, "train")
        if self.prune_phase.model_fields_set:
            _check_schedule(self.for_phase("prune"), "train.prune_phase")
        return self

    def for_phase(self, phase: str) -> TrainConfig:
        """The settings one training phase runs with: ``"prune"`` applies ``prune_phase`` over
        these, any other phase (fine-tune, baseline) uses these as they are."""
        if phase != "prune":
            return self
        updates = {k: v for k, v in self.prune_phase.model_dump().items() if v is not None}
        if not updates:
            return self
        merged = {**self.model_dump(), **updates, "prune_phase": {}}
        if "schedule" in updates and updates["schedule"] == "cosine" and "milestones" not in updates:
            merged["milestones"], merged["cycle_epochs"] = [], None  # a cosine phase drops train's steps
        return TrainConfig.model_construct(**{**merged, "prune_phase": PhaseConfig()})

    @model_validator(mode="after")
    def _deepspeed_only(self) -> TrainConfig:
        if self.backend != "deepspeed":
            # silently ignoring a ZeRO stage or a DeepSpeed file would train something else than asked
            if self.zero_stage:
                raise ValueError(f"train.zero_stage = {self.zero_stage}: needs train.backend=deepspeed")
            if self.deepspeed_config is not None:
                raise ValueError("train.deepspeed_config: needs train.backend=deepspeed")
            return self
        from pipeline.backends.deepspeed_config import check_installed, read_override

        check_installed()
        if self.deepspeed_config is not None:
            read_override(self.deepspeed_config)
        return self


def _check_schedule(t: TrainConfig, key: str) -> None:
    """A step schedule needs increasing milestones inside its cycle; a cosine one takes none
    (silently ignoring them would train with another schedule than the one asked for)."""
    if t.schedule == "cosine":
        if t.milestones or t.cycle_epochs is not None:
            raise ValueError(f"{key}.milestones / cycle_epochs: only with {key}.schedule=step")
        return
    if not t.milestones:
        raise ValueError(f"{key}.milestones: schedule=step needs at least one milestone epoch")
    if any(m < 1 for m in t.milestones) or any(b <= a for a, b in zip(t.milestones[:-1], t.milestones[1:], strict=True)):
        raise ValueError(f"{key}.milestones = {t.milestones}: must be increasing epochs >= 1")
    if t.cycle_epochs is not None and t.milestones[-1] >= t.cycle_epochs:
        raise ValueError(f"{key}.milestones = {t.milestones}: must lie inside cycle_epochs = {t.cycle_epochs}")


class BaselineConfig(_Strict):
    """Dense training before the search, so every trial starts from the same trained model."""

    epochs: int = Field(0, ge=0)
    lr: float = Field(0.05, gt=0.0, le=10.0)
    warmup_epochs: int = Field(1, ge=0)  # from scratch, a linear warm-up keeps BN statistics sane


class LatencyTableConfig(_Strict):
    """How the latency table of the device is built (pipeline/latency.py): the fractions of each
    dense width a piece is timed at, the calls per grid point, and where tables are cached (one
    file per device, torch, timing mode, architecture and scope)."""

    levels: list[float] = Field(default_factory=lambda: [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0],
                                min_length=1)
    reps: int = Field(3, ge=1, le=100)  # timed calls per grid point; the median is kept
    warmup: int = Field(1, ge=0, le=100)
    cache_dir: str = "runs/latency-tables"

    @field_validator("levels")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if any(not 0 < v <= 1 for v in value):
            raise ValueError(f"{value!r}: fractions of the dense width, each in (0, 1]")
        return sorted(set(value))


class MeasureConfig(_Strict):
    batch_size: int = Field(64, ge=1)
    warmup: int = Field(3, ge=0)
    # dense and pruned are timed in interleaved rounds; the speed-up is the median of the
    # per-round ratios. A relative interquartile range above max_spread is measured again with
    # twice the rounds (up to `attempts` times), then flagged speed_reliable = 0 if still noisy.
    rounds: int = Field(12, ge=2, le=10_000)
    max_spread: float = Field(0.10, gt=0.0, le=10.0)
    attempts: int = Field(2, ge=1, le=10)
    # CPU timing only: other processes using more than this share of all cores while we time make
    # the result unreliable, however tight (a steady hog slows both models alike: a wrong 1.0x)
    max_foreign_cpu: float = Field(0.15, gt=0.0, le=1.0)
    # a search's finalists are each timed against the same dense model: one whose dense rate is
    # this far off the median over the finalists is measured again, then flagged if still off
    max_drift: float = Field(0.2, gt=0.0, le=10.0)
    # time inference copies with BatchNorm folded into the convs (both models): what a deployment runs
    fold_bn: bool = True
    threads: int = Field(0, ge=0)  # CPU threads for timing; 0 = torch default
    # fastest: every model (dense and pruned alike) timed in the faster of contiguous and
    # channels_last, as it would be deployed; train: the memory format it trained in
    memory_format: Literal["fastest", "train"] = "fastest"
    # CPU timing: cached keeps freed memory in the process, as a caching allocator (jemalloc,
    # tcmalloc) would in a server, so no forward page-faults its activations in again
    # (pipeline.measure.cached_allocator); system: the process's malloc left as it is
    cpu_allocator: Literal["cached", "system"] = "cached"
    # torch.compile when timing: off (eager), on (compiled: the figure every decision uses), or
    # both (eager decides; the compiled figures are kept beside it as compiled_*)
    compile: Literal["off", "on", "both"] = "off"
    latency_table: LatencyTableConfig = Field(default_factory=LatencyTableConfig)


class SearchSpaceEntry(_Strict):
    choice: list[Any] | None = None
    grid: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    # draw this key only in trials of these methods (prune.method); the others keep the base
    # config's value: a grid over methods where some search a speed target, others a ratio
    methods: list[str] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> SearchSpaceEntry:
        given = [k for k, v in self.model_dump().items() if v is not None and k != "methods"]
        if len(given) != 1:
            raise ValueError("give exactly one of choice, grid, uniform, loguniform, randint")
        return self


class ObjectiveConfig(_Strict):
    """What the search's winner is: the best by `maximize` among trials meeting every constraint
    ("most accurate with speed-up >= X": maximize val_top1, min_speedup X; "fastest within Y of
    dense": maximize speedup, max_top1_drop Y)."""

    maximize: Literal["val_top1", "speedup"] = "val_top1"
    min_speedup: float | None = Field(None, gt=0.0, le=1000.0)  # measured (median, reliable), not MACs
    max_top1_drop: float | None = Field(None, ge=0.0, le=1.0)  # dense top-1 minus pruned top-1
    min_macs_reduction: float | None = Field(None, ge=0.0, lt=1.0)
    finalists: int = Field(3, ge=1, le=100)  # re-measured alone after the trials, before registering


class SearchConfig(_Strict):
    num_samples: int = Field(4, ge=1)
    num_workers: int = Field(2, ge=1)  # DDP workers per trial
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    max_concurrent: int = Field(1, ge=1)
    # where a trial's workers go (Ray placement group strategy): PACK fills a node first (fast
    # NVLink/shared-memory collectives); SPREAD puts them on different nodes where it can
    placement_strategy: Literal["PACK", "SPREAD"] = "PACK"
    ray_num_cpus: int | None = Field(None, ge=1)  # logical CPUs for a local ray.init
    metric: str = "val_top1"
    grace_period: int = Field(1, ge=1)
    reduction_factor: int = Field(2, ge=2)
    space: dict[str, SearchSpaceEntry] = Field(default_factory=dict)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)


class RegistryConfig(_Strict):
    tracking_uri: str = "sqlite:///runs/mlflow.db"
    experiment: str = "prunepipe"
    model_name: str = "prunepipe-model"
    promote_tolerance: float = Field(0.005, ge=0.0, le=1.0)  # top-1 drop allowed on promote
    enabled: bool = True

    @field_validator("tracking_uri")
    @classmethod
    def _known_scheme(cls, uri: str) -> str:
        check_tracking_uri(uri)
        return uri


def check_tracking_uri(uri: str) -> None:
    """A tracking URI MLflow can open: a known scheme (or a plain path), a SQLite file path."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        if ":" in uri.split("/")[0]:
            raise ValueError("not a tracking URI (expected e.g. sqlite:///runs/mlflow.db or http://host:5000)")
        return  # a plain folder: MLflow's file store
    scheme = scheme.split("+")[0]  # postgresql+psycopg2://
    if scheme not in TRACKING_SCHEMES:
        raise ValueError(f"unknown tracking URI scheme {scheme!r}; allowed: {', '.join(TRACKING_SCHEMES)}")
    if scheme == "sqlite" and not rest.startswith("/"):
        raise ValueError("a SQLite store is sqlite:///relative/path.db or sqlite:////absolute/path.db")


class Config(_Strict):
    name: str = "run"
    seed: int = Field(0, ge=0, le=SEED_MAX)
    output_dir: str = "runs/run"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    baseline: BaselineConfig = Field(default_factory=BaselineConfig)
    measure: MeasureConfig = Field(default_factory=MeasureConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)

    @model_validator(mode="after")
    def _search_keys(self) -> Config:
        # Method names and options are not checked here: the core knows no method. The launcher
        # checks them before any work (launch.checks.check_config) and each method validates its
        # own options when the recipe builds it.
        for key, entry in self.search.space.items():
            info = _check_dotted_key(key)
            if info is not None:
                ann = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
                check_sampler(key, entry, TypeAdapter(ann))
        return self


def _check_dotted_key(key: str) -> FieldInfo | None:
    """A search-space key must name a real config field, or every trial would fail later.
    Returns the field (None for a method option, which the method's own schema checks)."""
    node: Any = Config
    parts = key.split(".")
    info: FieldInfo | None = None
    for i, part in enumerate(parts):
        if node is dict:
            return None
        fields = getattr(node, "model_fields", None)
        if fields is None or part not in fields:
            raise ValueError(f"search.space: {key!r} is not a config key")
        info = fields[part]
        ann = info.annotation
        if part == "options" and i < len(parts) - 1:
            return None  # method options are checked per trial by the method's own schema
        node = ann if isinstance(ann, type) else None
        if node is not None and not issubclass(node, BaseModel):
            node = None
    if node is not None and isinstance(node, type) and issubclass(node, BaseModel):
        raise ValueError(f"search.space: {key!r} names a section, not a value")
    return info


def sampler_values(entry: SearchSpaceEntry) -> list[Any]:
    """The values a sampler can draw that bound its range: every choice, or both ends of a range
    (``randint`` is Ray Tune's, upper bound exclusive)."""
    if entry.choice is not None or entry.grid is not None:
        values = entry.choice if entry.choice is not None else entry.grid
        if not values:
            raise ValueError("an empty choice or grid draws nothing")
        return list(values)
    if entry.randint is not None:
        lo, hi = entry.randint
        if hi <= lo:
            raise ValueError(f"randint [{lo}, {hi}]: the upper bound (exclusive) must exceed the lower")
        return [lo, hi - 1]
    lo, hi = entry.uniform if entry.uniform is not None else entry.loguniform  # type: ignore[misc]
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        raise ValueError(f"[{lo}, {hi}]: need finite bounds with lower < upper")
    if entry.loguniform is not None and lo <= 0:
        raise ValueError(f"loguniform [{lo}, {hi}]: bounds must be positive")
    return [lo, hi]


def check_sampler(key: str, entry: SearchSpaceEntry, field: TypeAdapter) -> None:
    """Every value ``entry`` can draw passes ``field``'s validation, up front: otherwise the
    search would learn it only as failed trials."""
    try:
        values = sampler_values(entry)
    except ValueError as err:
        raise ValueError(f"search.space.{key}: {err}") from None
    for value in values:
        try:
            field.validate_python(value)
        except ValidationError as err:
            msg = err.errors()[0]["msg"].removeprefix("Value error, ")
            raise ValueError(f"search.space.{key}: can draw {value!r}: {msg}") from None


def format_error(err: ValidationError, prefix: str = "") -> str:
    """pydantic's first error as one line naming the dotted key (``prefix`` + its location)."""
    e = err.errors()[0]
    loc = prefix + ".".join(str(p) for p in e["loc"] if p != "__root__")
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "value_error" and loc and msg.startswith(f"{loc}."):
        return msg  # a section's own check already names the key it is about
    if e["type"] == "extra_forbidden":
        return f"{loc}: unknown key"
    if e["type"] == "literal_error" and "expected" in e.get("ctx", {}):
        return f"{loc} = {e.get('input')!r}: allowed values are {e['ctx']['expected']}"
    if loc:
        return f"{loc} = {e.get('input')!r}: {msg}"
    return msg


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=value`` → ("a.b", value), the value parsed as YAML (so 0.3 is a float, [1,2] a list)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = parse_yaml(raw, f"override {key}") if raw.strip() else ""
    except ConfigError as err:
        if "not valid YAML" not in str(err):
            raise  # an alias or a duplicate key is refused here as in a file
        value = raw  # a plain string that only looks like broken YAML
    return key, value


SPACE_PREFIX = "search.space."


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested mapping. ``search.space.<config key>`` is special: the search
    space is keyed by dotted config keys, so everything after ``search.space.`` is one key
    (``search.space.prune.prune_ratio={uniform: [0.3, 0.6]}``); ``=null`` removes that entry."""
    if key.startswith(SPACE_PREFIX) and len(key) > len(SPACE_PREFIX):
        search = tree.setdefault("search", {})
        space = search.setdefault("space", {}) if isinstance(search, dict) else None
        if not isinstance(space, dict):
            raise ConfigError(f"{key}: search.space is not a section")
        name = key.removeprefix(SPACE_PREFIX)
        if value is None:
            space.pop(name, None)
        else:
            space[name] = value
        return
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def build_config(raw: dict[str, Any], overrides: dict[str, Any] | None = None) -> Config:
    """Validate a raw mapping plus dotted overrides into a :class:`Config`."""
    tree = copy.deepcopy(raw) if raw else {}
    for key, value in (overrides or {}).items():
        set_dotted(tree, key, value)
    try:
        return Config(**tree)
    except ValidationError as err:
        raise ConfigError(format_error(err)) from None


def load_config(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Read a YAML file and apply overrides (``["a.b=1", ...]`` or ``{"a.b": 1}``)."""
    path = Path(path)
    what = f"config file {str(path)!r}"
    raw = parse_yaml(read_text_file(path, what, MAX_CONFIG_BYTES, ConfigError), what)
    if raw is None:
        raise ConfigError(f"{what} is empty; a config names at least one setting (see configs/demo.yaml)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} must hold a mapping at the top level")
    if isinstance(overrides, list):
        overrides = dict(parse_override(o) for o in overrides)
    return build_config(raw, overrides)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict → dotted keys (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def absolutize(cfg: Config) -> Config:
    """Resolve relative paths against the current directory once, in the launcher: Ray workers
    run in other working directories, and a relative SQLite path would fork the registry."""
    updates: dict[str, Any] = {"output_dir": str(Path(cfg.output_dir).resolve())}
    data = cfg.data.model_copy(update={"root": str(Path(cfg.data.root).resolve())})
    model = cfg.model
    if model.weights:
        model = model.model_copy(update={"weights": str(Path(model.weights).resolve())})
    train = cfg.train
    if train.deepspeed_config:
        train = train.model_copy(update={"deepspeed_config": str(Path(train.deepspeed_config).resolve())})
    updates["train"] = train
    table = cfg.measure.latency_table.model_copy(
        update={"cache_dir": str(Path(cfg.measure.latency_table.cache_dir).resolve())})
    updates["measure"] = cfg.measure.model_copy(update={"latency_table": table})
    reg = cfg.registry
    if reg.tracking_uri.startswith("sqlite:///") and not reg.tracking_uri.startswith("sqlite:////"):
        path = Path(reg.tracking_uri.removeprefix("sqlite:///")).resolve()
        reg = reg.model_copy(update={"tracking_uri": f"sqlite:///{path}"})
    return cfg.model_copy(update={**updates, "data": data, "model": model, "registry": reg})
