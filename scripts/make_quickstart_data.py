"""Make the quickstart's data and tokenizer, reproducibly: `python scripts/make_quickstart_data.py`.

Writes data/quickstart/:
  sft.jsonl      chat examples ("messages") of small arithmetic and word tasks
  dpo.jsonl      arithmetic preferences: the right sum (chosen) against a wrong one (rejected), wrong
                 in ways a small model can learn to avoid (off by ten, or ten times too large)
  grpo.jsonl     arithmetic prompts with their `answer`, for the exact-answer reward
  tokenizer/     a byte-level BPE tokenizer of 512 tokens trained on that text, with a ChatML
                 chat template (assistant turns in generation markers, for assistant-only loss)

The tiny presets (ftune/presets.py) have a vocabulary of 512 to match. The same seed always
gives the same files, so the shipped files can be checked against a fresh run.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 512
# Order fixes the ids: pad 0, bos 1, eos 2 (the tiny presets' config says the same).
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|im_end|>", "<|im_start|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
WORDS = ["apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "piano", "lemon", "robot",
         "candle", "forest", "silver", "garden", "rocket", "winter", "yellow", "planet", "bridge", "coffee"]


def arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if rng.random() < 0.5:
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}"
    a, b = max(a, b), min(a, b)
    return f"What is {a} - {b}?", f"{a} - {b} = {a - b}"


def reverse_words(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(2, 4))
    return f"Reverse the words: {' '.join(words)}", " ".join(reversed(words))


def spell(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f"Spell the word {word}.", "-".join(word.upper())


TASKS = [arithmetic, arithmetic, reverse_words, spell]


def make_examples(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        question, answer = rng.choice(TASKS)(rng)
        examples.append({"messages": [{"role": "user", "content": question},
                                      {"role": "assistant", "content": answer}]})
    return examples


def preference_examples(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        wrong = rng.choice([(a + b) * 10, a + b + 10, abs(a - b)])
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
                     "chosen": [{"role": "assistant", "content": f"{a} + {b} = {a + b}"}],
                     "rejected": [{"role": "assistant", "content": f"{a} + {b} = {wrong}"}]})
    return rows


def prompt_examples(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": str(a + b)})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    # Digits one by one, so numbers share tokens (arithmetic is learnable); byte-level for the rest.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"], chat_template=CHAT_TEMPLATE, model_max_length=1024,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "quickstart")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    examples = make_examples(args.count, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "sft.jsonl", examples)
    # Their own seeds, so that sft.jsonl (and the tokenizer trained on it) stay as they were.
    write_jsonl(args.out / "dpo.jsonl", preference_examples(500, args.seed + 1))
    write_jsonl(args.out / "grpo.jsonl", prompt_examples(500, args.seed + 2))

    texts = [message["content"] for example in examples for message in example["messages"]]
    texts += ["user", "assistant", "system"]
    tokenizer = train_tokenizer(texts)
    tokenizer.save_pretrained(args.out / "tokenizer")
    print(f"wrote {len(examples)} examples and a {len(tokenizer)}-token tokenizer to {args.out}")


if __name__ == "__main__":
    main()
