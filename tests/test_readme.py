"""README's Python API tour and docs/design.md's PEFT tour run as written; README's methods
table lists every method; every relative link of README.md and docs/ points at a file."""

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DESIGN = ROOT / "docs" / "design.md"


def _block(path: Path, marker: str) -> str:
    block = re.search(rf"<!-- {marker} -->\n```python\n(.*?)```", path.read_text(), re.S)
    assert block, f"{path.name} lost its <!-- {marker} --> python block"
    return block.group(1)


def _run(path: Path, marker: str) -> dict:
    scope: dict = {}
    exec(compile(_block(path, marker), str(path), "exec"), scope)  # noqa: S102
    return scope


def test_api_tour_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope = _run(README, "api-tour")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = scope["plain"].eval()(x)
        torch.testing.assert_close(scope["again"].eval()(x), ref, atol=1e-5, rtol=0)
    assert (tmp_path / "runs/tour/adapter-copy/adapter_config.json").is_file()


def test_peft_tour_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope = _run(DESIGN, "peft-tour")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scope["back"].eval()(x), scope["pm"].eval()(x), atol=0, rtol=0)
    assert any(hasattr(m, "lora_A") for m in scope["lora"].modules())


def test_methods_table_lists_every_registry_method():
    """README's methods table and the CLI's --method choices come from the one list."""
    from trimtune.cli import build_parser
    from trimtune.names import METHODS

    table = README.read_text().split("## Methods", 1)[1].split("\n\n", 2)[1]
    assert all(f"`{m}`" in table for m in METHODS), [m for m in METHODS if f"`{m}`" not in table]
    finetune = build_parser()._subparsers._group_actions[0].choices["finetune"]
    method = next(a for a in finetune._actions if a.dest == "method")
    assert tuple(method.choices) == METHODS


def _anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_resolves():
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), f"{page.name}: broken link {target}"
            if anchor and file.suffix == ".md":
                anchors = {_anchor(h) for h in re.findall(r"^#+ (.*)$", file.read_text(), re.M)}
                assert anchor in anchors, f"{page.name}: no heading for #{anchor} in {file.name}"
