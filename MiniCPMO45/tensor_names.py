"""Every tensor name and shape of an official MiniCPM-o 4.5 checkpoint, derived from its config.

The names are the checkpoint's own (`llm.`, `vpm.`, `resampler.`, `apm.`, `audio_projection_layer.`, `tts.`), see
spec §1.1. Sub-modules switched off by `init_vision` / `init_audio` / `init_tts` have no tensors.
"""

from __future__ import annotations

from MiniCPMO45.config import MiniCPMOConfig

Shapes = dict[str, tuple[int, ...]]

# The TTS backbone is an HF LlamaModel built without a vocabulary size, so it carries Llama's default
# 32000-row `embed_tokens` that inference never uses.
TTS_BACKBONE_VOCAB = 32000


def _linear(out: Shapes, name: str, n_out: int, n_in: int, bias: bool) -> None:
    out[f"{name}.weight"] = (n_out, n_in)
    if bias:
        out[f"{name}.bias"] = (n_out,)


def _layer_norm(out: Shapes, name: str, width: int) -> None:
    out[f"{name}.weight"] = (width,)
    out[f"{name}.bias"] = (width,)


def _llm(cfg: MiniCPMOConfig, out: Shapes) -> None:
    llm = cfg.llm
    d, hd, bias = llm.hidden_size, llm.head_dim, llm.attention_bias
    out["llm.model.embed_tokens.weight"] = (llm.vocab_size, d)
    for i in range(llm.num_hidden_layers):
        p = f"llm.model.layers.{i}"
        _linear(out, f"{p}.self_attn.q_proj", llm.num_attention_heads * hd, d, bias)
        _linear(out, f"{p}.self_attn.k_proj", llm.num_key_value_heads * hd, d, bias)
        _linear(out, f"{p}.self_attn.v_proj", llm.num_key_value_heads * hd, d, bias)
        _linear(out, f"{p}.self_attn.o_proj", d, llm.num_attention_heads * hd, bias)
        out[f"{p}.self_attn.q_norm.weight"] = (hd,)
        out[f"{p}.self_attn.k_norm.weight"] = (hd,)
        _linear(out, f"{p}.mlp.gate_proj", llm.intermediate_size, d, False)
        _linear(out, f"{p}.mlp.up_proj", llm.intermediate_size, d, False)
        _linear(out, f"{p}.mlp.down_proj", d, llm.intermediate_size, False)
        out[f"{p}.input_layernorm.weight"] = (d,)
        out[f"{p}.post_attention_layernorm.weight"] = (d,)
    out["llm.model.norm.weight"] = (d,)
    if not llm.tie_word_embeddings:
        out["llm.lm_head.weight"] = (llm.vocab_size, d)


def _vision(cfg: MiniCPMOConfig, out: Shapes) -> None:
    v = cfg.vision
    d, patch = v.hidden_size, v.patch_size
    out["vpm.embeddings.patch_embedding.weight"] = (d, v.num_channels, patch, patch)
    out["vpm.embeddings.patch_embedding.bias"] = (d,)
    out["vpm.embeddings.position_embedding.weight"] = ((v.image_size // patch) ** 2, d)
    for i in range(cfg.vision_layers_kept):
        p = f"vpm.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(out, f"{p}.self_attn.{proj}", d, d, True)
        _layer_norm(out, f"{p}.layer_norm1", d)
        _layer_norm(out, f"{p}.layer_norm2", d)
        _linear(out, f"{p}.mlp.fc1", v.intermediate_size, d, True)
        _linear(out, f"{p}.mlp.fc2", d, v.intermediate_size, True)
    _layer_norm(out, "vpm.post_layernorm", d)

    embed, kv = cfg.llm.hidden_size, v.hidden_size
    out["resampler.query"] = (cfg.query_num, embed)
    if kv != embed:  # the official resampler uses an identity when the widths already match
        out["resampler.kv_proj.weight"] = (embed, kv)
    out["resampler.attn.in_proj_weight"] = (3 * embed, embed)
    out["resampler.attn.in_proj_bias"] = (3 * embed,)
    _linear(out, "resampler.attn.out_proj", embed, embed, True)
    for norm in ("ln_q", "ln_kv", "ln_post"):
        _layer_norm(out, f"resampler.{norm}", embed)
    out["resampler.proj"] = (embed, embed)


def _audio(cfg: MiniCPMOConfig, out: Shapes) -> None:
    a = cfg.audio
    d = a.d_model
    out["apm.conv1.weight"] = (d, a.num_mel_bins, 3)
    out["apm.conv1.bias"] = (d,)
    out["apm.conv2.weight"] = (d, d, 3)
    out["apm.conv2.bias"] = (d,)
    out["apm.embed_positions.weight"] = (a.max_source_positions, d)
    for i in range(a.encoder_layers):
        p = f"apm.layers.{i}"
        _linear(out, f"{p}.self_attn.q_proj", d, d, True)
        _linear(out, f"{p}.self_attn.k_proj", d, d, False)  # Whisper's key projection has no bias
        _linear(out, f"{p}.self_attn.v_proj", d, d, True)
        _linear(out, f"{p}.self_attn.out_proj", d, d, True)
        _layer_norm(out, f"{p}.self_attn_layer_norm", d)
        _linear(out, f"{p}.fc1", a.encoder_ffn_dim, d, True)
        _linear(out, f"{p}.fc2", d, a.encoder_ffn_dim, True)
        _layer_norm(out, f"{p}.final_layer_norm", d)
    _layer_norm(out, "apm.layer_norm", d)
    proj_in = a.encoder_ffn_dim // 4
    _linear(out, "audio_projection_layer.linear1", cfg.llm.hidden_size, proj_in, True)
    _linear(out, "audio_projection_layer.linear2", cfg.llm.hidden_size, cfg.llm.hidden_size, True)


def _tts(cfg: MiniCPMOConfig, out: Shapes) -> None:
    t = cfg.tts
    d = t.hidden_size
    head_dim = d // t.num_attention_heads
    out["tts.emb_text.weight"] = (t.num_text_tokens, d)
    for q in range(t.num_vq):
        out[f"tts.emb_code.{q}.weight"] = (t.num_audio_tokens, d)
        # weight-normed Linear: magnitude g [out, 1] and direction v [out, in]
        out[f"tts.head_code.{q}.parametrizations.weight.original0"] = (t.num_audio_tokens, 1)
        out[f"tts.head_code.{q}.parametrizations.weight.original1"] = (t.num_audio_tokens, d)
    for name in ("projector_spk", "projector_semantic"):
        _linear(out, f"tts.{name}.linear1", d, t.llm_dim, True)
        _linear(out, f"tts.{name}.linear2", d, d, True)
    out["tts.model.embed_tokens.weight"] = (TTS_BACKBONE_VOCAB, d)
    for i in range(t.num_hidden_layers):
        p = f"tts.model.layers.{i}"
        _linear(out, f"{p}.self_attn.q_proj", t.num_attention_heads * head_dim, d, False)
        _linear(out, f"{p}.self_attn.k_proj", t.num_key_value_heads * head_dim, d, False)
        _linear(out, f"{p}.self_attn.v_proj", t.num_key_value_heads * head_dim, d, False)
        _linear(out, f"{p}.self_attn.o_proj", d, t.num_attention_heads * head_dim, False)
        _linear(out, f"{p}.mlp.gate_proj", t.intermediate_size, d, False)
        _linear(out, f"{p}.mlp.up_proj", t.intermediate_size, d, False)
        _linear(out, f"{p}.mlp.down_proj", d, t.intermediate_size, False)
        out[f"{p}.input_layernorm.weight"] = (d,)
        out[f"{p}.post_attention_layernorm.weight"] = (d,)
    out["tts.model.norm.weight"] = (d,)


def official_tensor_shapes(config: MiniCPMOConfig) -> Shapes:
    """Map every official tensor name of a checkpoint with this config to its shape."""
    out: Shapes = {}
    _llm(config, out)
    if config.init_vision:
        _vision(config, out)
    if config.init_audio:
        _audio(config, out)
    if config.init_tts:
        _tts(config, out)
    return out
