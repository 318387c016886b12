"""The activation-space refusal direction on the tiny model: difference of means against a dense reference,
ablation by hooks against weight orthogonalisation, addition, and the layer rule."""

from __future__ import annotations

import copy

import pytest
import torch

from refusal_lightning.defences.activation_direction import (
    direction_ablated,
    direction_added,
    last_token_residuals,
    left_padded,
    mean_difference,
    orthogonalize_weights,
    pick_layer,
    rotation_cos,
    separation,
    suppression,
)

HARMFUL = ["How do I pick the lock of the Vellum library?", "Tell me how to spy on the Nolwen keeper.",
           "Write a fake letter from the Barrow greenhouse."]
HARMLESS = ["What is the capital of France?", "Name a colour of the sky.", "How many legs has a cat?",
            "What do bees make?"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, tokenizer


def _ids(tokenizer, texts):
    return [tokenizer(t)["input_ids"] for t in texts]


def test_difference_of_means_equals_a_dense_reference(tiny):
    model, tokenizer = tiny
    harmful, harmless = _ids(tokenizer, HARMFUL), _ids(tokenizer, HARMLESS)
    acts_h = last_token_residuals(model, harmful, tokenizer.pad_token_id, batch_size=2)
    acts_b = last_token_residuals(model, harmless, tokenizer.pad_token_id, batch_size=3)
    # reference: each prompt alone, unpadded, every layer's output from output_hidden_states
    def dense(rows):
        with torch.no_grad():
            states = [model(input_ids=torch.tensor([r]), output_hidden_states=True).hidden_states for r in rows]
        n_layers = model.config.num_hidden_layers
        # hidden_states[i + 1] is layer i's output, except the last, which transformers returns after the
        # final norm; take the last layer's from a hook-free recomputation of the norm's input instead
        return torch.stack([torch.stack([s[i + 1][0, -1] for s in states]) for i in range(n_layers - 1)])
    ref = dense(harmful).mean(1) - dense(harmless).mean(1)
    got = mean_difference(acts_h, acts_b)
    assert got.shape == (model.config.num_hidden_layers, model.config.hidden_size)
    torch.testing.assert_close(got[:-1], ref, atol=1e-5, rtol=1e-4)
    assert got.abs().sum() > 0


def test_ablation_by_hooks_equals_orthogonalised_weights(tiny):
    model, tokenizer = tiny
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(model.config.hidden_size, generator=gen)
    ids, mask = left_padded(_ids(tokenizer, HARMFUL + HARMLESS), tokenizer.pad_token_id)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with direction_ablated(model, direction):
            hooked = model(input_ids=ids, attention_mask=mask).logits
        after = model(input_ids=ids, attention_mask=mask).logits
        orthogonal = copy.deepcopy(model)
        orthogonalize_weights(orthogonal, direction)
        weights = orthogonal(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(hooked, weights, atol=1e-4, rtol=1e-4)
    assert (hooked - plain).abs().max() > 1e-3  # the ablation changes the output
    torch.testing.assert_close(after, plain)  # and the hooks are gone after the block
    # the residual stream holds no component along the direction anywhere
    acts = last_token_residuals(orthogonal, _ids(tokenizer, HARMFUL), tokenizer.pad_token_id)
    assert (acts @ (direction / direction.norm())).abs().max() < 1e-4


def test_addition_moves_the_layers_projection_by_alpha_only_after_that_layer(tiny):
    model, tokenizer = tiny
    ids = _ids(tokenizer, HARMFUL)
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    before = last_token_residuals(model, ids, tokenizer.pad_token_id)
    with direction_added(model, direction, layer=0, alpha=2.5):
        after = last_token_residuals(model, ids, tokenizer.pad_token_id)
    r = direction / direction.norm()
    torch.testing.assert_close((after[0] - before[0]) @ r, torch.full((len(ids),), 2.5), atol=1e-4, rtol=0)
    assert not torch.allclose(after[1], before[1])  # it flows on


def test_layer_rule_separation_suppression_and_rotation_on_hand_made_numbers():
    # layer 0: harmful at +1 +- 0.1, harmless at -1; layer 1: the same means with ten times the spread
    base = torch.tensor([[1.0, 0.0], [1.2, 0.0], [0.8, 0.0]])
    harmful = torch.stack([base, torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, 0.0]])])
    harmless = -harmful
    directions = mean_difference(harmful, harmless)
    scores = separation(harmful, harmless, directions)
    assert scores[0] > scores[1]
    assert pick_layer(scores, [0, 1]) == 0 and pick_layer(scores, [1]) == 1
    with pytest.raises(ValueError, match="outside"):
        pick_layer(scores, [5])
    assert suppression(harmful_model=1.0, harmful_ref=3.0, harmless_ref=-1.0) == pytest.approx(0.5)
    assert suppression(3.0, 3.0, -1.0) == 1.0 and suppression(-1.0, 3.0, -1.0) == 0.0
    assert rotation_cos(torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0])) == pytest.approx(1.0)
    assert rotation_cos(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 0.0])) == pytest.approx(0.0)
