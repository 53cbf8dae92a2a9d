"""mech/* metrics: effective per-token weights A·∂agg/∂v by hand for each aggregation, their length slope and the
per-level shares."""
import numpy as np
import pytest

from grpo_jax.mechanisms import mechanism_metrics, token_weights

# row 0: a correct answer of 2 tokens (A = +1); row 1: a wrong one of 4 tokens (A = -1); one prompt token first
MASK = np.array([[0, 1, 1, 0, 0], [0, 1, 1, 1, 1]], bool)
ADV = np.array([1.0, -1.0])


@pytest.mark.parametrize("agg, norm_len, w0, w1", [
    ("seq-mean-token-mean", None, 1 / (2 * 2), -1 / (2 * 4)),  # 1/(B'|o_i|): the long wrong answer's tokens weigh less
    ("token-mean", None, 1 / 6, -1 / 6),                      # 1/Σ|o|: every token the same
    ("seq-mean-token-sum-norm", 8.0, 1 / 16, -1 / 16),        # 1/(B'·L)
])
def test_token_weights_and_length_by_hand(agg, norm_len, w0, w1):
    w = token_weights(ADV, MASK, agg, norm_len)
    np.testing.assert_allclose(w, [[0, w0, w0, 0, 0], [0, w1, w1, w1, w1]], rtol=1e-6)
    out = mechanism_metrics(ADV, MASK, agg, norm_len, correct_B=[True, False], levels_B=[1, 2])
    assert out["mech/token_weight/correct_mean"] == pytest.approx(w0)
    assert out["mech/token_weight/incorrect_mean"] == pytest.approx(w1)
    total = 2 * abs(w0) + 4 * abs(w1)
    assert out["mech/weight_share/level_1"] == pytest.approx(2 * abs(w0) / total)
    assert out["mech/weight_share/level_2"] == pytest.approx(4 * abs(w1) / total)
    assert out["mech/adv_share/level_1"] == out["mech/adv_share/level_2"] == 0.5
    assert np.isnan(out["mech/token_weight/correct_len_slope"])  # one row: no slope


def test_length_slope_shows_the_length_bias_and_its_fix():
    mask = np.arange(5)[None, :] < np.array([1, 2, 4])[:, None]  # three wrong answers of 1, 2, 4 tokens, A = -1
    adv, wrong = -np.ones(3), [False] * 3
    biased = mechanism_metrics(adv, mask, "seq-mean-token-mean", None, wrong)
    x, y = np.array([1, 2, 4]), -1 / (3 * np.array([1, 2, 4]))  # -1/(B'|o_i|): the longer, the smaller the penalty
    assert biased["mech/token_weight/incorrect_len_slope"] == pytest.approx(np.polyfit(x, y, 1)[0]) and y[0] < y[2]
    assert biased["mech/token_weight/incorrect_len_slope"] > 0
    fixed = mechanism_metrics(adv, mask, "seq-mean-token-sum-norm", 8.0, wrong)
    assert fixed["mech/token_weight/incorrect_len_slope"] == pytest.approx(0.0, abs=1e-9)
    assert "mech/weight_share/level_1" not in fixed  # no levels given


def test_token_level_advantages_and_padding_rows():
    adv_BxS = np.array([[0, 2.0, 1.0, 0, 0], [0, -1.0, -1.0, -1.0, -1.0], [0, 0, 0, 0, 0]])
    mask = np.vstack([MASK, np.zeros((1, 5), bool)])  # a padding row: no loss tokens, not a real row
    out = mechanism_metrics(adv_BxS, mask, "token-mean", None, correct_B=[True, False], levels_B=[1, 2])
    assert out["mech/token_weight/correct_mean"] == pytest.approx(1.5 / 6)
    assert out["mech/adv_share/level_1"] == pytest.approx(1.5 / 2.5)  # mean |A_it| per row: 1.5 and 1
    assert out["mech/weight_share/level_1"] == pytest.approx(3 / 7)  # Σ|A_it|/6: 3/6 and 4/6
