"""The documentation site builds in strict mode, so a broken reference fails the suite.

``mkdocs build --strict`` (mkdocs.yml at the repository root) renders the
guides under docs/ and the API reference that mkdocstrings generates from the
docstrings; any warning aborts it: a cross-reference to an object that does
not exist, a ``::: module`` that does not import, a link to a missing page, a
page left out of the nav. A second, small build checks that strict mode does
catch those, and the guides may quote only numbers the README or the code
states.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TIMEOUT_S = 300


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        cwd=config.parent, capture_output=True, text=True, timeout=TIMEOUT_S,
    )


def load_config() -> dict:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))


def nav_pages(nav) -> list[str]:
    out = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        out += nav_pages(value) if isinstance(value, list) else [value]
    return out


@pytest.mark.slow
def test_site_builds_strict(tmp_path):
    proc = mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stderr[-6000:]}"
    site = tmp_path / "site"
    codecs = (site / "reference" / "codecs" / "index.html").read_text(encoding="utf-8")
    assert 'id="fedzip.codecs.base.Codec"' in codecs  # the API reference was generated
    tutorial = (site / "tutorial" / "index.html").read_text(encoding="utf-8")
    # a cross-reference in a guide became a link into the reference
    assert 'href="../reference/aggregators/#fedzip.aggregators.compression_aggregator"' in tutorial


def test_every_guide_is_in_the_nav():
    config = load_config()
    assert config.get("strict") is True
    pages = nav_pages(config["nav"])
    for page in pages:
        assert (DOCS / page).is_file(), f"mkdocs.yml's nav names {page}, which is not in docs/"
    for path in DOCS.rglob("*.md"):
        assert str(path.relative_to(DOCS)) in pages, f"{path} is not in mkdocs.yml's nav"
    for guide in ("tutorial.md", "custom-codec.md", "tasks.md", "algorithms.md", "privacy.md", "scaling.md",
                  "bits.md", "architecture.md"):
        assert guide in pages


@pytest.mark.slow
def test_strict_mode_fails_on_broken_references(tmp_path):
    """The same plugins and options, one page with a broken cross-reference and a
    link to a page that is not there: the build must fail naming both."""
    config = load_config()
    handler = config["plugins"][-1]["mkdocstrings"]["handlers"]["python"]
    handler["paths"] = [str(ROOT / "src")]
    handler["options"]["extensions"] = [str(ROOT / e) for e in handler["options"]["extensions"]]
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text(
        "# Broken\n\n::: fedzip.seeding\n\nSee [this][fedzip.no_such_object] and [that](missing.md).\n",
        encoding="utf-8")
    config.update(docs_dir=str(docs), nav=[{"Broken": "index.md"}])
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    proc = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode != 0, "a broken reference did not fail the strict build"
    assert "fedzip.no_such_object" in proc.stderr
    assert "missing.md" in proc.stderr


_NUMBER = re.compile(r"(?<![\w.^])\d[\d,]*\.\d+|(?<![\w.^])\d{1,3}(?:,\d{3})+(?![\d])")


def test_guides_quote_only_numbers_the_readme_or_code_states():
    """No invented numbers: every decimal or thousands-grouped figure in a guide
    (e.g. 0.2503, 507.62, 1,663,370) is also in README.md or under src/."""
    sources = (ROOT / "README.md").read_text(encoding="utf-8")
    sources += "".join(p.read_text(encoding="utf-8") for p in (ROOT / "src").rglob("*.py"))
    unknown = {}
    for page in DOCS.glob("*.md"):
        if page.name == "architecture.md":
            continue
        found = [n for n in _NUMBER.findall(page.read_text(encoding="utf-8")) if n not in sources]
        if found:
            unknown[page.name] = sorted(set(found))
    assert not unknown, f"numbers in the guides that neither README.md nor the code states: {unknown}"
