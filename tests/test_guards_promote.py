"""The `promote` command itself, end to end in-process: the tolerance it takes from the command
line, from a config and by default, the boundary of that tolerance, and the refusal of a more
accurate but slower challenger. Timing is injected (a clock proportional to MACs, from
tests/test_registry.py) so the decision does not depend on this machine's speed or load."""

import pytest
import yaml

import pipeline.measure
import pipeline.promote
from launch.cli import main
from pipeline import registry
from pipeline.promote import promote
from tests.conftest import DEMO
from tests.helpers.factories import logged_pruned_model, macs_timer, sqlite_store


@pytest.fixture()
def champion_store(tmp_path, monkeypatch):
    """A store whose champion is a 30 %-pruned resnet50 at top-1 0.90; `compare` gets the MACs clock."""
    import mlflow

    clock = macs_timer()

    def compare_on_the_macs_clock(*args, timer=None, **kwargs):
        # the CLI passes no timer (it would time on this machine's clock): give it the MACs clock
        return pipeline.measure.compare(*args, timer=timer or clock, **kwargs)

    monkeypatch.setattr(pipeline.promote, "compare", compare_on_the_macs_clock)
    cfg = sqlite_store(tmp_path)
    client = registry.connect(cfg)
    run, _ = logged_pruned_model(tmp_path, 0.3, 0.90, "champ")
    v = registry.register(client, "m", run, {"val_top1": 0.90})
    assert promote("m", cfg.tracking_uri, tolerance=0.0, timer=macs_timer()).promoted
    assert int(client.get_model_version_by_alias("m", "champion").version) == v
    yield cfg.tracking_uri, client
    mlflow.end_run()


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["promote", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _champion(client) -> int:
    return int(client.get_model_version_by_alias("m", "champion").version)


def test_promote_command_tolerance_boundary_and_slower_challenger(tmp_path, champion_store, capsys):
    uri, client = champion_store
    champ = _champion(client)
    # faster (60 % pruned) but 0.0101 below the champion
    run, _ = logged_pruned_model(tmp_path, 0.6, 0.8899, "close")
    close = registry.register(client, "m", run, {"val_top1": 0.8899})

    code, out, _ = _cli(capsys, "m", "--tracking-uri", uri)  # default tolerance 0.005
    assert code == 0 and "below champion" in out and "tolerance 0.005" in out, out
    code, out, _ = _cli(capsys, "m", "--tracking-uri", uri, "--tolerance", "0.01")  # just past the boundary
    assert code == 0 and "below champion" in out, out
    assert _champion(client) == champ

    # the tolerance (and the store) from a config: 0.0102 lets it through, then it is timed faster
    cfg = yaml.safe_load((DEMO).read_text())
    cfg["registry"].update(tracking_uri=uri, promote_tolerance=0.0102)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, out, _ = _cli(capsys, "m", "--config", str(path))
    assert code == 0 and out.startswith("promoted:"), out
    assert _champion(client) == close

    # more accurate, but slower than the new champion (only 30 % pruned): refused, champion stays
    run, _ = logged_pruned_model(tmp_path, 0.3, 0.95, "slow")
    registry.register(client, "m", run, {"val_top1": 0.95})
    code, out, _ = _cli(capsys, "m", "--tracking-uri", uri, "--tolerance", "0.01")
    assert code == 0 and "not measured faster than champion" in out, out
    assert _champion(client) == close


def test_promote_command_without_a_store_is_one_line_error(capsys):
    code, out, err = _cli(capsys, "m")
    assert code == 2 and err.strip() == "prunepipe: error: promote: give --tracking-uri or --config", err
