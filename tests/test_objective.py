"""The population loss equals diffusers' textual-inversion loss computed with torch."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline

import edge_ti
from edge_ti.denoiser import Denoiser, alphas_cumprod
from edge_ti import latents as lat
from edge_ti import objective


@pytest.mark.parametrize("which", ["tiny_sd", "tiny_sd_v"])
def test_loss_matches_diffusers(which, request, tmp_path):
    source, onnx_dir = request.getfixturevalue(which)
    model = edge_ti.open_model(onnx_dir)
    rng = np.random.default_rng(0)
    P, n, D = 3, 2, model.hidden_size
    candidates = rng.normal(0, 0.05, (P, n, D)).astype(np.float32)
    token = "<t>"
    prompts = ["a photo of a <t>", "a rendition of the <t>", "a <t> on a table"]
    prompt_ids = model.tokenize(prompts, {token: candidates[0]})
    pixels = rng.uniform(-1, 1, (2, 3, model.resolution, model.resolution)).astype(np.float32)
    latents = lat.encode_images(model, pixels)
    # two triples share a timestep, so the per-timestep UNet batching is exercised
    triples = objective.Triples(latent_index=np.array([0, 1, 1, 0]), prompt_index=np.array([0, 2, 1, 2]),
                                timesteps=np.array([10, 500, 10, 999]),
                                noise=rng.standard_normal((4, *latents.shape[1:]), dtype=np.float32))
    ours = objective.population_loss(Denoiser(model), candidates, prompt_ids, latents, triples, max_batch=4)
    weighted = dataclasses.replace(triples, weight=Denoiser(model).eps_weight(triples.timesteps))
    ours_eps = objective.population_loss(Denoiser(model), candidates, prompt_ids, latents, weighted, max_batch=4)

    pipe = StableDiffusionPipeline.from_pretrained(source)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    path = str(tmp_path / "t.safetensors")
    edge_ti.save_embedding(path, {token: candidates[0]})
    pipe.load_textual_inversion(path)
    ids = pipe.tokenizer([pipe.maybe_convert_prompt(p, pipe.tokenizer) for p in prompts], padding="max_length",
                         max_length=77, truncation=True, return_tensors="pt").input_ids
    V = model.vocab_size
    with torch.no_grad():
        # the reference VAE latents: mean of the latent distribution x scaling factor
        ref_latents = pipe.vae.encode(torch.from_numpy(pixels)).latent_dist.mean * pipe.vae.config.scaling_factor
        assert np.abs(ref_latents.numpy() - latents).max() <= 1e-4 * np.abs(latents).max()
        for p in range(P):
            pipe.text_encoder.get_input_embeddings().weight[V:V + n] = torch.from_numpy(candidates[p])
            x0 = ref_latents[triples.latent_index]
            noise = torch.from_numpy(triples.noise)
            t = torch.from_numpy(triples.timesteps)
            noisy = scheduler.add_noise(x0, noise, t)
            target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
            hidden = pipe.text_encoder(ids[triples.prompt_index])[0]
            pred = pipe.unet(noisy, t, hidden).sample
            want = F.mse_loss(pred.float(), target.float(), reduction="mean").item()
            assert abs(ours[p] - want) <= 1e-4 * abs(want), (p, ours[p], want)
            # in epsilon units: the noise the prediction implies (eps itself, or from v and x_t)
            a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
            v_model = scheduler.config.prediction_type == "v_prediction"
            eps_hat = a.sqrt() * pred + (1 - a).sqrt() * noisy if v_model else pred
            want_eps = F.mse_loss(eps_hat.float(), noise.float(), reduction="mean").item()
            assert abs(ours_eps[p] - want_eps) <= 1e-4 * abs(want_eps), (p, ours_eps[p], want_eps)
    assert np.ptp(ours) > 0  # different candidates, different losses


def test_alphas_cumprod_schedules():
    for config in ({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
                   {"beta_schedule": "linear"}, {"beta_schedule": "squaredcos_cap_v2"},
                   {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                    "rescale_betas_zero_snr": True}):
        want = DDPMScheduler(**config).alphas_cumprod.numpy()
        assert np.allclose(alphas_cumprod(config), want, rtol=1e-5, atol=1e-7), config
