"""Issue 11, "nothing lost, nothing escapes": what a fault-and-bad-input review of scoring,
the audit and model loading found, each turned into a test (killed and failing runs,
replaced and odd files, hostile manifests and model.json files, bad configs)."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from stfpm.cli import app
from stfpm.errors import UserError


def test_user_errors_share_one_base_and_print_one_line_with_exit_2(tmp_path):
    from stfpm.artifact import ModelDirError, read_card
    from stfpm.data.datasets import DatasetError

    assert issubclass(ModelDirError, UserError) and issubclass(DatasetError, UserError)
    with pytest.raises(UserError, match="no model.json"):
        read_card(tmp_path)
    result = CliRunner().invoke(app, ["predict", str(tmp_path), str(tmp_path), "--out", str(tmp_path / "o")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "model.json" in lines[0]
