"""The data pipeline: loading every format, mixing, templates, tokenized samples and their
loss masks, bad rows, preference / KTO / prompt / PRM data, collation, packing, sharding."""
from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch

from engine.data.collate import pad_collate, preference_collate
from engine.data.config import DataConfig
from engine.data.errors import DataError, DataWarning
from engine.data.loading import blend_datasets, load_dataset_source
from engine.data.packing import pack_samples, packed_collate
from engine.data.preference import PreferenceDataset, UnpairedPreferenceDataset
from engine.data.process_reward import ProcessRewardDataset
from engine.data.prompts import PromptDataset
from engine.data.rows import Rows
from engine.data.sampler import iterate_batches, shard_indices
from engine.data.sft import SFTDataset
from engine.data.templates import PromptTemplate

ROWS = [{"input": f"What is {i}+{i}?", "output": f"It is {2 * i}."} for i in range(5)]
CHAT_PROMPT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


# ----- helpers --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    from models.tiny import build_tokenizer

    return build_tokenizer()


def write(path, rows: list[dict]) -> str:
    """Write rows in the format named by the file's extension; return the path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":
        keys = list(rows[0])
        path.write_text(",".join(keys) + "\n" + "".join(",".join(str(r[k]) for k in keys) + "\n" for r in rows))
    elif suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif suffix == ".arrow":  # the IPC stream format HF datasets writes
        table = pa.Table.from_pylist(rows)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    return str(path)


def config(dataset: str, **overrides) -> DataConfig:
    return DataConfig(dataset=dataset, **overrides)


def masked_text(tok, sample: dict) -> str:
    return tok.decode([t for t, m in zip(sample["input_ids"], sample["loss_mask"]) if m])


def unmasked_text(tok, sample: dict) -> str:
    return tok.decode([t for t, m in zip(sample["input_ids"], sample["loss_mask"]) if not m])


def bos_tokenizer():
    """The tiny tokenizer, made to put bos in front by default (like Llama's)."""
    from tokenizers import processors

    from models.tiny import build_tokenizer

    tok = build_tokenizer()
    tok._tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]),
    ])
    return tok


# ----- config ---------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, flag", [
    (dict(dataset="a.jsonl,b.jsonl", dataset_probs="1.0"), "--dataset_probs"),
    (dict(dataset="a.jsonl,b.jsonl", dataset_probs="0.5,0.6"), "sum to 1"),
    (dict(dataset="a.jsonl,b.jsonl", dataset_probs="0.5,x"), "--dataset_probs"),
    (dict(dataset="a.jsonl,b.jsonl", dataset_probs="1.0,0"), "--dataset_probs"),
    (dict(dataset="a.jsonl,"), "--dataset"),
    (dict(max_len=0), "--max_len"),
    (dict(prompt_max_len=-1), "--prompt_max_len"),
    (dict(max_samples=0), "--max_samples"),
    (dict(input_template="User: "), "--input_template"),
    (dict(input_template="Q: {}", apply_chat_template=True), "--apply_chat_template"),
    (dict(tokenizer_chat_template="{{ x }}"), "--tokenizer_chat_template"),
    (dict(pretrain_mode=True, apply_chat_template=True), "--pretrain_mode"),
    (dict(input_key=""), "--input_key"),
])
def test_config_errors_name_the_flag(overrides, flag):
    with pytest.raises(ValueError, match=flag):
        DataConfig(**{"dataset": "a.jsonl", **overrides})


def test_config_probabilities_are_renormalised():
    cfg = config("a,b,c", dataset_probs="0.3333333,0.3333333,0.3333334")
    assert cfg.dataset_specs == ["a", "b", "c"]
    assert sum(cfg.probabilities) == pytest.approx(1.0, abs=1e-12)


def test_cli_flags_build_the_config():
    from engine.cli import train_sft

    job = train_sft.parse_args(["--pretrain", "m", "--seed", "3", "--dataset", "a.jsonl,b.jsonl",
                                "--dataset_probs", "0.4,0.6", "--apply_chat_template"])
    cfg = job.data
    assert cfg.dataset_specs == ["a.jsonl", "b.jsonl"] and cfg.seed == 3 and cfg.apply_chat_template


# ----- loading --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["data.json", "data.jsonl", "data.parquet", "data.arrow", "data.csv"])
def test_load_every_file_format(tmp_path, name):
    path = write(tmp_path / name, ROWS)
    rows = load_dataset_source(path)
    assert [rows[i] for i in range(len(rows))] == ROWS
    assert rows.origin(3) == (path, 3)


def test_type_at_dir_takes_files_by_split_name(tmp_path):
    write(tmp_path / "d" / "train.jsonl", ROWS[:3])
    write(tmp_path / "d" / "test.jsonl", ROWS[3:])
    write(tmp_path / "d" / "ignored.parquet", ROWS)  # not json: json@ skips it
    train = load_dataset_source(f"json@{tmp_path / 'd'}", split="train")
    test = load_dataset_source(f"json@{tmp_path / 'd'}", split="test")
    assert list(train) == ROWS[:3] and list(test) == ROWS[3:]
    with pytest.raises(DataError, match=r"no files for split 'validation'.*splits found: test, train"):
        load_dataset_source(f"json@{tmp_path / 'd'}", split="validation")
    write(tmp_path / "d" / "train_sft.jsonl", ROWS[:1])  # a split name of the user's own
    assert list(load_dataset_source(f"json@{tmp_path / 'd'}", split="train_sft")) == ROWS[:1]
    assert list(load_dataset_source(f"json@{tmp_path / 'd'}", split="train")) == ROWS[:3]


def test_directory_of_shards_and_unnamed_files(tmp_path):
    write(tmp_path / "hub" / "data" / "train-00000-of-00002.parquet", ROWS[:2])
    write(tmp_path / "hub" / "data" / "train-00001-of-00002.parquet", ROWS[2:])
    rows = load_dataset_source(str(tmp_path / "hub"))
    assert list(rows) == ROWS and rows.origin(2)[0].endswith("train-00001-of-00002.parquet") and rows.origin(2)[1] == 0
    write(tmp_path / "plain" / "a.jsonl", ROWS[:1])
    write(tmp_path / "plain" / "b.json", ROWS[1:])
    assert list(load_dataset_source(str(tmp_path / "plain"))) == ROWS  # no split names: all train
    with pytest.raises(DataError, match="split 'test'"):
        load_dataset_source(str(tmp_path / "plain"), split="test")


def test_save_to_disk_directory(tmp_path):
    import datasets

    datasets.DatasetDict({
        "train": datasets.Dataset.from_list(ROWS[:4]), "test": datasets.Dataset.from_list(ROWS[4:]),
    }).save_to_disk(str(tmp_path / "saved"))
    assert list(load_dataset_source(str(tmp_path / "saved"), split="test")) == ROWS[4:]


def test_load_errors_name_the_path(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no such file") as error:
        load_dataset_source(missing)
    assert missing in str(error.value) and ".parquet" in str(error.value)  # lists what is supported
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notes\.txt: unsupported file type '\.txt'"):
        load_dataset_source(str(tmp_path / "notes.txt"))
    (tmp_path / "broken.jsonl").write_text('{"input": "a"}\n{"input": oops}\n')
    with pytest.raises(DataError, match=r"broken\.jsonl: line 2 is not valid JSON.*--skip_bad_rows"):
        load_dataset_source(str(tmp_path / "broken.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl: the file is empty"):
        load_dataset_source(str(tmp_path / "empty.jsonl"))
    with pytest.raises(DataError, match="'train' split only"):
        load_dataset_source(write(tmp_path / "one.jsonl", ROWS), split="test")


def test_unreachable_hub_name_is_a_clear_error(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # fail at once instead of retrying
    with pytest.raises(DataError, match=r"someorg/nothing: not a local file or directory, and loading it from the "
                                        r"HuggingFace hub failed.*supported: local"):
        load_dataset_source("someorg/nothing")


def test_max_samples_caps_each_source_and_the_mixture(tmp_path):
    a, b = write(tmp_path / "a.jsonl", ROWS), write(tmp_path / "b.jsonl", ROWS)
    assert len(load_dataset_source(a, max_samples=2)) == 2
    mixed = blend_datasets(config(f"{a},{b}", max_samples=3))
    assert [mixed.origin(i) for i in range(len(mixed))] == [(a, 0), (a, 1), (a, 2)]


# ----- mixing ---------------------------------------------------------------------------------
def test_blend_without_probs_concatenates(tmp_path):
    a, b = write(tmp_path / "a.jsonl", ROWS[:2]), write(tmp_path / "b.parquet", ROWS[2:])
    assert list(blend_datasets(config(f"{a}, {b}"))) == ROWS


def test_blend_mixes_by_probability_deterministically_like_openrlhf(tmp_path):
    import datasets

    a_rows = [{"text": f"a{i}"} for i in range(600)]
    b_rows = [{"text": f"b{i}"} for i in range(150)]
    a, b = write(tmp_path / "a.jsonl", a_rows), write(tmp_path / "b.jsonl", b_rows)
    mixed = blend_datasets(config(f"{a},{b}", dataset_probs="0.8,0.2", seed=7))
    texts = [row["text"] for row in mixed]
    share_a = sum(text.startswith("a") for text in texts) / len(texts)
    assert share_a == pytest.approx(0.8, abs=0.03)
    assert set(texts) == {r["text"] for r in a_rows + b_rows}  # every row is used at least once
    assert texts == [row["text"] for row in blend_datasets(config(f"{a},{b}", dataset_probs="0.8,0.2", seed=7))]
    assert texts != [row["text"] for row in blend_datasets(config(f"{a},{b}", dataset_probs="0.8,0.2", seed=8))]
    # The order OpenRLHF's blending_datasets gets from interleave_datasets for the same seed.
    reference = datasets.interleave_datasets(
        [datasets.Dataset.from_list(a_rows), datasets.Dataset.from_list(b_rows)],
        probabilities=[0.8, 0.2], seed=7, stopping_strategy="all_exhausted",
    )
    assert texts == reference["text"]
    # Rows keep their origin through the mixing.
    first_b = texts.index("b5")
    assert mixed.origin(first_b) == (b, 5)


def test_error_in_a_mixture_names_the_source_file_and_row(tmp_path, tok):
    a = write(tmp_path / "a.jsonl", ROWS)
    b = write(tmp_path / "b.jsonl", ROWS[:3] + [{"input": "q"}] + ROWS[3:])
    with pytest.raises(DataError) as error:
        SFTDataset.from_config(config(f"{a},{b}", dataset_probs="0.5,0.5"), tok)
    assert str(error.value).startswith(f"{b}, row 3, key 'output': missing")


# ----- templates ------------------------------------------------------------------------------
def test_input_template_and_plain_prompts(tok):
    template = PromptTemplate(tokenizer=tok, input_template="User: {}\nAssistant: ")
    assert template.prompt("hi {x}", key="input") == "User: hi {x}\nAssistant: "
    assert PromptTemplate(tokenizer=tok).prompt("hi", key="input") == "hi"
    assert template.prompt_and_response("hi", "there\n\n", prompt_key="i", response_key="o") == (
        "User: hi\nAssistant: ", "there")


def test_chat_template_prompts_and_conversations(tok):
    template = PromptTemplate(tokenizer=tok, apply_chat_template=True)
    assert template.prompt("hi", key="input") == CHAT_PROMPT.format("hi")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert template.prompt(messages, key="input") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n" + CHAT_PROMPT.format("hi"))
    assert template.prompt_and_response("hi", "yo", prompt_key="i", response_key="o") == (
        CHAT_PROMPT.format("hi"), "yo<|im_end|>")
    conversation = messages + [{"role": "assistant", "content": "yo"}]
    assert template.split_conversation(conversation, key="input")[1] == "yo<|im_end|>"


def test_tokenizer_chat_template_overrides_without_mutating(tok):
    original = tok.chat_template
    override = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}" \
               "{% if add_generation_prompt %}[assistant]{% endif %}"
    template = PromptTemplate.from_config(config("x", apply_chat_template=True, tokenizer_chat_template=override), tok)
    assert template.prompt_and_response("hi", "yo", prompt_key="i", response_key="o") == ("[user]hi[assistant]", "yo")
    assert tok.chat_template == original


def test_missing_chat_template_names_the_flags(tok):
    from models.tiny import build_tokenizer

    plain = build_tokenizer()
    plain.chat_template = None
    with pytest.raises(ValueError, match="--tokenizer_chat_template"):
        PromptTemplate(tokenizer=plain, apply_chat_template=True)


# ----- SFT ------------------------------------------------------------------------------------
def test_sft_loss_mask_is_exactly_the_response_with_input_template(tmp_path, tok):
    path = write(tmp_path / "sft.jsonl", ROWS)
    dataset = SFTDataset.from_config(config(path, input_template="User: {}\nAssistant: "), tok)
    assert len(dataset) == len(ROWS)
    for sample, row in zip(dataset, ROWS):
        assert masked_text(tok, sample) == row["output"] + "</s>"
        assert unmasked_text(tok, sample) == f"User: {row['input']}\nAssistant: "
        assert sample["loss_mask"] == sorted(sample["loss_mask"])  # prompt zeros, then response ones


def test_sft_loss_mask_with_chat_template_and_conversations(tmp_path, tok):
    rows = [
        {"input": "What is 1+1?", "output": "2"},
        {"input": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                   {"role": "user", "content": "bye"}, {"role": "assistant", "content": "see you"}]},
    ]
    dataset = SFTDataset.from_config(config(write(tmp_path / "chat.jsonl", rows), apply_chat_template=True), tok)
    first, second = dataset[0], dataset[1]
    assert unmasked_text(tok, first) == CHAT_PROMPT.format("What is 1+1?")
    assert masked_text(tok, first) == "2<|im_end|></s>"
    # Only the last assistant turn is the response; earlier turns are prompt.
    assert unmasked_text(tok, second) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n" + CHAT_PROMPT.format("bye"))
    assert masked_text(tok, second) == "see you<|im_end|></s>"


def test_bos_and_eos_appear_once():
    tok = bos_tokenizer()
    rows = [{"input": "hi", "output": "yo</s>"}, {"input": "hey", "output": "ok"}]
    with_bos = "<s>{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
               "{% if add_generation_prompt %}assistant: {% endif %}"
    for cfg in (DataConfig(dataset="x"), DataConfig(dataset="x", apply_chat_template=True,
                                                    tokenizer_chat_template=with_bos)):
        for sample in SFTDataset(rows, tok, cfg):
            ids = sample["input_ids"]
            assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
            assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1


def test_pretrain_mode_trains_on_every_token(tmp_path, tok):
    rows = [{"text": "The sun is hot."}, {"text": "Two plus two is four."}]
    path = write(tmp_path / "p.jsonl", rows)
    dataset = SFTDataset.from_config(config(path, input_key="text", pretrain_mode=True), tok)
    for sample, row in zip(dataset, rows):
        assert all(sample["loss_mask"]) and tok.decode(sample["input_ids"]) == row["text"] + "</s>"


def test_truncation_keeps_the_prompt_and_ends_in_eos(tok):
    rows = [{"input": "Q: 1", "output": "one two three four five six seven eight nine ten " * 5},
            {"input": "a long prompt " * 20, "output": "x"}]
    with pytest.warns(DataWarning, match="dropped 1 of 2 rows.*--max_len"):
        dataset = SFTDataset(rows, tok, DataConfig(dataset="x", max_len=16))
    (sample,) = list(dataset)
    assert len(sample["input_ids"]) == 16 and sample["input_ids"][-1] == tok.eos_token_id
    assert unmasked_text(tok, sample) == "Q: 1" and dataset.num_truncated == 1 and dataset.num_too_long == 1
    pretrain = SFTDataset(rows, tok, DataConfig(dataset="x", max_len=16, pretrain_mode=True))
    short, long = pretrain[0], pretrain[1]  # pretrain mode reads --input_key only
    assert tok.decode(short["input_ids"]) == "Q: 1</s>"
    assert len(long["input_ids"]) == 16 and long["input_ids"][-1] != tok.eos_token_id  # a cut document did not end


BAD_SFT_ROWS = [
    ({"input": "q"}, "'output'", "missing"),
    ({"input": "q", "output": 7}, "'output'", "expected a string, got int"),
    ({"input": "", "output": "a"}, "'input'", "is empty"),
    ({"input": "q", "output": "\n"}, "'output'", "is empty"),
    ({"input": [{"role": "user", "content": "q"}], "output": "a"}, "'input'", "--apply_chat_template"),
]


@pytest.mark.parametrize("bad_row, key, reason", BAD_SFT_ROWS)
def test_malformed_sft_row_names_file_row_and_key(tmp_path, tok, bad_row, key, reason):
    path = write(tmp_path / "bad.jsonl", ROWS[:2] + [bad_row] + ROWS[2:])
    with pytest.raises(DataError) as error:
        SFTDataset.from_config(config(path), tok)
    message = str(error.value)
    assert path in message and "row 2" in message and key in message and reason in message, message


def test_skip_bad_rows_counts_and_warns(tmp_path, tok):
    path = write(tmp_path / "bad.jsonl", [ROWS[0], {"input": "q"}, ROWS[1], {"output": "a"}, ROWS[2]])
    with pytest.warns(DataWarning, match=r"skipped 2 of 5 rows.*bad\.jsonl, row 1, key 'output'"):
        dataset = SFTDataset.from_config(config(path, skip_bad_rows=True), tok)
    assert len(dataset) == 3 and dataset.num_skipped == 2


def test_skip_bad_rows_skips_lines_that_are_not_json(tmp_path, tok):
    lines = [json.dumps(ROWS[0]), '{"input": "q", "output": oops}', json.dumps(ROWS[1]), "not json at all",
             json.dumps({"input": "q"}), json.dumps(ROWS[2])]
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    path = str(tmp_path / "mixed.jsonl")
    with pytest.raises(DataError, match=r"mixed\.jsonl: line 2 is not valid JSON.*2 such lines"):
        SFTDataset.from_config(config(path), tok)
    with pytest.warns(DataWarning) as caught:
        dataset = SFTDataset.from_config(config(path, skip_bad_rows=True), tok)
    messages = [str(w.message) for w in caught]
    assert any("skipped 2 of 6 lines that are not valid JSON" in m and "line 2" in m for m in messages), messages
    # The malformed row (no output) is named by its line in the file, and counted with the two lines.
    assert any("skipped 3 of 6 rows" in m and "mixed.jsonl, row 4, key 'output'" in m for m in messages), messages
    assert dataset.num_skipped == 3
    assert [s["input_ids"] for s in dataset] == [s["input_ids"] for s in SFTDataset.from_config(
        config(write(tmp_path / "good.jsonl", ROWS[:3])), tok)]


def test_from_config_with_a_saved_tokenizer(tmp_path, tok):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    path = write(tmp_path / "sft.parquet", ROWS)
    ours = SFTDataset.from_config(config(path, apply_chat_template=True), loaded)
    reference = SFTDataset.from_config(config(path, apply_chat_template=True), tok)
    assert list(ours) == list(reference)


# ----- preference, KTO, prompts, PRM ---------------------------------------------------------
PAIRS = [{"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 1.5},
         {"prompt": "Capital?", "chosen": "Paris", "rejected": "Rome", "margin": 0.5}]


def test_preference_pairs_share_the_prompt(tmp_path, tok):
    path = write(tmp_path / "pairs.jsonl", PAIRS)
    dataset = PreferenceDataset.from_config(config(path, prompt_key="prompt", apply_chat_template=True), tok)
    for sample, row in zip(dataset, PAIRS):
        n = sample["prompt_len"]
        assert sample["chosen_ids"][:n] == sample["rejected_ids"][:n]
        assert tok.decode(sample["chosen_ids"][:n]) == CHAT_PROMPT.format(row["prompt"])
        assert tok.decode(sample["chosen_ids"][n:]) == row["chosen"] + "<|im_end|></s>"
        assert tok.decode(sample["rejected_ids"][n:]) == row["rejected"] + "<|im_end|></s>"
        assert sample["margin"] == row["margin"]
    batch = preference_collate(list(dataset), tok.pad_token_id, pad_to_multiple_of=4)
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] % 4 == 0
    assert batch["margin"].tolist() == [1.5, 0.5]
    chosen_targets = batch["labels"][0][batch["loss_mask"][0].bool()].tolist()
    assert tok.decode(chosen_targets) == "4<|im_end|></s>"


def test_preference_conversations_without_prompt_key(tok):
    def chat(answer):
        return [{"role": "user", "content": "hi"}, {"role": "assistant", "content": answer}]

    rows = [{"chosen": chat("hello"), "rejected": chat("go away")}]
    (sample,) = list(PreferenceDataset(rows, tok, DataConfig(dataset="x", apply_chat_template=True)))
    assert tok.decode(sample["chosen_ids"][: sample["prompt_len"]]) == CHAT_PROMPT.format("hi")
    assert sample["margin"] == 0.0
    rows = [{"chosen": chat("hello"), "rejected": [{"role": "user", "content": "other"}] + chat("x")[1:]}]
    with pytest.raises(DataError, match="differs from the chosen one before its last turn"):
        PreferenceDataset(rows, tok, DataConfig(dataset="x", apply_chat_template=True))


@pytest.mark.parametrize("bad_row, key, reason", [
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "'rejected'", "identical"),
    ({"prompt": "p", "chosen": "a"}, "'rejected'", "missing"),
    ({"prompt": "p", "rejected": "a"}, "'chosen'", "missing"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "'margin'", "expected a number"),
])
def test_bad_preference_rows_are_reported(tmp_path, tok, bad_row, key, reason):
    path = write(tmp_path / "pairs.jsonl", PAIRS + [bad_row])
    with pytest.raises(DataError) as error:
        PreferenceDataset.from_config(config(path, prompt_key="prompt"), tok)
    message = str(error.value)
    assert path in message and "row 2" in message and key in message and reason in message, message
    with pytest.warns(DataWarning, match="skipped 1 of 3"):
        assert len(PreferenceDataset.from_config(config(path, prompt_key="prompt", skip_bad_rows=True), tok)) == 2


def test_unpaired_preference_labels(tok):
    rows = [{"input": "q1", "output": "good", "label": True}, {"input": "q2", "output": "bad", "label": 0}]
    cfg = DataConfig(dataset="x", label_key="label", input_template="Q: {}\nA: ")
    samples = list(UnpairedPreferenceDataset(rows, tok, cfg))
    assert [s["label"] for s in samples] == [True, False]
    assert tok.decode(samples[0]["input_ids"][: samples[0]["prompt_len"]]) == "Q: q1\nA: "
    assert masked_text(tok, samples[1]) == "bad</s>"
    with pytest.raises(DataError, match=r"row 0, key 'label': expected a boolean label"):
        UnpairedPreferenceDataset([{"input": "q", "output": "a", "label": "yes"}], tok, cfg)
    with pytest.raises(ValueError, match="--label_key"):
        UnpairedPreferenceDataset(rows, tok, DataConfig(dataset="x"))


def test_prompt_dataset_for_rl(tmp_path, tok):
    rows = [{"q": "12+7=", "answer": "19"},
            {"q": [{"role": "system", "content": "Add."}, {"role": "user", "content": "1+1="}], "answer": "2"},
            {"q": "word " * 100, "answer": "0"}]
    path = write(tmp_path / "prompts.jsonl", rows)
    cfg = config(path, input_key="q", label_key="answer", apply_chat_template=True, prompt_max_len=40)
    with pytest.warns(DataWarning, match="dropped 1 of 3 rows.*--prompt_max_len"):
        dataset = PromptDataset.from_config(cfg, tok)
    assert len(dataset) == 2
    first, second = dataset[0], dataset[1]
    assert first["prompt"] == CHAT_PROMPT.format("12+7=") and tok.decode(first["prompt_ids"]) == first["prompt"]
    assert (first["raw_prompt"], first["label"], first["datasource"]) == ("12+7=", "19", "default")
    assert second["raw_prompt"] == "1+1=" and second["prompt"].startswith("<|im_start|>system\nAdd.")
    plain = PromptDataset([{"input": "hi"}], tok, DataConfig(dataset="x", input_template="User: {}\nAssistant: "))
    assert plain[0]["prompt"] == "User: hi\nAssistant: " and plain[0]["label"] is None


def test_process_reward_dataset(tok):
    from models.tiny import build_tokenizer

    tok = build_tokenizer()
    tok.add_tokens(["<step>"], special_tokens=True)
    step = tok.convert_tokens_to_ids("<step>")
    cfg = DataConfig(dataset="x", label_key="labels")
    rows = [{"input": ["Add 1 and 2.", " It is 3."], "labels": ["+", "-"]},
            {"input": "First <step> then <step>", "labels": [1.0, 0.0]}]
    first, second = ProcessRewardDataset(rows, tok, cfg, placeholder_token="<step>", reward_tokens=["+", "-"])
    assert tok.decode(first["input_ids"]) == "Add 1 and 2.<step> It is 3.<step>"
    assert [first["input_ids"][p] for p in first["step_positions"]] == [step, step]
    assert first["step_labels"] == [tok.convert_tokens_to_ids("+"), tok.convert_tokens_to_ids("-")]
    assert len(second["step_positions"]) == 2 and second["step_labels"] == [1.0, 0.0]
    # Cut by --max_len: the second step's placeholder is gone, and so is its label.
    (cut,) = ProcessRewardDataset(rows[:1], tok, DataConfig(dataset="x", label_key="labels",
                                                              max_len=first["step_positions"][0] + 2),
                                  placeholder_token="<step>")
    assert len(cut["step_positions"]) == 1 and len(cut["step_labels"]) == 1
    with pytest.raises(DataError, match=r"row 0, key 'labels': expected a list of 2 labels"):
        ProcessRewardDataset([{"input": ["a", "b"], "labels": ["+"]}], tok, cfg, placeholder_token="<step>")
    with pytest.raises(ValueError, match="--placeholder_token"):
        ProcessRewardDataset(rows, tok, cfg, placeholder_token="two words")


# ----- collation and packing -----------------------------------------------------------------
def synthetic_samples(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    samples = []
    for index in range(count):
        length = rng.randint(2, 24)
        prompt = rng.randint(1, length - 1)
        ids = [rng.randint(3, 499) for _ in range(length)]
        samples.append({"id": index, "input_ids": ids, "loss_mask": [0] * prompt + [1] * (length - prompt)})
    return samples


def test_pad_collate_shifts_labels_and_mask():
    samples = [{"input_ids": [5, 6, 7, 8], "loss_mask": [0, 0, 1, 1]}, {"input_ids": [9, 10], "loss_mask": [0, 1]}]
    batch = pad_collate(samples, 0, pad_to_multiple_of=8)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 0, 0, 0, 0], [9, 10, 0, 0, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[6, 7, 8, 0, 0, 0, 0, 0], [10, 0, 0, 0, 0, 0, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [list(range(8))] * 2
    assert batch["loss_mask"].dtype == torch.float32 and batch["labels"].dtype == torch.long


def test_pack_samples_first_fit_never_splits_a_sample():
    samples = synthetic_samples(40)
    packs = pack_samples(samples, max_len=48)
    assert sorted(s["id"] for pack in packs for s in pack) == list(range(40))  # each sample whole, once
    assert all(sum(len(s["input_ids"]) for s in pack) <= 48 for pack in packs)
    total = sum(len(s["input_ids"]) for s in samples)
    assert len(packs) <= -(-total // 48) + 2  # first-fit decreasing is near the bound
    assert [[s["id"] for s in p] for p in packs] == [[s["id"] for s in p] for p in pack_samples(samples, 48)]
    with pytest.raises(ValueError, match="--max_len"):
        pack_samples(samples, max_len=10)


def test_packed_collate_boundaries_positions_and_labels():
    pack = [{"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]}, {"input_ids": [8, 9], "loss_mask": [0, 1]}]
    batch = packed_collate(pack, pad_id=0, pad_to_multiple_of=4)
    assert batch["cu_seqlens"].tolist() == [0, 3, 5] and batch["cu_seqlens"].dtype == torch.int32
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert batch["position_ids"][0, :5].tolist() == [0, 1, 2, 0, 1]
    # Position 2 (last of sample 0) must not learn token 8 (first of sample 1).
    assert batch["labels"].tolist()[0][:5] == [6, 7, 0, 9, 0]
    assert batch["loss_mask"].tolist() == [[1, 1, 0, 1, 0, 0, 0, 0]]


def test_packed_and_padded_train_on_the_same_token_label_pairs():
    samples = synthetic_samples(30, seed=1)
    padded = pad_collate(samples, 0, pad_to_multiple_of=2)
    expected = set()
    for row, sample in enumerate(samples):
        for t in torch.nonzero(padded["loss_mask"][row]).flatten().tolist():
            expected.add((sample["id"], t, int(padded["input_ids"][row, t]), int(padded["labels"][row, t])))
    found = set()
    for pack in pack_samples(samples, max_len=64):
        batch = packed_collate(pack, pad_id=0, pad_to_multiple_of=4)
        bounds = batch["cu_seqlens"].tolist()
        assert batch["input_ids"].shape[1] % 4 == 0 and bounds[-1] <= batch["input_ids"].shape[1]
        for sample, start, end in zip(pack, bounds[:-1], bounds[1:]):
            assert batch["position_ids"][0, start:end].tolist() == list(range(end - start))
            assert batch["loss_mask"][0, end - 1] == 0  # the label there would cross into the next sample
            for t in range(start, end):
                if batch["loss_mask"][0, t]:
                    assert int(batch["labels"][0, t]) == sample["input_ids"][t - start + 1]
                    found.add((sample["id"], t - start, int(batch["input_ids"][0, t]), int(batch["labels"][0, t])))
    assert found == expected and len(expected) == sum(sum(s["loss_mask"][1:]) for s in samples)


# ----- data-parallel sharding and resume -----------------------------------------------------
def test_sharding_is_disjoint_and_complete():
    num_samples, mbs, dp = 103, 4, 3
    shares = [list(shard_indices(num_samples, micro_batch_size=mbs, dp_rank=r, dp_size=dp, seed=5, epoch=2))
              for r in range(dp)]
    assert len({len(share) for share in shares}) == 1  # every rank runs the same number of micro-batches
    flat = [i for share in shares for batch in share for i in batch]
    assert len(flat) == len(set(flat)) == 96  # 8 global steps of 12; the short remainder is dropped
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(7)).tolist()
    assert Counter(flat) == Counter(order[:96])
    assert shares[1][0] == order[4:8]  # rank 1 takes the second slice of the first step
    other_epoch = list(shard_indices(num_samples, micro_batch_size=mbs, dp_rank=0, dp_size=dp, seed=5, epoch=3))
    assert other_epoch != shares[0]


def test_resume_from_consumed_samples_continues_the_sequence():
    dataset = [{"x": i} for i in range(50)]
    kwargs = dict(micro_batch_size=2, dp_size=2, seed=1, epoch=0)
    full = [list(iterate_batches(dataset, dp_rank=r, **kwargs)) for r in range(2)]
    resumed = [list(iterate_batches(dataset, dp_rank=r, start_index=3 * 4, **kwargs)) for r in range(2)]
    assert resumed == [share[3:] for share in full]

    def global_sequence(dp_size, mbs, start):
        shares = [list(shard_indices(50, micro_batch_size=mbs, dp_rank=r, dp_size=dp_size, seed=1, epoch=0,
                                     start_index=start)) for r in range(dp_size)]
        return [i for step in zip(*shares) for batch in step for i in batch]

    # A resume under another data-parallel size still continues the same global order.
    assert global_sequence(1, 4, 12)[:24] == global_sequence(2, 2, 0)[12:36]
    with pytest.raises(ValueError, match="start_index"):
        shard_indices(50, micro_batch_size=2, dp_rank=0, dp_size=2, seed=1, epoch=0, start_index=51)
    with pytest.raises(ValueError, match="dp_rank"):
        shard_indices(50, micro_batch_size=2, dp_rank=2, dp_size=2, seed=1, epoch=0)


def test_rows_from_list_report_memory_origin():
    rows = Rows.from_list([{"a": 1}, {"a": 2}]).take([1, 0, 1])
    assert [r["a"] for r in rows] == [2, 1, 2] and rows.origin(0) == ("<memory>", 1)


def _runs(tok, sample, *, trained: bool) -> list[str]:
    """The decoded runs of consecutive tokens that are (or are not) trained on."""
    runs, current = [], []
    for token, mask in zip(sample["input_ids"], sample["loss_mask"]):
        if bool(mask) == trained:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return [tok.decode(run) for run in runs + ([current] if current else [])]


def test_multiturn_trains_every_assistant_turn_as_the_template_renders_them(tmp_path, tok):
    turns = [("user", "hi"), ("assistant", "hello"), ("user", "2+2?"), ("assistant", "4"),
             ("user", "bye"), ("assistant", "see you")]
    messages = [{"role": role, "content": text} for role, text in turns]
    data = write(tmp_path / "multi.jsonl", [{"input": messages}])
    sample = SFTDataset.from_config(config(data, apply_chat_template=True, multiturn=True), tok)[0]
    # The sample is the template's own rendering of the conversation, with eos at the end.
    rendered = tok.apply_chat_template(messages, tokenize=False).rstrip("\n")
    assert tok.decode(sample["input_ids"]) == rendered + "</s>"
    # Its trained runs are the assistant turns, cut as the template renders them (a direct rendering of each
    # prefix), the last one ending in eos; everything else (user turns, markup) is not trained on.
    expected = []
    for index, (role, _) in enumerate(turns):
        if role == "assistant":
            prompt = tok.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
            expected.append(tok.apply_chat_template(messages[:index + 1], tokenize=False)[len(prompt):].rstrip("\n"))
    expected[-1] += "</s>"
    assert _runs(tok, sample, trained=True) == expected == ["hello<|im_end|>", "4<|im_end|>", "see you<|im_end|></s>"]
    assert _runs(tok, sample, trained=False)[1] == "\n" + CHAT_PROMPT.format("2+2?")
    # Without --multiturn the same row trains its last turn only.
    single = SFTDataset.from_config(config(data, apply_chat_template=True), tok)[0]
    assert _runs(tok, single, trained=True) == ["see you<|im_end|></s>"]
    # Cut to --max_len like a single-turn sample: the kept turns stay as they were, the last token is eos.
    full_length = len(sample["input_ids"])
    cut = SFTDataset.from_config(config(data, apply_chat_template=True, multiturn=True, max_len=full_length - 5), tok)[0]
    assert len(cut["input_ids"]) == full_length - 5 and cut["input_ids"][-1] == tok.eos_token_id
    assert cut["loss_mask"][:-1] == sample["loss_mask"][:full_length - 6] and cut["loss_mask"][-1] == 1
    with pytest.raises(ValueError, match="--multiturn .* needs --apply_chat_template"):
        config(data, multiturn=True)


def test_packed_pairs_keep_every_sequence_and_mark_its_last_token():
    from engine.data.collate import preference_collate
    from engine.data.packing import preference_packed_collate

    pairs = [{"chosen_ids": [1, 5, 6, 7], "rejected_ids": [1, 5, 8], "prompt_len": 2, "margin": 0.5},
             {"chosen_ids": [1, 9, 10], "rejected_ids": [1, 9, 11, 12, 13], "prompt_len": 2}]
    packed = preference_packed_collate(pairs, 0, pad_to_multiple_of=4)
    padded = preference_collate(pairs, 0)
    assert packed["input_ids"].shape == (1, 16) and int(packed["num_sequences"]) == 4  # 15 tokens, padded to 16
    assert packed["sequence_index"][0].tolist() == [0] * 4 + [1] * 3 + [2] * 3 + [3] * 5 + [4]
    assert packed["last_token"][0].nonzero()[:, 0].tolist() == [3, 6, 9, 14]
    for row in range(4):  # each sequence's tokens, labels and loss mask are its padded row's
        where = packed["sequence_index"][0] == row
        width = int(where.sum())
        for key in ("input_ids", "labels", "loss_mask"):
            assert packed[key][0][where].tolist() == padded[key][row][:width].tolist(), (key, row)
    assert packed["margin"].tolist() == [0.5, 0.0] and packed["pair_mask"].tolist() == [1.0, 1.0]
