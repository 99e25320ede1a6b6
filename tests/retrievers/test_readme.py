"""The example in retrievers/README.md runs as written."""
from __future__ import annotations

import re

from retrievers import starter_kb_dir


def test_readme_example_runs():
    readme = (starter_kb_dir().parent / "README.md").read_text()
    [example] = [block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "open_db" in block]
    exec(compile(example, "retrievers/README.md", "exec"), {})
