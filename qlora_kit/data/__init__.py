"""Training data: records -> shape check and render -> tokens and loss mask (cached) -> split -> packing -> batches.

pipeline.py    the public entry: build (split, pack), examples, load_records, check, collate, BatchStream
sources.py     data.path -> records: JSON/JSONL streamed here; parquet, csv, arrow, hub names through datasets
formats.py     text/alpaca/chat/sharegpt/completion: validate a record, render it with the spans that take loss
chat.py        chat records: content parts, tool calls and results, tools, per-turn weights; template + spans
preview.py     `qlora-kit data`: examples with loss tokens marked, counts, lengths, row fill (from build)
tokens.py      tokenize once: offsets -> label mask, flat int32 ids + bool mask, cached as safetensors
packing.py     best-fit packing plan; packed rows carry position ids restarting per document
pydoc_text.py  offline held-out English text from pydoc_data.topics

May import: the root modules and model/ (a tokenizer for the held-out text). Imported by train/, infer/, export/.
"""
