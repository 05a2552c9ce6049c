"""Every relative link in the repository's Markdown reaches its file and heading (tools/doc_links.py)."""
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
from doc_links import broken_links  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_every_link_reaches_its_file_and_heading():
    assert broken_links(ROOT) == []


def test_a_missing_file_or_heading_is_found(tmp_path):
    (tmp_path / "a.md").write_text("# The `ep` backend, (R = 2)\n\n## Twice\n\n## Twice\n", encoding="utf-8")
    (tmp_path / "b.md").write_text(
        "[ok](a.md#the-ep-backend-r--2) [ok](a.md#twice-1) [ok](#local) [web](https://example.com/x#y)\n"
        "[gone](c.md) [no anchor](a.md#twice-2)\n\n```\n[in code](nowhere.md)\n```\n\n## Local\n",
        encoding="utf-8")
    broken = broken_links(tmp_path)
    assert [line.split(": ", 1)[1] for line in broken] == ["c.md (no such file)", "a.md#twice-2 (no heading with this anchor)"]
