"""cxr_core.csvsafe: text cells that spreadsheets would run as formulas, and names that are not valid Unicode."""

from __future__ import annotations

import pytest

from cxr_core import csvsafe


@pytest.mark.parametrize("text", ["=1+1", " =1+1", "\u3000=1+1", "\uff1dSUM(A1)", "\uff0bcmd", "@x", "'=x"])
def test_formula_cells_are_quoted_even_behind_spaces_or_in_full_width(text):
    assert csvsafe.neutralise(text) == "'" + text
    assert csvsafe.restore(csvsafe.neutralise(text)) == text


@pytest.mark.parametrize("text", ["film.png", "a=b.png", " film", "-"[:0] + "x-ray"])
def test_plain_names_are_left_alone(text):
    assert csvsafe.neutralise(text) == text


def test_lone_surrogates_of_any_kind_become_the_replacement_character():
    assert csvsafe.safe_text("\udcff.png") == "\ufffd.png"  # an undecodable byte from a file name
    assert csvsafe.cell("\ud800x.png") == "\ufffd\ufffd\ufffdx.png"  # any other lone surrogate, no crash
