"""Image-text checkpoints (Gemma 3 4B+: model_type gemma3; Mistral Small 3.1 / 3.2: mistral3) load as their text
decoder: the logits of transformers' own image-text model on text, a hub-sparse text_config filled with
transformers' defaults, the vision tower left out, the text model's merged export and the image-text model's
adapters."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from helpers import make_tiny_tokenizer
from pronghorn.api import FastLanguageModel
from pronghorn.errors import UnsupportedModelError
from pronghorn.models.config import ModelConfig

TEXT = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, sliding_window=4, query_pre_attn_scalar=16, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, rope_scaling=dict(rope_type="linear", factor=2.0))
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=14)
MISTRAL_TEXT = dict(model_type="mistral", vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=None, pad_token_id=0,
                    bos_token_id=1, eos_token_id=2)  # head_dim 32 != 64 / 4, as Mistral Small's 128 != 5120 / 32


def _image_text_model(wrapper: str):
    if wrapper == "mistral3":  # the top-level flag ties the head (the text config's says untied)
        cfg = transformers.Mistral3Config(text_config=MISTRAL_TEXT, vision_config=dict(VISION, head_dim=16),
                                          image_token_index=96, spatial_merge_size=2)
        return transformers.Mistral3ForConditionalGeneration(cfg)
    cfg = transformers.Gemma3Config(text_config=TEXT, vision_config=VISION, mm_tokens_per_image=4,
                                    image_token_index=96, boi_token_index=95, eoi_token_index=94, eos_token_id=[2, 3])
    return transformers.Gemma3ForConditionalGeneration(cfg)


def _image_text_dir(tmp_path, layout: str, wrapper: str = "gemma3"):
    """A tiny image-text model saved as transformers saves it (the hub's ``language_model.model.`` names), or
    renamed to transformers 5's in-memory ``model.language_model.`` ones."""
    torch.manual_seed(0)
    hf = _image_text_model(wrapper).eval()
    with torch.no_grad():  # away from the default init (norms at 0, i.e. 1 + w = 1)
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path)
    make_tiny_tokenizer().save_pretrained(tmp_path)
    if layout == "in-memory":
        sd = load_file(tmp_path / "model.safetensors")
        sd = {("model.language_model." + k[len("language_model.model."):] if k.startswith("language_model.model.")
               else k): v for k, v in sd.items()}
        save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    return hf


@pytest.mark.parametrize("layout,wrapper", [("hub", "gemma3"), ("in-memory", "gemma3"), ("hub", "mistral3")])
def test_loads_as_its_text_decoder_with_transformers_logits(tmp_path, layout, wrapper):
    hf = _image_text_dir(tmp_path, layout, wrapper)
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert any("vision_tower" in k for k in keys)
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path), dtype=torch.float32, device="cpu")
    assert model.config.eos_token_id == 2  # the text config names one
    if wrapper == "gemma3":
        assert model.config.model_type == "gemma3_text" and model.config.layer_types == ["sliding_attention"] * 3
    else:
        assert (model.config.model_type, model.config.head_dim, model.config.tie_word_embeddings) == ("mistral", 32,
                                                                                                    True)
    ids = torch.randint(3, 90, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = hf(input_ids=ids).logits, model.eval()(input_ids=ids).logits
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


def test_a_hub_sparse_text_config_takes_transformers_defaults():
    d = {"model_type": "gemma3", "eos_token_id": [1, 106],
         "text_config": {"model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240,
                         "num_hidden_layers": 34, "sliding_window": 1024,
                         "rope_scaling": {"factor": 8.0, "rope_type": "linear"}}}  # google/gemma-3-4b-it's
    cfg = ModelConfig.from_hf_dict(d, source="config.json")
    assert (cfg.model_type, cfg.vocab_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (
        "gemma3_text", 262208, 8, 4, 256)
    assert cfg.eos_token_id == [1, 106] and cfg.parts.attn_scale == 256 ** -0.5
    assert cfg.rope == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}
    assert cfg.local_rope["rope_theta"] == 10000.0
    assert cfg.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"]
    assert cfg.hf_config["architectures"] == ["Gemma3ForCausalLM"]


def test_a_bidirectional_text_config_is_refused_clearly():
    d = {"model_type": "gemma3", "text_config": {"hidden_size": 64, "use_bidirectional_attention": True}}
    with pytest.raises(UnsupportedModelError, match="bidirectional"):
        ModelConfig.from_hf_dict(d, source="config.json")


def test_the_merged_export_is_the_text_model(tmp_path):
    hf = _image_text_dir(tmp_path / "in", "hub")
    model, tokenizer = FastLanguageModel.from_pretrained(str(tmp_path / "in"), dtype=torch.float32, device="cpu")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    model.save_pretrained_merged(str(tmp_path / "out"), tokenizer, dtype=torch.float32)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["Gemma3ForCausalLM"]
    text = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # the adapter starts at zero: the merged model is the base
        want, got = hf(input_ids=ids).logits, text(input_ids=ids).logits
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


def _trained_adapter(tmp_path, wrapper="gemma3"):
    hf = _image_text_dir(tmp_path / "base", "hub", wrapper)
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "base"), dtype=torch.float32, device="cpu")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    return hf, model.eval()


@pytest.mark.parametrize("wrapper", ["gemma3", "mistral3"])
def test_the_adapter_is_the_image_text_models_in_peft(tmp_path, wrapper):
    """PEFT on the image-text base applies every tensor of the saved adapter to the language model and puts none on
    the vision tower (a list of names would: its q_proj... match), giving pronghorn's logits."""
    import peft

    _, model = _trained_adapter(tmp_path, wrapper)
    model.save_pretrained(str(tmp_path / "a"))
    base = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "base", dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "a").eval()
    lora = [n for n, _ in loaded.named_modules() if n.endswith(".lora_A")]
    assert lora and not any("vision" in n for n in lora) and len(lora) == 3 * 7
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = loaded(input_ids=ids).logits, model(input_ids=ids).logits
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


def test_the_adapter_loads_back_and_peft_made_ones_load(tmp_path):
    import peft

    _, model = _trained_adapter(tmp_path)
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(4))
    model.save_pretrained(str(tmp_path / "a"))
    back, _ = FastLanguageModel.from_pretrained(str(tmp_path / "a"), dtype=torch.float32, device="cpu")
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert torch.equal(back.eval()(input_ids=ids).logits, want)
    # PEFT's own, on the image-text model: the seven projections of the language model's layers 1 and 2 (a regex
    # as Unsloth writes them for such models)
    base = transformers.Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "base", dtype=torch.float32)
    regex = r".*language_model.*\.layers\.[12]\..*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    made = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=regex)).eval()
    with torch.no_grad():
        for n, p in made.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
        want = made(input_ids=ids).logits
    made.save_pretrained(tmp_path / "peft")
    ours, _ = FastLanguageModel.from_pretrained(str(tmp_path / "base"), dtype=torch.float32, device="cpu")
    from pronghorn.models.adapter_format import load_adapter

    load_adapter(ours, tmp_path / "peft")
    assert ours.lora_config.layers_to_transform == [1, 2] and len(ours.lora_config.target_modules) == 7
    with torch.no_grad():
        got = ours.eval()(input_ids=ids).logits
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


@pytest.mark.parametrize("wrapper", ["gemma3", "mistral3"])
def test_the_text_decoder_loads_in_4bit_and_exports_gguf(tmp_path, wrapper):
    """QLoRA from an image-text checkpoint (its decoder's projections in NF4), and its GGUF: the text family's."""
    from gguf import GGUFReader

    _image_text_dir(tmp_path / "base", "hub", wrapper)
    model, tokenizer = FastLanguageModel.from_pretrained(str(tmp_path / "base"), dtype=torch.float32, device="cpu",
                                                         load_in_4bit=True)
    assert model.model.layers[0].self_attn.q_proj.is_quantized
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(5))
    model(input_ids=ids, labels=ids).loss.backward()
    full, _ = FastLanguageModel.from_pretrained(str(tmp_path / "base"), dtype=torch.float32, device="cpu")
    (path,) = full.save_pretrained_gguf(str(tmp_path / "g"), tokenizer, "f32")
    arch = GGUFReader(path).fields["general.architecture"]
    assert bytes(arch.parts[-1]).decode() == {"gemma3": "gemma3", "mistral3": "llama"}[wrapper]


def test_unsloths_fastmodel_flow_on_an_image_text_checkpoint(tmp_path):
    """Unsloth's Gemma 3 notebook: FastModel.from_pretrained, then get_peft_model with its finetune_* switches
    (the attention only here); the vision switch is refused clearly, as pronghorn loads the text decoder only."""
    from pronghorn import FastModel, PronghornError

    _image_text_dir(tmp_path, "hub")
    model, _ = FastModel.from_pretrained(str(tmp_path), max_seq_length=64, load_in_4bit=False, dtype=torch.float32,
                                         device="cpu", full_finetuning=False)
    with pytest.raises(PronghornError, match="finetune_vision_layers"):
        FastModel.get_peft_model(model, finetune_vision_layers=True)
    model = FastModel.get_peft_model(model, finetune_vision_layers=False, finetune_language_layers=True,
                                     finetune_attention_modules=True, finetune_mlp_modules=False, r=8, lora_alpha=8,
                                     lora_dropout=0, bias="none", random_state=3407)
    assert model.lora_config.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    with pytest.raises(PronghornError, match="default targets"):
        FastModel.get_peft_model(model, target_modules=["q_proj"], finetune_mlp_modules=False)
