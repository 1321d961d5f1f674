"""The documentation a newcomer reads first: README.md and docs/*.md.

* Every relative link resolves to a file, and every ``#anchor`` in it names a heading of the
  target file, by GitHub's anchor rules (lowercase, punctuation dropped, spaces to ``-``,
  ``-1``, ``-2`` for repeated headings).
* The README's code map names every package and module of ``TransferSegLib``, and no module
  that does not exist.
* The README stays short, and keeps the two set-up commands.

Each checker is also run on a made-up broken case, so a checker that can no longer fail is caught.
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LIBRARY = ROOT / "TransferSegLib"
MAP_HEADING = "## Map of the code"
MAX_README_LINES = 250

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
_LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)", re.S)
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _prose(markdown: str) -> str:
    """The text outside fenced code blocks (their lines blanked, so line numbers stay)."""
    lines, fenced = [], False
    for line in markdown.split("\n"):
        if _FENCE.match(line):
            fenced = not fenced
            lines.append("")
        else:
            lines.append("" if fenced else line)
    return "\n".join(lines)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading's text (before the -1, -2 of repeated headings)."""
    text = _LINK.sub(lambda m: m.group(1), heading)   # a link in a heading keeps its text
    text = _CODE_SPAN.sub(lambda m: m.group(2), text)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())  # \w: Unicode letters, digits and _
    return text.replace(" ", "-")


def anchors(markdown: str) -> set:
    """Every anchor a Markdown file's headings give, repeated headings numbered as GitHub does."""
    seen, result = {}, set()
    for line in _prose(markdown).split("\n"):
        match = _HEADING.match(line)
        if not match:
            continue
        anchor = github_anchor(match.group(2))
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        result.add(anchor if count == 0 else f"{anchor}-{count}")
    return result


def relative_links(markdown: str) -> list:
    """The targets of the links and images outside code that point into the repository."""
    text = _CODE_SPAN.sub(lambda m: " " * len(m.group(0)), _prose(markdown))
    return [m.group(2) for m in _LINK.finditer(text) if m.group(2) and not _SCHEME.match(m.group(2))]


def broken_links(path: Path) -> list:
    """``(target, why)`` for every relative link of a Markdown file that leads nowhere."""
    problems = []
    for target in relative_links(path.read_text(encoding="utf-8")):
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        if not destination.exists():
            problems.append((target, f"no file {destination}"))
            continue
        if not anchor:
            continue
        if destination.suffix != ".md" or not destination.is_file():
            problems.append((target, "an anchor into a file that is not Markdown"))
        elif anchor not in anchors(destination.read_text(encoding="utf-8")):
            problems.append((target, f"no heading with anchor #{anchor} in {destination.name}"))
    return problems


def documentation_files() -> list:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


# ---------------------------------------------------------------- links


def test_github_anchor_rules():
    assert github_anchor("Real CT scans (evaluation only)") == "real-ct-scans-evaluation-only"
    assert github_anchor("`transferseg info`") == "transferseg-info"
    assert github_anchor("2D → 3D transfer models (`training.recipes.transfer`, the `converted` architecture)") \
        == "2d--3d-transfer-models-trainingrecipestransfer-the-converted-architecture"
    assert github_anchor("Set-up: two commands") == "set-up-two-commands"
    assert anchors("# Speed\n```\n# not a heading\n```\n## Speed\n### Speed\n") == {"speed", "speed-1", "speed-2"}


def test_broken_links_are_found(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## Real heading\n", encoding="utf-8")
    (tmp_path / "picture.png").write_bytes(b"")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[fine](other.md#real-heading), [also fine](#page), ![fine](picture.png), "
        "[outside](https://example.org/missing.md), [`code` in the text](other.md)\n"
        "[missing file](missing.md) and [missing anchor](other.md#no-such-heading)\n"
        "[missing here](#nowhere), [anchor into a picture](picture.png#x), "
        "[a link over\ntwo lines](gone.md)\n"
        "`[in code](ignored.md)`\n\n```\n[in a fence](ignored.md)\n```\n",
        encoding="utf-8")
    assert sorted(target for target, _ in broken_links(page)) == sorted(
        ["missing.md", "other.md#no-such-heading", "#nowhere", "picture.png#x", "gone.md"])


def test_every_link_in_the_documentation_resolves():
    problems = [(path.relative_to(ROOT).as_posix(), target, why)
                for path in documentation_files() for target, why in broken_links(path)]
    assert problems == []


def test_the_docs_are_linked_from_the_readme():
    linked = {(README.parent / target.partition("#")[0]).resolve()
              for target in relative_links(README.read_text(encoding="utf-8"))}
    unlinked = [p.name for p in documentation_files()[1:] if p.resolve() not in linked]
    assert unlinked == []


# ---------------------------------------------------------------- the code map


def code_map(readme: str):
    """The README map's ``TransferSegLib/`` block as ``(packages, modules)``: the subpackage names, and
    for each package (``""`` for the top level) the set of ``.py`` files it names."""
    lines = readme.split("\n")
    start = lines.index(MAP_HEADING)
    fence = next(i for i in range(start, len(lines)) if _FENCE.match(lines[i]))
    end = next(i for i in range(fence + 1, len(lines)) if _FENCE.match(lines[i]))
    block = lines[fence + 1:end]
    first = next(i for i, line in enumerate(block) if line.startswith("TransferSegLib/"))
    entries = []
    for line in block[first + 1:]:
        if not line.startswith(" "):
            break
        if re.match(r"^ {2}\S", line):
            entries.append([line])
        elif entries:
            entries[-1].append(line)
    packages, modules = set(), {"": set()}
    for entry in entries:
        left = re.split(r"\s{2,}", entry[0].strip(), maxsplit=1)[0].split()
        named_packages = [name[:-1] for name in left if name.endswith("/")]
        packages.update(named_packages)
        modules[""].update(name for name in left if name.endswith(".py"))
        if len(named_packages) == 1 and len(left) == 1:
            text = " ".join([entry[0].strip()[len(left[0]):], *entry[1:]])
            modules.setdefault(named_packages[0], set()).update(re.findall(r"\b\w+\.py\b", text))
    return packages, modules


def map_problems(readme: str, library: Path) -> list:
    """What the map gets wrong about ``library``: packages and modules it leaves out or invents."""
    packages, modules = code_map(readme)
    real_packages = {p.name for p in library.iterdir() if (p / "__init__.py").is_file()}
    problems = [f"package {name}/ is not in the map" for name in sorted(real_packages - packages)]
    problems += [f"the map names {name}/, which does not exist" for name in sorted(packages - real_packages)]
    for package in sorted({""} | real_packages):
        folder = library / package
        real = {p.name for p in folder.glob("*.py")}
        required = {name for name in real if not name.startswith("__")}
        where = f"{package}/" if package else "the top level"
        named = modules.get(package, set())
        problems += [f"{where}: {name} is not in the map" for name in sorted(required - named)]
        problems += [f"{where}: the map names {name}, which does not exist" for name in sorted(named - real)]
    return problems


def test_map_problems_are_found(tmp_path):
    library = tmp_path / "TransferSegLib"
    (library / "nets").mkdir(parents=True)
    (library / "unlisted").mkdir()
    for name in ("__init__.py", "io.py", "forgotten.py", "nets/__init__.py", "nets/unet.py",
                 "nets/vfn.py", "unlisted/__init__.py"):
        (library / name).write_text("", encoding="utf-8")
    readme = ("# X\n\n" + MAP_HEADING + "\n\n```\nTransferSeg/     the module\nTransferSegLib/  the library:\n"
              "  io.py gone.py   reading, writing\n"
              "  nets/           unet.py and\n"
              "                  old.py\n"
              "  ghost/          nothing\n"
              "Testing/         tests\n```\n")
    assert map_problems(readme, library) == [
        "package unlisted/ is not in the map",
        "the map names ghost/, which does not exist",
        "the top level: forgotten.py is not in the map",
        "the top level: the map names gone.py, which does not exist",
        "nets/: vfn.py is not in the map",
        "nets/: the map names old.py, which does not exist",
    ]


def test_the_readme_map_names_every_package_and_module():
    assert map_problems(README.read_text(encoding="utf-8"), LIBRARY) == []


# ---------------------------------------------------------------- the README itself


def test_the_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail to docs/"


def test_the_readme_keeps_the_two_set_up_commands():
    readme = README.read_text(encoding="utf-8")
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for target in ("demo", "test"):
        assert re.search(rf"^make {target}\s", readme, re.M), f"`make {target}` is gone from README.md"
        assert re.search(rf"^{target}:", makefile, re.M), f"the Makefile has no `{target}` target"
