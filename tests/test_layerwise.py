"""Layer-wise pieces against closed-form references."""

import torch

from tlq_vllm.calibrate.gptq import weighted_hessian
from tlq_vllm.calibrate.layerwise import asymmetric_target


def test_asymmetric_target_is_the_least_squares_map_from_quantized_to_fp_inputs():
    """W' = argmin_M sum_t w_t ||M x~_t - W x_t||^2, checked against torch.linalg.lstsq (float64)."""
    torch.manual_seed(0)
    n, d_in, d_out = 400, 32, 16
    x_fp = torch.randn(n, d_in, dtype=torch.float64)
    x_q = x_fp + 0.05 * torch.randn(n, d_in, dtype=torch.float64)  # the quantized path's inputs
    w = torch.rand(n, dtype=torch.float64) + 0.1
    weight = torch.randn(d_out, d_in, dtype=torch.float64)
    hessian = weighted_hessian(x_q, w, dtype=torch.float64)
    cross = 2 * (x_fp * w[:, None]).T @ x_q
    got = asymmetric_target(weight, hessian, cross, damp=1e-12)
    sw = w.sqrt()[:, None]
    expected = torch.linalg.lstsq(x_q * sw, (x_fp @ weight.T) * sw).solution.T  # [out, in]
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8)
    # identical paths: the target is W itself
    same = asymmetric_target(weight, hessian, 2 * (x_q * w[:, None]).T @ x_q, damp=1e-12)
    torch.testing.assert_close(same, weight, rtol=1e-6, atol=1e-8)
