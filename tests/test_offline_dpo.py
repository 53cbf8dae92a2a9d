"""Offline DPO from prompt/chosen/rejected pairs: the step's loss is dpo_loss of the pairs, and it trains."""
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grpo_jax.data.char_tokenizer import build_char_tokenizer
from grpo_jax.losses import DPOConfig, dpo_loss, sequence_logps
from grpo_jax.models import ModelConfig, build_model, token_logprobs
from grpo_jax.offline_dpo import OfflineDPOConfig, encode_preference_pairs, load_preference_pairs, run_offline_dpo
from grpo_jax.optim import OptimConfig

from loop_helpers import TINY_MODEL

PAIRS = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"prompt": "2+2=", "chosen": "4", "rejected": "15"}]


def tiny():
    return build_model(ModelConfig(**TINY_MODEL), rngs=nnx.Rngs(0))


def config(steps, micro_batches=1):
    return OfflineDPOConfig(steps=steps, batch_pairs=2, micro_batches=micro_batches, max_len=16,
                            dpo=DPOConfig(beta=0.5), optim=OptimConfig(lr=1e-2))


def pair_logps(model, tokenizer):
    """Sequence log-probs of the completions (+ eos), [chosen_0, rejected_0, chosen_1, rejected_1]."""
    t, a, m = (jnp.asarray(x) for x in encode_preference_pairs(tokenizer, PAIRS, 16))
    return sequence_logps(token_logprobs(model, t, a), m)


def test_loss_is_dpo_loss_of_the_pairs_and_it_trains():
    tokenizer = build_char_tokenizer()
    ref = pair_logps(tiny(), tokenizer)
    model1, h1 = run_offline_dpo(tiny(), tokenizer, PAIRS, config(1))
    # step 1: policy == reference, so h_p = 0 for both pairs and L = -log σ(0) = log 2
    np.testing.assert_allclose(h1[0]["loss"], math.log(2.0), rtol=1e-6)
    # step 2 is scored at the params after step 1: L = mean_p -log σ(β((c_p - c_p^ref) - (r_p - r_p^ref)))
    pol = pair_logps(model1, tokenizer)
    expected, _ = dpo_loss(pol[0::2], pol[1::2], ref[0::2], ref[1::2], beta=0.5)
    _, h = run_offline_dpo(tiny(), tokenizer, PAIRS, config(8))
    np.testing.assert_allclose(h[1]["loss"], expected, rtol=1e-5)
    assert h[-1]["loss"] < h[1]["loss"] < math.log(2.0) and h[-1]["dpo_reward_accuracy"] == 1.0
    assert h[0]["dpo_pairs"] == 2


def test_micro_batches_give_the_same_run():
    tokenizer = build_char_tokenizer()
    _, a = run_offline_dpo(tiny(), tokenizer, PAIRS, config(3))
    _, b = run_offline_dpo(tiny(), tokenizer, PAIRS, config(3, micro_batches=2))
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-5)


def test_load_pairs_and_errors(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS) + "\n")
    assert load_preference_pairs(path) == PAIRS
    path.write_text(json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(ValueError, match="pairs.jsonl:1: field 'rejected' must be a string"):
        load_preference_pairs(path)
    with pytest.raises(ValueError, match="micro_batches=3 must divide batch_pairs=2"):
        OfflineDPOConfig(batch_pairs=2, micro_batches=3)
