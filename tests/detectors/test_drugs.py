"""detectors/drugs.py: placeholder ids (data quality) — the fast path agrees with the pattern."""

from hypothesis import given, settings, strategies as st

from detectors.drugs import _PLACEHOLDER, is_placeholder


def _by_pattern(value):
    return value is None or not value.strip() or bool(_PLACEHOLDER.match(value))


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet="0０9xX?-未知不详nulNAaUKk /t\t", max_size=16))
def test_fast_path_agrees_with_the_pattern(value):
    assert is_placeholder(value) == _by_pattern(value)


def test_long_placeholders_and_real_ids():
    assert is_placeholder("０００００００００００")      # full-width zeros, any length
    assert is_placeholder("XXXXxxxxXXXX")
    assert is_placeholder(" 999999999999 ")
    assert not is_placeholder("3101197406016500")      # a card id
    assert not is_placeholder("D310104001007")         # a physician id
    assert not is_placeholder("0000000001")            # not one repeated character
