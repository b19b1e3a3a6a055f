"""The one decoder-only transformer every family runs on (Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM2, ...).

Module and parameter names follow Hugging Face (``model.layers.3.self_attn.q_proj.weight``), so HF
checkpoints and PEFT adapters map 1:1. The layers are assembled from the parts a family's spec picks
(``cfg.parts``, models/families/spec.py): the MLP's activation, the norm's offset, sandwich norms, the
embedding scale, soft-capping, the attention scale and partial rotary embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..errors import PronghornError
from ..kernels import IGNORE_INDEX, geglu, linear_cross_entropy, rope_cos_sin, swiglu
from .attention import Attention, build_attention_mask
from .checkpointing import checkpoint_mode, layer_modes, layer_output_unused, run_layers
from .config import ModelConfig
from .host_embedding import Embedding
from .kv_cache import KVCache
from .linear import Linear
from .norm import RMSNorm
from .rope_scaling import rope_inv_freq
from .tiled_mlp import DEFAULT_CHUNK, chunk_tokens, mlp_chunk_for, sequence_tiled, tiled_mlp_mode

_GELU = {"gelu_tanh": "tanh", "gelu": "none"}


class MLP(nn.Module):
    """The gated MLP ``down(act(gate(x)) * up(x))``: SwiGLU (silu) or GeGLU (gelu, gelu_tanh)."""

    def __init__(self, cfg: ModelConfig, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.activation = cfg.parts.activation
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, **kw)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, **kw)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias, **kw)

    def forward(self, x: torch.Tensor, output_unused: bool = False) -> torch.Tensor:
        """``output_unused``: the values are thrown away (a replay for the backward): down_proj skips its matmul.
        gate, up and their product are this block's own temporaries, so the backward writes d gate, d up over
        gate and up, and d product over the product (two and one [tokens, intermediate] buffers less)."""
        if self.activation == "silu":
            h = swiglu(self.gate_proj(x), self.up_proj(x), owns_inputs=True)
        else:
            h = geglu(self.gate_proj(x), self.up_proj(x), _GELU[self.activation])
        return self.down_proj(h, output_unused=output_unused, owns_input=True)


class DecoderLayer(nn.Module):
    """Pre-norm residual blocks. With ``sandwich_norms`` (Gemma 2/3) the attention and MLP outputs are normed
    too, under HF's names: ``post_attention_layernorm`` after attention, ``pre_feedforward_layernorm`` /
    ``post_feedforward_layernorm`` around the MLP; otherwise ``post_attention_layernorm`` is the MLP's input norm."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        parts = cfg.parts

        def norm():
            return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, parts.norm_offset, **kw)

        self.self_attn = Attention(cfg, layer_idx, **kw)
        self.mlp = MLP(cfg, **kw)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.sandwich = parts.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def forward(self, x, cos, sin, masks, cache, mlp_chunk: int | None = None):
        return self.mlp_block(self.attention_block(x, cos, sin, masks, cache), mlp_chunk)

    def attention_block(self, x, cos, sin, masks, cache, output_unused: bool = False):
        """The first residual block: ``x`` plus self-attention of its norm (checkpointing replays the two blocks
        apart). ``output_unused``: a replay whose values are thrown away (o_proj skips its matmul)."""
        h = self.self_attn(self.input_layernorm(x), cos, sin, masks, cache, output_unused)
        return x + (self.post_attention_layernorm(h) if self.sandwich else h)

    def mlp_block(self, x, mlp_chunk: int | None = None):
        """The second residual block: ``x`` plus the MLP of its norm, over chunks of ``mlp_chunk`` tokens when
        given (models/tiled_mlp.py)."""
        if mlp_chunk:
            params = [*self._mlp_norms_parameters(), *self.mlp.parameters()]
            return x + sequence_tiled(self._norm_mlp, x, mlp_chunk, params)
        return x + self._norm_mlp(x)

    def _mlp_norms_parameters(self):
        if self.sandwich:
            return [*self.pre_feedforward_layernorm.parameters(), *self.post_feedforward_layernorm.parameters()]
        return list(self.post_attention_layernorm.parameters())

    def _norm_mlp(self, x):
        # read at call time: a tiled MLP's chunks are replayed inside its own backward (output_unused there)
        if self.sandwich:
            h = self.mlp(self.pre_feedforward_layernorm(x), output_unused=layer_output_unused())
            return self.post_feedforward_layernorm(h)
        return self.mlp(self.post_attention_layernorm(x), output_unused=layer_output_unused())


class DecoderModel(nn.Module):
    """Embeddings, decoder layers and the final norm (HF's ``model.`` prefix)."""

    def __init__(self, cfg: ModelConfig, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, **kw)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, **kw) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.parts.norm_offset, **kw)
        self.gradient_checkpointing = False
        self.tiled_mlp, self.tiled_mlp_chunk = "auto", DEFAULT_CHUNK  # models/tiled_mlp.py

    def _rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[dict, dict]:
        """cos and sin tables keyed by RoPE ("global", and "local" for a family whose sliding layers have
        their own, ``cfg.local_rope``); each [batch, seq, rotary dim]."""
        cfg = self.cfg
        ropes = {"global": cfg.rope} if cfg.local_rope is None else {"global": cfg.rope, "local": cfg.local_rope}
        rotary_dim = cfg.parts.rotary_dim or cfg.head_dim
        cos, sin = {}, {}
        for name, rope in ropes.items():
            seq_len = int(position_ids.max()) + 1 if rope["rope_type"] in ("dynamic", "longrope") else None
            key = (position_ids.device, seq_len)
            cached = self.__dict__.setdefault("_rope_cache", {}).get(name)
            if cached is None or cached[0] != key:
                inv, scale = rope_inv_freq(rope, rotary_dim, cfg.max_position_embeddings, seq_len)
                cached = self._rope_cache[name] = (key, inv.to(position_ids.device), scale)
            cos[name], sin[name] = rope_cos_sin(cached[1], position_ids, dtype, cached[2])
        return cos, sin

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if inputs_embeds is None:
            x = self.embed_tokens(input_ids)
            if self.cfg.parts.embed_scale != 1.0:  # as HF: the scale rounded to the table's dtype
                x = x * torch.tensor(self.cfg.parts.embed_scale, dtype=torch.float32).to(x.dtype)
        else:
            x = inputs_embeds
        b, t = x.shape[:2]
        past = cache.length if cache is not None else 0
        packed_positions = position_ids if past == 0 else None  # packed (padding-free) batches: no past only
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=x.device)[None].expand(b, t)
        cos, sin = self._rope(position_ids, x.dtype)
        windows = {self.cfg.window_of(i) for i in range(len(self.layers))}
        masks = cache.decode_masks(windows, x.dtype) if cache is not None else None  # static decode: no syncs
        if masks is None:
            masks = {w: build_attention_mask(attention_mask, t, past + t, w, x.device, packed_positions)
                     for w in windows}
        mlp_chunk = mlp_chunk_for(self, x)  # None: untiled
        x = run_layers(self.layers, x, (cos, sin, masks, cache, mlp_chunk), layer_modes(self, x, mlp_chunk))
        if cache is not None:
            cache.advance(t)
        return self.norm(x)


class DecoderForCausalLM(nn.Module):
    """Decoder + output head. ``forward`` matches transformers' CausalLM calling convention."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, dtype=dtype, device=device)
        if cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device="meta")
            self.lm_head.weight = self.model.embed_tokens.weight
        else:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, device=device)
        self.lora_config = None  # set when an adapter is attached (models.lora.LoRAConfig)

    # --- transformers-style accessors (HF Trainer / TRL look for these) ---
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device  # not the embedding: offload_embedding keeps it on the host

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, mode: str | bool | None = None,
                                      tiled_mlp: str | bool | None = None, tiled_mlp_chunk: int | None = None,
                                      every_n_layers: int | None = None, offload: bool | None = None,
                                      **hf_options) -> None:
        """``mode``: on | offload | auto | off (models/checkpointing.py). Without one (how HF Trainer and TRL
        call it), a model already set to a checkpointing mode keeps it, one switched off by
        ``gradient_checkpointing_disable`` gets its mode back (TRL disables and re-enables it around reference
        forwards); otherwise it becomes "on". ``tiled_mlp``: auto | on | off, the norm + MLP over chunks of
        ``tiled_mlp_chunk`` tokens (models/tiled_mlp.py); None keeps the current setting. What transformers 5.17's
        Trainer also passes: ``every_n_layers`` None or 1 (pronghorn's "auto" mode picks the layers instead),
        ``offload`` True (without a ``mode``: "offload"); any other option only unset."""
        if every_n_layers not in (None, 1):
            raise PronghornError(f"gradient_checkpointing_enable(every_n_layers={every_n_layers!r}): pronghorn "
                                 "checkpoints every layer in its mode; mode='auto' keeps the layers that fit")
        unknown = {k: v for k, v in hf_options.items() if v not in (None, False)}
        if unknown:
            raise PronghornError(f"gradient_checkpointing_enable: unsupported options {unknown}; pronghorn's own "
                                 "are mode (on | offload | auto | off), tiled_mlp and tiled_mlp_chunk")
        if mode is None and offload:
            mode = "offload"
        if mode is None:
            mode = self.model.gradient_checkpointing or self.__dict__.get("_disabled_checkpoint_mode") or "on"
        self.__dict__.pop("_disabled_checkpoint_mode", None)
        mode = checkpoint_mode(mode)
        self.model.gradient_checkpointing = False if mode == "off" else mode
        if tiled_mlp is not None:
            self.model.tiled_mlp = tiled_mlp_mode(tiled_mlp)
        if tiled_mlp_chunk is not None:
            self.model.tiled_mlp_chunk = chunk_tokens(tiled_mlp_chunk)

    def gradient_checkpointing_disable(self) -> None:
        if self.model.gradient_checkpointing:
            self.__dict__["_disabled_checkpoint_mode"] = self.model.gradient_checkpointing
        self.model.gradient_checkpointing = False

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        logits_to_keep: int = 0,
        return_logits: bool | None = None,
        **unused,
    ) -> CausalLMOutputWithPast:
        """With ``labels`` the loss is the mean next-token cross-entropy over non-ignored labels (or the sum
        divided by ``num_items_in_batch``). While training with labels, logits are not materialised unless
        ``return_logits=True``; otherwise they are returned as transformers does."""
        hidden = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds)
        loss = None
        if labels is not None:
            shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
            loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight, shifted.reshape(-1),
                                        num_items_in_batch, softcap=self.config.parts.final_softcap)
        if return_logits is None:
            return_logits = labels is None or not (self.training and torch.is_grad_enabled())
        logits = None
        if return_logits:
            h = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
            weight = self.lm_head.weight
            # a tied table kept on the host (offload_embedding="tied"): a transient device copy for the logits
            logits = self.lm_head(h) if weight.device == h.device else F.linear(h, weight.to(h.device))
            cap = self.config.parts.final_softcap
            if cap:
                logits = torch.tanh(logits / cap) * cap
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)
