"""Helpers for the training-engine tests.

- Makes the modules beside these tests (tiny_lm, distributed_reference) importable.
- A test module may define `start_background()`: it is called once the session has collected one of
  its tests, so slow subprocess runs (8 forced devices, two processes) overlap with the single-process
  tests instead of running after them. The module's fixtures then wait for the result.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))


def pytest_collection_modifyitems(config, items):
    del config
    for module in {item.module for item in items if hasattr(item, "module")}:
        start = getattr(module, "start_background", None)
        if start is not None:
            start()
