"""The gradient baseline (export/gradient_ti.py) on the tiny model: its loss is edge-ti's, and it moves only the token."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import edge_ti  # noqa: E402
from edge_ti.denoiser import Denoiser
from edge_ti import latents as lat  # noqa: E402
from edge_ti import objective  # noqa: E402
from edge_ti_export import gradient_ti  # noqa: E402


def test_loss_equals_edge_ti_objective(tiny_sd, concept_dir):
    """Same latents, noise, timesteps and prompts: torch's loss = objective.population_loss."""
    source, onnx_dir = tiny_sd
    model = edge_ti.open_model(onnx_dir)
    pixels = lat.load_images([concept_dir], model.resolution, flip=True)          # (6, 3, 32, 32)
    latents = lat.encode_images(model, pixels)                                      # (6, 4, 16, 16)
    prompts = [t.format("<t>") for t in gradient_ti.OBJECT_TEMPLATES[:5]]
    triples = objective.draw_triples(np.random.default_rng(3), 6, len(latents), len(prompts), 1000,
                                     latents.shape[1:])
    e = np.random.default_rng(4).normal(0, 0.5, (2, model.hidden_size)).astype(np.float32)  # 2 vectors
    ids = model.tokenize(prompts, {"<t>": e})
    expected = objective.population_loss(Denoiser(model), e[None], ids, latents, triples)[0]

    components = gradient_ti.load_components(source)
    gradient_ti.add_placeholder(components, "<t>", init_embedding=e, vectors=2)
    input_ids = gradient_ti.prompt_ids(components["tokenizer"],
                                       [prompts[k].replace("<t>", "<t> <t>_1") for k in triples.prompt_index])
    with torch.no_grad():
        loss = gradient_ti.denoising_loss(components, input_ids, torch.from_numpy(latents[triples.latent_index]),
                                          torch.from_numpy(triples.noise), torch.from_numpy(triples.timesteps))
    assert float(loss) == pytest.approx(expected, rel=1e-4)


def test_a_few_steps_move_only_the_token_rows(tiny_sd, concept_dir):
    source, _ = tiny_sd
    components = gradient_ti.load_components(source)
    before = components["text_encoder"].get_input_embeddings().weight.detach().clone()   # (V, D)
    unet_before = [p.detach().clone() for p in components["unet"].parameters()]
    seen = []
    settings = gradient_ti.GradientSettings(vectors=2, batch=2, max_steps=3, lr=5e-2, seed=0)
    result = gradient_ti.train(source, [concept_dir], "<t>", init_word="cat", settings=settings,
                               snapshot_steps=[1], on_step=lambda record, rows: seen.append(record["step"]),
                               components=components)
    after = components["text_encoder"].get_input_embeddings().weight.detach()            # (V + 2, D)
    V = before.shape[0]
    assert result.steps == 3 and result.samples == 6 and seen == [1, 2, 3]
    assert torch.equal(after[:V], before)                      # the vocabulary is restored every step
    assert not np.allclose(after[V:].numpy(), result.init)    # the two token rows moved
    assert np.array_equal(result.embedding["<t>"], after[V:].numpy())
    assert all(torch.equal(a, b) for a, b in zip(components["unet"].parameters(), unet_before))
    assert [s.step for s in result.snapshots] == [1, 3] and len(result.losses) == 3
    # init from the word: the mean of its token rows, for each vector
    word_ids = components["tokenizer"].encode("cat", add_special_tokens=False)
    assert np.allclose(result.init, before[word_ids].mean(0).numpy()[None].repeat(2, 0))


def test_anchor_keeps_the_init_words_row(tiny_sd, concept_dir):
    """GradientSettings(anchor=True): one more token row, the init word's, restored every step like the vocabulary's."""
    source, _ = tiny_sd
    components = gradient_ti.load_components(source)
    settings = gradient_ti.GradientSettings(batch=2, max_steps=3, lr=5e-2, seed=0, anchor=True)
    result = gradient_ti.train(source, [concept_dir], "<t>", init_word="cat", settings=settings, components=components)
    learned = result.embedding["<t>"]                                                      # (2, D)
    assert learned.shape[0] == 2
    np.testing.assert_array_equal(learned[1], result.init[1])     # the anchor: the word's row, untouched
    assert not np.allclose(learned[0], result.init[0])           # the searched row moved


def test_norm_cap_keeps_the_token_within_the_vocabularys_longest_row(tiny_sd, concept_dir):
    """GradientSettings(norm_cap=True): a step that would leave the vocabulary's norms is projected back; without it
    the same steps leave them (so the test can fail)."""
    source, _ = tiny_sd
    lengths = {}
    for cap in (False, True):
        components = gradient_ti.load_components(source)
        table = components["text_encoder"].get_input_embeddings().weight.detach()
        longest = float(table.norm(dim=1).max())
        settings = gradient_ti.GradientSettings(vectors=2, batch=2, max_steps=3, lr=5.0, seed=0, norm_cap=cap)
        result = gradient_ti.train(source, [concept_dir], "<t>", init_word="cat", settings=settings,
                                   components=components)
        lengths[cap] = np.linalg.norm(result.embedding["<t>"], axis=1) / longest
    assert lengths[False].max() > 1.01
    assert lengths[True].max() <= 1 + 1e-5 and lengths[True].max() > 0.99
