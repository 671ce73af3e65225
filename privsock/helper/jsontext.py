"""A str as JSON text, exactly as json.dumps writes it (ensure_ascii), without json.

The helper writes its audit lines and quotes odd names in its error messages
with this; importing json for that would cost it a third of a MiB of memory.
"""

from __future__ import annotations

# The two-letter escapes, \u00XX for the other control characters and DEL,
# \uXXXX (a surrogate pair above U+FFFF) for everything outside ASCII.
_ESCAPES = {c: f"\\u{c:04x}" for c in (*range(0x20), 0x7F)} | {
    0x22: '\\"', 0x5C: "\\\\", 0x08: "\\b", 0x09: "\\t", 0x0A: "\\n", 0x0C: "\\f",
    0x0D: "\\r",
}  # fmt: skip


def _non_ascii(c: str) -> str:
    n = ord(c)
    if n < 0x80:
        return c
    if n < 0x10000:
        return f"\\u{n:04x}"
    n -= 0x10000
    return f"\\u{0xD800 | n >> 10:04x}\\u{0xDC00 | n & 0x3FF:04x}"


def string(text: str) -> str:
    """json.dumps(text), quotes included."""
    text = text.translate(_ESCAPES)
    if not text.isascii():
        text = "".join(map(_non_ascii, text))
    return f'"{text}"'
