"""A team's own package for unlearning-worker: the UCI Adult census rows (32,561 people) as a
Parquet file with a column mapping, and a network of the team's own (embeddings for the
categorical columns, an MLP on top), registered as the `adult-tabular` network."""
