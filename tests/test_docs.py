"""The documentation agrees with the repository: the result tables of
docs/quality.md show the numbers of the stored results, every relative link
resolves, and the README stays short."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
QUALITY_PAGE = ROOT / "docs" / "quality.md"
README_MAX_LINES = 200
# Stored results whose tables docs/quality.md must show.
RESULTS = ("benchmarks/quality/small-cpu/results.json", "benchmarks/quality/mid-cpu/results.json")
MARKER = re.compile(r"<!--\s*results:\s*(\S+)\s*-->")
# Inline links and images: [text](target) / ![alt](target "title").
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# Reference definitions: [label]: target
REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
PERCENT_COLUMNS = {"top 5%": "top5", "top 10%": "top10", "top 15%": "top15"}


def markdown_files() -> list[Path]:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def parse_table(lines: list[str]) -> tuple[list[str], list[list[str]]]:
    """The header and body rows of the Markdown table that starts at ``lines[0]``."""

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    if len(lines) < 2 or not lines[0].lstrip().startswith("|"):
        raise ValueError(f"no table at {lines[:1]!r}")
    header = cells(lines[0])
    if not all(re.fullmatch(r":?-{3,}:?", c) for c in cells(lines[1])):
        raise ValueError(f"no header separator under {lines[0]!r}")
    rows = []
    for line in lines[2:]:
        if not line.lstrip().startswith("|"):
            break
        rows.append(cells(line))
    return header, rows


def marked_tables(text: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """``(results path, header, rows)`` for each table preceded by a results marker."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        m = MARKER.search(line)
        if not m:
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        header, rows = parse_table(lines[j:])
        out.append((m.group(1), header, rows))
    return out


def method_of(cell: str) -> str:
    """``random (seed 0)`` -> ``random``; backticks dropped."""
    return cell.replace("`", "").split()[0]


def check_table(path: str, header: list[str], rows: list[list[str]]) -> list[str]:
    """Differences between a docs table and the stored results it names."""
    data = json.loads((ROOT / path).read_text(encoding="utf-8"))
    detection = {d["method"]: d for d in data["detection"]}
    cols = [h.lower() for h in header]
    problems = []
    if "auroc" not in cols:
        return [f"{path}: the table has no AUROC column ({header})"]
    a = cols.index("auroc")
    shown = []
    for row in rows:
        if len(row) != len(header):
            problems.append(f"{path}: row {row} has {len(row)} cells, the header {len(header)}")
            continue
        method = method_of(row[0])
        shown.append(method)
        if method not in detection:
            problems.append(f"{path}: method {method!r} is not in the results")
            continue
        want = detection[method]["auroc"]
        if float(row[a]) != round(want, 3) or not re.fullmatch(r"\d\.\d{3}", row[a]):
            problems.append(
                f"{path}: {method} AUROC shown {row[a]}, results say {want:.3f} ({want})"
            )
        for title, key in PERCENT_COLUMNS.items():
            k = next((i for i, c in enumerate(cols) if c.endswith(title)), None)
            if k is None:
                continue
            pct = f"{100 * detection[method][key]:.1f}%"
            if row[k] != pct:
                problems.append(f"{path}: {method} {title} shown {row[k]}, results say {pct}")
    missing = sorted(set(detection) - set(shown))
    if missing:
        problems.append(f"{path}: methods in the results but not in the table: {missing}")
    if len(shown) != len(set(shown)):
        problems.append(f"{path}: a method is shown twice: {shown}")
    return problems


def relative_links(text: str) -> list[str]:
    text = FENCE.sub("", text)
    text = CODE_SPAN.sub("", text)
    targets = LINK.findall(text) + REF_DEF.findall(text)
    return [
        t
        for t in targets
        if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", t) and not t.startswith(("#", "//"))
    ]


def broken_links(md: Path) -> list[str]:
    """The relative link targets of ``md`` that name no existing file or folder."""
    broken = []
    for target in relative_links(md.read_text(encoding="utf-8")):
        path = unquote(target.split("#", 1)[0].split("?", 1)[0])
        if not (md.parent / path).exists():
            broken.append(target)
    return broken


# ------------------------------------------------------------------ quality tables


def test_quality_tables_show_the_stored_aurocs():
    tables = marked_tables(QUALITY_PAGE.read_text(encoding="utf-8"))
    named = [path for path, _, _ in tables]
    assert sorted(named) == sorted(RESULTS), f"docs/quality.md marks tables for {named}"
    problems = [p for path, header, rows in tables for p in check_table(path, header, rows)]
    assert not problems, "\n".join(problems)


def test_a_wrong_auroc_is_caught():
    text = QUALITY_PAGE.read_text(encoding="utf-8")
    path, header, rows = marked_tables(text)[0]
    a = [h.lower() for h in header].index("auroc")
    bad = [list(r) for r in rows]
    bad[0][a] = f"{float(bad[0][a]) + 0.001:.3f}"
    assert any("AUROC" in p for p in check_table(path, header, bad))
    assert any("not in the table" in p for p in check_table(path, header, rows[1:]))


def test_table_parser_reads_a_small_table():
    header, rows = parse_table(
        ["| method | AUROC |", "|---|---:|", "| `gsnr` | 0.375 |", "", "| x |"]
    )
    assert header == ["method", "AUROC"]
    assert rows == [["`gsnr`", "0.375"]]
    assert method_of("random (seed 0)") == "random"
    with pytest.raises(ValueError):
        parse_table(["| method | AUROC |", "| gsnr | 0.375 |"])


# ------------------------------------------------------------------ links and length


@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(md):
    broken = broken_links(md)
    assert not broken, f"{md.relative_to(ROOT)} links to missing paths: {broken}"


def test_link_check_finds_a_broken_link(tmp_path):
    text = (
        "[ok](ok.md) ![img](sub/missing.png) [web](https://example.org/x) [top](#top)\n"
        "`[code](nowhere.md)`\n```\n[fenced](nowhere.md)\n```\n[ref]: ./ok.md#part\n"
    )
    md = tmp_path / "page.md"
    md.write_text(text, encoding="utf-8")
    (tmp_path / "ok.md").write_text("x", encoding="utf-8")
    assert relative_links(text) == ["ok.md", "sub/missing.png", "./ok.md#part"]
    assert broken_links(md) == ["sub/missing.png"]


def test_docs_pages_exist():
    for name in ("library.md", "method.md", "quality.md", "benchmarks.md"):
        assert (ROOT / "docs" / name).is_file(), name


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; keep it at most {README_MAX_LINES}"
