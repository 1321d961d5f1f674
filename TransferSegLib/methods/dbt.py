"""``dbt_lesions``: the DBT detector of two kinds behind one card.

Masses come from a heatmap network on the card's working grid (AH-Net, Sec. 4.1: peaks of the
heatmap); calcification clusters come from a speck classifier that works at the input's own
resolution (:mod:`TransferSegLib.calcifications`): 0.15–0.6 mm specks do not survive the
0.5 mm grid the mass network needs.  Components: ``masses`` (task heatmap) and
``calcifications`` (a speck classifier); every detection carries its kind.  With a third
component ``mass_candidates`` (a candidate classifier, :mod:`TransferSegLib.masses`) the masses
are the heatmap's peaks and blob candidates on the same grid, rescored: the heatmap alone is
smooth at about 8 mm and misses masses under 10 mm.

Card settings (``method.config``): ``mass_peaks`` ({"threshold", "min_distance", "max_peaks"},
working voxels; default the card's ``peaks``; without ``mass_candidates``), ``masses`` (the
mass stage's settings, e.g. its threshold; with ``mass_candidates``) and ``calcifications``
(the cluster stage's settings, e.g. its threshold; default the component's own).
"""
from __future__ import annotations

from ..calcifications import detect_calcification_clusters
from ..heatmaps import find_peaks
from ..masses import detect_masses
from ..progress import StageProgress
from ..volume import TransferSegError
from .registry import MethodContext, MethodOutput, register_method
from .single import run_component

COMPONENTS = ("masses", "calcifications")


@register_method("dbt_lesions")
def run(context: MethodContext) -> MethodOutput:
    components = context.model.components
    missing = [name for name in COMPONENTS if name not in components]
    if missing:
        raise TransferSegError(f"method 'dbt_lesions' needs components {', '.join(COMPONENTS)}; "
                               f"{context.model.name} lacks {', '.join(missing)}")
    config = context.model.method.get("config") or {}
    report = StageProgress(context.progress)
    masses = run_component(context, components["masses"], progress=report.sub(0.0, 0.7))
    if "mass_candidates" in components:
        found = detect_masses(context.volume, masses.heatmap, components["mass_candidates"].network, config.get("masses"),
                              cancel=context.cancel)
    else:
        peaks = dict(config.get("mass_peaks") or context.card.get("peaks") or {})
        found = find_peaks(masses.heatmap, context.volume, **peaks)
        for detection in found:
            detection.kind = "mass"
    report(0.7, "calcification clusters")
    clusters = detect_calcification_clusters(
        context.native if context.native is not None else context.volume, components["calcifications"].network,
        config.get("calcifications"), progress=report.sub(0.7, 1.0), cancel=context.cancel)
    return MethodOutput(heatmap=masses.heatmap, detections=found, native_detections=clusters,
                        device=str(masses.device), fallbacks=list(masses.fallbacks),
                        summary={"detections_by_kind": {"mass": len(found), "calcification_cluster": len(clusters)}})
