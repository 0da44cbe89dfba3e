"""README's Python API tour runs as written."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_api_tour_runs_as_written(tmp_path, monkeypatch):
    text = README.read_text()
    block = re.search(r"<!-- api-tour -->\n```python\n(.*?)```", text, re.S)
    assert block, "README lost its <!-- api-tour --> python block"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block.group(1), str(README), "exec"), scope)  # noqa: S102
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = scope["plain"].eval()(x)
        torch.testing.assert_close(scope["again"].eval()(x), ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(scope["back"].eval()(x), scope["pm"].eval()(x), atol=0, rtol=0)
    assert (tmp_path / "runs/tour/adapter-copy/adapter_config.json").is_file()
