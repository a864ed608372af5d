"""Hostile and broken files, as a careless or hostile user hands them over: weights whose header
claims gigabytes, journals that point outside their trial, a store whose run holds other params,
an export onto a file, label files and folder names that do not fit, shards that are empty or cut,
labels out of range, a journal line that lost its newline.

Every case asserts the exit status, one stderr line naming the input, no traceback and a time
bound; the weights cases also bound the memory (a child process under an address-space limit,
or the test process's high-water mark). Conventions as in tests/test_bad_input.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mlflow.tracking import MlflowClient

from launch import cli
from pipeline import registry
from pipeline.config import RegistryConfig
from pipeline.journal import Journal, read_journal, segments
from pipeline.models import WeightsError, build_model
from pipeline.spec import SpecError, load_pruned
from pipeline.weights_header import ITEM_BYTES
from tests.conftest import DEMO, ROOT
from tests.helpers.doctor import copy_dataset, manifest, rewrite_sample, truncate_shard
from tests.helpers.factories import saved_pruned_model

TINY = ("data.image_size=16", "data.batch_size=32", "train.budget_epochs=null", "train.epochs=1", "prune.epochs=0",
        "measure.warmup=0", "measure.attempts=1", "measure.rounds=2", "train.bn_recalib_batches=0",
        "registry.enabled=false")
SYNTHETIC = ("data.backend=synthetic", "data.synthetic_samples=64", *TINY)
# The children's address space: a clean `prune` of the tiny config peaks at ~4.0 GB of it (torch's
# libraries mapped; measured with /proc/self/status VmPeak, and 3 GiB is too little to import
# torch), so 8 GiB passes a clean run and cannot hold one 16 GB tensor.
AS_LIMIT = 8 << 30
HUGE_ROWS = 8_000_000  # fc.weight [8e6, 512] float32: 16.4 GB claimed, in holes of a sparse file


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("prunepipe: error: "), lines[0]
    return lines[0]


def run_cli(argv: list, capsys, expect: int = 2, seconds: float = 20.0) -> str:
    """``prunepipe ARGV`` in this process: the exit status, and stderr's one line (returned)."""
    t0 = time.perf_counter()
    code = cli.main([str(a) for a in argv])
    took = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert code == expect, err
    assert took < seconds, f"{argv} took {took:.1f} s"
    return one_line(err)


def run_child(argv: list, limit: int | None = None, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    """``prunepipe ARGV`` in a fresh process, its address space capped at ``limit`` bytes (set in
    the child before anything is imported; no GPU, whose driver maps address space of its own)."""
    cap = f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit})); " if limit else ""
    code = f"{cap}import sys, runpy; sys.argv = ['prunepipe', *sys.argv[1:]]; runpy.run_module('launch.cli', run_name='__main__')"
    env = {**os.environ, "TQDM_DISABLE": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env=env)
    return proc, time.perf_counter() - t0


# --- weights whose header claims far more than the architecture holds ------------------------------
def write_header_only(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> Path:
    """A valid safetensors file declaring ``tensors`` (name → dtype, shape), its data all holes:
    a sparse file, so a 16 GB claim costs no disk."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = math.prod(shape) * ITEM_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path


def layout_of(state: dict[str, torch.Tensor], **claims: tuple[str, list[int]]) -> dict[str, tuple[str, list[int]]]:
    """``state``'s names, dtypes and shapes, with ``claims`` (``fc__weight`` for ``fc.weight``) replacing some."""
    tensors = {k: ("I64" if v.dtype == torch.int64 else "F32", list(v.shape)) for k, v in state.items()}
    tensors.update({k.replace("__", "."): v for k, v in claims.items()})
    return tensors


def resnet18_state() -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return build_model("resnet18", 10).state_dict()


HUGE_FC = {"fc__weight": ("F32", [HUGE_ROWS, 512])}
NEEDLE = f"tensor 'fc.weight' is F32 [{HUGE_ROWS}, 512]"


@pytest.fixture()
def huge_weights(tmp_path) -> Path:
    path = write_header_only(tmp_path / "huge.safetensors", layout_of(resnet18_state(), **HUGE_FC))
    assert path.stat().st_size > 16e9 and path.stat().st_blocks * 512 < 1 << 20  # claimed, not on disk
    return path


@pytest.mark.timeout(180)
@pytest.mark.parametrize("command", ["prune", "pretrain"])
def test_weights_claiming_gigabytes_are_refused_from_the_header(command, huge_weights, tmp_path):
    out = tmp_path / "out"
    argv = [command, DEMO, f"output_dir={out}", f"model.weights={huge_weights}", "baseline.epochs=1", *SYNTHETIC]
    proc, took = run_child(argv, limit=AS_LIMIT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = one_line(proc.stderr)
    assert str(huge_weights) in line and NEEDLE in line and "resnet18 has float32 [10, 512]" in line, line
    assert took < 60, f"{took:.0f} s"


@pytest.mark.timeout(180)
def test_the_address_space_limit_passes_a_clean_run(tmp_path):
    """The control of the test above: the same trial with weights that fit finishes under the limit."""
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    save_file(build_model("resnet18", 10).state_dict(), good)
    proc, took = run_child(["prune", DEMO, f"output_dir={tmp_path / 'out'}", f"model.weights={good}", *SYNTHETIC],
                           limit=AS_LIMIT)
    assert proc.returncode == 0, f"a clean run fails under RLIMIT_AS = {AS_LIMIT >> 30} GiB: {proc.stderr[-2000:]}"
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def hostile_model(tmp_path_factory) -> Path:
    """A pruned-model folder whose valid spec is paired with weights whose header claims 16 GB."""
    folder = saved_pruned_model(tmp_path_factory.mktemp("hostile") / "model")
    state = load_pruned(folder)[0].state_dict()
    write_header_only(folder / "model.safetensors", layout_of(state, **HUGE_FC))
    return folder


def _in_process_high_water(load) -> int:
    """Bytes the test process's resident high-water mark rose by while ``load`` ran."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    load()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024  # KiB on Linux


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", ["show", "bench", "export", "promote"])
def test_pruned_model_claiming_gigabytes_is_refused_from_the_header(command, hostile_model, tmp_path, capsys,
                                                                    monkeypatch):
    weights = hostile_model / "model.safetensors"
    argv = {"show": ["show", hostile_model], "bench": ["bench", hostile_model],
            "export": ["export", hostile_model, "--out", tmp_path / "onnx"],
            "promote": ["promote", "m", "--tracking-uri", "http://127.0.0.1:9"]}[command]
    if command == "promote":  # a registry whose challenger is the hostile folder, no server needed
        monkeypatch.setattr(registry, "version_by_alias",
                            lambda client, name, alias: SimpleNamespace(version="2" if alias == "challenger" else "1",
                                                                        tags={"val_top1": "0.5"}))
        monkeypatch.setattr(registry, "download_model", lambda uri, tracking_uri, into: hostile_model)
    lines: list[str] = []
    rose = _in_process_high_water(lambda: lines.append(run_cli(argv, capsys)))
    assert NEEDLE in lines[0] and str(weights) in lines[0] and "its spec has float32 [10, 512]" in lines[0], lines[0]
    assert rose < 512 << 20, f"the process grew by {rose >> 20} MiB before refusing"
    assert not (tmp_path / "onnx").exists()


def test_the_pyfunc_flavor_refuses_it_too(hostile_model):
    from pipeline.pyfunc_model import PRUNED_ARTIFACT, PrunedModel

    context = SimpleNamespace(artifacts={PRUNED_ARTIFACT: str(hostile_model)})
    with pytest.raises(SpecError) as err:
        PrunedModel().load_context(context)
    assert NEEDLE in str(err.value) and "\n" not in str(err.value)


def test_the_pyfunc_code_copy_imports_without_prunepipe_installed(tmp_path):
    """A serving host gets only the modules the model carries: they import on their own."""
    from pipeline.pyfunc_model import CODE_MODULES

    pkg = tmp_path / "pipeline"
    pkg.mkdir()
    for module in CODE_MODULES:
        shutil.copy2(ROOT / "pipeline" / module, pkg / module)
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]; "
            f"sys.path[:] = [{str(tmp_path)!r}] + [p for p in sys.path if p not in ('', {str(ROOT)!r})]; "
            "import pipeline.pyfunc_model, pipeline.spec; "
            f"assert pipeline.spec.__file__.startswith({str(tmp_path)!r}), pipeline.spec.__file__")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("claims, needle", [
    ({"fc__weight": ("I64", [10, 512])}, "tensor 'fc.weight' is I64 [10, 512], resnet18 has float32 [10, 512]"),
    ({"layer1__0__conv1__weight": ("F32", [64, 64, 3, 300])}, "tensor 'layer1.0.conv1.weight' is F32 [64, 64, 3, 300]"),
    ({"fc__weight": ("F32", [10, 513])}, "tensor 'fc.weight' is F32 [10, 513]"),
    ({"extra__weight": ("F32", [1 << 20, 1024])}, "holds tensor 'extra.weight' (F32 [1048576, 1024])"),
    ({"bn1__num_batches_tracked": ("F32", [])}, "tensor 'bn1.num_batches_tracked' is F32 []"),
])
def test_each_kind_of_misfit_is_named(claims, needle, tmp_path):
    path = write_header_only(tmp_path / "w.safetensors", layout_of(resnet18_state(), **claims))
    with pytest.raises(WeightsError) as err:
        build_model("resnet18", 10, path)
    assert needle in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_missing_tensor_is_named(tmp_path):
    tensors = layout_of(resnet18_state())
    del tensors["layer4.1.bn2.running_var"]
    path = write_header_only(tmp_path / "w.safetensors", tensors)
    with pytest.raises(WeightsError, match="tensor 'layer4.1.bn2.running_var' is missing"):
        build_model("resnet18", 10, path)


@pytest.mark.parametrize("header, needle", [
    (struct.pack("<Q", 1 << 60), "header length 1152921504606846976"),
    (struct.pack("<Q", 6) + b"[1, 2]", "its header is not a JSON object"),
    (struct.pack("<Q", 4) + b"\xff\xfe{}", "its header is not JSON"),
    (struct.pack("<Q", 72) + json.dumps({"fc.bias": {"dtype": "F32", "shape": [10], "data_offsets": [0, 4]}})
     .encode().ljust(72), "F32 [10] takes 40 bytes, its range 4"),
    (struct.pack("<Q", 72) + json.dumps({"fc.bias": {"dtype": "F32", "shape": [10], "data_offsets": [0, 40]}})
     .encode().ljust(72), "ends at byte 40 of a 0-byte data section"),
    (struct.pack("<Q", 72) + json.dumps({"fc.bias": {"dtype": "Q7", "shape": [10], "data_offsets": [0, 40]}})
     .encode().ljust(72), "dtype 'Q7'"),
])
def test_a_header_that_is_not_one_is_refused_unread(header, needle, tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(header)
    with pytest.raises(WeightsError) as err:
        build_model("resnet18", 10, path)
    assert "not a valid safetensors file" in str(err.value) and needle in str(err.value), str(err.value)


def test_weights_for_another_class_count_still_load(tmp_path):
    """ImageNet weights (1000 classes) for a 10-class model: the classifier stays fresh, the rest loads."""
    from safetensors.torch import save_file

    imagenet = build_model("resnet18", 1000).state_dict()
    save_file(imagenet, tmp_path / "w.safetensors")
    model = build_model("resnet18", 10, tmp_path / "w.safetensors")
    assert torch.equal(model.state_dict()["conv1.weight"], imagenet["conv1.weight"])
    assert model.fc.out_features == 10


# --- `prunepipe sync`: journals are input too -------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    registry.connect(RegistryConfig(tracking_uri=uri, experiment="hostile"))
    return uri


def journal_trial(folder: Path, uri: str, experiment: str, key: str, *records: tuple[str, dict],
                  params: dict | None = None) -> Path:
    """A trial's journal as a trial whose store was down writes it: start, ``records``, end."""
    journal = Journal(folder).open()
    try:
        journal.append("start", key=key, tracking_uri=uri, experiment=experiment, run_name=f"trial {key}",
                       tags={registry.JOURNAL_KEY_TAG: key}, params=params or {"prune.method": "l1"}, config=None,
                       datasets=[])
        for kind, data in records:
            journal.append(kind, **data)
        journal.append("end", status="FINISHED")
    finally:
        journal.close()
    return journal.path


def runs_in(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def _escape(trial: Path, how: str) -> tuple[str, dict, str]:
    """(record kind, data, what the message must name) for a journal pointing outside ``trial``."""
    (trial / "model").mkdir(parents=True, exist_ok=True)
    if how == "absolute artifact":
        return "artifact", {"path": "/etc/passwd", "folder": "plots"}, "/etc/passwd"
    if how == "dot-dot model folder":
        return "model", {"model_dir": "../..", "plot": None}, "model folder ../.."
    if how == "linked plot":
        (trial / "widths.png").symlink_to("/etc/passwd")
        return "model", {"model_dir": str(trial / "model"), "plot": str(trial / "widths.png")}, "/etc/passwd"
    if how == "link inside the model folder":
        (trial / "model" / "model.safetensors").symlink_to("/etc/passwd")
        return "model", {"model_dir": str(trial / "model"), "plot": None}, "model.safetensors"
    (trial / "logs").symlink_to("/etc")  # "linked logs folder"
    return "metrics", {"metrics": {"x": 1.0}, "step": 1, "ts": 1}, "logs/"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["absolute artifact", "dot-dot model folder", "linked plot",
                                 "link inside the model folder", "linked logs folder"])
def test_sync_refuses_a_journal_pointing_outside_its_trial(how, store, tmp_path, capsys):
    experiment = f"escape-{tmp_path.name}"
    root = tmp_path / "out"
    journal_trial(root / "a-good-trial", store, experiment, "good", ("metrics", {"metrics": {"x": 1.0}, "step": 1,
                                                                                 "ts": 1}))
    kind, data, named = _escape(root / "bad", how)
    journal = journal_trial(root / "bad", store, experiment, "bad", (kind, data))
    line = run_cli(["sync", root, "--tracking-uri", store], capsys)
    assert str(journal) in line and named in line and "outside the trial's folder" in line, line
    assert runs_in(store, experiment) == []  # nothing uploaded, not even the good trial


@pytest.mark.timeout(120)
def test_sync_uploads_what_lies_inside_the_trial(store, tmp_path, capsys):
    """The control: relative and absolute paths inside the trial's folder are uploaded."""
    experiment = f"inside-{tmp_path.name}"
    trial = tmp_path / "out" / "t"
    trial.mkdir(parents=True)
    (trial / "notes.txt").write_text("kept\n")
    (trial / "bad_samples.tsv").write_text("x\n")
    journal_trial(trial, store, experiment, "in", ("artifact", {"path": "notes.txt", "folder": "data"}),
                  ("artifact", {"path": str(trial / "bad_samples.tsv"), "folder": "data"}))
    assert cli.main(["sync", str(tmp_path / "out"), "--tracking-uri", store]) == 0, capsys.readouterr().err
    (run,) = runs_in(store, experiment)
    assert {a.path for a in MlflowClient(store).list_artifacts(run.info.run_id, "data")} == {"data/notes.txt",
                                                                                              "data/bad_samples.tsv"}


@pytest.mark.timeout(120)
def test_sync_into_a_run_holding_other_params_names_them_and_syncs_the_rest(store, tmp_path, capsys):
    experiment = f"params-{tmp_path.name}"
    root = tmp_path / "out"
    first = journal_trial(root / "a", store, experiment, "a", params={"prune.method": "l1", "prune.prune_ratio": 0.5})
    assert cli.main(["sync", str(root), "--tracking-uri", store]) == 0, capsys.readouterr().err
    (run,) = runs_in(store, experiment)
    # the trial folder rewritten after that sync: the same run, other settings, nothing synced yet
    kept = [json.loads(line) for line in first.read_text().splitlines() if '"kind": "synced"' not in line]
    for rec in kept:
        if rec["kind"] == "start":
            rec["params"]["prune.prune_ratio"] = 0.3
            rec["params"]["train.lr"] = 0.1
    first.write_text("".join(json.dumps(rec) + "\n" for rec in kept))
    journal_trial(root / "b", store, experiment, "b", params={"prune.method": "l2"})
    capsys.readouterr()
    t0 = time.perf_counter()
    line = run_cli(["sync", root, "--tracking-uri", store], capsys)
    assert time.perf_counter() - t0 < 30
    assert f"run {run.info.run_id}" in line and "prune.prune_ratio '0.5' -> '0.3'" in line, line
    assert "train.lr" not in line  # a new key is no conflict: only the differing ones are named
    assert "1 other run(s) synced" in line
    runs = {r.info.run_name: r for r in runs_in(store, experiment)}
    assert runs["trial b"].data.params == {"prune.method": "l2"}  # the other trial went through
    assert runs["trial a"].data.params["prune.prune_ratio"] == "0.5"  # the run is left as it was
    assert any(s.pending() for s in segments(read_journal(first)[0]))  # and the trial still pending


def test_a_registration_kept_for_sync_keeps_the_search_plot_inside_the_trial(tmp_path, capsys):
    """The search's plot lies above the trial's folder: the journal names a copy inside it."""
    from launch.sync import check_paths, register_best
    from pipeline.config import absolutize, load_config

    search = tmp_path / "search"
    (search / "t1" / "model").mkdir(parents=True)
    (search / "pareto.png").write_bytes(b"png")
    cfg = absolutize(load_config(DEMO, [f"output_dir={search}", "registry.tracking_uri=http://127.0.0.1:9"]))
    best = {"model_dir": str(search / "t1" / "model"), "run_id": None, "val_top1": 0.5}
    assert register_best(cfg, best, "card", search / "pareto.png") is None
    capsys.readouterr()
    records, _ = read_journal(search / "t1" / "journal.jsonl")
    (artifact,) = [r for r in records if r.kind == "artifact"]
    assert Path(artifact.data["path"]).parent == search / "t1" / "search"
    assert Path(artifact.data["path"]).read_bytes() == b"png"
    check_paths(search / "t1" / "journal.jsonl", search)  # sync takes it


# --- a journal's complete last record without its newline --------------------------------------------
@pytest.mark.timeout(120)
def test_a_whole_last_record_without_its_newline_is_reported_as_torn(store, tmp_path, capsys):
    experiment = f"torn-{tmp_path.name}"
    trial = tmp_path / "out" / "t"
    path = journal_trial(trial, store, experiment, "t", ("metrics", {"metrics": {"x": 1.0}, "step": 1, "ts": 1000}))
    last = json.dumps({"seq": 9, "kind": "metrics", "t": 1.0, "metrics": {"x": 9.0}, "step": 2, "ts": 2000})
    with open(path, "ab") as f:
        f.write(last.encode())  # whole JSON, and the crash came before its newline
    torn_line = path.read_bytes().count(b"\n") + 1
    assert [line for line, _ in read_journal(path)[1]] == [torn_line]
    Journal(trial).open().close()  # a writer ends the line: it must stay torn
    records, problems = read_journal(path)
    assert [line for line, _ in problems] == [torn_line] and all(r.seq != 9 for r in records)
    shown = cli.main(["sync", str(tmp_path / "out"), "--tracking-uri", store]), capsys.readouterr()
    assert shown[0] == 0, shown[1].err
    assert shown[1].out.count(f"line {torn_line}: a truncated or corrupt record") == 1, shown[1].out
    (run,) = runs_in(store, experiment)
    assert [m.value for m in MlflowClient(store).get_metric_history(run.info.run_id, "x")] == [1.0]


# --- export onto a file -------------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("under", [False, True])
def test_export_out_that_is_a_file(under, tmp_path, capsys):
    folder = saved_pruned_model(tmp_path / "model", size=16)
    existing = tmp_path / "report.onnx"
    existing.write_text("mine")
    out = existing / "sub" if under else existing
    line = run_cli(["export", folder, "--out", out], capsys, seconds=10)
    assert f"--out '{out}'" in line and "a file, not a folder" in line, line
    assert existing.read_text() == "mine"


# --- ImageNet conversion inputs --------------------------------------------------------------------------
def _mini(root: Path, flat_val: bool = True):
    from tests.helpers.mini_imagenet import make_mini_imagenet

    return make_mini_imagenet(root, classes=3, train_per_class=2, val_per_class=2, size_range=(24, 32), gray=0,
                              cmyk=0, png=0, corrupt=0, flat_val=flat_val, labels=("devkit",) if flat_val else ())


@pytest.mark.timeout(60)
def test_ground_truth_with_more_lines_than_val_images(tmp_path, capsys):
    mini = _mini(tmp_path / "src")
    gt = mini.devkit / "data" / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text(gt.read_text() + "1\n")
    out = tmp_path / "out"
    line = run_cli(["data", "imagenet", "--src", mini.root, "--out", out, "--devkit", mini.devkit, "--workers", 1],
                   capsys)
    assert str(gt) in line and "has 7 lines, val/ holds 6 images" in line, line
    assert not list(out.rglob("*.tar")) and not (out / "dataset.json").exists()


@pytest.mark.timeout(60)
def test_a_class_folder_whose_name_is_not_utf8(tmp_path, capsys):
    mini = _mini(tmp_path / "src", flat_val=False)
    for split in ("train", "val"):  # the same class in both: everything else about the tree is right
        folder = os.fsencode(mini.root / split)
        os.rename(os.path.join(folder, os.fsencode(mini.wnids[1])), os.path.join(folder, b"n0000\xff0002"))
    out = tmp_path / "out"
    line = run_cli(["data", "imagenet", "--src", mini.root, "--out", out, "--workers", 1], capsys)
    assert "class folder train/n0000\\xff0002" in line and "not UTF-8" in line, line
    assert not (out / "dataset.json").exists() and not (out / "classes.json").exists()


# --- whole trials on shards that are empty, cut or mislabelled -------------------------------------------
@pytest.fixture(scope="module")
def ten_classes(tmp_path_factory) -> Path:
    from pipeline.data.convert import write_synthetic

    root = tmp_path_factory.mktemp("ten")
    write_synthetic(root, num_classes=10, image_size=16, train_samples=256, val_samples=64, per_shard=32)
    return root


def _trial(ds: Path, out: Path, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    return run_child(["prune", DEMO, f"output_dir={out}", f"data.root={ds}", *TINY, *extra])


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", ["empty shard", "label 99 of 10"])
def test_a_bad_shard_stops_in_one_line_under_on_error_fail(case, ten_classes, tmp_path):
    ds = copy_dataset(ten_classes, tmp_path / "ds")
    shard = manifest(ds)["splits"]["train"][2]["path"]
    if case == "empty shard":
        (ds / shard).write_bytes(b"")
        needles = (shard, "the tar is empty (0 bytes)")
    else:
        key = rewrite_sample(ds, shard, 5, cls=b"99")
        needles = (shard, key, "label 99 out of range for 10 classes")
    proc, took = _trial(ds, tmp_path / "out", "data.on_error=fail")
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = one_line(proc.stderr)
    assert all(n in line for n in needles), line
    assert took < 60, f"{took:.0f} s"


@pytest.mark.timeout(180)
def test_a_truncated_shard_is_said_when_found_not_at_the_epochs_end(ten_classes, tmp_path):
    ds = copy_dataset(ten_classes, tmp_path / "ds")
    shard = manifest(ds)["splits"]["train"][1]["path"]
    truncate_shard(ds, shard, 0.5)
    proc, took = _trial(ds, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    warned = [i for i, line in enumerate(lines) if line.startswith("[prunepipe] warning:") and shard in line]
    epoch = [i for i, line in enumerate(lines) if '"phase": "cut"' in line]  # after the dense evaluation
    assert warned and epoch and warned[0] < epoch[0], proc.stdout
    assert "of 256 train samples cannot be read" in lines[warned[0]]
    assert took < 90, f"{took:.0f} s"


@pytest.mark.timeout(180)
def test_other_settings_in_an_existing_output_dir_stop_at_once(ten_classes, tmp_path):
    from launch.outputs import CHECKPOINT, fingerprint_json
    from pipeline.config import load_config

    out = tmp_path / "out"
    out.mkdir()
    cfg = load_config(DEMO, [f"output_dir={out}", f"data.root={ten_classes}", *TINY])
    torch.save({"phase": "finetune", "epoch": 1, "fingerprint": fingerprint_json(cfg)}, out / CHECKPOINT)
    proc, took = _trial(ten_classes, out, "prune.method=l2")
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = one_line(proc.stderr)
    assert str(out) in line and "prune.method 'l1' -> 'l2'" in line, line
    assert took < 30, f"{took:.0f} s: the data or the model were touched first?"
