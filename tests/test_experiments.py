"""Every experiments/*/config.yaml parses and builds (hub models and data replaced by tiny local stand-ins)."""
import json
from pathlib import Path

import pytest

from grpo_jax.data import build_splits
from grpo_jax.experiment import load_experiment
from grpo_jax.loop import train
from grpo_jax.run_setup import build_policy, load_tokenizer

from loop_helpers import TINY_MODEL, metrics

EXPERIMENTS = sorted(p.parent for p in (Path(__file__).parents[1] / "experiments").glob("*/config.yaml"))


def tiny_overrides(folder: Path, tmp_path: Path) -> list[str]:
    """Replace hub model/data by a tiny random model and small local files in the hub's column layout."""
    raw = load_experiment(folder)
    out = []
    if raw.model.path is not None and not Path(raw.model.path).exists():
        out += ["model.path=null", f"model.init={json.dumps(TINY_MODEL)}", "model.tokenizer=char",
                "model.dtype=float32"]
    if raw.data.source is not None and not Path(raw.data.source).exists():
        def write(name, numbers):
            rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}",
                     "problem": f"What is {i} + {i}?", "solution": f"\\boxed{{{2 * i}}}"} for i in numbers]
            path = tmp_path / f"{folder.name}_{name}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            return path

        out += [f"data.source={write('train', range(40))}", "data.subset=null"]
        if raw.data.held_out_source is not None:
            out += [f"data.held_out_source={write('test', range(40, 50))}"]
    return out


def test_there_are_experiments():
    names = {p.name for p in EXPERIMENTS}
    assert {"arith_tiny", "qwen25_05b_gsm8k", "countdown_r1"} <= names


@pytest.mark.parametrize("folder", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_parses_and_builds(folder, tmp_path):
    assert (folder / "README.md").exists()
    cfg = load_experiment(folder,
                          tiny_overrides(folder, tmp_path) + ["mesh.data=1", "mesh.fsdp=1", "mesh.num_devices=1"])
    tokenizer = load_tokenizer(cfg.model)
    splits = build_splits(cfg.data, tokenizer)
    assert splits.train and all("prompt" in ex and "answer" in ex for ex in splits.train[:5])
    model = build_policy(cfg, tokenizer, cfg.mesh.build())
    assert model.config.vocab_size >= len(tokenizer)


@pytest.mark.slow
def test_countdown_r1_runs_a_few_grpo_steps(tmp_path):
    folder = Path(__file__).parents[1] / "experiments" / "countdown_r1"
    cfg = load_experiment(folder, tiny_overrides(folder, tmp_path) + [
        "train.steps=2", "train.batch_prompts=2", "train.micro_batches=1", "rollout.group_size=4",
        "rollout.max_new_tokens=16", "eval.num_examples=4", "eval.pass_k=2", "eval.batch_prompts=4",
        "data.num_examples=50", "rewards.num_workers=1", "mesh.fsdp=1", "mesh.data=-1", "checkpoint.export_hf=false",
    ])
    summary = train(cfg, tmp_path / "run", show_progress=False)
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert {"reward/countdown/mean", "reward/format/mean", "train/loss", "eval/pass@2"} <= set(rows[-1])
    assert "eval/accuracy" in summary["final_eval"]


@pytest.mark.slow
def test_arith_tiny_shortened_raises_the_sampled_accuracy(tmp_path):
    """The default experiment's mechanism at a fraction of its cost: single-digit sums (``data.difficulty=1``), 40
    warm-start steps on the same flawed demonstrations (60% of the questions taught with the units digit one too
    high), 25 GRPO steps. The warm start already samples the slip on the flawed questions (~36% sampled accuracy);
    GRPO removes it (measured 2026-12-02: 35.5% over the first 5 steps, 65.6% over the last 10; seeds 1 and 2:
    36.2 -> 62.1%, 34.8 -> 59.2%). The full-size run and its figures: experiments/arith_tiny/README.md."""
    folder = Path(__file__).parents[1] / "experiments" / "arith_tiny"
    cfg = load_experiment(folder, ["data.difficulty=1", "warm_start.sft.steps=40", "train.steps=25",
                                   "eval.num_examples=0", "mesh.num_devices=1", "checkpoint.every=100",
                                   "checkpoint.export_hf=false"])
    train(cfg, tmp_path / "run", show_progress=False)
    accuracy = [r["accuracy"] for r in metrics(tmp_path / "run") if "accuracy" in r]
    assert len(accuracy) == 25
    first, last = sum(accuracy[:5]) / 5, sum(accuracy[-10:]) / 10  # 5 x 256 and 10 x 256 samples
    assert last > first + 0.1, (first, last)


def test_flawed_warm_start_targets_are_systematic():
    from grpo_jax.data import arith_examples
    from grpo_jax.experiment import WarmStartSection
    from grpo_jax.sft import SFTConfig

    examples = arith_examples(400, 2, seed=0, ops="+")
    ws = WarmStartSection(sft=SFTConfig(seed=3), flawed_target="{no_carry_answer}", flawed_fraction=0.6)
    target = ws.completion_fn(examples)
    flawed = {e["question"] for e in examples if target(e) != e["answer"]}
    carry = {e["question"] for e in examples if e["no_carry_answer"] != e["answer"]}
    assert flawed <= carry and 0.45 < len(flawed) / len(carry) < 0.75  # ~60% of the questions with a carry
    assert ws.completion_fn(examples)(examples[0]) == target(examples[0])  # same choice every time
    assert all(target(e) in (e["answer"], e["no_carry_answer"]) for e in examples)
    with pytest.raises(ValueError, match="together"):
        WarmStartSection(sft=SFTConfig(), flawed_fraction=0.5)
    bad = WarmStartSection(sft=SFTConfig(), flawed_target="{nope}", flawed_fraction=1.0).completion_fn(examples)
    with pytest.raises(ValueError, match="uses field 'nope'"):
        bad(examples[0])
