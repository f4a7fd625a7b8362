"""Running the ``simexplain`` command in-process, as the command-line tests do."""

from __future__ import annotations

from simexplain.cli import main


def run(capsys, *argv):
    """``main(argv)``'s exit code, stdout and stderr (``argv`` items made strings)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    """The command failed with one ``simexplain: error:`` line holding ``fragments``."""
    assert code != 0
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("simexplain: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
