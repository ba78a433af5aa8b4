"""An exception's text for one-line messages."""

from lily_diffusion.messages import first_line, one_line


def test_first_line_of_a_long_message_or_the_type_name():
    assert first_line(ValueError("\n  bad header\nline two\n")) == "bad header"
    assert first_line(EOFError()) == "EOFError"


def test_one_line_collapses_whitespace_and_cuts():
    assert one_line(ValueError("a\n  b\tc")) == "a b c"
    assert one_line(ValueError("x" * 50), limit=10) == "xxxxxxx..."
