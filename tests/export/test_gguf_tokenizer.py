"""SentencePiece-style vocabularies (Llama 2 / Mistral: BPE with byte fallback) as GGUF ``llama`` tokenizers."""

from gguf import GGUFReader
from helpers import make_pair
from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pronghorn.export.gguf_writer import save_gguf
from pronghorn.models.gguf_loading import gguf_field


def _spm_tokenizer():
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in ["\u2581", "t", "h", "e", "a", "c", "o", "s"]:
        vocab[c] = len(vocab)
    merges = [("\u2581", "t"), ("h", "e"), ("\u2581t", "he"), ("c", "a"), ("ca", "t")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    for b in range(0x41, 0x41 + 20):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_vocab_scores_types_and_transformers_reads_it(tmp_path):
    tok = _spm_tokenizer()
    _, model = make_pair("llama2")
    save_gguf(model, tmp_path / "g", tok, "f16")
    r = GGUFReader(tmp_path / "g" / "model.F16.gguf")
    assert gguf_field(r, "tokenizer.ggml.model") == "llama"
    assert gguf_field(r, "tokenizer.ggml.add_space_prefix") is True
    types, scores = gguf_field(r, "tokenizer.ggml.token_type"), gguf_field(r, "tokenizer.ggml.scores")
    assert types[:3] == [2, 3, 3]  # <unk> UNKNOWN, <s> </s> CONTROL
    assert types[16:36] == [6] * 20  # <0xNN> BYTE
    assert types[36:] == [5] * (97 - 36)  # padding rows UNUSED
    assert scores[11:16] == [-1.0, -2.0, -3.0, -4.0, -5.0]  # minus the merge rank: llama.cpp merges in BPE order
    again = AutoTokenizer.from_pretrained(str(tmp_path / "g"), gguf_file="model.F16.gguf")
    for text in ("the cat", "theca t", "hat", "Both"):
        assert again(text)["input_ids"] == tok(text)["input_ids"], text
