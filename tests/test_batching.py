"""`Pipeline.run_batch`: requests that agree on everything that shapes the computation run as one batch, with
their own prompts, seeds, negative prompts and images, and each gets the image it gets alone.

Bit for bit where the matrix products treat a row alike whatever rows are beside it. The timestep embedding
and modulation are products of one row per image, where one row takes another kernel than several (about
1 ulp apart): each request's are computed on its own rows (`row_groups`). Each request's text and reference
K/V are computed alone. The per-token products are row-independent in MKL for these shapes with AVX-512
kernels (measured 0 on an Intel Xeon and an AMD EPYC), but Intel MKL's AVX2 kernels round by row count
(ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 on the Xeon: up to 6.3e-7 of
the latents' magnitude), so the test allows 1e-6 of it."""

from __future__ import annotations

import pytest
import torch
from conftest import picture

import fluxforge as ff
from fluxforge.cache import Caches
from fluxforge.pipeline import Limits

COMMON = dict(max_sequence_length=32, width=32, height=32, steps=2, decode=False)
BATCHED = 1e-6  # batched against alone, relative to the latents' magnitude (about 5); see above


def requests(**varying) -> list[ff.GenerationRequest]:
    """Three requests with their own prompts and seeds (one of two images) and these fields per request."""
    prompts = ["a red fox", "a blue bird on a branch", "a green apple"]
    out = []
    for i, prompt in enumerate(prompts):
        own = {name: values[i] for name, values in varying.items()}
        out.append(
            ff.GenerationRequest(prompt=prompt, seed=10 * i, num_images=2 if i == 1 else 1, **own, **COMMON)
        )
    return out


def assert_solo_images(pipe: ff.Pipeline, batch: list[ff.GenerationRequest]) -> list[ff.GenerationResult]:
    results = pipe.run_batch(batch)
    assert len(results) == len(batch)
    alone = ff.Pipeline(pipe.components)  # its own caches: nothing computed for the batch is reused
    for request, result in zip(batch, results, strict=True):
        solo = alone.run(request)
        assert result.latents.shape == solo.latents.shape and result.seeds == solo.seeds
        assert result.info["prompt"] == solo.info["prompt"] and result.info["batch_size"] == len(batch)
        assert (result.latents - solo.latents).abs().max() <= BATCHED * solo.latents.abs().max()
    return results


def test_different_references_of_the_same_sizes(klein_pipeline):
    refs = [[picture(48, 32, s), picture(32, 32, s + 1)] for s in (1, 3, 5)]
    assert_solo_images(klein_pipeline, requests(references=refs))


def test_klein_kv_different_references_one_kv_copy_per_distinct_set(kv_pipeline):
    pipe = ff.Pipeline(kv_pipeline.components)
    pipe.caches = Caches()
    a, b = [picture(48, 32, 1), picture(32, 32, 2)], [picture(48, 32, 3), picture(32, 32, 4)]
    results = assert_solo_images(pipe, requests(references=[a, b, a]))
    assert results[0].info["cache"]["reference_kv"] == {"hits": 0, "misses": 2}  # two distinct sets
    stored = [entry[0] for entry in pipe.caches.reference_kv._entries.values()]
    assert len(stored) == 2 and all(kv.double[0][0].shape[0] == 1 for kv in stored)  # one row each
    again = pipe.run_batch(requests(references=[b, a, b]))
    assert again[0].info["cache"]["reference_kv"] == {"hits": 2, "misses": 0}


def test_img2img_with_different_init_images(klein_pipeline):
    inits = [picture(32, 32, s) for s in (7, 8, 9)]
    assert_solo_images(klein_pipeline, requests(init_image=inits, strength=[0.7] * 3))


def test_inpainting_with_different_images_and_masks(base_pipeline):
    masks = []
    for rows in (slice(0, 16), slice(16, 32), slice(8, 24)):
        mask = torch.zeros(1, 1, 32, 32)
        mask[..., rows, :] = 1
        masks.append(mask)
    inits = [picture(32, 32, s) for s in (11, 12, 13)]
    assert_solo_images(base_pipeline, requests(init_image=inits, mask=masks, guidance=[4.0] * 3))


def test_cfg_with_different_negative_prompts(base_pipeline):
    negatives = ["blurry", "", "low quality, jpeg artefacts"]
    assert_solo_images(base_pipeline, requests(negative_prompt=negatives, guidance=[4.0] * 3))


@pytest.mark.parametrize(
    "change,field",
    [
        (dict(width=48), "width"),
        (dict(steps=3), "steps"),
        (dict(references=[picture(32, 48, 0)]), "reference_sizes"),
        (dict(strength=0.5, init_image=picture(32, 32, 0)), "mode"),
    ],
)
def test_requests_that_shape_the_computation_differently_are_refused(klein_pipeline, change, field):
    ok = ff.GenerationRequest(prompt="a fox", references=[picture(32, 32, 0)], **COMMON)
    other = ff.GenerationRequest(
        **{**dict(prompt="a cat", references=[picture(32, 32, 1)], **COMMON), **change}
    )
    with pytest.raises(ValueError, match=f"requests 0 and 1 cannot run as one batch: they differ in {field}"):
        klein_pipeline.run_batch([ok, other])
    with pytest.raises(ValueError, match="at least one request"):
        klein_pipeline.run_batch([])


def test_each_request_is_checked_against_the_limits_alone(klein_pipeline):
    pipe = ff.Pipeline(klein_pipeline.components)
    pipe.limits = Limits(max_images=2)
    batch = [ff.GenerationRequest(prompt=f"a fox {i}", seed=i, num_images=2, **COMMON) for i in range(3)]
    assert sum(len(r.seeds) for r in pipe.run_batch(batch)) == 6  # 6 images, each request within 2
    too_many = ff.GenerationRequest(prompt="a fox", num_images=3, **COMMON)
    with pytest.raises(ValueError, match="num_images|images"):
        pipe.run_batch([batch[0], too_many])
