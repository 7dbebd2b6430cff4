"""The README and the guides in docs/: every relative link reaches a file, and every
``#anchor`` a heading of it (GitHub's anchors); the README stays a front page."""

import os
import re

from conftest import REPO_ROOT

README_MAX_LINES = 250


def _pages() -> list[str]:
    docs = os.path.join(REPO_ROOT, "docs")
    guides = sorted(os.path.join(docs, name) for name in os.listdir(docs) if name.endswith(".md"))
    return [os.path.join(REPO_ROOT, "README.md"), *guides]


def _anchors(path: str) -> set[str]:
    """GitHub's anchors of the headings of a markdown file (code blocks left out)."""
    anchors, fence = set(), False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("```"):
                fence = not fence
            elif not fence and re.match(r"#{1,6} ", line):
                title = line.lstrip("#").strip().lower()
                anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def _links(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"```.*?```|<!--.*?-->", "", f.read(), flags=re.DOTALL)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_every_relative_link_and_anchor_exists():
    broken = []
    for page in _pages():
        for link in _links(page):
            if re.match(r"[a-z]+:", link):  # https:, mailto:
                continue
            target, _, anchor = link.partition("#")
            path = os.path.normpath(os.path.join(os.path.dirname(page), target)) if target else page
            if not os.path.exists(path):
                broken.append(f"{os.path.relpath(page, REPO_ROOT)}: {link} (no such file)")
            elif anchor and path.endswith(".md") and anchor not in _anchors(path):
                broken.append(f"{os.path.relpath(page, REPO_ROOT)}: {link} (no such heading)")
    assert not broken, broken


def test_the_readme_is_a_front_page_linking_every_guide():
    with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert readme.count("\n") <= README_MAX_LINES
    linked = {os.path.basename(link.partition("#")[0]) for link in _links(os.path.join(REPO_ROOT, "README.md"))}
    guides = {os.path.basename(page) for page in _pages()[1:]}
    assert guides <= linked, guides - linked
