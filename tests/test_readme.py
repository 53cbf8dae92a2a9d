import re
import runpy
from pathlib import Path


def test_readme_notebook_example_runs(tmp_path, capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "README has no python example"
    for i, code in enumerate(blocks):
        script = tmp_path / f"block{i}.py"
        script.write_text(code)
        runpy.run_path(str(script), run_name="__main__")
    assert capsys.readouterr().out.strip()
