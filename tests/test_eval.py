"""Held-out evaluation: maj@k (majority vote over k samples) by hand, and through `grpo-jax eval`."""
import json

import numpy as np

from grpo_jax import cli, evaluation
from grpo_jax.data import build_splits
from grpo_jax.evaluation import majority_correct
from grpo_jax.experiment import load_experiment
from grpo_jax.rewards.verifiers import answer_key
from grpo_jax.run_setup import build_policy, export_hf, load_tokenizer

from loop_helpers import tiny_experiment, write_experiment


def test_answer_key_is_the_final_answer_in_canonical_form():
    assert answer_key("1,234") == answer_key("so 1234.0") == answer_key("<answer>1234</answer>") == "1234"
    assert answer_key("<answer>12.50</answer>") == "12.5" and answer_key("-0.0") == "0"
    assert answer_key("x \\boxed{ a  b }") == "a b" and answer_key("  ") is None


def test_majority_vote_by_hand():
    keys = [["7", "8", "7", "9"],      # 7 has two votes: correct
            ["5", "5", "6", None],     # 5 (wrong) beats the one correct 6; the empty answer does not vote
            ["1", "2", "2", "1"]]      # a tie: 2 reached two votes first
    correct = np.array([[1, 0, 1, 0], [0, 0, 1, 0], [1, 0, 0, 1]], bool)
    assert majority_correct(keys, correct).tolist() == [True, False, False]
    assert majority_correct([[None, None]], np.zeros((1, 2), bool)).tolist() == [False]


def test_grpo_jax_eval_prints_maj_at_k_on_3_prompts_x_4_samples(tmp_path, monkeypatch, capsys):
    """A random model's samples replaced by scripted completions (3 prompts x 4 samples): pass@4, mean@4 and maj@4
    as counted by hand."""
    exp = write_experiment(tmp_path / "exp", tiny_experiment(eval={"num_examples": 3, "batch_prompts": 8,
                                                                   "pass_k": 4}, mesh={"num_devices": 1}))
    cfg = load_experiment(exp)
    tokenizer = load_tokenizer(cfg.model)
    export_hf(build_policy(cfg, tokenizer, cfg.mesh.build()), tmp_path / "model", tokenizer)
    a = [int(ex["answer"]) for ex in build_splits(cfg.data, tokenizer).held_out[:3]]
    greedy = [str(a[0]), str(a[1] + 1), str(a[2])]
    sampled = [str(a[0]), str(a[0] + 1), f"{a[0]}.0", str(a[0] + 2),      # majority a0 (2 of 4): right
               str(a[1] + 3), str(a[1] + 3), str(a[1]), "no answer",      # majority a1+3: wrong, pass@4 still 1
               str(a[2] + 1), str(a[2] + 1), str(a[2] + 2), str(a[2] + 2)]  # all wrong
    scripted = iter([greedy, sampled])
    monkeypatch.setattr(evaluation, "decode_completions", lambda tokenizer, rollout: next(scripted))
    assert cli.main(["eval", str(tmp_path / "model"), str(exp)]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["examples"] == 3 and report["eval/accuracy"] == 2 / 3
    assert report["eval/pass@4"] == 2 / 3 and report["eval/mean@4"] == 3 / 12 and report["eval/maj@4"] == 1 / 3
