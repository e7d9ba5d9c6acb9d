"""Token sets: membership (rho, modality floors) and the weight shaping knobs, against hand-computed values."""

import pytest
import torch

from tlq_vllm.calibrate.cli import config_from_args, main
from tlq_vllm.calibrate.context import token_options
from tlq_vllm.calibrate.data import ROLE_ANSWER, ROLE_PROMPT, ROLE_VISION
from tlq_vllm.calibrate.tokensets import (
    WeightShaping,
    effective_tokens,
    equalise_samples,
    floor_modality_weights,
    select_tokens,
    shrink_to_uniform,
    temper,
)

P, V, A = ROLE_PROMPT, ROLE_VISION, ROLE_ANSWER


def roles_of(*codes):
    return torch.tensor(codes, dtype=torch.int8)


# Two samples, 9 tokens. rho 0.3 keeps ceil(2.7) = 3 tokens over all samples: scores 6, 5, 4.
SCORES = [torch.tensor([5.0, 1.0, 2.0, 3.0, 4.0]), torch.tensor([0.5, 6.0, 0.25, 0.75])]
ROLES = [roles_of(P, V, V, V, A), roles_of(P, V, V, A)]


def test_rho_keeps_the_top_fraction_of_all_tokens_over_samples():
    kept = select_tokens(SCORES, ROLES, rho=0.3, modality_floor=0.0)
    assert [i.tolist() for i in kept.indices] == [[0, 4], [1]]
    mean = (5 + 4 + 6) / 3
    assert torch.allclose(torch.cat(kept.weights), torch.tensor([5, 4, 6]) / mean)


def test_modality_floor_adds_each_samples_best_vision_and_text_tokens():
    # floor 0.5: sample 0 keeps ceil(1.5) = 2 of its 3 vision tokens (scores 3, 2) and 1 of its 2 text
    # tokens (score 5, already kept); sample 1 keeps 1 vision (6, kept) and 1 text token: the answer (0.75)
    kept = select_tokens(SCORES, ROLES, rho=0.3, modality_floor=0.5)
    assert [i.tolist() for i in kept.indices] == [[0, 2, 3, 4], [1, 3]]
    assert kept.num_tokens == 6
    mean = (5 + 2 + 3 + 4 + 6 + 0.75) / 6
    expected = torch.tensor([5, 2, 3, 4, 6, 0.75]) / mean
    assert torch.allclose(torch.cat(kept.weights), expected)
    assert torch.cat(kept.weights).mean().item() == pytest.approx(1.0)


def test_temper_compresses_ratios_and_power_zero_is_uniform():
    assert torch.equal(temper([torch.tensor([4.0, 1.0])], 0.5)[0], torch.tensor([2.0, 1.0]))
    assert torch.equal(temper([torch.tensor([4.0, 0.0])], 0.0)[0], torch.tensor([1.0, 1.0]))


def test_shrinkage_blends_mean_one_weights_with_uniform():
    # mean 4/3: [2.25, 0.75], [0]; 0.8 w + 0.2
    out = shrink_to_uniform([torch.tensor([3.0, 1.0]), torch.tensor([0.0])], 0.2)
    assert torch.allclose(out[0], torch.tensor([2.0, 0.8]))
    assert torch.allclose(out[1], torch.tensor([0.2]))


def test_per_sample_normalisation_gives_every_sample_the_same_total():
    # total 6 over 2 samples: each sample sums to 3
    out = equalise_samples([torch.tensor([3.0, 1.0]), torch.tensor([2.0]), torch.tensor([0.0])])
    target = 6 / 3
    assert torch.allclose(out[0], torch.tensor([3.0, 1.0]) * target / 4)
    assert torch.allclose(out[1], torch.tensor([target]))
    assert torch.equal(out[2], torch.tensor([0.0]))  # nothing to scale


def test_modality_weight_floor_raises_a_starved_modality_and_keeps_the_sample_total():
    roles = [roles_of(V, V, P, A), roles_of(V, V, P, A), roles_of(P, A)]
    indices = [torch.tensor([0, 1, 3]), torch.tensor([0, 1, 3]), torch.tensor([0, 1])]
    weights = [torch.tensor([0.1, 0.1, 9.8]), torch.tensor([0.0, 0.0, 5.0]), torch.tensor([1.0, 3.0])]
    out = floor_modality_weights(weights, indices, roles, 0.4)
    # sample 0: vision is half the tokens, so it must carry 0.4 * 0.5 * 10 = 2 of the total 10: x10;
    # the answer token carries the remaining 8
    assert torch.allclose(out[0], torch.tensor([1.0, 1.0, 8.0]))
    # sample 1: vision has weight 0, so its kept tokens share the floor 0.4 * 0.5 * 5 = 1 equally
    assert torch.allclose(out[1], torch.tensor([0.5, 0.5, 4.0]))
    # sample 2 has no vision tokens; its text tokens hold everything already
    assert torch.equal(out[2], weights[2])
    # a modality above its floor is left alone
    assert torch.equal(floor_modality_weights([torch.tensor([3.0, 1.0])], [torch.tensor([0, 1])],
                                              [roles_of(V, A)], 0.4)[0], torch.tensor([3.0, 1.0]))


def test_select_tokens_applies_power_before_shrinkage():
    roles = [roles_of(P, A)]
    shaping = WeightShaping(power=0.5, shrinkage=0.5)
    kept = select_tokens([torch.tensor([4.0, 1.0])], roles, rho=1.0, shaping=shaping)
    # sqrt -> [2, 1]; mean 1.5 -> [4/3, 2/3]; 0.5 w + 0.5 -> [7/6, 5/6] (shrinking first would give 1.14, 0.86)
    assert torch.allclose(kept.weights[0], torch.tensor([7 / 6, 5 / 6]))


def test_select_tokens_shapes_weights_in_the_documented_order_and_keeps_membership():
    shaping = WeightShaping(power=0.5, shrinkage=0.1, per_sample=True, modality_weight_floor=0.5)
    plain = select_tokens(SCORES, ROLES, rho=0.3, modality_floor=0.5)
    shaped = select_tokens(SCORES, ROLES, rho=0.3, modality_floor=0.5, shaping=shaping)
    assert [i.tolist() for i in shaped.indices] == [i.tolist() for i in plain.indices]
    raw = [s[i] for s, i in zip(SCORES, plain.indices, strict=True)]
    w = floor_modality_weights(equalise_samples(shrink_to_uniform(temper(raw, 0.5), 0.1)), plain.indices, ROLES, 0.5)
    mean = torch.cat(w).mean()
    for got, want in zip(shaped.weights, w, strict=True):
        assert torch.allclose(got, want / mean)


def test_effective_tokens():
    assert effective_tokens([torch.ones(4)]) == pytest.approx(4)
    assert effective_tokens([torch.tensor([2.0]), torch.tensor([1.0, 1.0])]) == pytest.approx(16 / 6)
    assert effective_tokens([torch.tensor([1.0, 0.0, 0.0])]) == pytest.approx(1)


def test_every_knob_spreads_heavy_tailed_weights():
    """On heavy-tailed scores (one token 1000x the others, as the answer-predicting position is),
    each knob raises the effective token count above the plain weights'."""
    scores = [torch.tensor([1000.0, 1.0, 2.0, 1.0]), torch.tensor([1.0, 3.0, 1.0])]
    roles = [roles_of(P, V, V, A), roles_of(V, V, A)]
    plain = effective_tokens(select_tokens(scores, roles, rho=1.0).weights)
    assert plain < 1.1
    for shaping in (WeightShaping(power=0.5), WeightShaping(shrinkage=0.5), WeightShaping(per_sample=True),
                    WeightShaping(modality_weight_floor=0.5)):
        assert effective_tokens(select_tokens(scores, roles, rho=1.0, shaping=shaping).weights) > 1.3 * plain


def test_shaping_flags_reach_the_token_options():
    config = config_from_args(["--importance-power", "0.5", "--weight-shrinkage", "0.25", "--per-sample-weights",
                               "--modality-weight-floor", "0.3"]).validate()
    assert token_options(config).shaping == WeightShaping(0.5, 0.25, True, 0.3)
    assert token_options(config_from_args([]).validate()).shaping == WeightShaping()


@pytest.mark.parametrize("flag, value", [("--importance-power", "1.5"), ("--weight-shrinkage", "-0.1"),
                                         ("--modality-weight-floor", "2")])
def test_out_of_range_shaping_is_one_error_line(tmp_path, capsys, flag, value):
    out = tmp_path / "out"
    code = main(["--model", "fixture:qwen2-vl", "--output", str(out), "--no-progress", flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {flag} must be in [0, 1]")
    assert not out.exists()


def test_a_recipe_sets_the_shaping_knobs(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("importance-power: 0.25\nper-sample-weights: true\n")
    config = config_from_args(["--recipe", str(recipe), "--weight-shrinkage", "0.5"]).validate()
    assert token_options(config).shaping == WeightShaping(power=0.25, shrinkage=0.5, per_sample=True)
