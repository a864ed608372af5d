"""Promotion: move ``champion`` to the ``challenger`` when it is as accurate (within a
tolerance) and faster. Speed is re-measured side by side in this process, never compared
across runs made on other machines at other times.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import registry
from pipeline.measure import compare
from pipeline.spec import load_pruned


@dataclass
class Decision:
    promoted: bool
    message: str


def promote(model_name: str, tracking_uri: str, tolerance: float, rounds: int = 3, batch_size: int = 32) -> Decision:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    challenger = registry.version_by_alias(client, model_name, registry.CHALLENGER)
    if challenger is None:
        raise registry.RegistryError(f"{model_name}: no version has the alias {registry.CHALLENGER!r}; run a search first")
    champion = registry.version_by_alias(client, model_name, registry.CHAMPION)
    if champion is None:
        client.set_registered_model_alias(model_name, registry.CHAMPION, challenger.version)
        return Decision(True, f"{model_name}: no champion yet; v{challenger.version} is now champion")
    if champion.version == challenger.version:
        return Decision(False, f"{model_name}: v{challenger.version} is already the champion")
    ch_top1 = float(challenger.tags.get("val_top1", "nan"))
    cp_top1 = float(champion.tags.get("val_top1", "nan"))
    if not ch_top1 >= cp_top1 - tolerance:
        return Decision(False, f"not promoted: challenger v{challenger.version} top-1 {ch_top1:.4f} is below champion "
                               f"v{champion.version} {cp_top1:.4f} minus tolerance {tolerance}")
    ch_model, ch_spec = load_pruned(registry.download_model(f"models:/{model_name}/{challenger.version}", tracking_uri))
    cp_model, cp_spec = load_pruned(registry.download_model(f"models:/{model_name}/{champion.version}", tracking_uri))
    size = int(ch_spec.get("image_size", 224))
    # compare() calls its first argument "dense": here it is the champion, the reference
    m = compare(cp_model, ch_model, size, rounds=rounds, batch_size=batch_size)
    if m["speedup"] <= 1.0:
        return Decision(False, f"not promoted: challenger v{challenger.version} is not faster than champion "
                               f"v{champion.version} ({m['img_s']:.0f} vs {m['dense_img_s']:.0f} img/s, measured now)")
    client.set_registered_model_alias(model_name, registry.CHAMPION, challenger.version)
    return Decision(True, f"promoted: v{challenger.version} is champion (top-1 {ch_top1:.4f} vs {cp_top1:.4f}; "
                          f"{m['img_s']:.0f} vs {m['dense_img_s']:.0f} img/s, {m['speedup']:.2f}x, measured now)")
