"""Train the tiny-MoE tokenizer: byte-level BPE on the corpus's train split.

Reads <corpus>/train.txt.xz (scripts/build_corpus.py), trains a byte-level BPE with the
`tokenizers` library (GPT-2 style pre-tokenization, all 256 bytes in the alphabet, so any text
encodes without unknown tokens) and writes tokenizer.json, tokenizer_config.json and
chat_template.jinja to <out>. Training is deterministic for a given corpus and library version.

    python scripts/train_tokenizer.py --corpus .corpus --out moetier/assets/tiny-moe
"""

from __future__ import annotations

import argparse
import json
import lzma
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

REPO = Path(__file__).resolve().parents[1]
EOS = "<|endoftext|>"  # document separator of the corpus; eos and pad
SPECIAL_TOKENS = [EOS, "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_bpe(documents: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer, length=len(documents))
    return tokenizer


def tokenizer_config(model_max_length: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": None,
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=REPO / ".corpus")
    parser.add_argument("--out", type=Path, default=REPO / "moetier" / "assets" / "tiny-moe")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--model-max-length", type=int, default=512)
    args = parser.parse_args()
    with lzma.open(args.corpus / "train.txt.xz", "rt", encoding="utf-8") as f:
        documents = f.read().split(EOS)
    tokenizer = train_bpe(documents, args.vocab_size)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == i, token
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.out / "tokenizer.json"))
    config = tokenizer_config(args.model_max_length)
    (args.out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (args.out / "chat_template.jinja").write_text(CHAT_TEMPLATE + "\n")
    print(f"vocab {tokenizer.get_vocab_size()} from {len(documents)} documents -> {args.out}")


if __name__ == "__main__":
    main()
