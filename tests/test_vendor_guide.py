"""The vendor guide lists the demo plugin verbatim, so the guide's example is code the tests run."""
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "vendor-backend.md"
DEMO = ROOT / "tests" / "vendor_plugin" / "mojo_vendor_demo" / "__init__.py"
MARKER = "<!-- demo plugin: tests/vendor_plugin/mojo_vendor_demo/__init__.py -->\n"


def _listing(text: str) -> str:
    assert text.count(MARKER) == 1, "the guide must mark the demo listing exactly once"
    block = text.split(MARKER, 1)[1]
    fence = "```python\n"
    assert block.startswith(fence), "the marker must be followed by a ```python block"
    body = block[len(fence):]
    end = body.find("\n```\n")
    assert end >= 0, "the demo listing is not closed"
    return body[:end + 1]


def test_guide_lists_the_demo_plugin_verbatim():
    assert _listing(GUIDE.read_text()) == DEMO.read_text()
