"""The README and docs/ stay true to the code: every relative link points at a file that exists, and
each page's flag table lists exactly the flags its script's --help prints."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# The page that documents each script's flags, and the heading of its table.
FLAG_PAGES = {"train.py": ("docs/training.md", "## Flags"), "prep/shard.py": ("docs/data.md", "## `prep/shard.py`"),
              "generate.py": ("docs/generate.md", "## Flags")}
LINK = re.compile(r"\]\(([^)\s]+)\)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def script_parser(script: str):
    """The argparse parser of a script, from its build_parser()."""
    spec = importlib.util.spec_from_file_location(f"doc_{Path(script).stem}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def long_flags(parser) -> set[str]:
    """Each option's long names, without --help and the --no- twin of a --flag/--no-flag pair."""
    flags = set()
    for action in parser._actions:
        names = [s for s in action.option_strings if s.startswith("--") and s != "--help"]
        flags.update(s for s in names if not (s.startswith("--no-") and f"--{s[5:]}" in names))
    return flags


def table_flags(page: Path, heading: str) -> set[str]:
    """The flags named in the first column of the first table after `heading`."""
    lines = page.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            rows.append(line)
        elif rows or line.startswith("#"):
            break
    flags = set()
    for row in rows[2:]:  # past the header and its rule
        first = re.split(r"(?<!\\)\|", row)[1]  # a cell may hold an escaped \|
        flags.update(f for f in FLAG.findall(first) if not (f.startswith("--no-") and f"--{f[5:]}" in first))
    return flags


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_a_file(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # a web address or a heading on the same page
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"


def test_the_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


@pytest.mark.parametrize("script", sorted(FLAG_PAGES))
def test_each_page_lists_the_flags_help_prints(script):
    page, heading = FLAG_PAGES[script]
    documented, parsed = table_flags(ROOT / page, heading), long_flags(script_parser(script))
    assert documented == parsed, (f"{page} and {script} --help differ: missing from the page "
                                  f"{sorted(parsed - documented)}, not flags of {script} {sorted(documented - parsed)}")


def test_the_resume_guarantee_names_the_settings_resume_checks():
    from run.checkpoint import SETTINGS

    rows = [line for line in (ROOT / "docs/training.md").read_text().splitlines()
            if line.startswith("| `--resume` with other")]
    assert len(rows) == 1, "docs/training.md's guarantees table has no (or more than one) `--resume` with other row"
    cell = rows[0].split("|")[1]
    checked = set(SETTINGS.values())
    flags = {name for name in checked if name.startswith("--")}
    assert set(FLAG.findall(cell)) - {"--resume"} == flags
    for name in checked - flags:  # the settings that are no flag: world size
        assert name in cell, f"docs/training.md's --resume row does not name {name!r}"
