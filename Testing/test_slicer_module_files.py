"""The Slicer extension's files as Slicer's build and the desktop see them (no Slicer needed).

- CMake: every file listed exists, every module and library file is listed (so the build tree,
  where ctest runs the self-test, holds everything the module imports), shipped models too;
- the module folder holds only TransferSeg.py at its top (Slicer loads every top-level .py);
- every parameter of the parameter node is bound in the .ui, to a widget type that Slicer's
  parameterNodeWrapper can connect to that parameter's type;
- the extension's screenshot URL points to a file in this repository;
- the extension's metadata: the license file and its SPDX name, the CMake floor Slicer's own
  SlicerConfig.cmake sets, contributors as "Name (Affiliation)", and every test file a CMake
  comment names exists;
- every import inside a function of the module says why, in a comment.
"""
from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "TransferSeg"


def cmake_set(text: str, name: str) -> list:
    """The items of ``set(NAME item …)`` in a CMake file, with ${MODULE_NAME} expanded."""
    match = re.search(rf"set\(\s*{name}\s+(.*?)\)", text, re.S)
    assert match, f"set({name} …) is missing"
    items = [line.split("#")[0].strip() for line in match.group(1).splitlines()]
    return [item.replace("${MODULE_NAME}", "TransferSeg") for item in " ".join(items).split()]


def test_cmake_lists_every_module_and_library_file_and_each_exists():
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    scripts = cmake_set(text, "MODULE_PYTHON_SCRIPTS")
    resources = cmake_set(text, "MODULE_PYTHON_RESOURCES")
    library = cmake_set(text, "TRANSFERSEG_LIBRARY_PYTHON_SCRIPTS")
    models = cmake_set(text, "TRANSFERSEG_MODELS")
    for item in scripts + resources:
        assert (MODULE / item).is_file(), f"TransferSeg/CMakeLists.txt lists {item}, which does not exist"
    for item in library + models:
        assert (ROOT / item).is_file(), f"TransferSeg/CMakeLists.txt lists {item}, which does not exist"
    on_disk = sorted(str(p.relative_to(MODULE)) for p in MODULE.rglob("*.py") if "__pycache__" not in p.parts)
    assert sorted(scripts) == on_disk, "MODULE_PYTHON_SCRIPTS must list exactly the module's .py files"
    library_on_disk = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "TransferSegLib").rglob("*.py")
                             if "__pycache__" not in p.parts)
    missing = sorted(set(library_on_disk) - set(library))
    assert not missing, f"add to TRANSFERSEG_LIBRARY_PYTHON_SCRIPTS in TransferSeg/CMakeLists.txt: {missing}"
    shipped = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "Resources" / "models").glob("*")
                     if p.suffix in (".json", ".safetensors"))
    assert sorted(models) == shipped, f"TRANSFERSEG_MODELS must list the shipped models: {shipped}"
    assert "Resources/TransferSeg.term.json" in resources
    assert "SOURCE_DIR ${CMAKE_CURRENT_SOURCE_DIR}/.." in text  # library paths are relative to the repository
    assert "DESTINATION_DIR ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}" in text  # the build tree


def test_only_the_module_file_sits_at_the_top_of_the_module_folder():
    assert sorted(p.name for p in MODULE.glob("*.py")) == ["TransferSeg.py"]
    tree = ast.parse((MODULE / "TransferSeg.py").read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.module == "TransferSegModuleLib.logic" for alias in node.names}
    assert "TransferSegLogic" in imported  # Slicer's <module>Logic name
    for path in (MODULE / "TransferSegModuleLib").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"^\s*(import|from)\s+(qt|ctk)\b", text, re.M), f"{path.name} must stay Qt-free"
    logic = (MODULE / "TransferSegModuleLib" / "logic.py").read_text(encoding="utf-8")
    assert "class TransferSegLogic" in logic and 'MODULE_NAME = "TransferSeg"' in logic


def parameters() -> dict:
    """name -> annotation source of TransferSegParameterNode."""
    tree = ast.parse((MODULE / "TransferSeg.py").read_text(encoding="utf-8"))
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TransferSegParameterNode"]
    assert any(ast.unparse(d) == "parameterNodeWrapper" for d in cls.decorator_list)
    return {n.target.id: ast.unparse(n.annotation) for n in cls.body if isinstance(n, ast.AnnAssign)}


def test_every_parameter_is_bound_to_a_widget_that_can_represent_it():
    ui = ET.parse(MODULE / "Resources" / "UI" / "TransferSeg.ui")
    bound = {}
    for widget in ui.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.findtext("string")] = widget.get("class")
    params = parameters()
    assert set(bound) == set(params), f"unbound: {set(params) - set(bound)}; unknown: {set(bound) - set(params)}"
    for name, annotation in params.items():
        widget = bound[name]
        # the pairs slicer/parameterNodeWrapper/guiConnectors.py (Slicer 5.10) can connect
        if annotation.startswith("slicer.vtkMRML"):
            assert widget == "qMRMLNodeComboBox", name
        elif annotation == "bool":
            assert widget == "QCheckBox", name
        elif annotation.startswith("Annotated[str, Choice("):
            assert widget == "QComboBox", name  # exactly QComboBox: the connector checks type() equality
        elif annotation.startswith("Annotated[float, WithinRange("):
            assert widget == "ctkSliderWidget", name  # a ctkSliderWidget needs a bounded float
        elif annotation == "Path":
            assert widget == "ctkDirectoryButton", name
        else:
            raise AssertionError(f"{name}: no checked widget for {annotation}")
    for expected in ("inputVolume", "task", "model", "device", "roi", "fusion"):
        assert expected in params
    ui_text = (MODULE / "Resources" / "UI" / "TransferSeg.ui").read_text(encoding="utf-8")
    for selector in ("inputSelector", "roiSelector", "outputSelector"):  # node combos get the scene
        assert f"<receiver>{selector}</receiver>" in ui_text


def test_extension_metadata_points_to_files_in_this_repository():
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    screenshots = re.search(r'set\(EXTENSION_SCREENSHOTURLS\s+"([^"]+)"\)', text).group(1).split()
    assert screenshots
    for url in screenshots + [re.search(r'set\(EXTENSION_ICONURL\s+"([^"]+)"\)', text).group(1)]:
        path = url.split("/main/", 1)[1]
        assert (ROOT / path).is_file(), f"{url} names {path}, which is not in the repository"
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in text
    assert "add_subdirectory(TransferSeg)" in text


def test_the_module_imports_no_slicerio():
    """Slicer does not bundle slicerio: only the child process (TransferSegLib.io writing .seg.nrrd) uses it."""
    for path in MODULE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not {name for name in imported if name.split(".")[0] == "slicerio"}, path


def test_choices_and_display_parameters_name_the_parameter_nodes_own_parameters():
    """Every combo-box parameter is repaired when a scene names a value it does not list, and the display
    parameters (the only ones that touch the slice views) are exactly the display controls."""
    params = parameters()
    tree = ast.parse((MODULE / "TransferSeg.py").read_text(encoding="utf-8"))
    (choices,) = [n.value for n in tree.body if isinstance(n, ast.Assign)
                  and any(getattr(t, "id", None) == "CHOICES" for t in n.targets)]
    assert {ast.literal_eval(k) for k in choices.keys} == {
        name for name, annotation in params.items() if annotation.startswith("Annotated[str, Choice(")}
    logic = ast.parse((MODULE / "TransferSegModuleLib" / "logic.py").read_text(encoding="utf-8"))
    (display,) = [ast.literal_eval(n.value) for n in logic.body if isinstance(n, ast.Assign)
                  and any(getattr(t, "id", None) == "DISPLAY_PARAMETERS" for t in n.targets)]
    # the result display controls (show3DWhenDone is a run option: it touches no slice view)
    assert set(display) == {name for name in params if name.startswith("show") and name != "show3DWhenDone"} | {
        "overlayOpacity", "confidenceThreshold"}


def test_extension_metadata_license_cmake_floor_and_contributors():
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert "[Apache-2.0](LICENSE)" in (ROOT / "README.md").read_text(encoding="utf-8")
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    # Slicer 5.10's CMake/SlicerConfig.cmake.in: cmake_minimum_required(VERSION 3.20.6...3.22.6 FATAL_ERROR)
    floor = re.search(r"cmake_minimum_required\(VERSION (\d+(?:\.\d+)*)", text).group(1)
    assert tuple(map(int, floor.split("."))) >= (3, 20, 6), floor
    contributors = re.search(r'set\(EXTENSION_CONTRIBUTORS "([^"]+)"\)', text).group(1)
    assert re.fullmatch(r"[^()]+ \([^()]+\)(, [^()]+ \([^()]+\))*", contributors), contributors
    module = (MODULE / "TransferSeg.py").read_text(encoding="utf-8")
    assert re.search(r"self\.parent\.contributors = \[\"" + re.escape(contributors) + r"\"\]", module)
    for cmake in (ROOT / "CMakeLists.txt", MODULE / "CMakeLists.txt"):
        for cited in re.findall(r"Testing/[\w/]+\.py", cmake.read_text(encoding="utf-8")):
            assert (ROOT / cited).is_file(), f"{cmake.name} names {cited}, which does not exist"


def test_imports_inside_functions_say_why():
    """An import inside a function needs a comment on its line or directly above it (or above its block)."""
    for path in [MODULE / "TransferSeg.py", *sorted((MODULE / "TransferSegModuleLib").glob("*.py"))]:
        lines = path.read_text(encoding="utf-8").splitlines()
        for function in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                n = node.lineno - 1
                while n > 0 and lines[n - 1].strip().startswith(("import ", "from ")):
                    n -= 1  # the first import of the block
                commented = "#" in lines[node.lineno - 1] or lines[n - 1].strip().startswith("#")
                assert commented, f"{path.name}:{node.lineno}: say why this import is inside a function"


def test_the_results_controls_are_in_the_panel():
    """The widgets the module file uses by name exist in the .ui (a typo would fail only in Slicer)."""
    ui = ET.parse(MODULE / "Resources" / "UI" / "TransferSeg.ui")
    names = {widget.get("name") for widget in ui.iter("widget")}
    module = (MODULE / "TransferSeg.py").read_text(encoding="utf-8")
    used = set(re.findall(r"self\.ui\.(\w+)", module))
    assert used <= names, f"not in TransferSeg.ui: {sorted(used - names)}"
    for name in ("findingsTableView", "show3DButton", "rescanModelsButton"):
        assert name in used
    classes = {widget.get("name"): widget.get("class") for widget in ui.iter("widget")}
    assert classes["findingsTableView"] == "qMRMLTableView" and classes["outputSelector"] == "qMRMLNodeComboBox"
    assert "<receiver>findingsTableView</receiver>" in (MODULE / "Resources" / "UI" / "TransferSeg.ui").read_text(
        encoding="utf-8")
