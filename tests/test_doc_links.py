"""Every relative link in the repository's Markdown reaches its file and heading (tools/doc_links.py)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_tool():
    spec = importlib.util.spec_from_file_location("doc_links", ROOT / "tools" / "doc_links.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_link_reaches_its_file_and_heading():
    assert load_tool().broken_links(ROOT) == []


def test_a_missing_file_or_heading_is_found(tmp_path):
    doc_links = load_tool()
    (tmp_path / "a.md").write_text("# The `ep` backend, (R = 2)\n\n## Twice\n\n## Twice\n", encoding="utf-8")
    (tmp_path / "b.md").write_text(
        "[ok](a.md#the-ep-backend-r--2) [ok](a.md#twice-1) [ok](#local) [web](https://example.com/x#y)\n"
        "[gone](c.md) [no anchor](a.md#twice-2)\n\n```\n[in code](nowhere.md)\n```\n\n## Local\n",
        encoding="utf-8")
    broken = doc_links.broken_links(tmp_path)
    assert [line.split(": ", 1)[1] for line in broken] == ["c.md (no such file)", "a.md#twice-2 (no heading with this anchor)"]
