"""Checkpoint loading: diffusers folders (single and sharded), BFL single files, variant detection, and the
errors a user sees for files that cannot be loaded."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import KLEIN_DIT, LAYERS, TEXT_DEPTH
from conftest import parts as klein_parts
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
from diffusers.loaders.single_file_utils import (
    convert_flux2_transformer_checkpoint_to_diffusers,
    convert_ldm_vae_checkpoint,
)
from safetensors.torch import load_file, save_file
from tiny import tiny_diffusers_transformer, tiny_diffusers_vae, to_bfl
from tiny_text import qwen3_tokenizer, randomize_, tiny_qwen3_config
from transformers import Qwen3ForCausalLM

import fluxforge
from fluxforge import bfl, checkpoint, files, weights
from fluxforge.config import VARIANTS, AutoencoderConfig, TransformerConfig
from fluxforge.errors import CheckpointError
from fluxforge.model.transformer import Flux2Transformer


@pytest.fixture(scope="module")
def parts():
    return klein_parts()


@pytest.fixture(scope="module")
def klein_folder(parts, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("klein")
    Flux2KleinPipeline(**parts, is_distilled=True).save_pretrained(folder)
    return folder


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def assert_same_weights(module: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    ours = module.state_dict()
    assert ours.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(ours[key].to(value.dtype), value), key


def test_diffusers_folder_loads_every_component(klein_folder, parts):
    c = fluxforge.load(klein_folder)
    assert c.variant.family == "flux.2-klein" and c.variant.name == "flux.2-klein-custom"
    assert c.variant.text_encoder.out_layers == LAYERS  # diffusers' default, which fits a 28-layer encoder
    assert_same_weights(c.transformer, parts["transformer"].state_dict())
    assert_same_weights(c.vae, parts["vae"].state_dict())
    assert c.transformer.dtype == torch.float32 and not any(
        p.requires_grad for p in c.transformer.parameters()
    )

    # The truncated encoder gives the full model's hidden states 9, 18, 27.
    tokens = c.tokenizer.encode(["a fox"], 12)
    with torch.no_grad():
        feats = c.text_encoder(tokens.input_ids, tokens.attention_mask)
        full = parts["text_encoder"](
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True
        ).hidden_states
    assert feats.shape == (1, 12, 48) and len(c.text_encoder.layers) == 27
    assert torch.equal(feats, torch.cat([full[k] for k in LAYERS], dim=-1))


def test_dtype_is_applied_while_loading(klein_folder, parts):
    c = fluxforge.load(klein_folder, dtype="bfloat16")
    assert {p.dtype for p in c.transformer.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in c.vae.parameters()} == {torch.bfloat16}
    expected = parts["transformer"].state_dict()["x_embedder.weight"].to(torch.bfloat16)
    assert torch.equal(c.transformer.x_embedder.weight, expected)


def test_sharded_transformer_loads_the_same_weights(parts, tmp_path):
    parts["transformer"].save_pretrained(tmp_path / "transformer", max_shard_size="40KB")
    assert len(list((tmp_path / "transformer").glob("*.safetensors"))) > 2
    model, variant = weights.load_transformer_folder(tmp_path / "transformer", "flux.2-klein")
    assert_same_weights(model, parts["transformer"].state_dict())


@pytest.mark.parametrize(
    "index,family",
    [
        ({"_class_name": "Flux2KleinPipeline", "is_distilled": True}, "flux.2-klein"),
        ({"_class_name": "Flux2KleinPipeline"}, "flux.2-klein-base"),
        ({"_class_name": "Flux2KleinKVPipeline"}, "flux.2-klein-kv"),
        ({"_class_name": "Flux2Pipeline"}, "flux.2-dev"),
    ],
)
def test_family_comes_from_model_index(index, family):
    assert files.family_of_model_index(index, Path("model_index.json")) == family


def test_registered_sizes_are_recognised_exactly():
    for name in ("flux.2-klein-4b", "flux.2-klein-9b"):
        assert files.variant_for("flux.2-klein", VARIANTS[name].transformer).name == name
    assert files.variant_for("flux.2-klein-base", VARIANTS["flux.2-klein-4b"].transformer).name == (
        "flux.2-klein-base-4b"
    )
    assert files.variant_for("flux.2-dev", VARIANTS["flux.2-dev"].transformer).name == "flux.2-dev"
    spelled_out = dataclasses.replace(VARIANTS["flux.2-klein-4b"].transformer, out_channels=128)
    assert files.variant_for("flux.2-klein", spelled_out).name == "flux.2-klein-4b"


@pytest.mark.parametrize("name", ["flux.2-dev", "flux.2-klein-4b", "flux.2-klein-9b"])
def test_bfl_config_is_read_off_real_shapes(name):
    """The real architectures, sized from BFL key shapes alone (built on the meta device, no data)."""
    cfg = VARIANTS[name].transformer
    with torch.device("meta"):
        state = Flux2Transformer(cfg).state_dict()
    shapes = _bfl_shapes(state, cfg)
    assert bfl.transformer_config(shapes) == cfg


def _bfl_shapes(state, cfg):
    """BFL key -> object with .shape, derived from meta tensors without touching data."""

    class Shape:
        def __init__(self, shape):
            self.shape = shape

    out: dict[str, Shape] = {}
    for key, src in bfl.transformer_plan(cfg).items():
        shape = tuple(state[key].shape)
        if src.part is not None:
            shape = (shape[0] * src.part[1], *shape[1:])
        out[src.key] = Shape(shape)
    return out


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("guidance_embeds", [False, True])
def test_bfl_transformer_file_loads_the_diffusers_weights(tmp_path, prefix, guidance_embeds):
    ref = tiny_diffusers_transformer(guidance_embeds=guidance_embeds)
    cfg = TransformerConfig.from_dict(dict(ref.config))
    state = to_bfl(ref.state_dict(), bfl.transformer_plan(cfg), prefix)
    if not prefix:  # our BFL layout is the one diffusers' own converter reads (it cannot strip prefixes)
        back = convert_flux2_transformer_checkpoint_to_diffusers(dict(state))
        assert back.keys() == ref.state_dict().keys()
        assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
    name = "flux-2-dev.safetensors" if guidance_embeds else "flux-2-klein-base-4b.safetensors"
    save_file(state, tmp_path / name)
    model, variant = weights.load_transformer_file(tmp_path / name)
    assert variant.family == ("flux.2-dev" if guidance_embeds else "flux.2-klein-base")
    assert model.config == cfg
    assert_same_weights(model, ref.state_dict())


def test_bfl_autoencoder_file_loads_the_diffusers_weights(tmp_path):
    ref = tiny_diffusers_vae(block_out_channels=(32, 64), norm_num_groups=32)  # FLUX.2 uses 32 groups
    state = to_bfl(ref.state_dict(), bfl.vae_plan(AutoencoderConfig.from_dict(dict(ref.config))))
    # diffusers 0.42.1 has no FLUX.2 autoencoder converter; its LDM one reads the same layout once the
    # quant convs sit at the top level (BFL nests them in the encoder / decoder) and without the bn stats.
    ldm = {
        k.removeprefix("encoder.").removeprefix("decoder.") if "quant_conv" in k else k: v
        for k, v in state.items()
        if not k.startswith("bn.")
    }
    back = convert_ldm_vae_checkpoint(ldm, dict(ref.config))
    expected = {k: v for k, v in ref.state_dict().items() if not k.startswith("bn.")}
    assert back.keys() == expected.keys()
    assert all(torch.equal(back[k].reshape(v.shape), v) for k, v in expected.items())
    save_file(state, tmp_path / "ae.safetensors")
    vae = weights.load_vae(tmp_path / "ae.safetensors")
    assert_same_weights(vae, ref.state_dict())


def test_bfl_files_with_text_encoder_folder(parts, klein_folder, tmp_path):
    ref = parts["transformer"]
    cfg = TransformerConfig.from_dict(dict(ref.config))
    save_file(to_bfl(ref.state_dict(), bfl.transformer_plan(cfg)), tmp_path / "flux-2-klein-4b.safetensors")
    text = tmp_path / "qwen"
    shutil.copytree(klein_folder / "text_encoder", text)
    for f in (klein_folder / "tokenizer").iterdir():
        shutil.copy(f, text)
    c = fluxforge.load(tmp_path / "flux-2-klein-4b.safetensors", vae=klein_folder / "vae", text_encoder=text)
    assert c.variant.family == "flux.2-klein"
    assert c.vae is not None and c.text_encoder is not None and c.tokenizer is not None
    assert_same_weights(c.transformer, ref.state_dict())


# ---------------------------------------------------------------------------------------------------------
# Errors


def test_missing_shard(parts, tmp_path):
    parts["transformer"].save_pretrained(tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("*-of-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shards named by the index are missing: {shard.name}") as err:
        weights.load_transformer_folder(tmp_path, "flux.2-klein")
    assert err.value.missing  # the keys that shard held


def test_wrong_shape_is_reported_before_any_data_is_read(klein_folder, tmp_path, monkeypatch):
    folder = copy_of(klein_folder, tmp_path)
    file = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    state["context_embedder.weight"] = torch.zeros(32, 40)
    del state["proj_out.weight"]
    state["extra.weight"] = torch.zeros(1)
    save_file(state, file)
    reads = []
    monkeypatch.setattr(checkpoint.Tensors, "read", lambda self, keys: reads.append(keys) or iter(()))
    with pytest.raises(CheckpointError) as err:
        fluxforge.load(folder)
    assert err.value.mismatched == ["context_embedder.weight: file has [32, 40], expected [32, 48]"]
    assert err.value.missing == ["proj_out.weight"] and err.value.unexpected == ["extra.weight"]
    assert err.value.variant == "flux.2-klein-custom"
    message = str(err.value)
    assert (
        "wrong shapes (1)" in message
        and "missing keys (1)" in message
        and "looks like: flux.2-klein" in message
    )
    assert reads == []


def test_flux1_file_is_named_as_such(tmp_path):
    save_file(
        {
            "double_blocks.0.img_mod.lin.weight": torch.zeros(2, 2),
            "vector_in.in_layer.weight": torch.zeros(2),
        },
        tmp_path / "flux1-dev.safetensors",
    )
    with pytest.raises(CheckpointError, match="FLUX.1 checkpoint"):
        fluxforge.load(tmp_path / "flux1-dev.safetensors")


def test_flux1_diffusers_folder_is_named_as_such(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(CheckpointError, match="'FluxPipeline', which is not a FLUX.2 pipeline.*FLUX.1"):
        fluxforge.load(tmp_path)


def test_random_safetensors_file(tmp_path):
    save_file({"weight": torch.zeros(3)}, tmp_path / "random.safetensors")
    with pytest.raises(CheckpointError, match="not a FLUX.2 transformer"):
        fluxforge.load(tmp_path / "random.safetensors")


def test_empty_folder(tmp_path):
    with pytest.raises(CheckpointError, match="model_index.json is missing .the folder is empty."):
        fluxforge.load(tmp_path)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        fluxforge.load(tmp_path / "nope.safetensors")


def test_truncated_safetensors(klein_folder, tmp_path):
    folder = copy_of(klein_folder, tmp_path)
    file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated") as err:
        fluxforge.load(folder)
    assert err.value.path == str(file)


def test_text_encoder_that_does_not_fit_the_transformer(klein_folder, tmp_path):
    with pytest.raises(
        CheckpointError, match="do not belong together: transformer joint_attention_dim is 48"
    ):
        fluxforge.load(klein_folder, text_encoder=_wider_qwen(tmp_path))


def _wider_qwen(tmp_path: Path) -> Path:
    cfg = tiny_qwen3_config(TEXT_DEPTH)
    cfg.hidden_size = 32
    folder = tmp_path / "wide"
    randomize_(Qwen3ForCausalLM(cfg)).save_pretrained(folder)
    qwen3_tokenizer().save_pretrained(folder)
    return folder


def test_unknown_variant_name(klein_folder):
    with pytest.raises(ValueError, match="unknown variant 'flux.2-klein-4B'. Did you mean 'flux.2-klein-4b'"):
        fluxforge.load(klein_folder, variant="flux.2-klein-4B")


def test_dev_folder_with_mistral_text_encoder(tmp_path, monkeypatch):
    """dev: guidance embedder, Mistral 3 language model (vision tower and LM head are never read)."""
    from diffusers import Flux2Pipeline
    from tiny_text import mistral3_tokenizer, tiny_mistral3_config
    from transformers import Mistral3ForConditionalGeneration

    torch.manual_seed(0)
    transformer = tiny_diffusers_transformer(**{**KLEIN_DIT, "guidance_embeds": True})
    # 31 layers: deep enough for diffusers' dev default (10, 20, 30), whose last is then not the normed one
    text = randomize_(Mistral3ForConditionalGeneration(tiny_mistral3_config(31))).eval()
    Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_diffusers_vae(),
        text_encoder=text,
        tokenizer=mistral3_tokenizer(),
        transformer=transformer,
    ).save_pretrained(tmp_path)
    read: list[str] = []
    original = checkpoint.Tensors.read
    monkeypatch.setattr(
        checkpoint.Tensors, "read", lambda self, keys: read.extend(keys) or original(self, keys)
    )
    c = fluxforge.load(tmp_path)
    text_keys = [k for k in read if "language_model" in k or "vision" in k or "lm_head" in k]
    assert text_keys and not [k for k in text_keys if "layers.30." in k or "vision" in k or "lm_head" in k]
    assert c.variant.family == "flux.2-dev" and c.variant.name == "flux.2-dev-custom"
    assert c.variant.text_encoder.kind == "mistral3" and c.variant.text_encoder.out_layers == (10, 20, 30)
    assert_same_weights(c.transformer, transformer.state_dict())
    ids = torch.tensor([[5, 9, 200, 31, 4, 4]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        feats = c.text_encoder(ids, mask)
        full = text(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert torch.equal(feats, torch.cat([full[10], full[20], full[30]], dim=-1))
    assert c.tokenizer is not None


def test_variant_override_must_fit_the_files(klein_folder, parts, tmp_path):
    with pytest.raises(
        CheckpointError, match="variant 'flux.2-klein-9b' was asked for, but the files hold another"
    ):
        fluxforge.load(klein_folder, variant="flux.2-klein-9b")
    ref = parts["transformer"]
    cfg = TransformerConfig.from_dict(dict(ref.config))
    save_file(to_bfl(ref.state_dict(), bfl.transformer_plan(cfg)), tmp_path / "klein.safetensors")
    base = dataclasses.replace(VARIANTS["flux.2-klein-base-4b"], name="tiny-base", transformer=cfg)
    model, variant = weights.load_transformer_file(tmp_path / "klein.safetensors", variant=base)
    assert variant is base and variant.defaults.guidance_mode == "cfg"


def test_component_folder_points_to_its_parent(klein_folder):
    with pytest.raises(CheckpointError, match="one component of a diffusers model.*pass the model folder"):
        fluxforge.load(klein_folder / "transformer")


def test_pixtral_processor_folder_loads_without_torchvision(tmp_path):
    """dev's tokenizer folder is a Pixtral processor's; prompts need only its tokenizer and chat template."""
    from tiny_text import MISTRAL3_CHAT_TEMPLATE, mistral3_tokenizer

    tokenizer = mistral3_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "PixtralProcessor"}))
    (tmp_path / "chat_template.jinja").write_text(MISTRAL3_CHAT_TEMPLATE)
    loaded = weights.load_tokenizer(tmp_path)
    assert loaded.chat_template == MISTRAL3_CHAT_TEMPLATE
    user = [{"role": "user", "content": [{"type": "text", "text": "a fox"}]}]
    assert loaded.render([user]) == ["<s>[INST]a fox[/INST]"]


def test_sharded_text_encoder(parts, tmp_path):
    parts["text_encoder"].save_pretrained(tmp_path / "te", max_shard_size="100KB")
    assert (tmp_path / "te" / "model.safetensors.index.json").is_file()
    encoder, text_cfg = weights.load_text_encoder(tmp_path / "te", VARIANTS["flux.2-klein-4b"])
    assert text_cfg.out_layers == LAYERS
    full = parts["text_encoder"].state_dict()
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, full["model." + key]), key


def test_bfl_file_missing_a_sizing_key(tmp_path):
    ref = tiny_diffusers_transformer()
    state = to_bfl(ref.state_dict(), bfl.transformer_plan(TransformerConfig.from_dict(dict(ref.config))))
    del state["txt_in.weight"]
    save_file(state, tmp_path / "flux-2-klein-4b.safetensors")
    with pytest.raises(
        CheckpointError, match="cannot size the transformer: the key txt_in.weight is missing"
    ) as err:
        fluxforge.load(tmp_path / "flux-2-klein-4b.safetensors")
    assert err.value.path == str(tmp_path / "flux-2-klein-4b.safetensors")
