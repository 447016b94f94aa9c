"""Stage 1 input: a recipe (one TOML file in compile/) — the schema, the instance catalog, the LMI import."""
