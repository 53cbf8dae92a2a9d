"""Task builders, loading from local files in the hub's column layout, templating, splits and resumable order."""
import dataclasses
import json

import numpy as np
import pytest

from grpo_jax.data import (
    DataConfig,
    OrderState,
    arith_examples,
    batch_at,
    batch_indices,
    build_splits,
    countdown_examples,
    render_prompt,
)
from grpo_jax.rewards import countdown, exact_int

GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
    {"question": "A shop sells 1,200 pens a day. How many in 2 days?", "answer": "1200 * 2 = 2400\n#### 2,400"},
    {"question": "What is 10 - 4?", "answer": "10 - 4 = 6\n#### 6"},
]
MATH_ROWS = [
    {"problem": "Half of 1?", "solution": r"It is $\boxed{\frac{1}{2}}$.", "level": "Level 1"},
    {"problem": "Nested?", "solution": r"First \boxed{2}, then $\boxed{\sqrt{\frac{a}{b}}}$", "level": "Level 2"},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_gsm8k_from_local_jsonl(tmp_path):
    src = _jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    splits = build_splits(DataConfig(task="gsm8k", source=src, cache_dir=str(tmp_path / "cache")))
    assert [ex["answer"] for ex in splits.train] == ["7", "2400", "6"]
    assert splits.train[1]["question"] == GSM8K_ROWS[1]["question"] and splits.held_out == []
    assert splits.train[0]["prompt"] == GSM8K_ROWS[0]["question"]  # no tokenizer, default template


def test_math_from_parquet_and_arrow(tmp_path):
    from datasets import Dataset

    Dataset.from_list(MATH_ROWS).to_parquet(str(tmp_path / "math.parquet"))
    cfg = DataConfig(task="math", source=str(tmp_path / "math.parquet"), cache_dir=str(tmp_path / "cache"))
    # gold = the last \boxed{} with balanced braces
    assert [ex["answer"] for ex in build_splits(cfg).train] == [r"\frac{1}{2}", r"\sqrt{\frac{a}{b}}"]
    # MATH-500 layout: an `answer` column wins over the solution's box; arrow files as save_to_disk writes them.
    rows = [{**MATH_ROWS[0], "answer": "0.5"}, {**MATH_ROWS[1], "answer": "x"}]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "m500"))
    cfg = dataclasses.replace(cfg, source=str(tmp_path / "m500" / "*.arrow"))
    assert [ex["answer"] for ex in build_splits(cfg).train] == ["0.5", "x"]


def test_missing_column_is_one_clear_error(tmp_path):
    src = _jsonl(tmp_path / "gsm8k.jsonl", [{"prompt": r["question"], "answer": r["answer"]} for r in GSM8K_ROWS])
    cfg = DataConfig(task="gsm8k", source=src, cache_dir=str(tmp_path / "cache"))
    want = r"column 'question' \(for field 'question'\) is not in the data; columns present: \['prompt', 'answer'\]"
    with pytest.raises(ValueError, match=want):
        build_splits(cfg)
    # ... and the column mapping fixes it.
    fixed = build_splits(dataclasses.replace(cfg, columns={"question": "prompt"}))
    assert fixed.train[0]["question"] == GSM8K_ROWS[0]["question"]
    # An `answer` column named in `columns` is required even for math, where it is otherwise optional.
    from datasets import Dataset

    Dataset.from_list(MATH_ROWS).to_json(str(tmp_path / "math.jsonl"))
    math_cfg = DataConfig(
        task="math", source=str(tmp_path / "math.jsonl"), columns={"answer": "final"}, cache_dir=str(tmp_path / "c2")
    )
    with pytest.raises(ValueError, match="column 'final' \\(for field 'answer'\\)"):
        build_splits(math_cfg)


def test_config_validation_names_fields():
    with pytest.raises(ValueError, match=r"task must be one of \['arith', 'countdown', 'gsm8k', 'math'\]"):
        DataConfig(task="mbpp")
    with pytest.raises(ValueError, match="source is required for task 'gsm8k'"):
        DataConfig(task="gsm8k")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['problem'\] for 'gsm8k'"):
        DataConfig(task="gsm8k", source="x.jsonl", columns={"problem": "q"})
    with pytest.raises(ValueError, match=r"difficulty must be one of \[1, 2, 3, 4\]"):
        DataConfig(task="arith", difficulty=7)
    with pytest.raises(ValueError, match=r"named example fields such as \{question\}, got \[''\]"):
        DataConfig(task="arith", template="Solve {}")
    # a field the task's examples lack is named when the prompts are built
    with pytest.raises(ValueError,
                       match=r"uses field 'problem' that 'arith' examples lack; fields: \['answer', 'expression'"):
        build_splits(DataConfig(task="arith", num_examples=5, template="Solve {problem}"))
    compact = build_splits(DataConfig(task="arith", num_examples=5, template="{expression}="))
    assert compact.train[0]["prompt"] == compact.train[0]["expression"] + "="


def test_arith_levels_and_answers():
    ex = arith_examples(200, 3, seed=1)
    assert ex == arith_examples(200, 3, seed=1) and ex != arith_examples(200, 3, seed=2)
    # level 3: three operands of at most two digits
    assert all(len(e["expression"].split()) == 5 and all(len(t) <= 2 for t in e["expression"].split()[::2]) for e in ex)
    # ops restricts the operators: level 2 is two operands of at most two digits
    plus_minus = arith_examples(100, 2, seed=0, ops="+-")
    assert {e["expression"].split()[1] for e in plus_minus} == {"+", "-"}
    assert all(len(e["expression"].split()) == 3 for e in plus_minus)
    e = arith_examples(1, 1, seed=0)[0]
    a, op, b = e["expression"].split()
    assert int(e["answer"]) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    assert all(exact_int("", f"<answer>{e['answer']}</answer>", e) == 1.0 for e in ex)


def test_countdown_levels_are_solvable():
    for level, count in [(1, 3), (4, 6)]:
        ex = countdown_examples(100, level, seed=0)
        assert all(len(e["numbers"]) == count and 1 <= e["target"] <= 100 for e in ex)
        # the stored solution uses every number once and reaches the target, per the reward itself
        assert all(countdown("", f"<answer>{e['solution']}</answer>", e, use_all=True) == 1.0 for e in ex)


def test_held_out_split_is_deterministic_and_disjoint():
    cfg = DataConfig(task="arith", num_examples=200, difficulty=2, held_out_fraction=0.1, seed=3)
    a, b = build_splits(cfg), build_splits(cfg)
    assert a == b and len(a.held_out) == 20  # round(0.1 * 200)
    assert not {e["question"] for e in a.train} & {e["question"] for e in a.held_out}
    other = build_splits(dataclasses.replace(cfg, seed=4))
    assert other.held_out != a.held_out


def test_render_prompt_with_and_without_chat_template():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chat = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    backend = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=chat)
    got = render_prompt(tok, "2+2?", system_prompt="Be brief.", template="Q: {question}")
    assert got == "<|system|>Be brief.\n<|user|>Q: 2+2?\n<|assistant|>"
    assert render_prompt(tok, "2+2?") == "<|user|>2+2?\n<|assistant|>"
    tok.chat_template = None  # a base-model tokenizer: plain format string
    assert (render_prompt(tok, "2+2?", system_prompt="Be brief.", template="Q: {question}\nA:")
            == "Be brief.\n\nQ: 2+2?\nA:")
    assert (render_prompt(None, "2+2?", template="User: {question} Assistant: <think>")
            == "User: 2+2? Assistant: <think>")


def test_order_is_a_permutation_per_epoch_and_resumes_exactly():
    n, bs, seed = 10, 4, 7
    state, seen = OrderState(), []
    for _ in range(5):  # 20 indices = exactly two epochs
        idx, state = batch_indices(state, num_examples=n, batch_size=bs, seed=seed)
        seen.append(idx)
    flat = np.concatenate(seen)
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert list(flat[:10]) != list(flat[10:])  # a fresh shuffle each epoch
    assert state == OrderState(epoch=2, position=0)
    # Resume from a saved mid-epoch state (after batch 2: epoch 0, position 8) -> the same batches 3..5.
    examples = [{"i": i} for i in range(n)]
    saved = dataclasses.asdict(batch_indices(OrderState(), num_examples=n, batch_size=8, seed=seed)[1])
    assert saved == {"epoch": 0, "position": 8}
    state, resumed = OrderState(**saved), []
    for _ in range(3):
        batch, state = batch_at(examples, state, batch_size=bs, seed=seed)
        resumed += [e["i"] for e in batch]
    assert resumed == list(flat[8:])
    with pytest.raises(ValueError, match="position=12 is past the 10 examples"):
        batch_indices(OrderState(position=12), num_examples=n, batch_size=bs, seed=seed)


def test_data_config_loads_from_a_yaml_like_dict():
    from grpo_jax.config import ConfigError, from_dict

    cfg = from_dict(DataConfig, {"task": "gsm8k", "source": "openai/gsm8k", "subset": "main",
                                 "columns": {"question": "q"}})
    assert cfg.columns == {"question": "q"} and cfg.split == "train"
    with pytest.raises(ConfigError, match="colums: unknown key"):
        from_dict(DataConfig, {"task": "gsm8k", "source": "x.jsonl", "colums": {}})


def test_no_carry_answer_drops_every_carry():
    from grpo_jax.data.synthetic import _no_carry_sum

    # 47 + 38: units 7+8=15 -> 5, tens 4+3=7 -> "75"; 67 + 58: 15 -> 5, 11 -> 1 -> "15"; 5 + 7 -> 2; 40 + 2 -> 42
    assert [_no_carry_sum(t) for t in (["47", "38"], ["67", "58"], ["5", "7"], ["40", "2"])] == ["75", "15", "2", "42"]
    ex = arith_examples(50, 2, seed=0, ops="+")
    assert all("no_carry_answer" in e for e in ex)
    assert "no_carry_answer" not in arith_examples(1, 2, seed=0, ops="-")[0]


def test_units_slip_answer_adds_one_to_the_last_digit_only():
    from grpo_jax.data.synthetic import _units_slip

    # 85 -> 86; 89 -> 80 (9 wraps to 0, no carry into the tens); 9 -> 0; -12 -> -13 (the digit, not the value)
    assert [_units_slip(a) for a in ("85", "89", "9", "-12", "100")] == ["86", "80", "0", "-13", "101"]
    ex = arith_examples(100, 2, seed=0, ops="+-")
    assert all(e["units_slip_answer"] == _units_slip(e["answer"]) != e["answer"] for e in ex)
