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
from ..kernels.linear_cross_entropy import fused_loss_path
from ..kernels.linear_logprobs import linear_logprobs
from ..kernels.policy import DEFAULT_POLICY, KernelPolicy
from ..kernels.step_operands import StepOperands, training_operands
from ..kernels.valid_rows import ValidRows
from .allocator import expand_segments_under_budget, release_workspaces
from .attention import Attention, attention_visibility, build_attention_mask
from .config import ModelConfig
from .hf_outputs import causal_lm_output
from .host_embedding import Embedding, offload_embedding
from .kept_graphs import KeptGraphs
from .kv_cache import KVCache
from .linear import Linear
from .memory_plan import (LOSS_CHUNK_BYTES, MemoryPlan, OptimizerFootprint, device_budget, make_plan, parse_budget,
                          step_sizes)
from .norm import RMSNorm
from .precision import leaves_fp16_autocast
from .recompute import checkpoint_mode, run_layers
from .replay_graphs import GRAPH_SETTINGS, ReplayGraphs, graphs_possible
from .rope_scaling import rope_inv_freq
from .tiled_mlp import DEFAULT_CHUNK, chunk_tokens, sequence_tiled, tiled_mlp_mode

REPLAYS = ("auto", "whole", "split")

_GELU = {"gelu_tanh": "tanh", "gelu": "none"}


class MLP(nn.Module):
    """The gated MLP ``down(act(gate(x)) * up(x))``: SwiGLU (silu) or GeGLU (gelu, gelu_tanh)."""

    kernel_policy: KernelPolicy = DEFAULT_POLICY  # kernels/policy.py; DecoderForCausalLM.set_kernel_policy

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
            h = swiglu(self.gate_proj(x), self.up_proj(x), owns_inputs=True, policy=self.kernel_policy)
        else:
            h = geglu(self.gate_proj(x), self.up_proj(x), _GELU[self.activation], self.kernel_policy, owns_inputs=True)
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

    def forward(self, x, cos, sin, masks, cache, mlp_chunk: int | None = None, output_unused: bool = False):
        """``output_unused``: a replay for the backward whose output values are thrown away (models/recompute.py):
        the layer's last projection skips its matmul."""
        return self.mlp_block(self.attention_block(x, cos, sin, masks, cache), mlp_chunk, output_unused)

    def attention_block(self, x, cos, sin, masks, cache, output_unused: bool = False):
        """The first residual block: ``x`` plus self-attention of its norm (checkpointing replays the two blocks
        apart). ``output_unused``: a replay whose values are thrown away (o_proj skips its matmul)."""
        normed, x = self.input_layernorm.with_residual(x)  # the residual's gradient joins the norm's backward
        # a sandwich post-norm's backward reads the attention output: its values are used even in a replay
        h = self.self_attn(normed, cos, sin, masks, cache, output_unused and not self.sandwich)
        return x + (self.post_attention_layernorm(h) if self.sandwich else h)

    def mlp_block(self, x, mlp_chunk: int | None = None, output_unused: bool = False):
        """The second residual block: ``x`` plus the MLP of its norm, over chunks of ``mlp_chunk`` tokens when
        given (models/tiled_mlp.py). ``output_unused``: as in ``forward``."""
        if mlp_chunk:
            params = [*self._mlp_norms_parameters(), *self.mlp.parameters()]
            return x + sequence_tiled(self._norm_mlp, x, mlp_chunk, params, output_unused)
        normed, x = self._mlp_norm().with_residual(x)
        return x + self._mlp_of_normed(normed, output_unused)

    def _mlp_norm(self) -> RMSNorm:
        return self.pre_feedforward_layernorm if self.sandwich else self.post_attention_layernorm

    def _mlp_norms_parameters(self):
        if self.sandwich:
            return [*self.pre_feedforward_layernorm.parameters(), *self.post_feedforward_layernorm.parameters()]
        return list(self.post_attention_layernorm.parameters())

    def _norm_mlp(self, x, output_unused: bool = False):
        return self._mlp_of_normed(self._mlp_norm()(x), output_unused)

    def _mlp_of_normed(self, normed, output_unused: bool = False):
        if self.sandwich:  # the post-norm's backward reads the MLP's output: its values are used even in a replay
            return self.post_feedforward_layernorm(self.mlp(normed))
        return self.mlp(normed, output_unused=output_unused)


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
        self.replay = "auto"  # auto | whole | split: how a replayed layer runs (models/recompute.py)
        # auto (the plan decides) | off: replayed layers as CUDA graphs (off: kept layers' graphs too)
        self.replay_graphs = "auto"
        self.kept_graphs_setting = "auto"  # auto (the plan decides) | off: kept layers as CUDA graphs
        self.graphs: ReplayGraphs | None = None  # the captured replays (models/replay_graphs.py), made when used
        self.kept_graphs: KeptGraphs | None = None  # kept layers as graphs (models/kept_graphs.py), made when used
        # the adapters' operands, made once per optimizer step for every layer (kernels/step_operands.py)
        self.step_operands: StepOperands | None = StepOperands()  # None: each op makes its own
        self.memory_budget: int | None = None  # bytes (max_memory); None: what the device gives
        self.memory_plan: MemoryPlan | None = None  # the plan of the last training forward (models/memory_plan.py)
        self.forced_plan: MemoryPlan | None = None  # set: every training step runs this plan, unplanned
        self.plan_target = 1.0  # < 1: plans aim at this fraction of the budget (a retry after running out of memory)
        self.decodes_between_steps = False  # GRPO: generation between the steps; no plan puts a tied table on the host
        self.optimizer_footprint = OptimizerFootprint()  # what the optimizer adds per trained weight (the trainer's)
        # whether the optimizer's state exists (the trainer's: False until its first step); None, unknown (a plain
        # loop): the first plan made counts it to come, later ones find it resident
        self.optimizer_state_allocated: bool | None = None

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

    def plan_step(self, batch: int, seq_len: int, dtype: torch.dtype, device: torch.device,
                  head: nn.Module | None = None) -> MemoryPlan:
        """The memory plan of a training step on ``batch`` x ``seq_len`` tokens (models/memory_plan.py), made once
        per batch shape (lengths in buckets of 256), checkpointing setting and budget, and printed when it
        changes. ``head``: the causal LM's output head (the plan may then put the input table on the host)."""
        if self.forced_plan is not None:
            self.memory_plan = self.forced_plan
            return self.forced_plan
        seq = -(-seq_len // 256) * 256
        mode = checkpoint_mode(self.gradient_checkpointing)
        tiled = tiled_mlp_mode(self.tiled_mlp)
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)(device) \
            if device.type == "cuda" else 1.0
        # GRPO's model decodes between its steps: a graph pool reserved for the whole step would sit beside the KV cache
        graphs = self.replay_graphs != "off" and not self.decodes_between_steps and graphs_possible(self.layers, device)
        kept_graphs = graphs and self.kept_graphs_setting != "off"
        key = (batch, seq, dtype, device, mode, tiled, self.tiled_mlp_chunk, self.replay, self.memory_budget,
               fraction, head is not None, self.optimizer_footprint, self.decodes_between_steps, self.plan_target,
               graphs, kept_graphs)
        plans = self.__dict__.setdefault("_plans", {})
        if key not in plans:
            if self.kept_graphs is not None:  # a new plan: measured and run without an old shape's pool
                self.kept_graphs.release()
            if device.type == "cuda":  # measured without cuBLAS workspaces, as a first plan is (the estimate's
                release_workspaces()  # calibration counts them in): else a replan counts them twice (128 MiB)
            budget, source = device_budget(device, self.memory_budget)
            expand_segments_under_budget(device, source)
            state = self.optimizer_state_allocated  # None (unknown): only the first plan counts it to come
            sizes = step_sizes(self, batch, seq, dtype, device, head,
                               first_step=not (plans if state is None else state), optimizer=self.optimizer_footprint)
            plan = make_plan(sizes, budget, source, (batch, seq), self.optimizer_footprint.advice, mode=mode,
                             tiled_mlp=tiled, mlp_chunk=self.tiled_mlp_chunk, replay=self.replay,
                             host_tied_table=not self.decodes_between_steps, target=self.plan_target, graphs=graphs,
                             kept_graphs=kept_graphs)
            plans[key] = plan
            if plan != self.__dict__.get("_logged_plan"):  # one line per change of plan
                print(f"pronghorn: memory plan for batch {batch} x {seq} tokens: {plan.summary()}", flush=True)
                self.__dict__["_logged_plan"] = plan
        self.memory_plan = plans[key]
        return self.memory_plan

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        plan: MemoryPlan | None = None,
    ) -> torch.Tensor:
        """``plan``: the memory plan of this training step (made here, by ``plan_step``, when not given)."""
        if plan is None and self.training and torch.is_grad_enabled():
            shape = (input_ids if inputs_embeds is None else inputs_embeds).shape
            plan = self.plan_step(shape[0], shape[1], _activation_dtype(self), self.norm.weight.device)
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
        if masks is None:  # soft-capped attention takes the kernel's form of the mask
            build = attention_visibility if self.cfg.parts.attn_softcap else build_attention_mask
            masks = {w: build(attention_mask, t, past + t, w, x.device, packed_positions) for w in windows}
        if plan is not None:
            mlp_chunk = plan.mlp_chunk
        else:  # inference: tiled only when asked ("on"), for long prompts
            on = tiled_mlp_mode(self.tiled_mlp) == "on" and b * t > self.tiled_mlp_chunk
            mlp_chunk = self.tiled_mlp_chunk if on else None
        graphs = kept = None
        if plan is not None and plan.replay_graphs:
            graphs = self.graphs = self.graphs or ReplayGraphs()
        if plan is not None and plan.kept_graphs:
            kept = self.kept_graphs = self.kept_graphs or KeptGraphs()
        elif plan is not None and self.kept_graphs is not None:
            self.kept_graphs.release()  # a plan without them (a shape or budget whose plan was made before)
        with training_operands(self.step_operands if plan is not None else None):
            x = run_layers(self.layers, x, (cos, sin, masks, cache, mlp_chunk), plan, graphs, kept)
        if cache is not None:
            cache.advance(t)
        return self.norm(x)


def _activation_dtype(decoder: DecoderModel) -> torch.dtype:
    """The dtype of the activations a training step keeps: autocast's when it is on, else the weights'."""
    device = decoder.norm.weight.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return decoder.norm.weight.dtype


class DecoderForCausalLM(nn.Module):
    """Decoder + output head. ``forward`` matches transformers' CausalLM calling convention."""

    kernel_policy: KernelPolicy = DEFAULT_POLICY  # the loss's; set_kernel_policy sets every layer's
    # The contract with HF Trainer (and TRL's trainers, built on it): ``forward`` takes ``num_items_in_batch`` and
    # divides its loss sum by it, and its loss shifts the labels itself (position i predicts label i + 1), so the
    # Trainer counts the items over ``labels[..., 1:]``, as it does for transformers' own ``...ForCausalLM`` models.
    accepts_loss_kwargs = True
    loss_type = "ForCausalLM"

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
                                      replay: str | None = None, max_memory=None, replay_graphs: str | None = None,
                                      kept_graphs: str | None = None, **hf_options) -> None:
        """``mode``: on | offload | auto | off (models/recompute.py). Without one (how HF Trainer and TRL
        call it), a model already set to a checkpointing mode keeps it, one switched off by
        ``gradient_checkpointing_disable`` gets its mode back (TRL disables and re-enables it around reference
        forwards); otherwise it becomes "on". ``tiled_mlp``: auto | on | off, the norm + MLP over chunks of
        ``tiled_mlp_chunk`` tokens (models/tiled_mlp.py); None keeps the current setting. What transformers 5.17's
        Trainer also passes: ``every_n_layers`` None or 1 (pronghorn's "auto" mode picks the layers instead),
        ``offload`` True (without a ``mode``: "offload"); any other option only unset. ``replay``: auto | whole |
        split, how a replayed layer runs (auto: the memory plan picks). ``max_memory``: the memory budget ("16GiB",
        bytes; "none": the device's; None keeps the current one), models/memory_plan.py. ``replay_graphs`` and
        ``kept_graphs``: auto | off, whether the plan may run replayed layers (and kept ones) as CUDA graphs
        (models/replay_graphs.py, models/kept_graphs.py; "off" for replays turns off both); None keeps each."""
        if every_n_layers not in (None, 1):
            raise PronghornError(f"gradient_checkpointing_enable(every_n_layers={every_n_layers!r}): pronghorn "
                                 "checkpoints every layer in its mode; mode='auto' keeps the layers that fit")
        unknown = {k: v for k, v in hf_options.items() if v not in (None, False)}
        if unknown:
            raise PronghornError(f"gradient_checkpointing_enable: unsupported options {unknown}; pronghorn's own "
                                 "are mode (on | offload | auto | off), tiled_mlp, tiled_mlp_chunk, replay, "
                                 "max_memory, replay_graphs and kept_graphs")
        for name, value in (("replay_graphs", replay_graphs), ("kept_graphs", kept_graphs)):
            if value is not None and value not in GRAPH_SETTINGS:
                raise PronghornError(f"{name} must be one of {GRAPH_SETTINGS}, got {value!r}")
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
        if replay is not None:
            if replay not in REPLAYS:
                raise PronghornError(f"replay must be one of {REPLAYS}, got {replay!r}")
            self.model.replay = replay
        if max_memory is not None:
            self.set_memory_budget(max_memory)
        if replay_graphs is not None:
            self.model.replay_graphs = replay_graphs
        if kept_graphs is not None:
            self.model.kept_graphs_setting = kept_graphs

    def set_kernel_policy(self, policy: KernelPolicy) -> None:
        """Every op of the model takes ``policy`` (kernels/policy.py): the reference everywhere (the test oracle)
        or the fast paths, and the adapters' compute dtype. The layers hold it; replays read it from them."""
        for module in self.modules():
            if hasattr(type(module), "kernel_policy"):
                module.kernel_policy = policy

    def set_memory_budget(self, max_memory) -> None:
        """The most device memory a training step may hold at its peak ("16GiB", "24GB", bytes; None or "none":
        what the device gives, within ``torch.cuda.set_per_process_memory_fraction``). The next training forward
        plans for it (models/memory_plan.py); a step that cannot fit stops there with the smallest budget that
        would."""
        self.model.memory_budget = parse_budget(max_memory)

    @property
    def memory_plan(self) -> MemoryPlan | None:
        """The memory plan of the last training forward (None before one)."""
        return self.model.memory_plan

    def gradient_checkpointing_disable(self) -> None:
        if self.model.gradient_checkpointing:
            self.__dict__["_disabled_checkpoint_mode"] = self.model.gradient_checkpointing
        self.model.gradient_checkpointing = False

    @leaves_fp16_autocast  # where the family overflows fp16 and the weights are fp32 (models/precision.py)
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        shift_labels: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        return_logits: bool | None = None,
        return_token_logps: bool = False,
        keep_rows: torch.Tensor | None = None,
        temperature: float = 1.0,
        return_entropy: bool = False,
        **unused,
    ) -> CausalLMOutputWithPast:
        """With ``labels`` the loss is the mean next-token cross-entropy over non-ignored labels (or the sum
        divided by ``num_items_in_batch``); ``shift_labels`` given beside them (what a context-parallel collator
        passes) are targets already shifted, position i's own, and replace them, as in transformers. While
        training with labels, logits are not materialised unless ``return_logits=True``; otherwise they are
        returned as transformers does.

        ``return_token_logps=True`` (with ``labels``): instead of the loss, ``token_logps`` [batch, seq], the fp32
        log-prob of each next-token label (0 where ignored), from the chunked log-prob head (no logits). The
        preference trainers call it this way, so a DDP / FSDP wrapper sees one forward. ``keep_rows``: the flat
        indices of the labels not ignored, when the caller computed them on the host (no host sync).
        ``temperature``: the log-probs of ``softmax(logits / temperature)`` (GRPO's; not for a soft-capped family,
        whose cap comes first); ``return_entropy``: also ``token_entropy`` [batch, seq], each distribution's
        entropy (no gradient, 0 where ignored)."""
        plan = self.training_plan(*(input_ids if inputs_embeds is None else inputs_embeds).shape[:2])
        valid_rows = None
        if labels is not None:
            shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:] if shift_labels is None else shift_labels
            flat = None if return_token_logps else shifted.reshape(-1)  # the loss's labels
            # the fused loss's row count, copied while the layers run
            if flat is not None and fused_loss_path(self.lm_head.weight, flat, self.device, self.kernel_policy):
                valid_rows = ValidRows(flat)
        hidden = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, plan)
        loss = None
        if labels is not None:
            weight = self.lm_head.weight
            small = plan is not None and plan.loss_chunk_bytes < LOSS_CHUNK_BYTES[0]  # else the loss's own default
            rows = max(1, plan.loss_chunk_bytes // (weight.shape[0] * hidden.element_size())) if small else None
            if return_token_logps:
                out = causal_lm_output(None, None, past_key_values)
                if temperature != 1.0:
                    if self.config.parts.final_softcap:
                        raise PronghornError("a temperature with soft-capped logits: divide the capped logits "
                                             "(return_logits=True) instead")
                    hidden = hidden / temperature
                tok = self._token_logps(hidden, shifted, rows, keep_rows, return_entropy)
                if return_entropy:
                    tok, out["token_entropy"] = tok
                out["token_logps"] = tok
                return out
            loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, flat, num_items_in_batch,
                                        softcap=self.config.parts.final_softcap, chunk_size=rows,
                                        policy=self.kernel_policy, valid_rows=valid_rows)
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
        return causal_lm_output(loss, logits, past_key_values)

    def training_plan(self, batch: int, seq: int) -> MemoryPlan | None:
        """The memory plan of a training forward of ``batch`` x ``seq`` tokens (None outside training), the input
        table moved to the host first when the plan says so. ``forward`` calls it; so does a trainer that runs
        the backbone itself (GRPO's packed forward) and passes the plan on."""
        if not (self.training and torch.is_grad_enabled()):
            return None
        plan = self.model.plan_step(batch, seq, _activation_dtype(self.model), self.device, self.lm_head)
        if plan.table_on_host and self.model.embed_tokens.weight.device.type == "cuda":
            offload_embedding(self, tied=plan.table_on_host == "tied")
        return plan

    def _token_logps(self, hidden: torch.Tensor, shifted: torch.Tensor, chunk_rows: int | None,
                     keep_rows: torch.Tensor | None, entropy: bool = False):
        # soft-capped final logits (Gemma 2 / 3) are capped inside the chunked head
        out = linear_logprobs(hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight, shifted.reshape(-1),
                              chunk_size=chunk_rows, keep_rows=keep_rows, policy=self.kernel_policy,
                              softcap=self.config.parts.final_softcap, entropy=entropy)
        return tuple(t.view(shifted.shape) for t in out) if entropy else out.view(shifted.shape)
