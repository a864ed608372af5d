import subprocess
import sys

import pytest

from pipeline.config import ConfigError, build_config, load_config, parse_override
from tests.conftest import ROOT

DEMO = ROOT / "configs" / "demo.yaml"


def test_shipped_configs_validate():
    for path in (ROOT / "configs").glob("*.yaml"):
        cfg = load_config(path)
        assert 0 <= cfg.prune.prune_ratio < 1


@pytest.mark.parametrize(
    "override, needle",
    [
        ("prune.prune_ratio=1.2", "prune.prune_ratio"),
        ("train.epochs=-1", "train.epochs"),
        ("train.epochs=many", "train.epochs"),
        ("prune.ratio=0.3", "prune.ratio: unknown key"),
        ("model.arch=vgg16", "model.arch"),
        ("prune.method=magic", "prune.method"),
        ("prune.options.bogus={a: 1}", "prune.options.bogus: unknown method"),
        ("prune.options.random={colour: 1}", "prune.options.random.colour: unknown key"),
        ("data.backend=dali9", "data.backend"),
        ("prune.scope=everything", "prune.scope"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, [override])
    msg = str(err.value)
    assert needle in msg
    assert "\n" not in msg  # one line


def test_overrides_are_typed_and_applied():
    cfg = load_config(DEMO, ["prune.prune_ratio=0.25", "search.num_workers=3", "prune.method=random"])
    assert cfg.prune.prune_ratio == 0.25 and isinstance(cfg.prune.prune_ratio, float)
    assert cfg.search.num_workers == 3
    assert cfg.prune.method == "random"
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])


def test_search_space_keys_must_exist():
    with pytest.raises(ConfigError, match="search.space"):
        build_config({"search": {"space": {"prune.nonsense": {"choice": [1, 2]}}}})
    with pytest.raises(ConfigError, match="exactly one"):
        build_config({"search": {"space": {"prune.prune_ratio": {"choice": [0.1], "uniform": [0.1, 0.2]}}}})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cli_reports_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", "prune", str(DEMO), "prune.prune_ratio=1.2", f"output_dir={tmp_path}"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prunepipe: error: prune.prune_ratio")
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing was written: it stopped before any work
