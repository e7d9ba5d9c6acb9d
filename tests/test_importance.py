"""Pure importance functions: integration, token selection and the modality-level ablation."""

import torch

from tlq_vllm.calibrate.data import ROLE_ANSWER, ROLE_PROMPT, ROLE_VISION
from tlq_vllm.calibrate.importance import modality_average
from tlq_vllm.calibrate.tokensets import select_tokens


def test_modality_average_replaces_each_token_by_its_modality_mean_over_all_samples():
    roles = [
        torch.tensor([ROLE_PROMPT, ROLE_VISION, ROLE_VISION, ROLE_ANSWER], dtype=torch.int8),
        torch.tensor([ROLE_VISION, ROLE_PROMPT, ROLE_ANSWER], dtype=torch.int8),
    ]
    scores = [{"q_proj": [torch.tensor([1.0, 2.0, 4.0, 8.0]), torch.tensor([6.0, 3.0, 10.0])]}]
    out = modality_average(scores, roles)[0]["q_proj"]
    # vision: (2 + 4 + 6) / 3 = 4; prompt: (1 + 3) / 2 = 2; answer: (8 + 10) / 2 = 9
    assert torch.equal(out[0], torch.tensor([2.0, 4.0, 4.0, 9.0]))
    assert torch.equal(out[1], torch.tensor([4.0, 2.0, 9.0]))


def test_rho_one_keeps_every_token_with_weights_of_mean_one():
    roles = [torch.tensor([ROLE_PROMPT, ROLE_VISION, ROLE_ANSWER], dtype=torch.int8)]
    kept = select_tokens([torch.tensor([1.0, 2.0, 3.0])], roles, rho=1.0)
    assert kept.num_tokens == 3
    assert torch.allclose(torch.cat(kept.weights), torch.tensor([0.5, 1.0, 1.5]))
