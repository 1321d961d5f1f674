"""Slicer's TerminologyEntry strings, read and written here: neither Slicer nor slicerio is needed.

A segment's terminology says what it is in DICOM codes.  A model card gives it either as a dict
of [coding scheme, code value, code meaning] triples::

    {"category": ["SCT", "49755003", "Morphologically Altered Structure"],
     "type": ["SCT", "108369006", "Neoplasm"], "anatomicRegion": ["SCT", "10200004", "Liver"]}

(optional: "typeModifier", "anatomicRegionModifier", and the context names "contextName",
"anatomicContextName"), or as the string Slicer keeps in a segment's ``TerminologyEntry`` tag:
seven fields separated by "~", each code "scheme^value^meaning", an absent code "^^"
(``vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry``)::

    context~category~type~typeModifier~anatomicContext~anatomicRegion~anatomicRegionModifier

:func:`entry_from_card` turns either form into one dict with the keys above (the form slicerio's
.seg.nrrd writer takes too); :func:`entry_to_string` writes Slicer's string from it.  A context
(:func:`read_context`, a ``.term.json`` file) is named in an entry only when it holds the entry's
category and type: Slicer resolves an entry in the context it names.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .volume import TransferSegError

#: the context every Slicer has loaded (it has no Neoplasm nor Lesion; a module ships its own for those)
GENERAL_ANATOMY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
CODE_KEYS = ("category", "type", "typeModifier", "anatomicRegion", "anatomicRegionModifier")


@dataclass(frozen=True)
class TerminologyContext:
    """A segmentation category and type context: its name, and the (category, type) codes it holds,
    each code as (coding scheme, code value)."""

    name: str
    types: frozenset

    def holds(self, entry: dict) -> bool:
        return (tuple(entry["category"][:2]), tuple(entry["type"][:2])) in self.types


def read_context(path) -> TerminologyContext:
    """The category and type codes of a Slicer terminology context file (``*.term.json``)."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
        name = document["SegmentationCategoryTypeContextName"]
        types = set()
        for category in document["SegmentationCodes"]["Category"]:
            for type_ in category.get("Type", []):
                types.add(((category["CodingSchemeDesignator"], category["CodeValue"]),
                           (type_["CodingSchemeDesignator"], type_["CodeValue"])))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TransferSegError(f"{Path(path).name} is not a Slicer terminology context file: {e}") from None
    return TerminologyContext(str(name), frozenset(types))


def _code(text: str, key: str) -> list | None:
    """``"SCT^10200004^Liver"`` → ``["SCT", "10200004", "Liver"]``; an absent code (``"^^"`` or empty) → None."""
    parts = text.split("^")
    if not any(parts):
        return None
    if len(parts) != 3 or not parts[1]:
        raise TransferSegError(f"terminology {key} {text!r} is not 'coding scheme^code value^code meaning'")
    return parts


def entry_from_string(text: str) -> dict:
    """Parse a Slicer TerminologyEntry string (as Slicer's DeserializeTerminologyEntry reads it)."""
    fields = text.split("~")
    if len(fields) == 8 and not fields[7]:
        fields = fields[:7]  # a colour table writes a trailing "~"; Slicer's reader ignores it
    if not 3 <= len(fields) <= 7:
        raise TransferSegError(f"terminology string {text!r} is not a Slicer TerminologyEntry "
                               "(context~category~type~modifier~anatomic context~region~region modifier)")
    fields += [""] * (7 - len(fields))
    entry = {"contextName": fields[0]}
    for key, field in zip(("category", "type", "typeModifier"), fields[1:4]):
        code = _code(field, key)
        if code is not None:
            entry[key] = code
    for key in ("category", "type"):
        if key not in entry:
            raise TransferSegError(f"terminology string {text!r} has no {key} code")
    if fields[4]:
        entry["anatomicContextName"] = fields[4]
    region = _code(fields[5], "anatomicRegion")
    if region is not None:  # Slicer reads a region modifier only with a region
        entry["anatomicRegion"] = region
        modifier = _code(fields[6], "anatomicRegionModifier")
        if modifier is not None:
            entry["anatomicRegionModifier"] = modifier
    return entry


def entry_from_card(terminology, context: TerminologyContext | None = None) -> dict:
    """The entry dict of a model card's terminology (a TerminologyEntry string or a dict of triples).

    A dict without a ``contextName`` names ``context`` if that holds its category and type, else
    Slicer's General Anatomy list; a string keeps the context it names.
    """
    if isinstance(terminology, str):
        return entry_from_string(terminology)
    if not isinstance(terminology, dict):
        raise TransferSegError(f"terminology must be a TerminologyEntry string or a dict; got {terminology!r}")
    entry = dict(terminology)
    for key in CODE_KEYS:
        value = entry.get(key)
        if key in entry and (not isinstance(value, (list, tuple)) or len(value) != 3
                             or not all(isinstance(x, str) for x in value)):
            raise TransferSegError(f"terminology '{key}' must be [coding scheme, code value, code meaning] strings")
        if key in entry:
            entry[key] = list(value)
    for key in ("category", "type"):
        if key not in entry:
            raise TransferSegError(f"terminology needs '{key}' as [coding scheme, code value, code meaning]")
    if not entry.get("contextName"):
        entry["contextName"] = context.name if context is not None and context.holds(entry) else \
            GENERAL_ANATOMY_CONTEXT
    if "anatomicRegion" in entry:
        entry.setdefault("anatomicContextName", ANATOMIC_CONTEXT)
    return entry


def entry_to_string(entry: dict) -> str:
    """Slicer's TerminologyEntry string of an entry dict, field for field as Slicer serialises it."""
    def code(key):
        return "^".join(entry.get(key) or ("", "", ""))

    return "~".join([entry.get("contextName") or "", code("category"), code("type"), code("typeModifier"),
                     entry.get("anatomicContextName") or "", code("anatomicRegion"), code("anatomicRegionModifier")])
