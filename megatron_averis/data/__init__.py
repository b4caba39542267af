"""Data pipeline: tokenizers, preprocessing into megatron-core indexed
datasets, the embedded public-domain corpus and the experiment corpus.

Entry points (imported from their modules, so that importing this package
stays cheap):

- ``tokenizer.build_tokenizer(model_path)`` -> megatron-core tokenizer
  (``SentencePieceTokenizer`` / ``HuggingFaceTokenizer``)
- ``tokenizer_training.train_sentencepiece(inputs, output_model, ...)``
- ``indexed.preprocess_files(inputs, output_prefix, tokenizer_model, ...)``
- ``embedded.prepare_embedded_corpus(out_dir)`` -> tokenizer + train/valid prefixes
- ``experiment.build_experiment_corpus(out_dir, ...)``

See docs/data.md.
"""
