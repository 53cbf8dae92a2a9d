"""config.json of the hub models the research configs name (the fields ModelConfig reads), as published at
https://huggingface.co/<id>/blob/main/config.json: their geometry without a download (``grpo_jax.memory``)."""

_QWEN_COMMON = dict(hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=True,
                    vocab_size=151936, bos_token_id=151643, eos_token_id=151645, use_sliding_window=False)
PUBLISHED_CONFIGS: dict[str, dict] = {
    "Qwen/Qwen2.5-0.5B-Instruct": dict(_QWEN_COMMON, model_type="qwen2", hidden_size=896, intermediate_size=4864,
                                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                       max_position_embeddings=32768),
    "Qwen/Qwen2.5-1.5B-Instruct": dict(_QWEN_COMMON, model_type="qwen2", hidden_size=1536, intermediate_size=8960,
                                       num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                       max_position_embeddings=32768),
    "Qwen/Qwen3-0.6B": dict(_QWEN_COMMON, model_type="qwen3", hidden_size=1024, intermediate_size=3072,
                            num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                            attention_bias=False, max_position_embeddings=40960),
}
