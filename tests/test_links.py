"""Links that can't rot: every relative link or image in the repository's Markdown points at a file
that exists, and every #anchor at a heading of its page, named as GitHub names headings.
External http(s) links are not checked: the tests run without a network."""

import os
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parent.parent
SKIPPED_DIRS = {".venv", "data", "runs", "node_modules", "__pycache__"}

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
# a run of backticks, then the same run, within one paragraph
CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)((?:(?!\n[ \t]*\n).)+?)(?<!`)\1(?!`)", re.DOTALL)
ATX_HEADING = re.compile(r"^ {0,3}#{1,6}(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
SETEXT_UNDERLINE = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
LINK_LABEL = r"(?:[^\[\]]|\[[^\[\]]*\])*"  # one level of nested brackets, as in [![alt](img)](url)
DESTINATION = r"\(\s*(<[^>\n]*>|[^()\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)"
INLINE_LINK = re.compile(r"(?<!!)\[" + LINK_LABEL + r"\]" + DESTINATION)
IMAGE = re.compile(r"!\[" + LINK_LABEL + r"\]" + DESTINATION)
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:[ \t]*(<[^>\n]*>|\S+)", re.MULTILINE)
HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
HTML_ANCHOR = re.compile(r"<a\b[^>]*?\b(?:name|id)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def markdown_files(root):
    """Every .md file under root, outside hidden, virtual-environment and data folders."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and not d.startswith("."))
        yield from (Path(folder) / f for f in sorted(files) if f.endswith(".md"))


def outside_fences(text):
    """The text's lines, with those of fenced code blocks blanked out."""
    lines, fence = [], None
    for line in text.split("\n"):
        marker = FENCE.match(line)
        if fence is None and marker:
            fence = marker.group(1)
            line = ""
        elif fence is not None:
            if marker and marker.group(1)[0] == fence[0] and len(marker.group(1)) >= len(fence):
                fence = None
            line = ""
        lines.append(line)
    return lines


def without_code(text):
    """The text with fenced code blocks and code spans blanked out, line numbers kept."""
    return CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), "\n".join(outside_fences(text)))


def heading_texts(text):
    """The text of each heading, ATX (`## ...`) or setext (underlined), outside fenced code."""
    lines = outside_fences(text)
    headings = []
    for i, line in enumerate(lines):
        atx = ATX_HEADING.match(line)
        above = lines[i - 1] if i else ""
        if atx:
            headings.append(atx.group(1) or "")
        elif SETEXT_UNDERLINE.match(line) and above.strip() and not ATX_HEADING.match(above) \
                and not re.match(r"^(?: {4}|\t| {0,3}(?:[-+*>|]|\d+[.)])(?:\s|$))", above):
            headings.append(above.strip())
    return headings


def heading_plain_text(heading):
    """What GitHub renders of a heading: link and image text, code as written, no emphasis or tags."""
    spans = []

    def keep_code(match):
        spans.append(match.group(2).strip())
        return f"\0{len(spans) - 1}\0"

    plain = CODE_SPAN.sub(keep_code, heading)
    plain = re.sub(r"!?\[(" + LINK_LABEL + r")\]\([^)]*\)", r"\1", plain)
    plain = re.sub(r"<[^>]+>", "", plain)
    plain = re.sub(r"(?<![\w\0])_+|_+(?![\w\0])", "", plain)  # _emphasis_, not snake_case
    return re.sub(r"\0(\d+)\0", lambda m: spans[int(m.group(1))], plain)


def slug(heading):
    """GitHub's anchor for a heading: lowercase, punctuation but - and _ dropped, spaces to -."""
    text = heading_plain_text(heading).lower()
    return "".join("-" if ch == " " else ch for ch in text if ch.isalnum() or ch in "-_ ")


def anchors(text):
    """Every anchor of a page: its headings' slugs (a repeat gets -1, -2, ...) and explicit <a name>."""
    found, seen = set(), {}
    for heading in heading_texts(text):
        base = candidate = slug(heading)
        while candidate in found:
            seen[base] = seen.get(base, 0) + 1
            candidate = f"{base}-{seen[base]}"
        found.add(candidate)
    found.update(HTML_ANCHOR.findall(without_code(text)))
    return found


def link_targets(text):
    """(line number, target) of every inline link, image, reference definition and HTML href/src."""
    prose = without_code(text)
    matches = [m for pattern in (INLINE_LINK, IMAGE, REFERENCE_DEFINITION, HTML_LINK)
               for m in pattern.finditer(prose)]
    return sorted((prose.count("\n", 0, m.start()) + 1, m.group(1).strip("<>")) for m in matches)


def broken_links(root):
    """'file:line: target (why)' for each relative link under root whose file or anchor is missing."""
    root = Path(root).resolve()
    broken = []
    for page in markdown_files(root):
        text = page.read_text(encoding="utf-8")
        for line, target in link_targets(text):
            if SCHEME.match(target) or target.startswith("//"):
                continue  # external: not checked
            path_part, _, anchor = unquote(target).partition("#")
            where = f"{page.relative_to(root)}:{line}: {target}"
            if path_part:
                base = root if path_part.startswith("/") else page.parent
                linked = (base / path_part.lstrip("/")).resolve()
                if not linked.is_relative_to(root) or not linked.exists():
                    broken.append(f"{where} (no such file)")
                    continue
            else:
                linked = page
            if anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text("utf-8")):
                broken.append(f"{where} (no heading #{anchor} in {linked.relative_to(root)})")
    return broken


def test_every_relative_link_in_the_repository_resolves():
    pages = list(markdown_files(REPO))
    assert REPO / "README.md" in pages
    assert broken_links(REPO) == []


@pytest.mark.parametrize("heading, expected", [
    ("Use it", "use-it"),
    ("Results at a glance: the book, the peers", "results-at-a-glance-the-book-the-peers"),
    ("`captcha_solver.py predict`", "captcha_solverpy-predict"),
    ("The [GAN](docs/gan.md) — scoring", "the-gan--scoring"),
    ("`_model_`, the *book's* network", "_model_-the-books-network"),
    ("_emphasis_ and time_to_accuracy", "emphasis-and-time_to_accuracy"),
    ("Time to 93.2% (whole)", "time-to-932-whole"),
])
def test_slugs_follow_githubs_rules(heading, expected):
    assert slug(heading) == expected


def test_the_checker_catches_a_missing_file_and_a_missing_anchor_and_passes_good_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "figure.png").write_bytes(b"png")
    (tmp_path / "docs" / "page.md").write_text(
        "# The page\n\n## Results\n\n## Results\n\nSetext heading\n---\n\n"
        "[back](../README.md) [self](#results-1) [setext](#setext-heading) ![figure](figure.png)\n"
        "[top](../README.md#use-it) <img src=\"figure.png\"> [web](https://example.com/missing.md)\n"
        "```\n[inside code](nowhere.md)\n```\n`[in a span](nowhere.md)` ``a ` [in a span](nowhere.md)``\n")
    (tmp_path / "README.md").write_text(
        "# Project\n\n## Use it\n\n[page](docs/page.md#results) [figure](docs/figure.png)\n\n"
        "[ref]: docs/page.md#the-page\n")
    assert broken_links(tmp_path) == []

    (tmp_path / "README.md").write_text(
        "# Project\n\n## Use it\n\n[gone](docs/gone.md)\n![lost](docs/lost.png)\n"
        "[no heading](docs/page.md#results-2)\n[here](#nothing-here)\n<img src=\"docs/missing.png\">\n"
        "[![inner](docs/inner.png)](docs/outer.md)\n")
    assert broken_links(tmp_path) == [
        "README.md:5: docs/gone.md (no such file)",
        "README.md:6: docs/lost.png (no such file)",
        "README.md:7: docs/page.md#results-2 (no heading #results-2 in docs/page.md)",
        "README.md:8: #nothing-here (no heading #nothing-here in README.md)",
        "README.md:9: docs/missing.png (no such file)",
        "README.md:10: docs/inner.png (no such file)",
        "README.md:10: docs/outer.md (no such file)",
    ]
