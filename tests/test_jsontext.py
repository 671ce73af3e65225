"""privsock.helper.jsontext: a str as JSON text, exactly as json.dumps writes it."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privsock.helper import jsontext

# Every category, lone surrogates included (a path decoded with surrogateescape).
_any_char = st.characters(blacklist_categories=())


@given(st.text(_any_char) | st.text(st.characters(max_codepoint=0x80)))
@settings(max_examples=1000)
def test_string_is_json_dumps(text: str) -> None:
    assert jsontext.string(text) == json.dumps(text)


@pytest.mark.parametrize("code", [*range(0x81), 0x2028, 0xD800, 0xDCFF, 0xFFFF, 0x10000, 0x10FFFF])
def test_string_escapes_each_special_character_as_json_does(code: int) -> None:
    text = f"a{chr(code)}b"
    assert jsontext.string(text) == json.dumps(text)
    assert jsontext.string(text).isascii()
