from dreidel.cli._table import counted, format_table


def test_numbers_right_aligned_text_left_aligned():
    text = format_table(["name", "value"], [("a", 1.5), ("longer", 1.5e7)])
    lines = text.splitlines()
    assert lines[0].startswith("name")
    assert lines[2].endswith("1.500") and lines[3].endswith("1.50e+07")
    assert len({len(line) for line in lines[1:]}) == 1


def test_counted_is_plural_unless_the_count_is_one():
    """The demo printed '(native core: avx2, 1 threads)'."""
    assert [counted(n, "thread") for n in (0, 1, 2)] == ["0 threads", "1 thread", "2 threads"]
