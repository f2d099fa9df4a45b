"""The README's library snippet runs as written, and its results tables are what the logs say."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_snippet_runs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the README lost its library example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_readme_tables_are_rebuilt_from_the_logged_runs():
    """tools/results.sh prints the tables from docs/results alone; each must stand in the README as is."""
    out = subprocess.run(["bash", str(ROOT / "tools" / "results.sh"), "--tables-only"], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout
    readme = (ROOT / "README.md").read_text()
    tables = [block for block in out.split("\n\n") if block.lstrip("#").strip()]
    tables = ["\n".join(line for line in block.splitlines() if line.startswith("|")) for block in tables]
    tables = [t for t in tables if t]
    assert len(tables) == 5
    for table in tables:
        assert table in readme, table.splitlines()[0]
