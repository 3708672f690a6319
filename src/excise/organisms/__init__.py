"""Model organisms built here: the planted-bias LM and the arithmetic model (tokenizer, architecture, pretraining)."""
