"""REINFORCE++ (algo.kind reinforce_pp) by hand: the advantage, the loss of one micro-batch, and a few loop steps."""
import math

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from grpo_jax.algorithms import make_algorithm
from grpo_jax.algorithms.reinforce_pp import reinforce_pp_advantages
from grpo_jax.config import from_dict
from grpo_jax.experiment import ExperimentConfig
from grpo_jax.losses import LossConfig
from grpo_jax.presets import PRESETS
from grpo_jax.train_step import Batch

from loop_helpers import metrics, tiny_experiment


def test_advantage_by_hand():
    # one prompt token (position 0, masked), 3 completion tokens; row 1 has 2 valid tokens; rewards (1, 0), β = 0.5
    mask = jnp.array([[0, 1, 1, 1], [0, 1, 1, 0]], bool)
    old = jnp.array([[0.0, -1.0, -2.0, -1.0], [0.0, -1.0, -1.0, 0.0]])
    ref = jnp.array([[0.0, -1.2, -1.8, -1.4], [0.0, -1.0, -1.2, 0.0]])
    adv = reinforce_pp_advantages(jnp.array([1.0, 0.0]), old, ref, mask, beta=0.5, eps=0.0)
    # k1 = old - ref: row 0 (.2, -.2, .4), row 1 (0, .2); per-token rewards -β·k1 plus r on the last token:
    # row 0 (-.1, .1, -.2 + 1) -> return-to-go (.8, .9, .8); row 1 (0, -.1) -> (-.1, -.1)
    g = np.array([0.8, 0.9, 0.8, -0.1, -0.1])
    # batch mean 2.3/5 = .46; squared deviations .1156 + .1936 + .1156 + .3136 + .3136 = 1.052; std sqrt(1.052/5)
    z = (g - 0.46) / math.sqrt(1.052 / 5)
    np.testing.assert_allclose(adv[0, 1:], z[:3], rtol=1e-5)
    np.testing.assert_allclose(adv[1, 1:3], z[3:], rtol=1e-5)
    assert float(adv[0, 0]) == 0.0 and float(adv[1, 3]) == 0.0  # masked positions
    # without a reference (β·KL = 0) only the terminal reward: returns row 0 (1, 1, 1), row 1 (0, 0); mean .6,
    # variance (3·.16 + 2·.36)/5 = .24: A = .4/sqrt(.24) = sqrt(2/3) and -.6/sqrt(.24) = -sqrt(1.5)
    bare = reinforce_pp_advantages(jnp.array([1.0, 0.0]), old, None, mask, beta=0.5, eps=0.0)
    np.testing.assert_allclose(bare[mask], [math.sqrt(2 / 3)] * 3 + [-math.sqrt(1.5)] * 2, rtol=1e-5)


def test_loss_of_one_micro_batch_by_hand():
    algo = make_algorithm("reinforce_pp", loss=LossConfig(agg="token-mean", clip_low=0.2, beta=0.05))
    assert algo.loss.beta == 0.0 and algo.algo.loss.beta == 0.05  # the KL is in the reward, not in the loss
    mask = jnp.array([[0, 1, 1]], bool)
    b = Batch(tokens_BxS=jnp.zeros((1, 3), jnp.int32), attn_mask_BxS=jnp.ones((1, 3), bool), loss_mask_BxS=mask,
              old_logp_BxS=jnp.zeros((1, 3)), ref_logp_BxS=None, adv=jnp.array([[0.0, 1.0, 1.0]]))
    logp = jnp.array([[0.0, 0.1, 0.3]])  # ratios e^.1 = 1.105 (inside the clip), e^.3 = 1.350 (clipped to 1.2)
    loss, stats = algo.micro_loss(logp, b.old_logp_BxS, None, b, algo.denominators(b))
    np.testing.assert_allclose(loss, -(math.exp(0.1) + 1.2) / 2, rtol=1e-6)
    np.testing.assert_allclose(algo.finalize(stats)["clip_frac"], 0.5)


def test_preset_and_a_few_loop_steps(tmp_path):
    from grpo_jax.loop import train

    assert PRESETS["reinforce_pp"]().kind == "reinforce_pp"
    cfg = tiny_experiment(algo={"preset": "reinforce_pp"}, train={"steps": 2, "batch_prompts": 4},
                          rewards={"fns": [{"name": "loop_helpers:length_reward"}], "num_workers": 1},
                          mesh={"data": 1, "num_devices": 1}, eval={"num_examples": 0},
                          checkpoint={"every": 1, "async_save": False, "export_hf": True})
    summary = train(from_dict(ExperimentConfig, cfg), tmp_path / "run", show_progress=False)
    rows = metrics(tmp_path / "run")[1:]
    assert summary["start_step"] == 0 and [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert np.isfinite(r["train/loss"]) and r["train/grad_norm"] > 0 and "train/kl_loss" not in r
        np.testing.assert_allclose(r["adv/mean"], 0.0, atol=1e-5)  # normalised over the batch's tokens
        np.testing.assert_allclose(r["adv/std"], 1.0, rtol=1e-3)
    final = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert all(np.isfinite(v).all() for v in final.values())
