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


def test_methods_table_lists_every_registry_method():
    """README's methods table and the CLI's --method choices come from the one list."""
    from trimtune.cli import build_parser
    from trimtune.names import METHODS

    table = README.read_text().split("## Methods", 1)[1].split("\n\n", 2)[1]
    assert all(f"`{m}`" in table for m in METHODS), [m for m in METHODS if f"`{m}`" not in table]
    finetune = build_parser()._subparsers._group_actions[0].choices["finetune"]
    method = next(a for a in finetune._actions if a.dest == "method")
    assert tuple(method.choices) == METHODS
