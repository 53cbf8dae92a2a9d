"""The reward_model reward equals transformers' Qwen2ForSequenceClassification on a tiny random checkpoint."""
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from grpo_jax.rewards import RewardModelScorer, RewardsConfig, RewardSpec, compute_rewards

from tiny_hf import PAD, hf_classifier

CHAT = "{% for m in messages %}<{{ m['role'][0] }}>{{ m['content'] }}\n{% endfor %}"
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 ?+=<>\n"
QUESTIONS = ["what is 2+3?", "say hi", "12+30=?"]
COMPLETIONS = ["5", "hi there a long answer with many many characters in it", ""]


@pytest.fixture(scope="module")
def rm_folder(tmp_path_factory):
    """A tiny random Qwen2ForSequenceClassification (vocab 128, pad id 0) with a char-level chat tokenizer."""
    folder = tmp_path_factory.mktemp("rm")
    hf = hf_classifier("qwen2", num_labels=2, seed=3)
    hf.save_pretrained(folder)
    vocab = {"<pad>": PAD, "<unk>": 1} | {c: i + 3 for i, c in enumerate(CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    # Saved apart from the model: next to a qwen2 config.json, AutoTokenizer would rebuild it as Qwen2Tokenizer.
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", chat_template=CHAT)
    tokenizer.save_pretrained(folder / "tokenizer")
    return folder, hf


def _torch_scores(hf, label):
    """Each conversation scored alone (no padding) by transformers, from ids of the hand-written template text."""
    scores = []
    for q, c in zip(QUESTIONS, COMPLETIONS):
        ids = [CHARS.index(ch) + 3 for ch in f"<u>{q}\n<a>{c}\n"]
        with torch.no_grad():
            scores.append(hf(torch.tensor([ids])).logits[0, label].item())
    return np.array(scores, np.float32)


def test_scores_match_transformers(rm_folder):
    folder, hf = rm_folder
    # batch_size 2 over 3 pairs: a padded last chunk; rows of 21, 69 and 15 tokens, left-padded to buckets of 128
    # and 16.
    scorer = RewardModelScorer(str(folder), tokenizer_path=str(folder / "tokenizer"), batch_size=2, label=1)
    assert scorer.render("q", "c") == "<u>q\n<a>c\n"
    np.testing.assert_allclose(scorer(QUESTIONS, COMPLETIONS), _torch_scores(hf, 1), atol=1e-4, rtol=0)


def test_reward_model_through_compute_rewards(rm_folder):
    folder, hf = rm_folder
    kwargs = {"path": str(folder), "tokenizer_path": str(folder / "tokenizer"), "batch_size": 4}
    cfg = RewardsConfig(fns=(RewardSpec(name="reward_model", weight=2.0, kwargs=kwargs),))
    examples = [{"question": q} for q in QUESTIONS] + [{"question": QUESTIONS[0]}]
    completions = COMPLETIONS + [COMPLETIONS[0]]
    total, m = compute_rewards(cfg, ["<rendered prompt>"] * 4, completions, examples, group_size=2)
    expected = _torch_scores(hf, 0)
    np.testing.assert_allclose(total, 2.0 * np.append(expected, expected[0]), atol=2e-4, rtol=0)
    assert m["reward/reward_model/errors"] == 0
    with pytest.raises(ValueError, match="kwargs.*do not fit"):
        bad = RewardsConfig(fns=(RewardSpec(name="reward_model", kwargs={"pth": "x"}),))
        compute_rewards(bad, ["p"], ["c"], [{}], group_size=1)
