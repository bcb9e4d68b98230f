from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from m4oe.cli import app
from m4oe.model import create_model, parameter_counts

runner = CliRunner()


@pytest.mark.slow
def test_info_json_matches_the_model():
    result = runner.invoke(app, ["info", "--preset", "tiny", "--modalities", "CT,MRI", "--num-classes", "5", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    model = create_model("tiny", modalities=["CT", "MRI"], label_sets={"data": ["background", "a", "b", "c", "d"]})
    assert info["params"] == parameter_counts(model)
    assert info["params"]["head"] == 24 * 5
    # hard routing runs one expert instead of two: fewer FLOPs
    assert 0 < info["gflops_per_slice_hard_routing"] < info["gflops_per_slice"]


@pytest.mark.slow
def test_info_table_and_bad_preset():
    result = runner.invoke(app, ["info", "--preset", "swin-unet"])
    assert result.exit_code == 0 and "GFLOPs" in result.output
    bad = runner.invoke(app, ["info", "--preset", "nope"])
    assert bad.exit_code == 2 and "unknown preset" in bad.output


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """``m4oe ARGS`` as the installed command runs it (through ``main``, which turns errors into one line)."""
    import sys

    import pytest

    from m4oe.cli import main

    monkeypatch.setattr(sys, "argv", ["m4oe", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out = capsys.readouterr()
    return exit_info.value.code, out.out + out.err


def _config(tmp_path, train=None, text=None):
    from .data_helpers import make_dataset

    data = make_dataset(tmp_path / "ds", n=3)
    path = tmp_path / "exp.yaml"
    if text is not None:
        path.write_bytes(text)
        return path
    import yaml

    model = {"preset": "tiny", "img_size": 64, "embed_dim": 16, "num_heads": [1, 2, 2, 4], "window_size": 2}
    values = {"model": model, "split": {"folds": 3}, "train": train or {}, "datasets": [{"path": str(data)}]}
    path.write_text(yaml.safe_dump(values))
    return path


def _assert_one_line(code: int, output: str, *needles: str) -> None:
    assert code != 0
    assert "Traceback" not in output and len(output.strip().splitlines()) == 1, output
    for needle in needles:
        assert needle in output, output


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    config = _config(tmp_path, train={"epochs": 1.5})
    _assert_one_line(*run_main(monkeypatch, capsys, "train", str(config), "-o", str(tmp_path / "r")), "train.epochs")
    config = _config(tmp_path, train={"batch_size": 4.5})
    _assert_one_line(*run_main(monkeypatch, capsys, "prepare", str(config), "--verify-only"), "train.batch_size")
    latin = _config(tmp_path, text="datasets:\n  - {path: caf\xe9}\n".encode("latin-1"))
    _assert_one_line(*run_main(monkeypatch, capsys, "prepare", str(latin), "--verify-only"), "UTF-8")
    config = _config(tmp_path)
    _assert_one_line(*run_main(monkeypatch, capsys, "train", str(config), "-o", str(tmp_path / "r"),
                               "--device", "tpu"), "--device 'tpu'")  # fmt: skip
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    _assert_one_line(*run_main(monkeypatch, capsys, "prepare", str(config), "-o", str(blocker / "cache")), "a_file")
    _assert_one_line(*run_main(monkeypatch, capsys, "train", str(config), "-o", str(blocker / "run"),
                               "--cache", str(tmp_path / "c")), "a_file")  # fmt: skip


@pytest.mark.slow
def test_predict_bad_routing_and_debug_traceback(tmp_path, monkeypatch, capsys):
    from m4oe import save_bundle

    model = create_model("tiny", modalities=["CT"], label_sets={"d": ["background", "a"]}, img_size=64,
                         embed_dim=16, num_heads=(1, 2, 2, 4), window_size=2)  # fmt: skip
    bundle = save_bundle(model, tmp_path / "bundle")
    args = ["predict", "-m", str(bundle), "-i", str(tmp_path), "-o", str(tmp_path / "out"), "--routing", "bogus"]
    _assert_one_line(*run_main(monkeypatch, capsys, *args), "--routing 'bogus'")
    import torch

    if not torch.cuda.is_available():
        _assert_one_line(*run_main(monkeypatch, capsys, *args[:-2], "--device", "cuda"), "no CUDA GPU")
    import sys

    import pytest

    from m4oe.cli import base, main

    monkeypatch.setattr(base, "DEBUG", False)  # main() sets it; restored after the test
    monkeypatch.setattr(sys, "argv", ["m4oe", *args, "--debug"])
    with pytest.raises(Exception, match="--routing 'bogus'"):  # --debug: the exception itself, for the traceback
        main()
