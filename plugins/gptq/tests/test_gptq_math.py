import torch


def test_stacked_siblings_get_the_codes_each_would_get_alone():
    """q/k/v (gate/up) share one Hessian: the plugin sweeps their stacked rows once and splits the result."""
    from slimquant_gptq.gptq import GPTQSettings, gptq_quantize
    from slimquant_gptq.plugin import split_rows

    torch.manual_seed(0)
    x = torch.randn(512, 64)
    hessian = x.t() @ x
    weights = [torch.randn(rows, 64) for rows in (64, 16, 16)]
    settings = GPTQSettings(bits=4, symmetric=False, group_size=16, act_order=True, mse=True, block_size=32)
    alone = [gptq_quantize(w, hessian, settings) for w in weights]
    together = split_rows(gptq_quantize(torch.cat(weights), hessian, settings), [64, 16, 16])
    for a, b in zip(alone, together, strict=True):
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)
        assert (a.g_idx is None) == (b.g_idx is None) and (a.g_idx is None or torch.equal(a.g_idx, b.g_idx))
