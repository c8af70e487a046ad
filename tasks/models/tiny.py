"""tiny-llama: a random 2-layer Llama with a self-trained BPE tokenizer, built in seconds (tests, smoke).

torch/transformers/tokenizers are imported inside the functions that need them.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

from stillhouse.tasks.models.publish import publish, read_manifest, tmp_sibling

log = logging.getLogger(__name__)

TINY_NAME = "tiny-llama"

# ChatML, the format SmolLM2 and Qwen use. `{% generation %}` marks assistant text so a trainer can
# ask apply_chat_template(return_assistant_tokens_mask=True) for the loss mask.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")


# --------------------------------------------------------------------------- tiny model


def _tiny_corpus(seed: int, n: int = 600) -> list[str]:
    """Arithmetic word problems and solutions in the formats the verifier reads, plus chat markers."""
    rng = random.Random(seed)
    names = ["Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivan", "June"]
    things = ["apples", "books", "coins", "pens", "eggs", "cards", "cookies", "marbles", "stamps"]
    ops = [("more", "+", lambda a, b: a + b), ("fewer", "-", lambda a, b: a - b),
           ("times as many", "*", lambda a, b: a * b)]
    lines = []
    for _ in range(n):
        who, other = rng.sample(names, 2)
        thing = rng.choice(things)
        a, b = rng.randint(2, 99), rng.randint(2, 20)
        word, sym, fn = rng.choice(ops)
        ans = fn(a, b)
        if word == "times as many":
            q = f"{who} has {a} {thing}. {other} has {b} {word}. How many {thing} does {other} have?"
        else:
            q = f"{who} has {a} {thing}. {other} has {b} {word} {thing} than {who}. How many {thing} does {other} have?"
        sol = f"{other} has {a} {sym} {b} = {ans} {thing}. The answer is \\boxed{{{ans}}}.\n#### {ans}"
        lines.append(f"<|im_start|>user\nSolve the following math problem step by step.\n\n{q}<|im_end|>\n"
                     f"<|im_start|>assistant\n{sol}<|im_end|>\n")
        lines.append(f"Question: {q}\nAnswer: {sol}\n")
    lines.append(" ".join(str(i) for i in range(1000)))
    lines.append("Problem: Write a new, harder version of this problem. The final answer is 42.")
    return lines


def train_chat_tokenizer(texts: list[str], vocab_size: int, max_length: int, *, split_digits: bool = False):
    """A byte-level BPE tokenizer trained on `texts`, with the tiny models' special tokens
    (bos <s>, eos <|im_end|>, pad <pad>) and ChatML chat template, as a transformers tokenizer.

    split_digits: digit runs become pre-tokens of their own (tiny-tutor wants "17" to be one token
    wherever it stands, see stillhouse.tasks.models.tiny_tutor).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=False), byte_level])
        if split_digits else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=["</s>", "<|im_start|>"],
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = TINY_CHAT_TEMPLATE
    return hf_tok


def build_tiny_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 256,
    max_position_embeddings: int = 2048,
) -> Path:
    """Build a random tiny Llama with a self-trained byte-level BPE tokenizer into `out_dir`.

    Deterministic given the arguments; takes a second or two on CPU. head_dim = hidden_size /
    num_heads must be 64 (vLLM's CPU kernels need it). The folder holds safetensors weights, the
    tokenizer with bos/eos/pad and a ChatML chat template, and a manifest written last; a second
    call with the same arguments returns the existing folder.
    """
    out_dir = Path(out_dir)
    if hidden_size % num_heads or hidden_size // num_heads != 64:
        raise ValueError(f"head_dim must be 64, got hidden_size={hidden_size} num_heads={num_heads}")
    spec = {
        "kind": TINY_NAME, "seed": seed, "vocab_size": vocab_size, "hidden_size": hidden_size,
        "num_layers": num_layers, "num_heads": num_heads, "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings, "version": 1,
    }
    if (read_manifest(out_dir) or {}).get("spec") == spec:
        return out_dir

    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    hf_tok = train_chat_tokenizer(list(_tiny_corpus(seed)), vocab_size, max_position_embeddings)

    ids = {t: hf_tok.convert_tokens_to_ids(t) for t in TINY_SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<pad>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<s>"], eos_token_id=[ids["<|im_end|>"], ids["</s>"]], pad_token_id=ids["<pad>"]
    )

    tmp = tmp_sibling(out_dir)
    try:
        model.save_pretrained(tmp)
        hf_tok.save_pretrained(tmp)
        return publish(tmp, out_dir, {"name": TINY_NAME, "spec": spec})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


