"""The bad-input battery's harness: run a command-line entry point in-process and check that bad
input ends the way a user needs it to end.

Every case asserts: a non-zero exit, exactly one line on stderr that names what was wrong (the
file, key, row or path given in ``names``), no traceback, done in seconds, and a tree that holds
exactly what it held before (or only what the case allows to appear).
"""

from __future__ import annotations

import time
from pathlib import Path

from finetune.cli import main


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (relative path -> size, mtime in ns): what a case may not touch."""
    root = Path(root)
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def refuses(capsys, argv: list[str], names: list[str] | str, tree: Path | None = None,
            may_appear: tuple[str, ...] = (), seconds: float = 30.0) -> str:
    """Run ``finetune ARGV`` and assert a clean refusal; returns the one stderr line.

    ``names``: texts the message must contain (case-insensitive), e.g. the file name and row.
    ``tree``: a folder whose files must be unchanged afterwards (new files only under ``may_appear``
    prefixes, e.g. a log the run writes before it refuses).
    """
    names = [names] if isinstance(names, str) else names
    before = snapshot(tree) if tree is not None else None
    capsys.readouterr()
    start = time.perf_counter()
    rc = main(argv)
    elapsed = time.perf_counter() - start
    captured = capsys.readouterr()
    err_lines = [line for line in captured.err.splitlines() if line.strip()]
    assert rc != 0, f"exit 0 for bad input {argv}; stdout: {captured.out[-500:]}"
    assert "Traceback" not in captured.err, captured.err[-2000:]
    errors = [line for line in err_lines if line.startswith("error:")]
    assert len(errors) == 1, f"expected one 'error:' line, got:\n{captured.err[-2000:]}"
    message = errors[0]
    for name in names:
        assert name.lower() in message.lower(), f"{name!r} not named in: {message}"
    assert elapsed < seconds, f"took {elapsed:.1f}s"
    if tree is not None:
        after = snapshot(tree)
        changed = [p for p in set(before) | set(after)
                   if before.get(p) != after.get(p) and not (p not in before and p.startswith(may_appear))]
        assert not changed, f"files changed: {sorted(changed)}"
    return message
