"""The README's Python snippets run as written (one namespace, in order)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_snippets_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 2, "README lost its quickstart snippets"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["losses"].shape == (4,)
    assert namespace["grads"].wte.embedding.shape == (65, 64)
    assert int(namespace["state"].step) == 3
    assert namespace["metrics"]["loss"] < namespace["value"] + 1e-3
