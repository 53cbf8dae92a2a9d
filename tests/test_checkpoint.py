"""Checkpoints that cannot be read: a corrupt latest falls back to the previous one; when none restores the run stops
with one line and touches nothing; `--restart` is the explicit way to start over."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import cli
from grpo_jax.checkpoint import Checkpointer, CheckpointError, abstract_like

from loop_helpers import metrics, tiny_experiment, write_experiment


def corrupt(step_dir):
    """Overwrite every file of a checkpoint's train state with garbage (a half-written or bit-rotted object)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    assert files
    for p in files:
        p.write_bytes(b"not a checkpoint")


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_corrupt_latest_falls_back_to_the_previous_one_and_none_readable_raises(tmp_path, caplog):
    tree = {"w": jnp.arange(4.0)}
    ckpt = Checkpointer(tmp_path / "ck", keep=3, async_save=False)
    for step in (1, 2):
        ckpt.save(step, {"w": tree["w"] * step}, {"at": step}, wait=True)
    corrupt(tmp_path / "ck" / "2")
    step, state, meta = ckpt.restore_latest(abstract_like(tree))
    assert (step, meta) == (1, {"at": 1}) and np.array_equal(state["w"], np.arange(4.0))
    assert "skipped (step 2:" in caplog.text and "resumed from step 1" in caplog.text
    corrupt(tmp_path / "ck" / "1")
    with pytest.raises(CheckpointError, match=r"none of the 2 checkpoints in .*ck could be restored \(first error: "
                                              r"step 2: "):
        ckpt.restore_latest(abstract_like(tree))
    ckpt.close()
    assert Checkpointer(tmp_path / "empty").restore_latest(abstract_like(tree)) is None  # no checkpoint: a new run


@pytest.mark.slow
def test_no_restorable_checkpoint_exits_with_one_line_and_keeps_everything(tmp_path, capsys):
    exp = write_experiment(tmp_path / "exp", tiny_experiment(train={"steps": 4}, checkpoint={"every": 2}))
    run_dir = tmp_path / "run"
    argv = ["train", str(exp), "--run-dir", str(run_dir), "--no-progress"]
    assert cli.main(argv) == 0
    for step in (2, 4):
        corrupt(run_dir / "checkpoints" / str(step))
    before = snapshot(run_dir)
    capsys.readouterr()
    assert cli.main(argv) == 4
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("grpo-jax:")]
    assert len(ours) == 1 and f"checkpoints in {run_dir / 'checkpoints'} could be restored" in ours[0], ours
    assert "first error: step 4:" in ours[0] and "--restart" in ours[0]
    assert snapshot(run_dir) == before  # metrics.jsonl byte-identical, checkpoints untouched

    assert cli.main([*argv, "--restart"]) == 0  # starting over is explicit
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["start_step"] == 0
    assert [r["step"] for r in metrics(run_dir)] == [0, 1, 2, 3, 4]
