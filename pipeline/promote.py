"""Promotion: move ``champion`` to the ``challenger`` when it is as accurate (within a
tolerance) and measured faster. Speed is re-measured side by side in this process, never
compared across runs made on other machines at other times; a measurement too noisy to trust
promotes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import registry
from pipeline.measure import Timer, compare
from pipeline.models import build_model


@dataclass
class Decision:
    promoted: bool
    message: str


def _faster(reference, candidate, size: int, rounds: int, batch_size: int, timer: Timer | None) -> tuple[bool, str]:
    """Is ``candidate`` measured faster than ``reference`` (reliably)? And the figures, as words."""
    m = compare(reference, candidate, size, rounds=rounds, batch_size=batch_size, timer=timer)
    words = (f"{m['img_s']:.0f} vs {m['dense_img_s']:.0f} img/s, {m['speedup']:.2f}x "
             f"[IQR {m['speedup_low']:.2f}–{m['speedup_high']:.2f}], measured now")
    if not m["speed_reliable"]:
        return False, words + "; too noisy to trust (is something else running?)"
    # the whole middle half of the rounds must be faster, not only the median
    return m["speedup_low"] > 1.0, words


def promote(
    model_name: str,
    tracking_uri: str,
    tolerance: float,
    rounds: int = 12,
    batch_size: int = 32,
    timer: Timer | None = None,
) -> Decision:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    challenger = registry.version_by_alias(client, model_name, registry.CHALLENGER)
    if challenger is None:
        raise registry.RegistryError(f"{model_name}: no version has the alias {registry.CHALLENGER!r}; run a search first")
    champion = registry.version_by_alias(client, model_name, registry.CHAMPION)
    if champion is not None and champion.version == challenger.version:
        return Decision(False, f"{model_name}: v{challenger.version} is already the champion")
    ch_model, ch_spec = registry.load_registered(f"models:/{model_name}/{challenger.version}", tracking_uri)
    size = int(ch_spec.get("image_size", 224))
    if champion is None:
        # the first champion must still be faster than the dense model it was pruned from
        dense = build_model(ch_spec["arch"], int(ch_spec["num_classes"]))
        faster, words = _faster(dense, ch_model, size, rounds, batch_size, timer)
        if not faster:
            return Decision(False, f"not promoted: challenger v{challenger.version} is not measured faster than the "
                                   f"dense {ch_spec['arch']} ({words})")
        client.set_registered_model_alias(model_name, registry.CHAMPION, challenger.version)
        return Decision(True, f"{model_name}: no champion yet; v{challenger.version} is now champion ({words} "
                              f"against the dense {ch_spec['arch']})")
    ch_top1 = float(challenger.tags.get("val_top1", "nan"))
    cp_top1 = float(champion.tags.get("val_top1", "nan"))
    if not ch_top1 >= cp_top1 - tolerance:
        return Decision(False, f"not promoted: challenger v{challenger.version} top-1 {ch_top1:.4f} is below champion "
                               f"v{champion.version} {cp_top1:.4f} minus tolerance {tolerance}")
    cp_model, _ = registry.load_registered(f"models:/{model_name}/{champion.version}", tracking_uri)
    faster, words = _faster(cp_model, ch_model, size, rounds, batch_size, timer)
    if not faster:
        return Decision(False, f"not promoted: challenger v{challenger.version} is not measured faster than champion "
                               f"v{champion.version} ({words})")
    client.set_registered_model_alias(model_name, registry.CHAMPION, challenger.version)
    return Decision(True, f"promoted: v{challenger.version} is champion (top-1 {ch_top1:.4f} vs {cp_top1:.4f}; {words})")
