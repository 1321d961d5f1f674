"""The checks a model card passes when it is read, before any volume is read or network built.

:func:`check_card` checks every key that the pipeline, the methods, the sliding-window inferer,
peak finding and the writers read later, so a card with a wrong value is one clear error at
once, not a traceback after minutes of inference.  Each key has a small checker and the form
it should take (``_SPEC_VALUES``, ``_MODEL_VALUES``, and a table per section: ``preprocessing``,
``inference``, ``peaks``, ``evaluation``, the known methods' ``config``); a section refuses a
key it does not know, so a misspelt setting is not silently ignored.

Imports nothing above :mod:`TransferSegLib.volume`, so reading a card stays cheap (no torch).
The few choices it shares with modules that import torch (the inferer's activations and
blends, ``find_peaks``' arguments, the methods' settings) are repeated here;
Testing/test_hostile_models.py checks that they agree.
"""
from __future__ import annotations

import json
import math
import re

from .labels import VIEWS
from .volume import TransferSegError

__all__ = ["COMPONENT_NAME", "VIEWS", "check_card", "is_composed"]

_SINGLE_CARD_KEYS = ("name", "version", "task", "labels", "architecture", "preprocessing", "patch_size", "weights")
_COMPOSED_CARD_KEYS = ("name", "version", "task", "labels", "method", "components", "weights")
# no "." in a component name: a weight key's first dotted part names its component
COMPONENT_NAME = re.compile(r"[A-Za-z0-9_-]+")
ACTIVATIONS = ("softmax", "sigmoid", "none")  # inference.ACTIVATIONS
BLENDS = ("gaussian", "constant")  # inference.BLENDS
FUSIONS = {"vfn": "fusion", "vfn-noimage": "fusion_noimage", "majority": None, "staple": None}  # multiview.FUSIONS
#: real cards nest about 10 levels deep; one far deeper would break copy.deepcopy and json.dumps later
_MAX_DEPTH = 64
_AXIS_OF_LETTER = {"R": "RL", "L": "RL", "A": "AP", "P": "AP", "S": "SI", "I": "SI"}  # resample.to_orientation


def is_composed(card: dict) -> bool:
    return "method" in card or "components" in card


# --- checkers: value -> bool ----------------------------------------------------------------------
def _is_int(value, low=None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and (low is None or value >= low)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_label(value) -> bool:
    return _is_int(value, 1) and value <= 255


def _is_label_key(key) -> bool:
    """A label value written as a JSON object's key, e.g. "2" (not "²", which isdigit() lets through)."""
    return isinstance(key, str) and key.isascii() and key.isdecimal() and _is_label(int(key))


def _ints(count: int, low: int):
    return lambda value: isinstance(value, list) and len(value) == count and all(_is_int(v, low) for v in value)


def _positive_triple(value) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(_is_number(v) and v > 0 for v in value)


def _or_null(check):
    return lambda value: value is None or check(value)


def _one_of(*choices):
    return lambda value: isinstance(value, str) and value in choices


def _text(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _orientation(value) -> bool:
    return (isinstance(value, str) and len(value) == 3 and all(c in _AXIS_OF_LETTER for c in value.upper())
            and len({_AXIS_OF_LETTER[c] for c in value.upper()}) == 3)


def _spacing_range(value) -> bool:
    return (isinstance(value, dict) and set(value) == {"min", "max"} and _positive_triple(value["min"])
            and _positive_triple(value["max"]) and all(a <= b for a, b in zip(value["min"], value["max"])))


def _hu_window(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_is_number(v) for v in value) and value[0] < value[1]


def _fraction(value) -> bool:
    return _is_number(value) and 0 <= value < 1


def _regions(value) -> bool:
    return isinstance(value, dict) and all(isinstance(v, list) and v and all(_is_label(x) for x in v)
                                           for v in value.values())


def _color(value) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(_is_number(v) and 0 <= v <= 1 for v in value)


def _terminology(value) -> bool:
    """A Slicer TerminologyEntry string, or a dict of [coding scheme, code value, code meaning]
    triples with at least category and type (as io.save_segmentation reads it)."""
    if isinstance(value, str):  # context~category~type~…, each code "scheme^value^meaning" (what slicerio parses)
        parts = value.split("~")
        return len(parts) >= 3 and all(part.count("^") == 2 and part.split("^")[1] for part in parts[1:3])
    triple = lambda v: isinstance(v, list) and len(v) == 3 and all(isinstance(x, str) for x in v)  # noqa: E731
    return isinstance(value, dict) and {"category", "type"} <= set(value) and all(
        triple(value[k]) for k in ("category", "type", "typeModifier", "anatomicRegion", "anatomicRegionModifier")
        if k in value)


_ORGAN_KEYS = {"name", "labels", "min_ml", "min_ml_per_cm", "min_body_cm2", "side", "min_offset_mm"}


def _expects(value) -> bool:
    """What the model expects of a scan (see :mod:`TransferSegLib.scope`)."""
    if not isinstance(value, dict) or set(value) - {"modality", "region", "organ", "lesion"}:
        return False
    organ, lesion = value.get("organ"), value.get("lesion")
    return (value.get("modality") in (None, "CT") and isinstance(value.get("region", ""), str)
            and (organ is None or isinstance(organ, dict) and set(organ) <= _ORGAN_KEYS
                 and _text(organ.get("name")) and isinstance(organ.get("labels"), list) and organ["labels"]
                 and all(_is_label(v) for v in organ["labels"])
                 and all(_is_number(organ.get(k, 0)) and organ.get(k, 0) >= 0
                         for k in ("min_ml", "min_ml_per_cm", "min_body_cm2", "min_offset_mm"))
                 and organ.get("side", "right") in ("right", "left"))
            and (lesion is None or organ is not None and isinstance(lesion, dict)
                 and set(lesion) == {"name", "label", "max_fraction"} and _text(lesion["name"])
                 and _is_label(lesion["label"]) and _is_number(lesion["max_fraction"])
                 and 0 < lesion["max_fraction"] <= 1))


# --- key -> (checker, the form it should take) ----------------------------------------------------
_SPACING = (_or_null(_positive_triple), "null or 3 positive numbers of mm (k, j, i), e.g. [3.0, 0.8, 0.8]")
_PATCH = (_ints(3, 1), "3 positive whole numbers of voxels (k, j, i), e.g. [24, 96, 96]")
_COUNT = (lambda v: _is_int(v, 1), "a whole number ≥ 1, e.g. 2")

#: a network's part of the card: a single card's top level, or one of a composed card's components
_SPEC_VALUES = {
    "patch_size": _PATCH,
    "expected_spacing_mm": _SPACING,
    "working_spacing_mm": _SPACING,
    "view": (_or_null(_one_of(*VIEWS)), f"null or one of {', '.join(VIEWS)}"),
}
#: the model's own keys, at a card's top level
_MODEL_VALUES = {
    "name": (_text, 'a non-empty string, e.g. "ct-liver-tumor-unet3d"'),
    "version": (_text, 'a string, e.g. "1.0.0"'),
    "description": (_or_null(lambda v: isinstance(v, str)), 'a string, e.g. "liver and tumors in CT"'),
    "metrics": (_or_null(lambda v: isinstance(v, dict)), 'an object of held-out results, e.g. {"dice_liver": 0.95}'),
    "expected_spacing_mm": _SPACING,
    "working_spacing_mm": _SPACING,
    "working_orientation": (_or_null(_orientation), 'null or three letters from R/L, A/P, S/I, one per axis, '
                                                    'e.g. "LPS"'),
    "expects": (_or_null(_expects), '{"modality": "CT", "region": TEXT, "organ": {"name", "labels", "min_ml", '
                                    '"min_ml_per_cm", "min_body_cm2", "side", "min_offset_mm"}, "lesion": '
                                    '{"name", "label", "max_fraction"}}, e.g. {"modality": "CT", "organ": '
                                    '{"name": "liver", "labels": [1, 2], "min_ml": 150}}'),
    "trained_spacing_mm": (_or_null(_spacing_range), '{"min": [k, j, i], "max": [k, j, i]} of positive mm with '
                                                     'min ≤ max, e.g. {"min": [1, 0.7, 0.7], "max": [5, 1, 1]}'),
}
_LABEL_VALUES = {
    "name": (_text, 'a non-empty string, e.g. "liver"'),
    "label": (_is_label, "a whole number 1…255, e.g. 1"),
    "color": (_color, "[r, g, b] in 0…1, e.g. [0.86, 0.42, 0.32]"),
    "terminology": (_terminology, '{"category": [scheme, code, meaning], "type": [scheme, code, meaning]}, e.g. '
                                  '{"category": ["SCT", "123037004", "Anatomical Structure"], '
                                  '"type": ["SCT", "10200004", "Liver"]}'),
}
# sections: name -> (key -> (checker, form), an example of the whole section)
_SECTIONS = {
    "preprocessing": ({
        "hu_window": (_hu_window, "[low, high] HU with low < high, e.g. [-200, 250]"),
        "normalise": (_one_of("zscore", "minmax"), '"zscore" or "minmax"'),
    }, '{"hu_window": [-200, 250]}'),
    "inference": ({
        "overlap": (_fraction, "a fraction in [0, 1), e.g. 0.5"),
        "blend": (_one_of(*BLENDS), " or ".join(f'"{b}"' for b in BLENDS)),
        "batch_size": _COUNT,
        "activation": (_one_of(*ACTIVATIONS), ", ".join(f'"{a}"' for a in ACTIVATIONS)),
        "patch_size": (_or_null(_PATCH[0]), "null or " + _PATCH[1]),
    }, '{"overlap": 0.5, "activation": "softmax", "batch_size": 2}'),
    "peaks": ({  # heatmaps.find_peaks' keyword arguments
        "threshold": (_is_number, "a number, e.g. 0.25"),
        "min_distance": (lambda v: _is_int(v, 0) or _ints(3, 0)(v), "voxels ≥ 0, one whole number or [k, j, i], "
                                                                    "e.g. [2, 8, 8]"),
        "max_peaks": (_COUNT[0], "a whole number ≥ 1, e.g. 20"),
    }, '{"threshold": 0.25, "min_distance": [3, 10, 10], "max_peaks": 20}'),
    "evaluation": ({
        "regions": (_regions, 'region name -> label values 1…255, e.g. {"liver": [1, 2], "liver tumor": [2]}'),
        "tumor_burden": (lambda v: isinstance(v, dict) and set(v) == {"tumor", "liver"}
                         and all(isinstance(x, str) for x in v.values()),
                         '{"tumor": REGION, "liver": REGION}, e.g. {"tumor": "liver tumor", "liver": "liver"}'),
    }, '{"regions": {"liver": [1, 2], "liver tumor": [2]}}'),
}
# method name -> the settings of its config; a method not named here checks its own
_METHODS = {
    "multiview": {
        "fusion": (_one_of(*FUSIONS), ", ".join(f'"{f}"' for f in FUSIONS)),
        "stride": _COUNT,
        "patch": (_or_null(_PATCH[0]), "null or " + _PATCH[1]),
        "roi_margin": (lambda v: _is_int(v, 0), "voxels ≥ 0, e.g. 16"),
        "blend": (_one_of(*BLENDS), " or ".join(f'"{b}"' for b in BLENDS)),
        "batch_size": _COUNT,
    },
    "cascade": {
        "thresholds": (lambda v: isinstance(v, list) and all(_is_number(t) and 0 < t <= 1 for t in v),
                       "probabilities in (0, 1], one per label, e.g. [0.5, 0.9]"),
        "slices": _COUNT,
        "stride": _COUNT,
        "margin": (lambda v: _is_int(v, 0), "edge slices ≥ 0, e.g. 2"),
        "box_margin_mm": (lambda v: _is_number(v) and v >= 0, "mm ≥ 0, e.g. 12"),
        "batch_size": _COUNT,
    },
}
_POSTPROCESSING_FORMS = {"largest_component": "[1, 2]", "fill_holes": "[1, 2]", "inside": "{\"2\": [1, 2]}",
                         "min_volume_ml": "{\"2\": 0.25}"}


# --- checking ---------------------------------------------------------------------------------------
def _show(value) -> str:
    return json.dumps(value, default=str)[:80]


def _check_values(values: dict, table: dict, where: str, prefix: str = "") -> None:
    for key, (ok, form) in table.items():
        if key in values and not ok(values[key]):
            raise TransferSegError(f"{where}: {prefix}{key} must be {form}; got {_show(values[key])}")


def _check_section(values: dict, name: str, where: str, prefix: str = "") -> None:
    """``values[name]``, when given and not null: an object of known settings, each well formed."""
    table, example = _SECTIONS[name]
    section = values.get(name)
    if section is None:
        return
    if not isinstance(section, dict):
        raise TransferSegError(f"{where}: {prefix}{name} must be an object, e.g. {example}; got {_show(section)}")
    unknown = [key for key in section if key not in table]
    if unknown:
        raise TransferSegError(f"{where}: {prefix}{name}.{unknown[0]} is not one of the {name} settings "
                               f"({', '.join(table)}), e.g. {example}")
    _check_values(section, table, where, f"{prefix}{name}.")


def _check_labels(labels, task: str, where: str) -> None:
    """Well-formed labels, no value or name twice; a segmentation's values are 1…n, one per output channel."""
    if not isinstance(labels, list) or not all(isinstance(seg, dict) for seg in labels):
        raise TransferSegError(f"{where}: labels must be a list of {{\"name\": ..., \"label\": 1…255, "
                               f"\"color\": [r, g, b]}}, not {_show(labels)}")
    for n, seg in enumerate(labels):
        missing = [key for key in ("name", "label") if key not in seg]
        if missing:
            raise TransferSegError(f"{where}: labels[{n}] lacks {' and '.join(missing)}, e.g. "
                                   "{\"name\": \"liver\", \"label\": 1, \"color\": [0.86, 0.42, 0.32]}")
        _check_values(seg, _LABEL_VALUES, where, f"labels[{n}].")
    for key, what in (("label", "label value"), ("name", "label name")):
        seen = [seg[key] for seg in labels]
        twice = next((v for n, v in enumerate(seen) if v in seen[:n]), None)
        if twice is not None:
            raise TransferSegError(f"{where}: {what} {twice!r} is given twice in labels; each label needs its own "
                                   "name and value, e.g. liver 1, liver tumor 2")
    values = sorted(seg["label"] for seg in labels)
    if task == "segmentation" and values != list(range(1, len(values) + 1)):
        raise TransferSegError(f"{where}: a segmentation model's label values must be 1…n, one per output channel "
                               f"after the background, e.g. [1, 2]; got {values or 'none'}")


def _check_postprocessing(spec, where: str) -> None:
    """The card's ``postprocessing`` (see ``pipeline.postprocess``): known steps, each well formed,
    so a misspelt step is refused when the model loads instead of silently skipped."""
    if spec is None:
        return
    if not isinstance(spec, dict):
        raise TransferSegError(f"{where}: postprocessing must be an object, e.g. {{\"largest_component\": [1, 2]}}")
    for key, value in spec.items():
        if key not in _POSTPROCESSING_FORMS:
            raise TransferSegError(f"{where}: postprocessing.{key} is not a post-processing step; the steps are "
                                   f"{', '.join(_POSTPROCESSING_FORMS)}")
        if key in ("largest_component", "fill_holes"):
            ok = isinstance(value, list) and value and all(_is_label(v) for v in value)
        elif key == "inside":
            ok = isinstance(value, dict) and all(
                _is_label_key(k) and isinstance(v, list) and v and all(_is_label(x) for x in v)
                for k, v in value.items())
        else:
            ok = isinstance(value, dict) and all(_is_label_key(k) and _is_number(v) and v >= 0
                                                 for k, v in value.items())
        if not ok:
            raise TransferSegError(f"{where}: postprocessing.{key} must look like {_POSTPROCESSING_FORMS[key]} "
                                   f"(labels 1…255), not {_show(value)}")


def _check_spec(spec: dict, where: str, prefix: str = "") -> None:
    """One network's part of the card: its architecture, patch, spacings, view, preprocessing, inference."""
    arch = spec.get("architecture")
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str) \
            or not isinstance(arch.get("config", {}), dict):
        raise TransferSegError(f"{where}: {prefix}architecture must be {{\"name\": ..., \"config\": {{...}}}}, "
                               f"not {_show(arch)}")
    _check_values(spec, _SPEC_VALUES, where, prefix)
    _check_section(spec, "preprocessing", where, prefix)
    _check_section(spec, "inference", where, prefix)


def _check_method(card: dict, where: str) -> None:
    """A composed card's method and components, and a known method's config (the components it
    needs a method checks itself, before any inference)."""
    method = card["method"]
    if not isinstance(method, dict) or not isinstance(method.get("name"), str) or not method["name"] \
            or not isinstance(method.get("config") or {}, dict):
        raise TransferSegError(f"{where}: method must be {{\"name\": \"single\" | \"multiview\" | …, "
                               f"\"config\": {{…}}}}, not {_show(method)}")
    components = card["components"]
    if not isinstance(components, dict) or not components:
        raise TransferSegError(f"{where}: components must name at least one network, e.g. {{\"axial\": {{…}}}}")
    for name, spec in components.items():
        if not COMPONENT_NAME.fullmatch(name):
            raise TransferSegError(f"{where}: component name {name!r} may hold only letters, digits, '_' and '-' "
                                   "(its weights are the keys that start with NAME.)")
        if not isinstance(spec, dict):
            raise TransferSegError(f"{where}: component {name!r} must be an object with \"architecture\": "
                                   "{\"name\": ..., \"config\": {...}}")
        _check_spec(spec, where, f"components.{name}.")
    if method["name"] not in _METHODS:
        return
    settings = _METHODS[method["name"]]
    config = method.get("config") or {}
    unknown = [key for key in config if key not in settings]
    if unknown:
        raise TransferSegError(f"{where}: method.config.{unknown[0]} is not a {method['name']} setting; there are "
                               f"{', '.join(settings)}")
    _check_values(config, settings, where, "method.config.")
    _METHOD_RULES[method["name"]](config, card, where)


def _multiview_rules(config: dict, card: dict, where: str) -> None:
    fusion = config.get("fusion", "vfn")
    if FUSIONS[fusion] is not None and FUSIONS[fusion] not in card["components"]:
        raise TransferSegError(f"{where}: method.config.fusion {fusion!r} needs the component {FUSIONS[fusion]!r}, "
                               "which the card lacks; choose \"majority\" or \"staple\"")


def _cascade_rules(config: dict, card: dict, where: str) -> None:
    thresholds = config.get("thresholds", [0.5, 0.9])
    if len(thresholds) != len(card["labels"]):
        raise TransferSegError(f"{where}: method.config.thresholds must give one probability per label "
                               f"({len(card['labels'])}), e.g. [0.5, 0.9]; got {_show(thresholds)}")
    slices, stride, margin = (config.get(key, default) for key, default in (("slices", 8), ("stride", 2),
                                                                              ("margin", 2)))
    if stride > slices - 2 * margin:
        raise TransferSegError(f"{where}: windows of {slices} slices at stride {stride} with {margin} edge slices "
                               "dropped do not cover the volume; need stride ≤ slices − 2·margin, e.g. 8, 2, 2")


_METHOD_RULES = {"multiview": _multiview_rules, "cascade": _cascade_rules}


def _nested_deeper_than(value, limit: int) -> bool:
    """Whether objects and lists nest more than ``limit`` levels deep (counted without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return False


def check_card(card, where: str) -> None:
    """Every key the card's form needs and every value the pipeline reads later, well formed."""
    if not isinstance(card, dict):
        raise TransferSegError(f"{where}: the model card must be a JSON object")
    if _nested_deeper_than(card, _MAX_DEPTH):
        raise TransferSegError(f"{where}: the model card nests objects and lists more than {_MAX_DEPTH} levels deep; "
                               "a card is a few levels deep (give the model's NAME.json, or install it again)")
    composed = is_composed(card)
    missing = [k for k in (_COMPOSED_CARD_KEYS if composed else _SINGLE_CARD_KEYS) if k not in card]
    if missing:
        form = "a composed model card (with method and components)" if composed else "the model card"
        raise TransferSegError(f"{where}: {form} lacks {', '.join(missing)}")
    if card["task"] not in ("segmentation", "heatmap"):
        raise TransferSegError(f"{where}: task must be \"segmentation\" or \"heatmap\", not {_show(card['task'])}")
    _check_values(card, _MODEL_VALUES, where)
    _check_labels(card["labels"], card["task"], where)
    if not isinstance(card["weights"], dict):
        raise TransferSegError(f"{where}: weights must be {{\"file\": \"NAME.safetensors\", \"sha256\": ...}}, "
                               f"not {_show(card['weights'])}")
    _check_postprocessing(card.get("postprocessing"), where)
    _check_section(card, "peaks", where)
    _check_section(card, "evaluation", where)
    if composed:
        _check_method(card, where)
    else:
        _check_spec(card, where)
