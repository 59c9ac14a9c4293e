"""Dataset flags (OpenRLHF names) and their DataConfig."""
from __future__ import annotations

import argparse


def add_data_args(parser: argparse.ArgumentParser, *, prompt_data: bool = False) -> None:
    g = parser.add_argument_group("data")
    name = "--prompt_data" if prompt_data else "--dataset"
    g.add_argument(name, dest="dataset", required=True,
                   help="comma-separated: local json/jsonl/parquet/arrow files or dirs, TYPE@DIR, or hub names")
    g.add_argument("--dataset_probs" if not prompt_data else "--prompt_data_probs", dest="dataset_probs", default=None,
                   help="comma-separated mixing probabilities, one per dataset")
    g.add_argument("--input_key", default="input")
    g.add_argument("--output_key", default="output")
    g.add_argument("--label_key", default=None)
    g.add_argument("--chosen_key", default="chosen")
    g.add_argument("--rejected_key", default="rejected")
    g.add_argument("--prompt_key", default=None)
    g.add_argument("--input_template", default=None, help='e.g. "User: {}\\nAssistant: "')
    g.add_argument("--apply_chat_template", action="store_true")
    g.add_argument("--tokenizer_chat_template", default=None)
    g.add_argument("--max_len", type=int, default=2048)
    g.add_argument("--prompt_max_len", type=int, default=1024)
    g.add_argument("--max_samples", type=int, default=None)
    g.add_argument("--train_split", default="train")
    g.add_argument("--eval_split", default=None)
    g.add_argument("--pretrain_mode", action="store_true", help="loss on every token (continued pre-training)")
    g.add_argument("--packing_samples", action="store_true")
    g.add_argument("--skip_bad_rows", action="store_true", help="skip malformed rows (counted) instead of failing")


def data_config(args):
    from engine.data.config import DataConfig

    return DataConfig(
        dataset=args.dataset,
        dataset_probs=args.dataset_probs,
        input_key=args.input_key,
        output_key=args.output_key,
        label_key=args.label_key,
        chosen_key=args.chosen_key,
        rejected_key=args.rejected_key,
        prompt_key=args.prompt_key,
        input_template=args.input_template,
        apply_chat_template=args.apply_chat_template,
        tokenizer_chat_template=args.tokenizer_chat_template,
        max_len=args.max_len,
        prompt_max_len=args.prompt_max_len,
        max_samples=args.max_samples,
        train_split=args.train_split,
        eval_split=args.eval_split,
        pretrain_mode=args.pretrain_mode,
        packing_samples=args.packing_samples,
        skip_bad_rows=args.skip_bad_rows,
        seed=args.seed,
    )


def load_splits(dataset_cls, args, **options):
    """``(tokenizer, train_set, eval_set or None)``: ``--dataset`` tokenised by ``--pretrain``'s tokenizer."""
    from transformers import AutoTokenizer

    data = data_config(args)
    tokenizer = AutoTokenizer.from_pretrained(args.pretrain)
    train_set = dataset_cls.from_config(data, tokenizer, split=data.train_split, **options)
    eval_set = dataset_cls.from_config(data, tokenizer, split=data.eval_split, **options) if data.eval_split else None
    return tokenizer, train_set, eval_set
