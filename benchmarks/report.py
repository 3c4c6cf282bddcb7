"""Where a benchmark script's numbers go: the markdown table to stdout, and to files when asked."""

import json
import pathlib


def publish(results, table: str, out: str | None = None, md: str | None = None, indent: int = 1) -> None:
    """Print `table`; write `results` as JSON to `out` and `table` to `md` when given (parents created)."""
    print(table)
    for path, text in ((out, json.dumps(results, indent=indent) + "\n"), (md, table)):
        if path:
            pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
            pathlib.Path(path).write_text(text)
