"""The README guides, docs/ explains: both stay short enough to read and free of broken links."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT


def test_the_docs_build_strictly_offline(tmp_path):
    # --strict turns every warning into a failure: a page missing from the navigation, a link or an anchor
    # that does not resolve. The theme fetches no fonts (mkdocs.yml), so this needs no network.
    site = tmp_path / "site"
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("mkdocs")), "build", "--strict", "-d", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (site / "architecture" / "index.html").is_file()


def test_a_broken_link_fails_the_build(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    (copy / "docs" / "serving.md").write_text("[gone](no-such-page.md)\n", encoding="utf-8")
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("mkdocs")), "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=copy,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert proc.returncode != 0 and "no-such-page.md" in proc.stdout + proc.stderr


def test_the_readme_guides_in_at_most_200_lines_and_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"
    # the two set-up commands come first
    assert re.search(r"```bash\nmake run[^\n]*\nmake test[^\n]*\n```", text)
