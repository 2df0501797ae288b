"""Every decoder family ``transformers`` ships that fits the runner's layout: the runner reproduces the
model's own logits bit for bit, and greedy CLaSp equals ``generate``; families that do not fit are
refused at load with a message naming what is missing. The README's family table is this list."""

from __future__ import annotations

import warnings

import pytest
import torch

from clasp_decoding.config import GenerationConfig
from clasp_decoding.errors import UnsupportedModelError
from clasp_decoding.families import check_supported
from clasp_decoding.runner import ModelRunner
from conftest import hf_greedy, random_prompt, run_tokens, scratch_cache

COMMON = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
SUPPORTED = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "phi3": {},
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "sliding_window": 8},
    "gemma3_text": {"head_dim": 16, "sliding_window": 8},
    "olmo": {},
    "olmo2": {},
    "granite": {
        "embedding_multiplier": 3.0,
        "logits_scaling": 2.0,
        "residual_multiplier": 0.5,
        "attention_multiplier": 0.3,
    },
    "smollm3": {},
    "cohere": {"logit_scale": 0.5},
    "glm": {"head_dim": 16},
    "starcoder2": {},
    "stablelm": {},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "shared_expert_intermediate_size": 32, **MOE},
    "qwen3_moe": {"num_experts": 4, "head_dim": 16, **MOE},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    "granitemoe": {
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "embedding_multiplier": 2.0,
        "logits_scaling": 1.5,
    },
    "helium": {"head_dim": 16},
    "exaone4": {"head_dim": 16},
    "arcee": {},
    "seed_oss": {"head_dim": 16},
    "hunyuan_v1_dense": {"head_dim": 16},
    "deepseek_v3": {
        "num_key_value_heads": 4,
        "kv_lora_rank": 16,
        "q_lora_rank": 32,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 16,
        "n_routed_experts": 4,
        "first_k_dense_replace": 2,
        "n_group": 1,
        "topk_group": 1,
        **MOE,
    },
}
REFUSED = {
    "phi": "lacks model.norm",  # Phi-1/2: final_layernorm, a layout of its own
    "gpt2": "lacks model, model.embed_tokens|lacks model",
    "gpt_neox": "lacks model",
    "falcon": "lacks model",
    "jamba": "lacks",
    "qwen3_next": "recurrent state",
    "mamba": "lacks model",
}


def build(family: str, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = AutoConfig.for_model(family, **{**COMMON, **extra})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(3.0 if "embed" in name or "lm_head" in name else 1.5)
    return model


@pytest.mark.parametrize("family", list(SUPPORTED))
def test_family_runs_exactly(family):
    model = build(family, **SUPPORTED[family])
    runner = ModelRunner(model)
    ids = torch.tensor(random_prompt(1, 20))
    with torch.inference_mode():
        ref = model(ids[None]).logits[0].float()
    logits, _ = runner.forward(scratch_cache(runner, 32), ids, 0)
    assert torch.equal(logits, ref)  # embedding, family steps, layers, norm, head: the model's own maths
    prompt = random_prompt(3, 8) * 2
    want = hf_greedy(model, prompt, 24)
    for method in ("clasp", "hybrid"):
        cfg = GenerationConfig(
            max_new_tokens=24, method=method, num_skip=2, draft_exit_threshold=0.0, layer_opt_interval=2
        )
        out, _ = run_tokens(runner, prompt, cfg)
        assert out == want, (family, method)


@pytest.mark.parametrize("family", list(REFUSED))
def test_family_that_does_not_fit_is_refused_clearly(family):
    model = build(family)
    with pytest.raises(UnsupportedModelError, match=REFUSED[family]):
        check_supported(model)


def test_encoder_decoders_are_refused():
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        check_supported(model)
