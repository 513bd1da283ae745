"""``docs/deploy.md`` holds exactly the capability table generated from the class attributes."""

from __future__ import annotations

from pathlib import Path

import pytest

from gald import deploy
from gald.deploy.__main__ import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "deploy.md"


def _block(text: str) -> str:
    assert text.count(deploy.TABLE_START) == 1, "start marker missing or repeated"
    assert text.count(deploy.TABLE_END) == 1, "end marker missing or repeated"
    return text.split(deploy.TABLE_START)[1].split(deploy.TABLE_END)[0]


def test_doc_table_is_the_generated_one() -> None:
    block = _block(DOC.read_text(encoding="utf-8"))
    assert block == f"\n{deploy.capability_table()}\n", (
        "docs/deploy.md is stale: run python -m gald.deploy --write docs/deploy.md"
    )


def test_doc_has_the_recipes() -> None:
    text = DOC.read_text(encoding="utf-8")
    for heading in ("## ONNX recipe", "## DDP + SyncBatchNorm recipe", "## AMP notes"):
        assert heading in text


def test_write_and_check_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "deploy.md"
    doc.write_text(f"intro\n{deploy.TABLE_START}\nold table\n{deploy.TABLE_END}\noutro\n")
    assert main(["--check", str(doc)]) == 1
    assert "stale" in capsys.readouterr().err
    assert main(["--write", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("intro\n")
    assert text.endswith("\noutro\n")
    assert _block(text) == f"\n{deploy.capability_table()}\n"
    assert main(["--check", str(doc)]) == 0
    assert not deploy.update_markdown(doc)  # idempotent
    doc.write_text("no markers\n")
    with pytest.raises(ValueError, match="must contain the markers"):
        deploy.update_markdown(doc)
