"""LoRA and LoKr against diffusers 0.42.1's `load_lora_weights` (fp32, tiny random transformer), one file per
trainer layout built here in that trainer's key layout; strict matching; unload, fuse and the caches."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch
from diffusers import Flux2KleinPipeline
from peft.tuners.lokr.layer import factorization
from safetensors.torch import save_file
from test_transformer import diffusers_call, inputs, ours_from
from tiny import tiny_diffusers_transformer

from fluxforge.bfl import transformer_source
from fluxforge.lora import LoraError, LoraSet, read_lora

TOL = 1e-5
DIT = dict(guidance_embeds=True)  # every Linear of the architecture exists, the guidance embedder too


def linears(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def in_blocks(name: str) -> bool:
    return name.startswith(("transformer_blocks.", "single_transformer_blocks."))


def rand(*shape, gen, std=0.3):
    return torch.randn(*shape, generator=gen) * std


def diffusers_lora(model, rank=3, seed=5, where=lambda n: True):
    """lora_A / lora_B per Linear of `model`, under its diffusers module names."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in linears(model).items():
        if where(name):
            out[f"{name}.lora_A.weight"] = rand(rank, m.in_features, gen=gen)
            out[f"{name}.lora_B.weight"] = rand(m.out_features, rank, gen=gen)
    return out


def bfl_modules(model, skip=("final_layer.adaLN_modulation.1",)) -> dict[str, tuple[int, int]]:
    """BFL module name -> (rows, in) of the (fused) weight it names."""
    out: dict[str, tuple[int, int]] = {}
    for name, m in linears(model).items():
        key = transformer_source(f"{name}.weight").key.removesuffix(".weight")
        if key in skip:
            continue
        rows, width = out.get(key, (0, m.in_features))
        out[key] = (rows + m.out_features, width)
    return out


def bfl_lora(model, rank=3, seed=6, down_up=False, alpha=None, prefix="diffusion_model.", where=None):
    gen = torch.Generator().manual_seed(seed)
    a, b = ("lora_down", "lora_up") if down_up else ("lora_A", "lora_B")
    out = {}
    for key, (rows, width) in bfl_modules(model).items():
        if where is not None and not where(key):
            continue
        name = prefix + (key.replace(".", "_") if prefix == "lora_unet_" else key)
        out[f"{name}.{a}.weight"] = rand(rank, width, gen=gen)
        out[f"{name}.{b}.weight"] = rand(rows, rank, gen=gen)
        if alpha is not None:
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def lokr_factors(rows, width, rank, gen, decompose_w1=False):
    """LyCORIS factors for a [rows, width] weight as peft factorizes it; w2 rank-decomposed."""
    out_l, out_k = factorization(rows, -1)
    in_m, in_n = factorization(width, -1)
    parts = {}
    if decompose_w1:
        parts["lokr_w1_a"], parts["lokr_w1_b"] = rand(out_l, rank, gen=gen), rand(rank, in_m, gen=gen)
    else:
        parts["lokr_w1"] = rand(out_l, in_m, gen=gen)
    parts["lokr_w2_a"], parts["lokr_w2_b"] = rand(out_k, rank, gen=gen), rand(rank, in_n, gen=gen)
    return parts


KOHYA_TOP = ("img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "final_layer.linear")


def layouts(ref) -> dict[str, dict[str, torch.Tensor]]:
    """One file per layout that diffusers reads for FLUX.2, each over the layers that layout covers there."""
    gen = torch.Generator().manual_seed(11)
    lycoris, bare, bfl_lokr = {}, {}, {}
    for name, m in linears(ref).items():
        if in_blocks(name):
            for part, t in lokr_factors(m.out_features, m.in_features, 2, gen).items():
                lycoris[f"lycoris_{name.replace('.', '_')}.{part}"] = t
            lycoris[f"lycoris_{name.replace('.', '_')}.alpha"] = torch.tensor(3.0)
            # rank 1, as peft decomposes w1 only where the rank is under half its sides (4 x 4 here)
            for part, t in lokr_factors(m.out_features, m.in_features, 1, gen, decompose_w1=True).items():
                bare[f"{name}.{part}"] = t
    for key, (rows, width) in bfl_modules(ref).items():
        if key.startswith(("double_blocks", "single_blocks")):
            for part, t in lokr_factors(rows, width, 2, gen).items():
                bfl_lokr[f"diffusion_model.{key}.{part}"] = t
            bfl_lokr[f"diffusion_model.{key}.alpha"] = torch.tensor(4.0)
    blocks_and_kohya_top = lambda k: k.startswith(("double_blocks", "single_blocks")) or k in KOHYA_TOP  # noqa: E731
    return {
        "diffusers": {f"transformer.{k}": v for k, v in diffusers_lora(ref).items()},
        "peft": {f"base_model.model.{k}": v for k, v in diffusers_lora(ref, where=in_blocks).items()},
        "ai-toolkit": bfl_lora(ref),
        "ai-toolkit, diffusers names": {
            f"diffusion_model.{k}": v for k, v in diffusers_lora(ref, seed=8, where=in_blocks).items()
        },
        "kohya": bfl_lora(
            ref, rank=4, alpha=2.0, down_up=True, prefix="lora_unet_", where=blocks_and_kohya_top
        ),
        "lycoris lokr": lycoris,
        "simpletuner lokr": bare,
        "peft lokr": {f"transformer.{k}": v for k, v in bare.items()},
        "ai-toolkit lokr": bfl_lokr,
    }


@pytest.fixture(scope="module")
def files():
    return layouts(tiny_diffusers_transformer(**DIT))


def run_ours(model, x):
    with torch.no_grad():
        return model(x["img"], x["txt"], x["timestep"], x["img_ids"], x["txt_ids"], torch.tensor([3.5, 5.0]))


def diffusers_with(state, metadata=None, **load):
    """diffusers' transformer (the same random weights) after load_lora_weights of `state`."""
    ref = tiny_diffusers_transformer(**DIT)
    pipe = Flux2KleinPipeline(transformer=ref, vae=None, text_encoder=None, tokenizer=None, scheduler=None)
    pipe.load_lora_weights(dict(state), **load)
    return pipe


def ours_with(state, metadata=None, scale=1.0):
    model = ours_from(tiny_diffusers_transformer(**DIT))
    loras = LoraSet(model)
    loras.add(read_lora(state, model, "a", metadata), scale)
    return model, loras


@pytest.mark.parametrize("layout", list(layouts(tiny_diffusers_transformer(**DIT))))
def test_each_layout_matches_diffusers(files, layout):
    state = files[layout]
    x = inputs(2, refs=1)
    pipe = diffusers_with(state)
    expected = diffusers_call(pipe.transformer, x, torch.tensor([3.5, 5.0]))[0]
    model, loras = ours_with(state)
    adapter = loras.loaded["a"]
    assert adapter.kind == ("lokr" if "lokr" in layout else "lora")
    got = run_ours(model, x)
    base = run_ours(ours_from(tiny_diffusers_transformer(**DIT)), x)
    assert (got - base).abs().max() > 1e-2  # the LoRA does something
    assert (got - expected).abs().max() <= TOL


def test_metadata_alpha_and_rank_pattern_as_diffusers(tmp_path):
    ref = tiny_diffusers_transformer(**DIT)
    state = {f"transformer.{k}": v for k, v in diffusers_lora(ref, rank=4).items()}
    # one module of another rank: rank_pattern and alpha_pattern name it
    gen = torch.Generator().manual_seed(3)
    state["transformer.proj_out.lora_A.weight"] = rand(2, 32, gen=gen)
    state["transformer.proj_out.lora_B.weight"] = rand(4, 2, gen=gen)
    targets = sorted({k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in state})
    config = {"r": 4, "lora_alpha": 8, "rank_pattern": {"proj_out": 2}, "alpha_pattern": {"proj_out": 1}}
    config["target_modules"] = targets
    meta = {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    path = tmp_path / "meta.safetensors"
    save_file(state, path, metadata={"format": "pt", **meta})
    x = inputs(2)
    pipe = Flux2KleinPipeline(transformer=ref, vae=None, text_encoder=None, tokenizer=None, scheduler=None)
    pipe.load_lora_weights(str(path))
    expected = diffusers_call(pipe.transformer, x, torch.tensor([3.5, 5.0]))[0]
    model = ours_from(tiny_diffusers_transformer(**DIT))
    loras = LoraSet(model)
    loras.add(read_lora(path, model))
    assert (run_ours(model, x) - expected).abs().max() <= TOL


def test_two_adapters_with_scales_and_fusing_match_diffusers(files):
    a, b = files["diffusers"], files["kohya"]
    x = inputs(2)
    pipe = diffusers_with(a, adapter_name="a")
    pipe.load_lora_weights(dict(b), adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, -0.4])
    expected = diffusers_call(pipe.transformer, x, torch.tensor([3.5, 5.0]))[0]
    model = ours_from(tiny_diffusers_transformer(**DIT))
    loras = LoraSet(model)
    loras.add(read_lora(a, model, "a"), 0.7)
    loras.add(read_lora(b, model, "b"), -0.4)
    assert (run_ours(model, x) - expected).abs().max() <= TOL

    pipe.fuse_lora()
    fused_expected = diffusers_call(pipe.transformer, x, torch.tensor([3.5, 5.0]))[0]
    original = {k: v.clone() for k, v in model.state_dict().items()}
    loras.fuse()
    assert loras.fused == {"a": 0.7, "b": -0.4}
    assert (run_ours(model, x) - fused_expected).abs().max() <= TOL
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in original.items())
    loras.unfuse()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original.items())  # bit for bit


def test_unload_restores_the_model_exactly(files):
    model = ours_from(tiny_diffusers_transformer(**DIT))
    x = inputs(2)
    before = run_ours(model, x)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    loras = LoraSet(model)
    loras.add(read_lora(files["ai-toolkit lokr"], model, "a"))
    assert not torch.equal(run_ours(model, x), before)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())  # unfused: untouched
    loras.fuse()
    loras.remove("a")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert torch.equal(run_ours(model, x), before)
    assert not any(m._forward_hooks for m in model.modules())


def test_bfl_final_modulation_rows_are_swapped_as_the_base_weights():
    """final_layer.adaLN_modulation.1 holds (shift; scale) in BFL files and (scale; shift) in the model: the
    LoRA's delta must land on the rows its base weight lands on (diffusers maps it unswapped)."""
    model = ours_from(tiny_diffusers_transformer(**DIT))
    gen = torch.Generator().manual_seed(1)
    down, up = rand(2, 32, gen=gen), rand(64, 2, gen=gen)
    state = {
        "diffusion_model.final_layer.adaLN_modulation.1.lora_A.weight": down,
        "diffusion_model.final_layer.adaLN_modulation.1.lora_B.weight": up,
    }
    loras = LoraSet(model)
    loras.add(read_lora(state, model, "a"))
    before = model.norm_out.linear.weight.clone()
    loras.fuse()
    shift, scale = (up @ down).chunk(2)
    assert torch.allclose(model.norm_out.linear.weight - before, torch.cat([scale, shift]), atol=1e-6)


def test_lora_down_up_under_diffusion_model_reads_as_kohya(files):
    """diffusers takes such files for kohya ones and loads none of their keys; fluxforge reads them with
    kohya's alpha / rank, which gives what the same weights in kohya's own names give."""
    ref = tiny_diffusers_transformer(**DIT)
    kw = dict(rank=4, alpha=2.0, down_up=True, seed=9)
    ai = bfl_lora(ref, **kw, where=lambda k: k.startswith(("double_blocks", "single_blocks")))
    kohya = bfl_lora(
        ref, **kw, prefix="lora_unet_", where=lambda k: k.startswith(("double_blocks", "single_blocks"))
    )
    x = inputs(2)
    m1, _ = ours_with(ai)
    m2, _ = ours_with(kohya)
    assert torch.equal(run_ours(m1, x), run_ours(m2, x))


# -- strict matching ---------------------------------------------------------------------------------------


def flux1_kohya(rank=2):
    """Keys of a FLUX.1 kohya LoRA (width 3072, 19 double blocks, per-block modulation)."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for i in range(2):
        for mod in ("img_mod_lin", "img_attn_qkv", "txt_mlp_0"):
            rows = {"img_mod_lin": 6 * 64, "img_attn_qkv": 3 * 64, "txt_mlp_0": 4 * 64}[mod]
            out[f"lora_unet_double_blocks_{i}_{mod}.lora_down.weight"] = rand(rank, 64, gen=gen)
            out[f"lora_unet_double_blocks_{i}_{mod}.lora_up.weight"] = rand(rows, rank, gen=gen)
    return out


def test_no_key_matches_names_the_layout_and_flux1():
    model = ours_from(tiny_diffusers_transformer(**DIT))
    with pytest.raises(LoraError) as err:
        read_lora(flux1_kohya(), model, "f1")
    message = str(err.value)
    assert "0 of the 12 keys" in message and "none do" in message
    assert "kohya" in message and "FLUX.1" in message
    assert "lora_unet_double_blocks_0_img_mod_lin.lora_down.weight" in message


def test_a_lora_for_a_wider_model_names_it(files):
    """A klein 4B file on klein 9B, in miniature: the same layer names, another width."""
    wide = tiny_diffusers_transformer(**DIT, num_attention_heads=3)  # width 48 against 32
    state = {f"transformer.{k}": v for k, v in diffusers_lora(wide, where=in_blocks).items()}
    model = ours_from(tiny_diffusers_transformer(**DIT))
    with pytest.raises(LoraError) as err:
        read_lora(state, model, "wide")
    message = str(err.value)
    assert f"0 of the {len(state)} keys" in message
    assert "48 wide" in message and "32" in message
    assert "wrong shapes" in message


def test_partly_matching_file_is_an_error_that_counts(files):
    state = dict(files["diffusers"])
    state["transformer.transformer_blocks.0.attn.to_qq.lora_A.weight"] = torch.zeros(3, 32)
    state["transformer.transformer_blocks.0.attn.to_qq.lora_B.weight"] = torch.zeros(32, 3)
    state["transformer.transformer_blocks.0.attn.to_q.lora_magnitude"] = torch.zeros(32)
    model = ours_from(tiny_diffusers_transformer(**DIT))
    with pytest.raises(LoraError) as err:
        read_lora(state, model, "x")
    total = len(state)
    assert f"{total - 3} of the {total} keys" in str(err.value)
    assert "to_qq.lora_A.weight" in str(err.value) and "lora_magnitude" in str(err.value)


def test_dora_and_empty_and_unreadable_files(tmp_path, files):
    model = ours_from(tiny_diffusers_transformer(**DIT))
    dora = dict(files["diffusers"])
    dora["transformer.proj_out.lora_magnitude_vector"] = torch.ones(4)
    dora["transformer.proj_out.dora_scale"] = torch.ones(4)
    with pytest.raises(LoraError, match="DoRA"):
        read_lora(dora, model)
    with pytest.raises(LoraError, match="no tensors"):
        read_lora({}, model)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a file")
    with pytest.raises(LoraError, match="not a readable safetensors"):
        read_lora(bad, model)
    with pytest.raises(LoraError, match="no such LoRA file"):
        read_lora(tmp_path / "missing.safetensors", model)


def test_lora_set_rules(files):
    model = ours_from(tiny_diffusers_transformer(**DIT))
    loras = LoraSet(model)
    loras.add(read_lora(files["diffusers"], model, "a"))
    with pytest.raises(ValueError, match="loaded already"):
        loras.add(read_lora(files["diffusers"], model, "a"))
    with pytest.raises(ValueError, match="no LoRA named 'b' is loaded"):
        loras.activate({"b": 1.0})
    with pytest.raises(ValueError, match="finite number"):
        loras.activate({"a": float("nan")})
    loras.fuse()
    with pytest.raises(ValueError, match="fused into the weights; unfuse them"):
        loras.activate({})
    loras.unfuse()
    loras.activate({})
    assert loras.key() == ()


# -- in the pipeline ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kv_folder(tmp_path_factory):
    from conftest import parts

    folder = tmp_path_factory.mktemp("kv")
    diffusers.Flux2KleinKVPipeline(**parts()).save_pretrained(folder)
    return folder


def test_pipeline_lora_on_klein_kv_matches_diffusers_and_the_kv_cache_never_crosses_it(kv_folder, tmp_path):
    from conftest import KLEIN_DIT, assert_close, parts, picture
    from test_compat import KW

    from fluxforge import compat
    from fluxforge.pipeline import Pipeline

    state = {
        f"transformer.{k}": v for k, v in diffusers_lora(tiny_diffusers_transformer(**KLEIN_DIT)).items()
    }
    path = tmp_path / "style.safetensors"
    save_file(state, path)
    theirs = diffusers.Flux2KleinKVPipeline(**parts())
    theirs.load_lora_weights(str(path))
    pipe = Pipeline.from_pretrained(kv_folder)
    facade = compat.Flux2KleinKVPipeline(pipe)
    facade.set_progress_bar_config(disable=True)
    refs = [picture(64, 64, 1), picture(96, 64, 2)]
    call = dict(
        prompt="a fox", image=refs, height=32, width=32, num_inference_steps=2, output_type="latent", **KW
    )

    def run(p):
        return p(generator=torch.Generator().manual_seed(0), **call).images

    base = run(facade)  # fills the reference K/V cache without a LoRA
    adapter = pipe.load_lora(path)
    assert (adapter.name, adapter.layout, adapter.kind) == ("style", "diffusers", "lora")
    with_lora = run(facade)
    assert_close(with_lora, run(theirs))  # not the cached K/V of the base model
    assert (with_lora - base).abs().max() > 1e-3
    request = dict(prompt="a fox", references=refs, width=32, height=32, steps=2, seed=3, decode=False)
    a = pipe.generate(**request, loras={}).latents
    assert pipe.generate(**request, loras={"style": 1.0}).info["loras"] == {"style": 1.0}
    assert pipe.generate(**request).info["loras"] == {"style": 1.0}  # a run's choice does not outlast it
    pipe.set_loras({})
    assert torch.equal(pipe.generate(**request).latents, a)
    with pytest.raises(ValueError, match=r"loras: no LoRA named 'other' is loaded \(loaded: 'style'\)"):
        pipe.generate(**request, loras={"other": 1.0})
    pipe.unload_lora()
    assert torch.equal(run(facade), base)


def test_fused_lora_is_as_the_unfused_one(kv_folder, tmp_path):
    from fluxforge.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(kv_folder)
    state = {f"transformer.{k}": v for k, v in diffusers_lora(pipe.transformer, seed=4).items()}
    pipe.load_lora(state, scale=0.6, name="s")
    request = dict(prompt="a fox", width=32, height=32, steps=2, seed=3, decode=False)
    unfused = pipe.generate(**request).latents
    pipe.fuse_loras()
    fused = pipe.generate(**request)
    # Fusing sums in another order ((W + sBA)x against Wx + sB(Ax)): on latents of magnitude ~8 that is
    # float32 rounding, measured up to 1.5e-5 with AVX2 kernels (9e-6 with AVX-512); diffusers' fused and
    # unfused paths differ alike. Each path matches diffusers' own within 1e-5 (tests above).
    assert (fused.latents - unfused).abs().max() <= 5e-5 and fused.info["loras"] == {"s": 0.6}
    with pytest.raises(ValueError, match="fused into the weights"):
        pipe.generate(**request, loras={})
    pipe.unfuse_loras()
    assert torch.equal(pipe.generate(**request).latents, unfused)


def test_an_adapter_follows_the_model_to_another_dtype(files):
    """Loaded in fp32, then the model moves to bf16 (pipe.to, or offload moving it between devices): as if
    it had been loaded into the bf16 model."""
    moved, _ = ours_with(files["kohya"])
    moved.to(torch.bfloat16)
    direct = ours_from(tiny_diffusers_transformer(**DIT)).to(torch.bfloat16)
    LoraSet(direct).add(read_lora(files["kohya"], direct, "a"))
    x = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs(2).items()}
    assert torch.equal(run_ours(moved, x), run_ours(direct, x))
    assert run_ours(moved, x).dtype == torch.bfloat16


def test_half_a_lokr_factor_and_broken_metadata_are_errors(files):
    model = ours_from(tiny_diffusers_transformer(**DIT))
    half = {k: v for k, v in files["simpletuner lokr"].items() if not k.endswith("lokr_w1_b")}
    with pytest.raises(LoraError) as err:
        read_lora(half, model)
    assert "lokr_w1 must be given whole or as lokr_w1_a and lokr_w1_b" in str(err.value)
    with pytest.raises(LoraError, match="lora_adapter_metadata is not a JSON object"):
        read_lora(files["diffusers"], model, metadata={"lora_adapter_metadata": "{not json"})
