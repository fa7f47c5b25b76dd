"""Decoder-layer inputs kept from a user's forward calls replay statelessly (no cache, no foreign mask)."""

import pytest
import torch
from tiny_models import ARCHS, tiny_model, token_samples
from transformers.cache_utils import DynamicCache

from slimquant.model.structure import find_decoder_layers
from slimquant.runtime.layer_inputs import NotReplayable, first_sample, leading_samples, leading_tokens, stateless_input


def _first_layer_calls(model, run):
    calls = []
    _, layers = find_decoder_layers(model)
    handle = layers[0].register_forward_pre_hook(lambda m, a, k: calls.append((a, dict(k))), with_kwargs=True)
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return layers[0], calls


@pytest.mark.parametrize("key", ["cache", "past_key_values", "past_key_value", "some_new_name"])
def test_every_cache_object_is_dropped_whatever_its_name(key):
    hidden = torch.randn(1, 5, 8)
    args, kwargs = stateless_input((hidden,), {key: DynamicCache(), "use_cache": True, "position_ids": None})
    assert key not in kwargs and kwargs["use_cache"] is False
    assert args[0] is not hidden or not hidden.requires_grad


def test_a_mask_over_cached_keys_or_a_later_position_is_refused():
    hidden = torch.randn(1, 1, 8)
    with pytest.raises(NotReplayable, match="key positions"):
        stateless_input((hidden,), {"attention_mask": torch.zeros(1, 1, 1, 9)})
    with pytest.raises(NotReplayable, match="position 8"):
        stateless_input((hidden,), {"cache_position": torch.tensor([8])})


@pytest.mark.parametrize("arch", ARCHS)
def test_inputs_of_a_cached_forward_replay_like_a_fresh_one(arch):
    """The user's forward runs with the model's default use_cache; replaying the kept input twice, and after a
    second call of another length, gives the output of the original call."""
    model = tiny_model(arch)
    long, short = token_samples(1, 32, seed=1)[0], token_samples(1, 16, seed=2)[0]
    layer, calls = _first_layer_calls(model, lambda: (model(long, use_cache=True), model(short, use_cache=True)))
    kept = stateless_input(*calls[0])
    with torch.no_grad():
        first = layer(*kept[0], **kept[1])
        again = layer(*kept[0], **kept[1])
    first = first[0] if isinstance(first, tuple) else first
    again = again[0] if isinstance(again, tuple) else again
    assert first.shape[-2] == 32
    assert torch.equal(first, again)


def test_paddleslim_smooth_keeps_a_full_forward_not_a_generation_step():
    pytest.importorskip("slimquant_smoothquant")
    from slimquant.compat.paddleslim import Smooth

    model = tiny_model("llama")
    ids = token_samples(1, 12, seed=3)[0]
    with torch.no_grad():
        reference = model(ids).logits
    smooth = Smooth(model, alpha=0.5)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        smooth.step += 1
    smooth.update_weight()
    with torch.no_grad():
        after = model(ids).logits
    assert (after - reference).norm() / reference.norm() < 1e-4


def test_first_sample_cuts_every_per_sample_tensor_and_shares_the_rest():
    hidden = torch.randn(4, 8, 16)
    cos, sin = torch.randn(1, 8, 4), torch.randn(4, 8, 4)
    mask = torch.zeros(4, 1, 8, 8)
    args, kwargs = first_sample(((hidden,), {"attention_mask": mask, "position_embeddings": (cos, sin),
                                             "cache_position": torch.arange(8), "use_cache": False}))
    assert torch.equal(args[0], hidden[:1])
    assert kwargs["attention_mask"].shape == (1, 1, 8, 8)
    assert kwargs["position_embeddings"][0] is cos and torch.equal(kwargs["position_embeddings"][1], sin[:1])
    assert kwargs["cache_position"].shape == (8,) and kwargs["use_cache"] is False
    single = ((hidden[:1],), {"attention_mask": None})
    assert first_sample(single) is single


def test_leading_samples_keeps_the_first_rows_of_a_batch():
    hidden = torch.randn(4, 8, 16)
    args, kwargs = leading_samples(((), {"hidden_states": hidden, "attention_mask": torch.zeros(4, 1, 8, 8)}), 3)
    assert args == () and torch.equal(kwargs["hidden_states"], hidden[:3])
    assert kwargs["attention_mask"].shape == (3, 1, 8, 8)
    whole = ((hidden,), {})
    assert leading_samples(whole, 4) is whole and leading_samples(whole, 9) is whole


@pytest.mark.parametrize("arch", ARCHS)
def test_leading_tokens_give_the_first_rows_of_the_full_output(arch):
    from slimquant.runtime.context import hidden_of

    model = tiny_model(arch)
    layer, calls = _first_layer_calls(model, lambda: model(token_samples(1, 40)[0]))
    full = stateless_input(*calls[0])
    short = leading_tokens(full, 16)
    assert leading_tokens(full, 40) is full
    with torch.no_grad():
        expected = hidden_of(layer(*full[0], **full[1]))[:, :16]
        out = hidden_of(layer(*short[0], **short[1]))
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_the_smoothing_guard_checks_on_the_leading_tokens_when_they_agree(monkeypatch):
    from slimquant import smoothing
    from slimquant.runtime.context import LayerContext

    model = tiny_model("llama")
    layer, calls = _first_layer_calls(model, lambda: model(token_samples(1, 96)[0]))
    ctx = LayerContext(0, "model.layers.0", layer, torch.device("cpu"), {}, {}, [stateless_input(*calls[0])])
    guard = smoothing.Guard(ctx, "test")
    assert guard.check_input[0][0].shape[1] == smoothing.GUARD_TOKENS == guard.reference.shape[1]

    def off_by_one(inp, count):  # a cut whose output is not the first rows of the full one
        args, kwargs = leading_tokens(inp, count)
        return (inp[0][0][:, 1:count + 1], *args[1:]), kwargs

    monkeypatch.setattr(smoothing, "leading_tokens", off_by_one)
    assert smoothing.Guard(ctx, "test").check_input[0][0].shape[1] == 96  # so the whole sample stays
