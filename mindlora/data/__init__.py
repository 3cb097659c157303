"""mindlora.data: raw instruction data -> Megatron indexed datasets -> training batches.

Modules (one direction of flow):
    records     input files (.json/.jsonl/.parquet) and field validation, with locations
    templates   chat templates from configs/finetune/templates.json
    tokenizer   load_tokenizer(path): HF folder, sentencepiece .model, tiktoken file
    handlers    --handler-name classes: record -> ids + labels (batch tokenisation)
    packing     over-length policy and greedy packing
    indexed     Megatron .bin/.idx writer and memory-mapped reader
    meta        <prefix>_meta.json: tokenizer identity beside the data
    preprocess  the tools/preprocess_data.py run (workers, atomic outputs, summary)
    dataset     InstructionDataset, BlendedDataset, split_dataset, collate (torch)
    toy         a tiny trained tokenizer with Qwen-style chat templates for tests and benches
"""
