"""`memtrain compare`: strategy combinations × sizes, each cell in its own process, as CSV/JSON/Markdown/PNG."""
