"""Packed and shared-prompt update layouts (grpo_jax.layout, grpo_jax.models.packed): a hand-made plan, and
log-probs, gradients and a short training run equal to the padded computation on an 8-device mesh."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from grpo_jax.algorithms import make_algorithm
from grpo_jax.layout import Layout, bucket, with_plan
from grpo_jax.losses import LossConfig
from grpo_jax.mesh import make_mesh, shard_batch, shard_model
from grpo_jax.models import ModelConfig, build_model, token_logprobs
from grpo_jax.models.packed import plan_logprobs
from grpo_jax.train_step import Batch, StepConfig, init_train_state, make_train_step, state_sharding

G, PROMPTS, P, T = 4, 8, 7, 6  # 32 rows: 2 micro-batches x 4 blocks (data 2 x fsdp 2) of 4 rows
TOL = 1e-5


def tiny_model(mesh=None):
    cfg = ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True)
    model = build_model(cfg, rngs=nnx.Rngs(0))
    return nnx.split(model if mesh is None else shard_model(model, mesh))


def grouped_batch(seed=0) -> Batch:
    """PROMPTS groups of G rows: each group's prompt left-padded to P (lengths 1..P), completions right-padded to T
    with lengths 0..T; some groups' completions start with the same tokens (a shared prefix past the prompt)."""
    rng = np.random.default_rng(seed)
    B, S = G * PROMPTS, P + T
    tokens, attn = np.zeros((B, S), np.int32), np.zeros((B, S), bool)
    comp_len = rng.integers(0, T + 1, B)
    comp_len[0] = T
    for g in range(PROMPTS):
        n = 1 + g % P
        prompt, common = rng.integers(3, 64, n), rng.integers(3, 64, g % 3)
        for i in range(g * G, (g + 1) * G):
            c = rng.integers(3, 64, T)
            c[:len(common)] = common
            tokens[i, P - n:P], tokens[i, P:P + comp_len[i]] = prompt, c[:comp_len[i]]
            attn[i, P - n:P + comp_len[i]] = True
    loss_mask = attn & (np.arange(S) >= P)[None]
    old = np.where(loss_mask, np.log(rng.uniform(0.01, 0.2, (B, S))), 0).astype(np.float32)
    ref = np.where(loss_mask, old + rng.normal(0, 0.1, (B, S)), 0).astype(np.float32)
    return Batch(tokens_BxS=jnp.asarray(tokens), attn_mask_BxS=jnp.asarray(attn), loss_mask_BxS=jnp.asarray(loss_mask),
                 old_logp_BxS=jnp.asarray(old), ref_logp_BxS=jnp.asarray(ref),
                 adv=jnp.asarray(rng.normal(0, 1, B), jnp.float32))


def test_bucket():
    # 1, 2, 3, then m·2^k, m in 4..7: 4 5 6 7 | 8 10 12 14 | 16 20 24 28 | ... | 64 80 96 112 | 128
    assert [bucket(n) for n in (0, 1, 3, 4, 5, 7, 9, 13, 17, 25, 50, 100, 128)] == [
        1, 1, 3, 4, 5, 7, 10, 14, 20, 28, 56, 112, 128]


def test_shared_prompt_plan_of_a_hand_made_batch():
    # completions in the last 3 columns (p = 3), chunks of 4: a row per group, its prompt in chunk 0 (g = 1), the
    # completions at columns 4 and 8 (slots of round_up(3, 4) = 4): L = 4 + 2·4 = 12, w = 1
    # group 1: rows 0, 1 = prompt [5, 6] + [7, 8] / [7, 9, 4]; group 2: rows 2, 3 = prompt [3] + [2] / [5, 6]
    tokens = np.array([[0, 5, 6, 7, 8, 0], [0, 5, 6, 7, 9, 4], [0, 0, 3, 2, 0, 0], [0, 0, 3, 5, 6, 0]])
    layout = Layout(kind="shared_prompt", group_size=2, row_multiple=4, new_tokens=3)
    plan = layout.plan(tokens, tokens > 0, tokens > 0)
    np.testing.assert_array_equal(plan.tokens_XxRxL[0], [[5, 6, 0, 0, 7, 8, 0, 0, 7, 9, 4, 0],
                                                         [3, 0, 0, 0, 2, 0, 0, 0, 5, 6, 0, 0]])
    np.testing.assert_array_equal(plan.positions_XxRxL[0], [[0, 1, 0, 0, 2, 3, 0, 0, 2, 3, 4, 0],
                                                            [0, 0, 0, 0, 1, 0, 0, 0, 1, 2, 0, 0]])
    np.testing.assert_array_equal(plan.branch_XxRxL[0], [[0, 0, 0, 0, 1, 1, 0, 0, 2, 2, 2, 0],
                                                         [0, 0, 0, 0, 1, 0, 0, 0, 2, 2, 0, 0]])
    np.testing.assert_array_equal(plan.segment_XxRxL[0], plan.tokens_XxRxL[0] > 0)
    assert (plan.chunk, plan.global_chunks, plan.window_chunks) == (4, 1, 1)
    # targets (source = flat r * 12 + l, token): 6 inside the prompt once for both rows; 7 after the prompt's last
    # token (l 1) for each row; 8 after 7 (l 4); 9 after 7 (l 8), 4 after 9 (l 9); row 2's 2 and row 3's 5 after
    # [3] (12 + 0); row 3's 6 after 5 (12 + 8)
    np.testing.assert_array_equal(plan.source_XxN[0, :9], [0, 1, 4, 1, 8, 9, 12, 12, 20])
    np.testing.assert_array_equal(plan.target_XxN[0, :9], [6, 7, 8, 7, 9, 4, 2, 5, 6])
    none = 16  # N = 2 runs x 2 prompt targets (columns 1, 2) + 4 rows x 3 completion columns; slot N reads 0
    assert plan.source_XxN.shape == (1, none)
    np.testing.assert_array_equal(plan.slot_BxS, [[none, none, 0, 1, 2, none], [none, none, 0, 3, 4, 5],
                                                  [none, none, none, 6, none, none], [none, none, none, 7, 8, none]])
    loss_mask = (tokens > 0) & (np.arange(6) >= 3)  # the train step: p = the first loss column, no prompt targets
    assert layout.plan(tokens, tokens > 0, loss_mask).source_XxN.shape == (1, 12)
    assert dataclasses.replace(layout, new_tokens=None).plan(tokens, tokens > 0, loss_mask).tokens_XxRxL.shape[-1] == 12
    packed = Layout(kind="packed", row_multiple=8, row_factor=1).plan(tokens, tokens > 0, tokens > 0)
    # one segment per row, lengths 4, 5, 2, 3; first-fit decreasing: 5 -> row 0, 4 -> row 1, 3 -> row 0, 2 -> row 1;
    # R = 4 (the worst case: 4 rows of 6 real tokens), N = 4 rows x 5 columns that can be a target
    np.testing.assert_array_equal(packed.tokens_XxRxL[0], [[5, 6, 7, 9, 4, 3, 5, 6], [5, 6, 7, 8, 3, 2, 0, 0]]
                                  + [[0] * 8] * 2)
    np.testing.assert_array_equal(packed.segment_XxRxL[0, :2], [[1] * 5 + [2] * 3, [1] * 4 + [2] * 2 + [0] * 2])
    np.testing.assert_array_equal(packed.positions_XxRxL[0, :2], [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 0, 0]])
    assert packed.source_XxN.shape == (1, 20) and (packed.global_chunks, packed.window_chunks) == (0, 1)


def assert_window_covers_every_visible_key(plan):
    """Every key a query may see (the mask rule of ``grpo_jax.models.packed``) lies in its row's first g chunks or in
    the w chunks ending at the query's own chunk."""
    C, g, w = plan.chunk, plan.global_chunks, plan.window_chunks
    L = plan.tokens_XxRxL.shape[-1]
    J = L // C
    for s, b in zip(plan.segment_XxRxL.reshape(-1, L), plan.branch_XxRxL.reshape(-1, L)):
        allowed = ((s[:, None] == s[None]) & (s[None] != 0) & ((b[None] == 0) | (b[None] == b[:, None]))
                   & np.tril(np.ones((L, L), bool)))
        j, n = np.nonzero(allowed.reshape(J, C, J, C).any(axis=(1, 3)))
        assert ((n < g) | (n > j - w)).all(), (g, w, list(zip(j, n)))


@pytest.mark.parametrize("kind", ["packed", "shared_prompt"])
def test_plan_shapes_depend_on_the_batch_shape_only(kind):
    """Batches of one shape with other prompt and completion lengths (and completions that start alike): the same
    R, L, N, g and w for the train step (want = loss mask) and the reference pass (want = every real slot)."""
    shapes = set()
    for seed in range(4):
        b = grouped_batch(seed)
        for want, new_tokens in ((b.loss_mask_BxS, None), (b.attn_mask_BxS, T)):
            layout = Layout(kind=kind, group_size=G, micro_batches=2, blocks=4, row_multiple=4, new_tokens=new_tokens)
            plan = layout.plan(b.tokens_BxS, b.attn_mask_BxS, want)
            assert_window_covers_every_visible_key(plan)
            shapes.add((new_tokens, plan.tokens_XxRxL.shape, plan.source_XxN.shape, plan.global_chunks,
                        plan.window_chunks))
    assert len(shapes) == 2, shapes


def test_blocks_follow_the_micro_batch_split():
    assert Layout(kind="packed", micro_batches=2, blocks=2).block_rows(8) == [[[0, 2], [4, 6]], [[1, 3], [5, 7]]]
    assert Layout(kind="packed", micro_batches=2, blocks=2, contiguous=True).block_rows(8) == [
        [[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    with pytest.raises(ValueError, match="does not split into micro_batches=2 x blocks=4"):
        Layout(kind="packed", micro_batches=2, blocks=4).block_rows(12)


@pytest.mark.parametrize("kind, row_factor, new_tokens", [("packed", 1, None), ("packed", 3, None),
                                                          ("shared_prompt", 1, T), ("shared_prompt", 1, None)])
def test_logprobs_and_entropy_equal_the_padded_rows_on_8_devices(kind, row_factor, new_tokens):
    """Chunks of 4 tokens: packed rows of S = 13 -> 16 tokens (window = the whole row) or 3 S = 39 -> 40 tokens (a
    window of 4 of the 10 chunks); one group per row: its prompt (7 columns) in 2 chunks, then 4 completion slots of
    2 chunks (a window of 2 + 2 of 10), or with p = the first real column, no prompt and slots of 4 chunks."""
    mesh = make_mesh(8)
    graphdef, params = tiny_model(mesh)
    b = shard_batch(grouped_batch(), mesh)
    layout = Layout(kind=kind, group_size=G, blocks=8, row_multiple=4, row_factor=row_factor, new_tokens=new_tokens)
    plan = layout.plan(b.tokens_BxS, b.attn_mask_BxS, b.attn_mask_BxS)
    J = plan.tokens_XxRxL.shape[-1] // 4
    assert plan.global_chunks + plan.window_chunks < J or (kind, row_factor) == ("packed", 1)
    assert_window_covers_every_visible_key(plan)
    plan = shard_batch(plan, mesh)

    @jax.jit
    def both(params, b, plan):
        model = nnx.merge(graphdef, params)
        padded = token_logprobs(model, b.tokens_BxS, b.attn_mask_BxS, return_entropy=True, chunk_size=8)
        return padded, plan_logprobs(model, plan, temperature=1.0, return_entropy=True, chunk_size=8)

    (logp, ent), (logp_p, ent_p) = both(params, b, plan)
    assert float(jnp.abs(logp).min()) == 0.0 and float(jnp.abs(logp).max()) > 1.0
    np.testing.assert_allclose(logp_p, logp, atol=TOL)
    np.testing.assert_allclose(ent_p, ent, atol=TOL)
    assert logp_p.sharding.spec == logp.sharding.spec and not logp_p.sharding.is_fully_replicated


def update(mesh, step_cfg, b, layout=None):
    """(metrics, -grad) of one GRPO step (SGD, lr 1) on ``mesh``, through ``layout``'s plan when given."""
    graphdef, params = tiny_model(mesh)
    opt = optax.sgd(1.0)
    state = init_train_state(params, opt)
    start = jax.tree.map(np.asarray, params)
    step = make_train_step(graphdef, opt, step_cfg, make_algorithm("grpo", loss=LossConfig(beta=0.04)),
                           state_sharding=state_sharding(state))
    b = shard_batch(b, mesh)
    state, metrics = step(state, b if layout is None else with_plan(b, layout, mesh))
    return metrics, jax.tree.map(lambda a, c: np.asarray(a) - c, state.params, start)


@pytest.mark.parametrize("kind, micro, contiguous", [("packed", 2, False), ("shared_prompt", 2, False),
                                                     ("shared_prompt", 1, False), ("shared_prompt", 2, True)])
def test_update_equals_the_padded_update_on_8_devices(kind, micro, contiguous):
    """Gradients (SGD deltas) and metrics of a GRPO step with β·KL, 2 iterations (ratios != 1), on a data 2 x
    fsdp 2 x tensor 2 mesh, against the padded layout's full-batch step; contiguous micro-batches via
    grad_variance."""
    mesh = make_mesh(2, 2, 2)
    b = grouped_batch()
    base = StepConfig(num_iterations=2, logprob_chunk=8)
    m_pad, g_pad = update(mesh, base, b)
    step_cfg = dataclasses.replace(base, micro_batches=micro, grad_variance=contiguous)
    layout = Layout(kind=kind, group_size=G, micro_batches=micro, contiguous=contiguous, blocks=4, row_multiple=4)
    m_new, g_new = update(mesh, step_cfg, b, layout)
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(g_pad)) > 1e-3
    for a, c in zip(jax.tree.leaves(g_new), jax.tree.leaves(g_pad)):
        np.testing.assert_allclose(a, c, atol=TOL)
    for k in ("loss", "kl", "clip_frac", "ratio_mean", "entropy", "grad_norm"):
        np.testing.assert_allclose(m_new[k], m_pad[k], rtol=TOL, atol=TOL, err_msg=k)


@pytest.mark.parametrize("kind", ["packed", "shared_prompt"])
def test_reference_pass_through_a_layout_equals_the_padded_one(kind):
    from grpo_jax.run_setup import logprob_fn

    mesh = make_mesh(8)
    graphdef, params = tiny_model(mesh)
    b = shard_batch(grouped_batch(), mesh)
    padded = logprob_fn(graphdef, 1.0, 8)(params, b.tokens_BxS, b.attn_mask_BxS)
    layout = Layout(kind=kind, group_size=G, micro_batches=2, contiguous=True, blocks=8, row_multiple=4,  # strided
                    new_tokens=T)
    packed = logprob_fn(graphdef, 1.0, 8, 2, layout, mesh)(params, b.tokens_BxS, b.attn_mask_BxS)
    np.testing.assert_allclose(packed, padded, atol=TOL)


@pytest.mark.parametrize("sections, message", [
    ({"train": {"layout": "tight"}},
     "train.layout: 'tight' is not allowed; choose one of ['auto', 'padded', 'packed', 'shared_prompt']"),
    ({"algo": {"kind": "ppo"}}, "train.layout='packed' is not implemented for algo.kind='ppo'"),
])
def test_bad_layout_config_is_one_line(sections, message):
    from grpo_jax.config import from_dict
    from grpo_jax.experiment import ExperimentConfig

    from loop_helpers import tiny_experiment

    cfg = tiny_experiment(train={"steps": 1, "batch_prompts": 4, "layout": "packed"})
    cfg["train"] |= sections.get("train", {})
    cfg["algo"] = sections.get("algo", cfg["algo"])
    with pytest.raises(ValueError) as err:
        from_dict(ExperimentConfig, cfg)
    assert message in str(err.value) and len(str(err.value).splitlines()) == 1


def test_auto_layout_shares_the_prompt_where_it_saves_enough_token_slots():
    from grpo_jax.layout import auto_layout

    assert auto_layout(8, 6, 32) == "padded"  # step_vs_trl's standard shape: 304 slots a group padded, 288 shared
    assert auto_layout(16, 64, 128) == "shared_prompt"  # its long shape: 3072 against 2112
    assert auto_layout(8, 8, 8) == "padded"  # arith_tiny: 128 against 288 (completions start on a 32-token chunk)
    assert auto_layout(8, 128, 32) == "shared_prompt"  # update_layouts.py's 4:1 batch: 1280 against 384
    assert auto_layout(1, 500, 8) == "padded"  # nothing to share


LONG = "a long question of many words " * 4


@pytest.mark.parametrize("sections, prompt, layout", [
    ({}, LONG, "shared_prompt"),  # 120 prompt tokens, G 4, 6 new: 4 x 126 slots a group padded, 128 + 4 x 32 shared
    ({}, "1+2=", "padded"),  # 40 against 160
    ({"rollout": {"max_new_tokens": 200}}, LONG, "padded"),  # 4 x 320 against 128 + 4 x 224
    ({"train": {"layout": "packed"}}, LONG, "packed"),  # a layout set by hand stays
    ({"algo": {"kind": "ppo"}}, LONG, "padded"),  # the critic reads the padded rows
    ({"rollout": {"dynamic_group": {"min_size": 2, "max_size": 6}}}, LONG, "padded"),  # ragged groups
])
def test_auto_layout_of_a_run(sections, prompt, layout):
    from grpo_jax.algorithms import build_algorithm
    from grpo_jax.config import from_dict
    from grpo_jax.experiment import ExperimentConfig
    from grpo_jax.run_setup import load_tokenizer, resolve_layout

    from loop_helpers import tiny_experiment

    raw = tiny_experiment(**{k: v for k, v in sections.items() if k != "algo"})
    cfg = from_dict(ExperimentConfig, raw | {"algo": sections.get("algo", raw["algo"])})
    rows = [{"prompt": prompt}] * 10
    assert resolve_layout(cfg, build_algorithm(cfg), load_tokenizer(cfg.model), rows).train.layout == layout


@pytest.mark.slow
def test_train_runs_of_each_layout_log_the_padded_metrics(tmp_path):
    """Two steps of ``loop.train`` (β·KL with its reference pass, 2 micro-batches, data 2 x fsdp 2 x tensor 2) per
    layout: the same samples and the same update metrics as the padded layout."""
    from grpo_jax.config import from_dict
    from grpo_jax.experiment import ExperimentConfig
    from grpo_jax.loop import train

    from loop_helpers import metrics, tiny_experiment

    rows = {}
    for layout in ("padded", "packed", "shared_prompt"):
        cfg = tiny_experiment(train={"steps": 2, "batch_prompts": 8, "micro_batches": 2, "layout": layout},
                              eval={"num_examples": 0}, mesh={"data": 2, "fsdp": 2, "tensor": 2},
                              rewards={"fns": [{"name": "loop_helpers:length_reward"}], "num_workers": 1})
        train(from_dict(ExperimentConfig, cfg), tmp_path / layout, show_progress=False)
        rows[layout] = [r for r in metrics(tmp_path / layout) if "train/loss" in r]
    assert len(rows["padded"]) == 2 and rows["padded"][-1]["train/grad_norm"] > 0
    for layout in ("packed", "shared_prompt"):
        for new, pad in zip(rows[layout], rows["padded"]):
            assert new["length/mean"] == pad["length/mean"]  # same samples
            for key in ("train/loss", "train/kl", "train/grad_norm", "train/entropy", "reward/total/mean"):
                assert abs(new[key] - pad[key]) <= 1e-5 * max(1.0, abs(pad[key])), (layout, key, new[key], pad[key])


@pytest.mark.parametrize("layout", ["packed", "shared_prompt"])
def test_fixed_prompt_len_never_recompiles_after_the_first_step(tmp_path, layout):
    """30 steps over prompts of 5-90 tokens padded to one length: the step and the reference pass of the layout
    compile in step 1 only, whatever the prompt and completion lengths."""
    from test_loop import varying_prompts_run

    rows = varying_prompts_run(tmp_path, 30, layout=layout, fixed_prompt_len=True)
    assert len(rows) == 30 and [r["compiles"] for r in rows] == [rows[0]["compiles"]] * 30
